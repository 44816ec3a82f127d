"""Every attack of docs/security.md, against real peer processes (``Fault``, as hivemind lists
faults): one named test per attack.

Four networks run once per session (module fixtures), each on a file store, with the tiny
preset: a private run (three listed peers decide windows) and a public one (a validator
decides; two peers are listed, a third earns its way in), each once clean and once under
an attacker process (``locoswarm.attack``) holding only fresh keys and write access to the
store. Every attack test checks that its attack really happened (the attacker's report),
that the defence held in the way that attack needs, and what every attack must leave
intact: no honest process exits, honest replicas end bit-identical, the run reaches its
last window, and the held-out loss ends within 2% of the same run without the attacker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from locoswarm.attack import COPY_SYBILS, FLOOD_SYBILS, NORM_SYBILS, Fault
from node.accounting import Accounting
from node.follow import DecisionReader
from protocol.consensus import Decision
from protocol.identity import Identity
from protocol.manifest import Manifest
from protocol.stores import open_store
from tests.network import (
    REPO,
    PeerProcess,
    create_run,
    heldout_curve,
    peer_keys,
    small_manifest,
)

pytestmark = pytest.mark.slow

WINDOWS = 7
PRIVATE_FAULTS = [
    Fault.FORGED_DECISIONS, Fault.EMPTY_DECISIONS, Fault.RANDOM_BASE, Fault.FUTURE_CLOSE, Fault.FLIP_RECORDS,
    Fault.VOTE_SQUAT, Fault.FORGED_CHECKPOINT, Fault.JUNK_CHECKPOINTS, Fault.NESTED_KEY, Fault.JUNK_PAYLOAD_KEYS,
    Fault.HUGE_OBJECTS, Fault.HUGE_HEADER, Fault.DUPLICATE_KEYS, Fault.SYBIL_FLOOD, Fault.DECISION_REPLAY,
    Fault.BLOB_POISON, Fault.LISTING_FLOOD, Fault.ANNOUNCE_HIJACK,
]
PUBLIC_FAULTS = [
    Fault.SYBIL_NORM, Fault.SYBIL_COPIES, Fault.TRICKLE_URL, Fault.REDIRECT_URL, Fault.JUNK_SCORES,
    Fault.BACKDATED_CLOSE,
]


@dataclass
class Outcome:
    """What one network did."""

    root: Path
    manifest: Manifest
    peers: list[PeerProcess]
    codes: list[int]
    decisions: list[Decision]
    report: dict
    late: PeerProcess | None = None

    @property
    def digests(self) -> set[str]:
        return {p.progress["digest"] for p in self.peers + ([self.late] if self.late else [])}

    def final_loss(self) -> float:
        return heldout_curve(self.peers[0])[-1]

    def counted(self) -> set[str]:
        return {p for d in self.decisions for p in d.peers}

    def bytes_down(self) -> float:
        """Bytes the first peer downloaded per window."""
        return self.peers[0].progress["accounting"]["bytes_down"] / WINDOWS


def _network(root: Path, *, public: bool, faults: list[Fault]) -> Outcome:
    names = ["h0", "h1", "h2"]
    validator_key = Identity.from_seed(b"attack-suite validator")
    if public:  # the validator decides; h0 and h1 are vouched for, h2 must earn its way in
        manifest = small_manifest(run__peers=peer_keys("h0", "h1"), validators__keys=(validator_key.public_key.hex(),),
                                  validators__score_lag=1, run__announce_private=True,
                                  run__announce_hosts=("127.0.0.1",), run__keep_windows=20)
    else:
        manifest = small_manifest(run__peers=peer_keys(*names), run__keep_windows=20)  # every decision stays readable
    run = create_run(root, manifest)
    procs: list[subprocess.Popen] = []
    if public:
        vdir = root / "validator"
        vdir.mkdir(parents=True)
        validator_key.save(vdir / "validator.key")
        procs.append(_spawn([sys.executable, "-m", "locoswarm.cli", "validator", "--store", run.uri, "--manifest",
                             str(run.manifest_path), "--workdir", str(vdir), "--windows", str(WINDOWS),
                             "--threads", "1"], vdir / "log.txt"))
    if faults:
        procs.append(_spawn([sys.executable, "-m", "locoswarm.attack", "--store", run.uri, "--workdir",
                             str(root / "attacker"), "--windows", str(WINDOWS),
                             "--faults", ",".join(f.name.lower() for f in faults)], root / "attacker.log"))
    peers = [PeerProcess(root, name, run.manifest_path, run.uri, windows=WINDOWS) for name in names]
    try:
        codes = [p.wait(timeout=900) for p in peers]
        late = None
        if not public:  # someone joining after the attack: it must adopt only a certified checkpoint
            late = PeerProcess(root, "late", run.manifest_path, run.uri, windows=WINDOWS)
            codes.append(late.wait(timeout=300))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        PeerProcess.kill_all()
    store = open_store(run.uri)
    reader = DecisionReader(store, run.manifest, Accounting())
    decisions = [d for w in range(WINDOWS) if (d := reader.read(w)) is not None]
    report_path = root / "attacker" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return Outcome(root, run.manifest, peers, codes, decisions, report, late)


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


@pytest.fixture(scope="module")
def private_clean(tmp_path_factory) -> Outcome:
    return _network(tmp_path_factory.mktemp("private-clean"), public=False, faults=[])


@pytest.fixture(scope="module")
def private_attacked(tmp_path_factory) -> Outcome:
    return _network(tmp_path_factory.mktemp("private-attacked"), public=False, faults=PRIVATE_FAULTS)


@pytest.fixture(scope="module")
def public_clean(tmp_path_factory) -> Outcome:
    return _network(tmp_path_factory.mktemp("public-clean"), public=True, faults=[])


@pytest.fixture(scope="module")
def public_attacked(tmp_path_factory) -> Outcome:
    return _network(tmp_path_factory.mktemp("public-attacked"), public=True, faults=PUBLIC_FAULTS)


def _honest_run_held(attacked: Outcome, clean: Outcome, fault: Fault) -> None:
    """What every attack must leave intact (and that the attack really happened)."""
    assert attacked.report.get(fault.name, 0) + attacked.report.get(f"{fault.name}_refused", 0) > 0, \
        f"{fault.name} did nothing: {attacked.report}"
    logs = "\n".join(p.log()[-3000:] for p in attacked.peers)
    assert all(code == 0 for code in attacked.codes), f"an honest process exited with {attacked.codes}:\n{logs}"
    assert len(attacked.digests) == 1, "honest replicas diverged"
    assert all(p.progress["window"] == WINDOWS for p in attacked.peers), "the run did not reach its last window"
    assert [d.window for d in attacked.decisions] == list(range(WINDOWS))
    assert attacked.final_loss() <= clean.final_loss() * 1.02, (attacked.final_loss(), clean.final_loss())
    strangers = set(attacked.report["ids"]["sybils"]) | {attacked.report["ids"]["attacker"]}
    assert not attacked.counted() & strangers, "a stranger's payload was counted"


# ---------------------------------------------------------------------------- decisions


def test_forged_decisions_signed_by_a_stranger_decide_nothing(private_attacked, private_clean):
    _honest_run_held(private_attacked, private_clean, Fault.FORGED_DECISIONS)
    closers = set(private_attacked.manifest.closers)
    assert all(d.signers <= closers for d in private_attacked.decisions)


def test_empty_decisions_do_not_freeze_the_model(private_attacked, private_clean):
    _honest_run_held(private_attacked, private_clean, Fault.EMPTY_DECISIONS)
    assert all(len(d.included) == 3 for d in private_attacked.decisions[1:])


def test_a_decision_on_a_random_base_stops_nobody(private_attacked, private_clean):
    _honest_run_held(private_attacked, private_clean, Fault.RANDOM_BASE)


def test_a_close_time_far_in_the_future_and_a_ghost_peer_are_not_believed(private_attacked, private_clean):
    _honest_run_held(private_attacked, private_clean, Fault.FUTURE_CLOSE)
    assert all(d.closed_at < 1e11 for d in private_attacked.decisions)
    assert "f" * 24 not in private_attacked.counted()


def test_a_backdated_close_does_not_make_honest_payloads_late(public_attacked, public_clean):
    _honest_run_held(public_attacked, public_clean, Fault.BACKDATED_CLOSE)
    h2 = Identity.from_seed(b"locoswarm test peer h2").peer_id
    assert h2 in public_attacked.counted(), "the validator judged the newcomer's on-time payloads late"


def test_honest_records_overwritten_back_and_forth_never_split_the_replicas(private_attacked, private_clean):
    _honest_run_held(private_attacked, private_clean, Fault.FLIP_RECORDS)
    assert private_attacked.report[Fault.FLIP_RECORDS.name] > 0


def test_garbage_written_first_under_honest_vote_keys_is_replaced(private_attacked, private_clean):
    _honest_run_held(private_attacked, private_clean, Fault.VOTE_SQUAT)


def test_a_previous_decision_replayed_under_this_window_is_refused(private_attacked, private_clean):
    _honest_run_held(private_attacked, private_clean, Fault.DECISION_REPLAY)


# ---------------------------------------------------------------------------- checkpoints


def test_a_forged_checkpoint_is_never_adopted(private_attacked, private_clean):
    _honest_run_held(private_attacked, private_clean, Fault.FORGED_CHECKPOINT)
    late = private_attacked.late
    assert late is not None and late.progress["origin"]["from"] == "checkpoint"
    assert late.progress["digest"] == private_attacked.peers[0].progress["digest"]


def test_junk_checkpoints_crash_no_joiner(private_attacked, private_clean):
    _honest_run_held(private_attacked, private_clean, Fault.JUNK_CHECKPOINTS)
    assert private_attacked.codes[-1] == 0  # the late joiner


# ---------------------------------------------------------------------------- keys and objects


def test_a_directory_planted_under_a_payload_key_does_not_block_its_owner(private_attacked, private_clean):
    """The store refuses the nested key; planted straight on disk, the owner's write replaces it."""
    _honest_run_held(private_attacked, private_clean, Fault.NESTED_KEY)
    assert private_attacked.report[Fault.NESTED_KEY.name] > 0
    assert all(len(d.included) == 3 for d in private_attacked.decisions[1:])


def test_junk_payload_keys_are_never_parsed_or_counted(private_attacked, private_clean):
    _honest_run_held(private_attacked, private_clean, Fault.JUNK_PAYLOAD_KEYS)


def test_huge_junk_objects_are_never_downloaded(private_attacked, private_clean):
    _honest_run_held(private_attacked, private_clean, Fault.HUGE_OBJECTS)
    assert private_attacked.bytes_down() < 3 * private_clean.bytes_down(), \
        (private_attacked.bytes_down(), private_clean.bytes_down())


def test_a_payload_with_a_16_mib_header_is_refused_before_it_is_read(private_attacked, private_clean):
    _honest_run_held(private_attacked, private_clean, Fault.HUGE_HEADER)
    assert private_attacked.bytes_down() < 3 * private_clean.bytes_down()


def test_a_payload_repeating_a_header_key_is_refused(private_attacked, private_clean):
    _honest_run_held(private_attacked, private_clean, Fault.DUPLICATE_KEYS)


def test_two_hundred_fresh_keys_publishing_valid_payloads_count_for_nothing(private_attacked, private_clean):
    _honest_run_held(private_attacked, private_clean, Fault.SYBIL_FLOOD)
    assert private_attacked.report[Fault.SYBIL_FLOOD.name] >= FLOOD_SYBILS


def test_poisoned_content_copies_are_detected_by_hash(private_attacked, private_clean):
    _honest_run_held(private_attacked, private_clean, Fault.BLOB_POISON)


def test_a_flood_of_junk_consensus_keys_is_not_read(private_attacked, private_clean):
    _honest_run_held(private_attacked, private_clean, Fault.LISTING_FLOOD)


def test_an_announcement_for_an_honest_peer_signed_by_a_stranger_is_ignored(private_attacked, private_clean):
    _honest_run_held(private_attacked, private_clean, Fault.ANNOUNCE_HIJACK)
    assert all(len(d.included) == 3 for d in private_attacked.decisions[1:])


# ---------------------------------------------------------------------------- Sybils and hosts


def test_sybils_at_25_times_the_norm_neither_count_nor_make_honest_peers_look_tiny(public_attacked, public_clean):
    _honest_run_held(public_attacked, public_clean, Fault.SYBIL_NORM)
    assert public_attacked.report[Fault.SYBIL_NORM.name] >= NORM_SYBILS


def test_copies_with_flipped_signs_and_a_replayed_aggregate_are_not_counted(public_attacked, public_clean):
    _honest_run_held(public_attacked, public_clean, Fault.SYBIL_COPIES)
    assert public_attacked.report[Fault.SYBIL_COPIES.name] >= COPY_SYBILS


def test_a_url_trickling_one_byte_every_10_s_costs_only_its_own_download(public_attacked, public_clean):
    _honest_run_held(public_attacked, public_clean, Fault.TRICKLE_URL)


def test_a_redirect_to_an_internal_address_is_never_followed(public_attacked, public_clean):
    _honest_run_held(public_attacked, public_clean, Fault.REDIRECT_URL)
    assert public_attacked.report["internal_hits"] == 0


def test_junk_scores_and_scores_signed_by_a_stranger_are_ignored(public_attacked, public_clean):
    _honest_run_held(public_attacked, public_clean, Fault.JUNK_SCORES)


def test_the_clean_networks_learn(private_clean, public_clean):
    for clean in (private_clean, public_clean):
        assert all(code == 0 for code in clean.codes) and len(clean.digests) == 1
        curve = heldout_curve(clean.peers[0])
        assert curve[-1] < curve[0]
