"""Peer identity: an ed25519 key in a file the user can back up, and the id derived from it.

The peer id is the first 12 bytes of SHA-256 of the raw public key, in hex. Anything signed
carries the raw public key next to the signature, so a verifier checks both that the key
derives the claimed id and that the signature verifies; nobody can sign for an id whose
key they do not hold.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from protocol.errors import IdentityError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
PEER_ID_HEX_CHARS = 24


def peer_id_of(public_key: bytes) -> str:
    """The peer id that a raw 32-byte ed25519 public key stands for."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise IdentityError(f"public key must be {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    return hashlib.sha256(public_key).hexdigest()[:PEER_ID_HEX_CHARS]


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is a valid ed25519 signature of ``message`` by ``public_key``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """A private signing key and the public facts derived from it."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity (tests and simulations); ``seed`` is hashed to 32 bytes."""
        return cls(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> Identity:
        """Read the key file at ``path``, creating it (mode 0600) when it does not exist."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        ident = cls.generate()
        ident.save(path)
        return ident

    @classmethod
    def load(cls, path: str | os.PathLike) -> Identity:
        try:
            raw = Path(path).read_bytes()
            key = serialization.load_pem_private_key(raw, password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise IdentityError(f"cannot read ed25519 key from {path}: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{path} holds a {type(key).__name__}, not an ed25519 key")
        return cls(key)

    def save(self, path: str | os.PathLike) -> None:
        """Write the key as unencrypted PKCS#8 PEM, atomically, readable by the owner only."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.replace(tmp, path)

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)
