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

from protocol.errors import ManifestError


@dataclass(frozen=True)
class RunConfig:
    id: str = "local"
    """Human name of the run; with the manifest hash it forms ``run_key``."""
    seed: int = 1234
    """Seeds genesis weights, data assignment and held-out sampling."""
    genesis: float = 0.0
    """Unix time at which window 0 opens (``locoswarm init`` sets it to now)."""
    window_seconds: float = 60.0
    """Publish deadline: a window closes at most this many seconds after the previous one."""
    grace_seconds: float = 2.0
    """How long after a window closes a late gatherer keeps listing before it gives up."""
    checkpoint_every: int = 5
    """Publish a full checkpoint every this many windows (late joiners start from it)."""
    keep_windows: int = 20
    """Garbage collection: payloads older than this many windows *and* older than the latest
    checkpoint are deleted; checkpoints and what a late joiner needs are kept."""

    def __post_init__(self) -> None:
        if not self.id or not all(c.isalnum() or c in "-_." for c in self.id):
            raise ManifestError(f"run.id {self.id!r} must be non-empty letters, digits, '-', '_' or '.'")
        if self.window_seconds <= 0:
            raise ManifestError("run.window_seconds must be > 0")
        if self.checkpoint_every < 1:
            raise ManifestError("run.checkpoint_every must be >= 1")
        if self.keep_windows < self.checkpoint_every:
            raise ManifestError("run.keep_windows must be >= run.checkpoint_every so late joiners can replay")


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny"
    """One of node.model.PRESETS (tiny, 25m, 150m, 1b), or "hf" with ``hf_config``."""
    hf_config: str = ""
    """Path to a Hugging Face config.json (used when preset = "hf")."""
    dtype: str = "float32"
    """Dtype of the global weights; the outer step is always done in float32."""


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 2048
    """BPE vocabulary size trained by ``locoswarm init`` on the run's corpus."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"
    """"stdlib" (Python's own standard library sources, sorted: on every machine), a local
    text file or folder, token shards (.npy/.bin), or a saved HF ``datasets`` directory."""
    max_chars: int = 6_000_000
    """Cap on corpus characters read from text sources (keeps init fast)."""
    seq_len: int = 128
    """Tokens per training sequence."""
    batch_size: int = 8
    """Sequences per inner step per peer."""
    heldout_fraction: float = 0.05
    """Share of sequences reserved for held-out evaluation; never assigned to a peer."""
    eval_sequences: int = 64
    """Held-out sequences used to report the shared model's loss."""
    index_sha256: str = ""
    """SHA-256 of the run's data index, set by ``locoswarm init``: pins tokenizer and shards,
    so nobody who can write to the store can swap the data under a running run."""

    def __post_init__(self) -> None:
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ManifestError("data.heldout_fraction must be in (0, 0.5)")
        if self.seq_len < 8 or self.batch_size < 1:
            raise ManifestError("data.seq_len must be >= 8 and data.batch_size >= 1")


@dataclass(frozen=True)
class InnerConfig:
    steps: int = 20
    """H: local AdamW steps per window (SparseLoCo paper uses H=15..50)."""
    lr: float = 2e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 40
    """Linear warmup, counted in inner steps across windows."""
    total_steps: int = 2000
    """Cosine decay horizon in inner steps; lr holds at min after it."""
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    comm: str = "none"
    """Gradient communication inside a multi-GPU peer: "none" (fp32 DDP) or "loco"."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ManifestError("inner.steps (H) must be >= 1")
        if self.comm not in ("none", "loco"):
            raise ManifestError(f"inner.comm must be 'none' or 'loco', not {self.comm!r}")


@dataclass(frozen=True)
class CodecConfig:
    chunk: int = 4096
    """Elements per chunk (SparseLoCo paper, Sec. 3: chunked top-k)."""
    tile: int = 64
    """2-D weights whose both dims divide by ``tile`` are chunked as tile x tile blocks."""
    topk: int = 64
    """Values kept per chunk (64/4096 = 1.56% density)."""
    bits: int = 2
    """Bits per kept value (2 = sign + one magnitude bit)."""
    ef_beta: float = 0.95
    """Error-feedback decay: e <- beta*e + delta."""
    ef_rule: str = "sparseloco"
    """"sparseloco" (accumulate, subtract what was sent) or "loco" (moving average of the
    compression error, Xie et al. 2024)."""

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
        if self.ef_rule not in ("sparseloco", "loco"):
            raise ManifestError(f"codec.ef_rule must be 'sparseloco' or 'loco', not {self.ef_rule!r}")


@dataclass(frozen=True)
class OuterConfig:
    rule: str = "mean_selected"
    """"mean_selected": each coordinate is the mean over the peers that sent it (reference);
    "mean": plain sum divided by the number of peers."""
    lr: float = 1.0
    """alpha in theta <- theta - alpha * aggregate (plain SGD; EF plays the momentum role)."""
    clip: str = "median"
    """"median": each peer's contribution per tensor is clipped to the median norm; "none"."""
    max_payload_bytes: int = 256 * 1024 * 1024
    """Refuse payload objects larger than this before downloading them whole."""

    def __post_init__(self) -> None:
        if self.rule not in ("mean_selected", "mean"):
            raise ManifestError(f"outer.rule must be 'mean_selected' or 'mean', not {self.rule!r}")
        if self.clip not in ("median", "none"):
            raise ManifestError(f"outer.clip must be 'median' or 'none', not {self.clip!r}")


@dataclass(frozen=True)
class StoreConfig:
    uri: str = "file://runs/local/store"
    """Where payloads, records and checkpoints live: file://, s3://bucket/prefix or p2p://."""
    endpoint_url: str = ""
    """S3: endpoint of an S3-compatible service (R2, MinIO); empty for AWS."""
    region: str = ""
    addressing_style: str = "auto"
    profile: str = ""
    """S3: named AWS profile for credentials; empty = the standard AWS credential chain."""
    initial_peers: tuple[str, ...] = ()
    """p2p: multiaddrs of peers to bootstrap the DHT from."""
    request_timeout: float = 20.0
    """Seconds one store request may take before it is retried."""
    retries: int = 4
    """Attempts per request, with exponential backoff and jitter."""


@dataclass(frozen=True)
class ValidatorsConfig:
    keys: tuple[str, ...] = ()
    """Hex ed25519 public keys whose score records peers trust."""
    score_lag: int = 2
    """Peers use the scores published for window w - score_lag when aggregating window w."""
    min_weight: float = 0.0
    """Peers whose combined weight is at or below this are left out of aggregation."""


@dataclass(frozen=True)
class Manifest:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    validators: ValidatorsConfig = field(default_factory=ValidatorsConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def digest(self) -> str:
        """SHA-256 of the canonical JSON form: the run's identity."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
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


def _coerce(section: str, key: str, f: dataclasses.Field, value: Any) -> Any:
    """Accept exactly the declared type (ints for floats are fine); refuse everything else."""
    want = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    where = f"[{section}] {key}"
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
