"""Ed25519 signatures: with trusted keys only an artifact signed by one of them loads; hashes alone do not."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import sparsecc
from sparsecc.cli import main
from sparsecc.runtime import ArtifactError
from sparsecc.runtime.signing import (SIGNATURE_FILE, generate_key, key_id, raw_public_bytes, sign_manifest,
                                      write_key_pair)

from .attacker import rewrite_program


@pytest.fixture(scope="module")
def key():
    return generate_key()


@pytest.fixture(scope="module")
def signed(key, tmp_path_factory):
    """A small model saved with `save(..., sign_with=key)`, its inputs and its outputs."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), torch.randn(3, 8)
    compiled = sparsecc.compile(model, (x,), sparsity="2:4", check=False)
    folder = tmp_path_factory.mktemp("signed") / "artifact"
    compiled.save(folder, sign_with=key, progress=False)
    return folder, x, compiled(x)


@pytest.fixture
def artifact(signed, tmp_path):
    """A private copy to tamper with."""
    return Path(shutil.copytree(signed[0], tmp_path / "artifact"))


def test_signed_artifact_loads_with_its_key_in_every_form(key, signed):
    folder, x, want = signed
    public = key.public_key()
    pem = _pem(public)
    for trusted in ([public], [raw_public_bytes(public)], [pem], [generate_key().public_key(), pem.decode()],
                    public):
        torch.testing.assert_close(sparsecc.runtime.load(folder, trusted_keys=trusted)(x), want, rtol=0, atol=0)
    record = json.loads((folder / SIGNATURE_FILE).read_text())
    assert record["algorithm"] == "ed25519" and record["key_id"] == key_id(public)


def _pem(public):
    from cryptography.hazmat.primitives import serialization
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _double_the_output(program):
    """The attacker's edit: the program returns its result plus itself; every hash is then recomputed."""
    out = program["outputs"][0]
    program["instructions"].append({"op": "aten::add.Tensor", "args": [out, out], "kwargs": {},
                                    "outputs": [out["r"]], "unpack": False, "name": "tampered"})


def test_a_tampered_manifest_with_recomputed_hashes_is_refused_with_keys(key, artifact, signed):
    _, x, want = signed
    rewrite_program(artifact, _double_the_output)
    torch.testing.assert_close(sparsecc.runtime.load(artifact)(x), 2 * want)   # hashes alone cannot tell
    with pytest.raises(ArtifactError, match="signature does not match manifest.json"):
        sparsecc.runtime.load(artifact, trusted_keys=[key.public_key()])


def test_unsigned_is_refused_with_keys_and_accepted_without(key, artifact, signed):
    (artifact / SIGNATURE_FILE).unlink()
    with pytest.raises(ArtifactError, match="not signed"):
        sparsecc.runtime.load(artifact, trusted_keys=[key.public_key()])
    torch.testing.assert_close(sparsecc.runtime.load(artifact)(signed[1]), signed[2], rtol=0, atol=0)


def test_another_key_is_refused(artifact):
    other = generate_key()
    with pytest.raises(ArtifactError, match="signed by key [0-9a-f]{16}, which is not among the trusted keys"):
        sparsecc.runtime.load(artifact, trusted_keys=[other.public_key()])
    # re-signed by the attacker's own key: still not a trusted signer
    (artifact / SIGNATURE_FILE).write_bytes(sign_manifest((artifact / "manifest.json").read_bytes(), other))
    with pytest.raises(ArtifactError, match="not among the trusted keys"):
        sparsecc.runtime.load(artifact, trusted_keys=[generate_key().public_key()])


def test_a_forged_key_id_is_refused(key, artifact):
    record = json.loads(sign_manifest((artifact / "manifest.json").read_bytes(), generate_key()))
    record["key_id"] = key_id(key)        # names the trusted key, signed by another
    (artifact / SIGNATURE_FILE).write_text(json.dumps(record))
    with pytest.raises(ArtifactError, match="signature does not match"):
        sparsecc.runtime.load(artifact, trusted_keys=[key.public_key()])


@pytest.mark.parametrize("record", [b"", b"not json", b'{"algorithm": "rsa", "key_id": "x", "signature": ""}',
                                    b'{"algorithm": "ed25519", "key_id": "x", "signature": "!!"}',
                                    b'{"algorithm": "ed25519", "key_id": "x", "signature": "AAAA"}',
                                    b'[' * 3000])
def test_a_malformed_signature_is_refused(key, artifact, record):
    (artifact / SIGNATURE_FILE).write_bytes(record)
    with pytest.raises(ArtifactError, match="manifest.sig (is malformed|has .* bytes)"):
        sparsecc.runtime.load(artifact, trusted_keys=[key.public_key()])


def test_the_signature_is_checked_before_the_manifest_is_parsed(key, artifact):
    (artifact / "manifest.json").write_bytes(b"[" * 100_000)
    with pytest.raises(ArtifactError, match="signature does not match"):
        sparsecc.runtime.load(artifact, trusted_keys=[key.public_key()])


def test_bad_trusted_keys_are_refused(artifact):
    for keys, message in [([], "trusted_keys is empty"), ([b"short"], "neither 32 raw bytes nor a PEM"),
                          ([42], "trusted key of type int"), (42, "'int' object is not iterable")]:
        with pytest.raises(ArtifactError, match=message):
            sparsecc.runtime.load(artifact, trusted_keys=keys)


def test_resaving_unsigned_removes_the_old_signature(signed, tmp_path):
    root = Path(shutil.copytree(signed[0], tmp_path / "artifact"))
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    sparsecc.compile(model, (signed[1],), sparsity="2:4", check=False).save(root, progress=False)
    assert not (root / SIGNATURE_FILE).exists()


def test_cli_keygen_build_signed_and_inspect(tmp_path, capsys):
    assert main(["keygen", "-o", str(tmp_path / "keys")]) == 0
    private, public = tmp_path / "keys" / "sparsecc.key", tmp_path / "keys" / "sparsecc.pub"
    assert private.stat().st_mode & 0o077 == 0
    assert main(["keygen", "-o", str(tmp_path / "keys")]) == 2          # never overwrites a key
    out = tmp_path / "artifact"
    assert main(["build", "examples.tiny_transformer:build", "--target", "cpu", "-o", str(out), "--no-check",
                 "--sign-key", str(private)]) == 0
    sparsecc.runtime.load(out, trusted_keys=[public])      # a PEM file's path
    capsys.readouterr()
    assert main(["inspect", str(out), "--trusted-key", str(public)]) == 0
    assert "verified against a trusted key" in capsys.readouterr().out
    assert main(["inspect", str(out), "--trusted-key", str(write_key_pair(tmp_path / "other")[1])]) == 2
    assert "not among the trusted keys" in capsys.readouterr().err
