"""Ed25519 signatures over an artifact's manifest: authenticity, not just integrity.

The manifest lists every file's SHA-256, so a signature over the exact
manifest.json bytes covers the whole artifact. It is stored beside them:

    DIR/manifest.sig   {"algorithm": "ed25519", "key_id": KEY_ID, "signature": base64 of 64 bytes}

KEY_ID is the first 16 hex digits of the SHA-256 of the signer's raw 32-byte public
key; it names the key (for `sparsecc inspect` and error messages), the signature
itself is checked against the trusted key holding that id.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ArtifactError

SIGNATURE_FILE = "manifest.sig"
ALGORITHM = "ed25519"
TrustedKey = Union[Ed25519PublicKey, bytes, str, os.PathLike]   # a key object, raw 32 bytes, PEM text/bytes or file
SigningKey = Union[Ed25519PrivateKey, bytes, str, os.PathLike]   # a key object, PEM bytes, or a PEM file


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def raw_public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Union[Ed25519PublicKey, Ed25519PrivateKey]) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return hashlib.sha256(raw_public_bytes(public)).hexdigest()[:16]


def write_key_pair(directory: Union[str, os.PathLike], name: str = "sparsecc") -> tuple[Path, Path]:
    """A fresh key pair as PEM files `name.key` (private, mode 0600) and `name.pub` in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)   # never readable by others
    except FileExistsError:
        raise ValueError(f"{private_path} exists; refusing to overwrite a signing key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def signing_key(key: SigningKey) -> Ed25519PrivateKey:
    """An Ed25519 private key from a key object, PEM bytes, or the path of a PEM file."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    pem = key if isinstance(key, bytes) else Path(key).read_bytes()
    try:
        loaded = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ValueError(f"signing key {_describe(key)} is not an unencrypted PEM private key: {err}") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"signing key {_describe(key)} is a {type(loaded).__name__}, not an Ed25519 key")
    return loaded


def public_key(key: TrustedKey) -> Ed25519PublicKey:
    """A trusted key given as an Ed25519PublicKey, its raw 32 bytes, PEM (bytes or text) or a PEM file."""
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, os.PathLike):
        key = Path(key).read_bytes()
    if isinstance(key, bytes) and len(key) == 32:
        return Ed25519PublicKey.from_public_bytes(key)
    if isinstance(key, (bytes, str)):
        try:
            loaded = serialization.load_pem_public_key(key.encode() if isinstance(key, str) else key)
        except (ValueError, UnsupportedAlgorithm) as err:
            raise ValueError(f"trusted key is neither 32 raw bytes nor a PEM public key: {err}") from None
        if isinstance(loaded, Ed25519PublicKey):
            return loaded
        raise ValueError(f"trusted key is a {type(loaded).__name__}, not an Ed25519 public key")
    raise ValueError(f"trusted key of type {type(key).__name__}: pass Ed25519PublicKey objects, raw 32-byte keys "
                     "or PEM bytes")


def sign_manifest(manifest: bytes, key: SigningKey) -> bytes:
    """The contents of manifest.sig for these exact manifest.json bytes."""
    private = signing_key(key)
    record = {"algorithm": ALGORITHM, "key_id": key_id(private),
              "signature": base64.b64encode(private.sign(manifest)).decode()}
    return (json.dumps(record) + "\n").encode()


def signature_key_id(record: bytes) -> str:
    """The key id a manifest.sig names (its signature is not checked here)."""
    return _parse_record(record)[0]


def verify_manifest(manifest: bytes, record: Optional[bytes], trusted_keys: Iterable[TrustedKey]) -> str:
    """The id of the trusted key that signed `manifest`; ArtifactError for a missing, malformed or wrong
    signature, or a signer outside `trusted_keys`."""
    single = isinstance(trusted_keys, (Ed25519PublicKey, bytes, str, os.PathLike))   # one key given without a list
    try:
        keys = {key_id(k): k for k in map(public_key, [trusted_keys] if single else list(trusted_keys))}
    except (ValueError, TypeError, OSError) as err:
        raise ArtifactError(f"load: {err}") from None
    if not keys:
        raise ArtifactError("load: trusted_keys is empty, so no signature can be accepted")
    if record is None:
        raise ArtifactError(f"the artifact is not signed ({SIGNATURE_FILE} is missing) but trusted_keys were given")
    signer, signature = _parse_record(record)
    if signer not in keys:
        raise ArtifactError(f"the artifact is signed by key {signer}, which is not among the trusted keys "
                            f"({', '.join(sorted(keys))})")
    try:
        keys[signer].verify(signature, manifest)
    except InvalidSignature:
        raise ArtifactError(f"{SIGNATURE_FILE}: the signature does not match manifest.json for key {signer} "
                            "(the manifest was modified, or signed by another key)") from None
    return signer


def _parse_record(record: bytes) -> tuple[str, bytes]:
    try:
        fields: Any = json.loads(record)
        if not isinstance(fields, dict) or set(fields) != {"algorithm", "key_id", "signature"}:
            raise ValueError("expected the fields algorithm, key_id, signature")
        if fields["algorithm"] != ALGORITHM:
            raise ValueError(f"algorithm {fields['algorithm']!r} is not {ALGORITHM!r}")
        if not isinstance(fields["key_id"], str) or not isinstance(fields["signature"], str):
            raise ValueError("key_id and signature must be strings")
        signature = base64.b64decode(fields["signature"], validate=True)
    except (ValueError, RecursionError, binascii.Error) as err:
        raise ArtifactError(f"{SIGNATURE_FILE} is malformed: {err}") from None
    if len(signature) != 64:
        raise ArtifactError(f"{SIGNATURE_FILE} is malformed: an Ed25519 signature has 64 bytes, not {len(signature)}")
    return fields["key_id"], signature


def _describe(key: Any) -> str:
    return "(PEM bytes)" if isinstance(key, bytes) else repr(str(key))
