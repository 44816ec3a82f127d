"""A validator: re-checks each window's payloads, rates peers, publishes signed scores.

- ``checks.py``    pure checks needing no model: on time, decoder verdicts, empty/huge/NaN
                   norms, copies (``check_window`` runs them all; ``Verdict``)
- ``evaluate.py``  loss before/after one peer's update alone, on its assigned and on
                   unassigned data (``evaluate_payload``, ``Evaluation`` and its score formula)
- ``ratings.py``   OpenSkill Plackett-Luce ratings per window, evidence average, absence
                   decay, weight and inclusion rule, JSON save/load (``Ratings``)
- ``dashboard.py`` ``DashboardState`` (thread-safe) and the ``Dashboard`` web server:
                   leaderboard, loss curve, bytes per window, ``/api/state``, ``/metrics``
- ``service.py``   the main loop: follow the run, score each window, publish, apply

The signed score record format and the rule peers apply to it live in
``protocol/scores.py``, since peers and validators must agree on them; the Prometheus
metric set both roles export is ``node/metrics.py``.
"""
