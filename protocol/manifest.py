"""The run manifest: one TOML file that every peer and validator of a run agrees on.

Each TOML table maps to one frozen dataclass below; every field says its unit and default.
The manifest's identity is the SHA-256 of its canonical JSON form (not of the TOML text,
so comments and formatting do not matter); ``run_key`` binds that hash into every
payload and record, so two peers with different manifests refuse each other's bytes.
Only this module reads TOML or hashes the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.errors import ManifestError, StoreError

COMM_CHOICES = ("none", "loco")
"""Gradient communication between the ranks of one multi-GPU peer."""
EF_RULES = ("sparseloco",)
"""Error-feedback rules; "loco" (a moving average of the compression error) was removed:
LoCo proposed it for dense per-step gradients, not top-k outer payloads."""
OUTER_RULES = ("mean_selected", "mean")
OUTER_CLIPS = ("median", "none")


def check_keys(where: str, keys: tuple[str, ...]) -> None:
    """Every key is a distinct ed25519 public key in lowercase hex (64 characters)."""
    for key in keys:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ManifestError(f"{where}: {key!r} is not an ed25519 public key in lowercase hex (64 characters)")
    if len(set(keys)) != len(keys):
        raise ManifestError(f"{where} lists a key twice")


def check_choice(where: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; else a ``ManifestError`` naming them (the one
    check of every enumerated option, used by the manifest and by node-local overrides)."""
    if value not in choices:
        raise ManifestError(f"{where} must be one of {', '.join(repr(c) for c in choices)}, not {value!r}")
    return value


@dataclass(frozen=True)
class RunConfig:
    id: str = "local"
    """Human name of the run (letters, digits, '-', '_', '.'); with the manifest hash it forms
    ``run_key``. Default "local"."""
    seed: int = 1234
    """Seeds genesis weights, data assignment and the held-out split. Default 1234."""
    genesis: float = 0.0
    """Unix time (seconds) at which window 0 opens: peers that start earlier wait for it
    before training window 0. 0 means "when ``locoswarm init`` runs" (init writes the time).
    Default 0."""
    window_seconds: float = 60.0
    """Seconds a window stays open for payloads after the previous window closed (window 0:
    after genesis) at the most; it closes earlier once every expected peer has published,
    and adaptive deadlines (``deadline_factor``) shorten it to what recent windows took.
    Default 60."""
    deadline_factor: float = 2.0
    """Adaptive deadlines: a window stays open at most this many times the median length of
    the last 5 windows (from their decisions' agreed close times, which every replica reads
    alike), within [``min_window_seconds``, ``window_seconds``]. A dead or stalled peer then
    costs the others one short wait, not ``window_seconds``. 0 turns adaptation off.
    Default 2."""
    min_window_seconds: float = 5.0
    """The shortest deadline adaptation may set, in seconds. Default 5."""
    grace_seconds: float = 2.0
    """Seconds after a window's close during which a validator still counts an upload as on
    time (store clocks and listings lag a little). Default 2."""
    checkpoint_every: int = 5
    """Publish the global weights every this many windows (late joiners start from them).
    Default 5."""
    keep_windows: int = 20
    """Garbage collection: a window's objects are deleted once it is this many windows old
    *and* older than the newest checkpoint, so late joiners can always replay. Default 20."""
    peers: tuple[str, ...] = ()
    """Hex ed25519 public keys of peers the run's operator vouches for. In a run without
    validators (a private run) they are the only peers whose payloads count, and they decide
    what closes each window; in a run with validators they count from the first window,
    without waiting to be scored. Default none."""
    announce_hosts: tuple[str, ...] = ()
    """Host names a peer's announced URL (its own bucket) may point to: exact, or
    ".example.com" for any subdomain; empty = any host. Default none."""
    announce_private: bool = False
    """Let announced URLs point to loopback, private or link-local addresses. Only for local
    networks and tests: on the internet it lets a peer make every reader fetch from the
    reader's own network (cloud metadata services included). Default false."""
    store: str = ""
    """Where joiners reach the run's store: a store URI with the non-secret settings a machine
    needs, e.g. ``s3://bucket/prefix?endpoint=https://ACCOUNT.r2.cloudflarestorage.com&region=auto``
    or ``p2p://run?peers=/ip4/203.0.113.5/tcp/31337/p2p/Qm...``; never a credential (refused).
    ``locoswarm init`` writes the URI it creates the run in unless this is set; store flags of
    ``join`` and ``peer`` win over it. Left out of the run's identity while empty, so
    manifests written before this field existed keep their hash. Default ""."""
    quorum: int = 0
    """Signatures of closers a window's decision needs (the closers are the validators, or
    the listed peers of a private run). 0 = automatic: more than two thirds of the
    validators (safe with fewer than a third of them hostile), or a majority of the listed
    peers of a private run (safe against crashes, not against a peer that equivocates).
    Default 0."""

    def __post_init__(self) -> None:
        if not self.id or not all(c.isalnum() or c in "-_." for c in self.id):
            raise ManifestError(f"run.id {self.id!r} must be non-empty letters, digits, '-', '_' or '.'")
        if self.window_seconds <= 0 or self.grace_seconds < 0 or self.genesis < 0:
            raise ManifestError("run.window_seconds must be > 0, run.grace_seconds and run.genesis >= 0")
        if self.deadline_factor < 0 or not 0 < self.min_window_seconds <= self.window_seconds:
            raise ManifestError("run.deadline_factor must be >= 0 and run.min_window_seconds in (0, window_seconds]")
        if self.checkpoint_every < 1:
            raise ManifestError("run.checkpoint_every must be >= 1")
        if self.keep_windows < self.checkpoint_every:
            raise ManifestError("run.keep_windows must be >= run.checkpoint_every so late joiners can replay")
        check_keys("run.peers", self.peers)
        if self.quorum < 0:
            raise ManifestError("run.quorum must be >= 0 (0 = automatic)")
        if self.store:
            # Imported here: the store package pulls in cryptography, which a manifest without
            # a store never needs.
            from protocol.stores import StoreSettings

            try:
                StoreSettings.parse(self.store)
            except StoreError as exc:
                raise ManifestError(f"run.store: {exc}") from exc


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny"
    """One of ``node.model.PRESETS`` (tiny, 25m, 150m, 1b), or "hf" with ``hf_config``.
    Default "tiny"."""
    hf_config: str = ""
    """Path of a Hugging Face config.json, read when ``preset = "hf"``. Default ""."""
    dtype: str = "float32"
    """Dtype of the global weights; the outer step is always float32. Default "float32"."""


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 2048
    """BPE vocabulary size ``locoswarm init`` trains on the run's corpus. Default 2048."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"
    """"stdlib" (Python's own standard library sources, sorted: on every machine), a local
    text file or folder, token shards (.npy/.bin), "store:<key>" for shards already in the
    store, or a saved HF ``datasets`` directory. Default "stdlib"."""
    max_chars: int = 6_000_000
    """Characters read from text sources at most (keeps init fast). Default 6,000,000."""
    seq_len: int = 128
    """Tokens per training sequence. Default 128."""
    batch_size: int = 8
    """Sequences per inner step per peer. Default 8."""
    heldout_fraction: float = 0.05
    """Share of sequences held out for evaluation, never assigned to a peer. Default 0.05."""
    eval_sequences: int = 64
    """Held-out sequences the shared model's loss is reported on. Default 64."""
    index_sha256: str = ""
    """SHA-256 of the run's data index, set by ``locoswarm init``: pins tokenizer and shards,
    so nobody who can write to the store can swap the data under a running run."""

    def __post_init__(self) -> None:
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ManifestError("data.heldout_fraction must be in (0, 0.5)")
        if self.seq_len < 8 or self.batch_size < 1 or self.eval_sequences < 1 or self.max_chars < 1:
            raise ManifestError("data.seq_len must be >= 8; data.batch_size, eval_sequences and max_chars >= 1")


@dataclass(frozen=True)
class InnerConfig:
    steps: int = 20
    """H: local AdamW steps per window (the SparseLoCo paper uses H = 15..50). Default 20."""
    lr: float = 2e-3
    """Peak AdamW learning rate. Default 0.002."""
    warmup_steps: int = 40
    """Linear warmup, in inner steps counted across windows. Default 40."""
    total_steps: int = 2000
    """Cosine decay horizon in inner steps; the rate holds at its minimum after. Default 2000."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine schedule, as a fraction of ``lr``. Default 0.1."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (not norms or biases). Default 0.1."""
    beta1: float = 0.9
    """AdamW first-moment decay. Default 0.9."""
    beta2: float = 0.95
    """AdamW second-moment decay. Default 0.95."""
    grad_clip: float = 1.0
    """Global gradient-norm clip per inner step; 0 turns it off. Default 1.0."""
    comm: str = "none"
    """Gradient communication inside a multi-GPU peer: "none" (fp32 DDP all-reduce) or "loco"
    (4-bit with error compensation). Default "none"."""
    overlap: bool = False
    """Train window w+1 while window w is decided, gathered and aggregated: each window's
    training starts from the last global weights a peer has, and the aggregate it was
    waiting for is added to its local weights between two inner steps when it lands (a
    one-window delay of the outer step for the first steps of a window). What goes on the
    wire is unchanged: a payload of window w is still taken against theta(w). Default false
    (docs/overlap.md measures both)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup_steps < 0 or self.total_steps < 1:
            raise ManifestError("inner.steps (H) and inner.total_steps must be >= 1, inner.warmup_steps >= 0")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or self.grad_clip < 0:
            raise ManifestError("inner.lr must be > 0, inner.min_lr_ratio in [0, 1], inner.grad_clip >= 0")
        check_choice("inner.comm", self.comm, COMM_CHOICES)


@dataclass(frozen=True)
class CodecConfig:
    chunk: int = 4096
    """Elements per chunk (SparseLoCo paper, Sec. 3: chunked top-k). Default 4096."""
    tile: int = 64
    """2-D weights whose both dims divide by ``tile`` are chunked as tile x tile blocks;
    ``tile ** 2`` must equal ``chunk``. Default 64."""
    topk: int = 64
    """Values kept per chunk (64 / 4096 = 1.56% density). Default 64."""
    bits: int = 2
    """Bits per kept value (2 = sign + one magnitude bit; wire version 1 supports only 2)."""
    ef_beta: float = 0.95
    """Error-feedback decay: e <- beta * e + delta, then what was sent is subtracted
    (SparseLoCo paper, Alg. 1). Default 0.95."""
    ef_rule: str = "sparseloco"
    """"sparseloco" (accumulate, send the top-k, subtract what was sent), the only rule; kept
    as a field so every manifest that names it keeps its identity. Default "sparseloco"."""
    ef_lookahead: float = 0.0
    """lambda: each window sends the top-k of ``e + lambda * delta`` instead of ``e`` and
    subtracts what it sent, so the run receives the window's drift of the coordinates it
    selects lambda windows early, and ``e`` holds the advance as a debt later windows repay
    (nothing is created or lost over a run). 0 = the paper's rule. Measured in
    docs/convergence.md. Default 0."""

    def __post_init__(self) -> None:
        if self.tile * self.tile != self.chunk:
            raise ManifestError(f"codec.tile ({self.tile}) squared must equal codec.chunk ({self.chunk})")
        if not 1 <= self.topk <= self.chunk:
            raise ManifestError("codec.topk must be between 1 and codec.chunk")
        if self.chunk > 65536:
            raise ManifestError("codec.chunk must be <= 65536 (positions are 16-bit)")
        if self.bits != 2:
            raise ManifestError("codec.bits: only 2 is supported by wire version 1")
        if not 0.0 <= self.ef_beta < 1.0:
            raise ManifestError("codec.ef_beta must be in [0, 1)")
        check_choice("codec.ef_rule", self.ef_rule, EF_RULES)
        if not 0.0 <= self.ef_lookahead <= 4.0:
            raise ManifestError("codec.ef_lookahead must be in [0, 4] (windows of drift sent early)")


@dataclass(frozen=True)
class OuterConfig:
    rule: str = "mean_selected"
    """"mean_selected": each coordinate is the mean over the peers that sent it (the reference
    rule); "mean": the sum divided by the number of peers. Default "mean_selected"."""
    lr: float = 1.0
    """alpha in theta <- theta - alpha * aggregate (plain SGD; error feedback plays the
    momentum role). Default 1.0."""
    clip: str = "median"
    """"median": each peer's contribution per tensor is clipped to the median norm; "none".
    Default "median"."""
    max_payload_bytes: int = 256 * 1024 * 1024
    """Bytes: payload objects larger than this are refused before they are read. Default 256 MiB."""

    def __post_init__(self) -> None:
        check_choice("outer.rule", self.rule, OUTER_RULES)
        check_choice("outer.clip", self.clip, OUTER_CLIPS)
        if self.lr <= 0 or self.max_payload_bytes < 1:
            raise ManifestError("outer.lr and outer.max_payload_bytes must be > 0")


@dataclass(frozen=True)
class ValidatorsConfig:
    keys: tuple[str, ...] = ()
    """Hex ed25519 public keys of the validators whose score records peers trust. Default none."""
    score_lag: int = 2
    """Window w aggregates by the scores published for window ``w - score_lag``. Default 2."""
    min_weight: float = 0.0
    """Peers whose combined weight is at or below this are left out. Default 0."""
    lookback: int = 4
    """When fewer than a majority of the validators scored window ``w - score_lag`` (they are
    slow or offline), window w may follow the scores of one of the ``lookback`` windows
    before it; older scores are never used. Default 4."""
    max_newcomers: int = 4
    """Peers without standing (not listed by the run, not yet rated by a majority of the
    validators) one window counts at most, so a swarm of fresh keys cannot crowd a window.
    Default 4."""

    def __post_init__(self) -> None:
        if self.score_lag < 1 or not 0.0 <= self.min_weight < 1.0:
            raise ManifestError("validators.score_lag must be >= 1 and validators.min_weight in [0, 1)")
        if self.lookback < 0 or self.max_newcomers < 0:
            raise ManifestError("validators.lookback and validators.max_newcomers must be >= 0")
        check_keys("validators.keys", self.keys)


@dataclass(frozen=True)
class Manifest:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    validators: ValidatorsConfig = field(default_factory=ValidatorsConfig)

    @property
    def closers(self) -> tuple[str, ...]:
        """Hex public keys whose signatures decide windows: the validators, or the listed
        peers of a run without validators; sorted."""
        return tuple(sorted(self.validators.keys or self.run.peers))

    @property
    def quorum(self) -> int:
        """Closer signatures a decision needs (``run.quorum``, or the automatic value)."""
        n = len(self.closers)
        if self.run.quorum:
            return self.run.quorum
        return (2 * n) // 3 + 1 if self.validators.keys else n // 2 + 1

    def check_authority(self) -> None:
        """Refuse a run nobody may close, or whose quorum cannot be reached."""
        if not self.closers:
            raise ManifestError(
                "this run trusts no key to close windows: list validators (validators.keys, "
                "`init --validator-key`) or the run's peers (run.peers, `init --peer-key`)"
            )
        if self.quorum > len(self.closers):
            raise ManifestError(f"run.quorum {self.quorum} is more than the {len(self.closers)} closers")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def digest(self) -> str:
        """SHA-256 of the canonical JSON form: the run's identity."""
        fields = self.to_dict()
        for section, key in _HASHED_WHEN_SET:
            if fields[section][key] == _field_default(section, key):
                del fields[section][key]
        canon = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    @property
    def run_key(self) -> str:
        """What payloads and records carry as their run: ``<id>@<first 16 hex of digest>``."""
        return f"{self.run.id}@{self.digest[:16]}"

    def replace(self, **sections: Any) -> Manifest:
        """A copy with whole sections or ``section__field`` values replaced."""
        updates: dict[str, Any] = {}
        for key, value in sections.items():
            name, _, sub = key.partition("__")
            if sub:
                base = updates.get(name, getattr(self, name))
                updates[name] = dataclasses.replace(base, **{sub: value})
            else:
                updates[name] = value
        return dataclasses.replace(self, **updates)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        sections = {}
        known = {f.name: f for f in dataclasses.fields(cls)}
        for name, value in raw.items():
            if name not in known:
                raise ManifestError(f"unknown manifest table [{name}]; known: {', '.join(known)}")
            if not isinstance(value, dict):
                raise ManifestError(f"[{name}] must be a table")
            section_cls = known[name].default_factory  # type: ignore[misc]
            fields = {f.name: f for f in dataclasses.fields(section_cls)}
            kwargs = {}
            for key, v in value.items():
                if key not in fields:
                    raise ManifestError(f"unknown key {key!r} in [{name}]; known: {', '.join(fields)}")
                kwargs[key] = _coerce(name, key, fields[key], v)
            sections[name] = section_cls(**kwargs)
        return cls(**sections)

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ManifestError(f"cannot read manifest {path}: {exc}") from exc
        return cls.from_dict(raw)

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            raw = tomllib.loads(data.decode())
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ManifestError(f"manifest is not valid TOML: {exc}") from exc
        return cls.from_dict(raw)

    def to_toml(self) -> str:
        lines = [f"# locoswarm run manifest; identity {self.run_key}"]
        for name, section in self.to_dict().items():
            lines.append(f"\n[{name}]")
            for key, value in section.items():
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


_HASHED_WHEN_SET = (("run", "store"), ("run", "deadline_factor"), ("run", "min_window_seconds"),
                    ("inner", "overlap"), ("codec", "ef_lookahead"))
"""Fields added after runs existed: left out of the canonical form while at their default,
so every manifest written before them keeps its identity."""


def _field_default(section: str, key: str) -> Any:
    section_cls = {f.name: f.default_factory for f in dataclasses.fields(Manifest)}[section]  # type: ignore[misc]
    return {f.name: f.default for f in dataclasses.fields(section_cls)}[key]


def _coerce(section: str, key: str, f: dataclasses.Field, value: Any) -> Any:
    """Accept exactly the declared type (ints for floats are fine); refuse everything else."""
    want = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    where = f"[{section}] {key}"
    if want == "bool":
        if not isinstance(value, bool):
            raise ManifestError(f"{where} must be true or false, got {value!r}")
        return value
    if want == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ManifestError(f"{where} must be a number, got {value!r}")
        return float(value)
    if want == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError(f"{where} must be an integer, got {value!r}")
        return value
    if want == "str":
        if not isinstance(value, str):
            raise ManifestError(f"{where} must be a string, got {value!r}")
        return value
    if want.startswith("tuple"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ManifestError(f"{where} must be a list of strings, got {value!r}")
        return tuple(value)
    raise ManifestError(f"{where}: unsupported field type {want}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
