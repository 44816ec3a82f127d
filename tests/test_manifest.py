"""The run manifest: strict parsing, stable identity, clear errors."""

import pytest

from protocol.errors import ManifestError
from protocol.manifest import Manifest


def test_round_trip_through_toml_keeps_identity():
    m = Manifest().replace(run__id="demo", inner__steps=7, validators__keys=("ab" * 32,))
    again = Manifest.from_bytes(m.to_toml().encode())
    assert again == m
    assert again.digest == m.digest
    assert again.run_key.startswith("demo@")


def test_any_change_changes_the_run_identity():
    m = Manifest()
    assert m.replace(codec__topk=32).digest != m.digest
    assert m.replace(run__seed=m.run.seed + 1).run_key != m.run_key


def test_comments_and_key_order_do_not_change_identity():
    a = Manifest.from_bytes(b"[inner]\nsteps = 9\nlr = 0.001\n")
    b = Manifest.from_bytes(b"# hello\n[inner]\nlr = 0.001  # peak\nsteps = 9\n")
    assert a.digest == b.digest


@pytest.mark.parametrize(
    "text, fragment",
    [
        (b"[inner]\nsteps = 'ten'\n", "must be an integer"),
        (b"[inner]\nsteps = true\n", "must be an integer"),
        (b"[codec]\ntopk = 0\n", "codec.topk"),
        (b"[codec]\ntile = 32\n", "squared must equal"),
        (b"[outer]\nrule = 'median'\n", "outer.rule"),
        (b"[bogus]\nx = 1\n", "unknown manifest table"),
        (b"[run]\ncolour = 'red'\n", "unknown key 'colour'"),
        (b"[run]\nid = 'has space'\n", "run.id"),
        (b"not toml at all ===", "not valid TOML"),
    ],
)
def test_bad_manifest_is_refused_with_a_reason(text, fragment):
    with pytest.raises(ManifestError, match=fragment):
        Manifest.from_bytes(text)


def test_int_is_accepted_where_a_float_is_declared():
    assert Manifest.from_bytes(b"[outer]\nlr = 1\n").outer.lr == 1.0
