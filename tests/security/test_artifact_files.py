"""An artifact's files are data: regular files inside the folder, size-limited, never a FIFO, device or link."""
import json
import os
import threading
import time

import pytest

import sparsecc
from sparsecc.runtime import ArtifactError
from sparsecc.runtime import artifact

from .attacker import copy_artifact, pristine_artifact, rehash, rewrite_manifest, write_manifest_text


@pytest.fixture
def root(tmp_path):
    return copy_artifact(pristine_artifact(), tmp_path / "artifact")


def _load_within(root, seconds):
    """Load in a thread: a load that blocks (a FIFO opened for reading) fails the test instead of hanging it."""
    outcome = {}

    def load():
        try:
            sparsecc.runtime.load(root)
            outcome["error"] = None
        except Exception as err:      # the test checks the type below
            outcome["error"] = err
    start = time.monotonic()
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"load did not return within {seconds} s"
    return outcome["error"], time.monotonic() - start


@pytest.mark.parametrize("name", ["manifest.sha256", "manifest.json", "weights.safetensors"])
def test_a_fifo_is_refused_without_blocking(root, name):
    (root / name).unlink()
    os.mkfifo(root / name)
    error, seconds = _load_within(root, 5)
    assert isinstance(error, ArtifactError) and "is not a regular file (it is a FIFO)" in str(error), error
    assert seconds < 1


@pytest.mark.parametrize("name", ["manifest.json", "manifest.sha256", "weights.safetensors"])
def test_a_symlink_to_dev_zero_is_refused(root, name):
    (root / name).unlink()
    (root / name).symlink_to("/dev/zero")
    error, _ = _load_within(root, 5)
    assert isinstance(error, ArtifactError) and "symbolic link" in str(error), error


def test_a_symlink_to_a_file_outside_is_refused(root, tmp_path):
    outside = tmp_path / "outside.safetensors"
    (root / "weights.safetensors").rename(outside)
    (root / "weights.safetensors").symlink_to(outside)    # same bytes, same hash: only the link is wrong
    with pytest.raises(ArtifactError, match="weights.safetensors is .* a symbolic link"):
        sparsecc.runtime.load(root)


def test_a_symlinked_folder_on_the_way_is_refused(root, tmp_path):
    (tmp_path / "real").mkdir()
    (root / "weights.safetensors").rename(tmp_path / "real" / "weights.safetensors")
    (root / "sub").symlink_to(tmp_path / "real")
    rewrite_manifest(root, lambda m: _rename_weights(m, "sub/weights.safetensors"))
    with pytest.raises(ArtifactError, match="sub/weights.safetensors is .* a symbolic link"):
        sparsecc.runtime.load(root)


def _rename_weights(manifest, name):
    manifest["files"][name] = manifest["files"].pop(manifest["weights"])
    manifest["weights"] = name


@pytest.mark.parametrize("name", ["../weights.safetensors", "/etc/passwd", "./weights.safetensors",
                                  "kernels//k.cubin", "a\\..\\b", ""])
def test_names_outside_the_folder_or_not_plain_are_refused(root, name):
    (root.parent / "weights.safetensors").write_bytes((root / "weights.safetensors").read_bytes())
    rewrite_manifest(root, lambda m: _rename_weights(m, name))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        sparsecc.runtime.load(root)


def test_a_folder_listed_as_a_file_is_refused(root):
    (root / "kernels").mkdir()
    rewrite_manifest(root, lambda m: m["files"].update({"kernels": {"sha256": "0" * 64, "bytes": 0}}))
    with pytest.raises(ArtifactError, match="kernels is not a regular file \\(it is a folder\\)"):
        sparsecc.runtime.load(root)


def test_oversize_files_are_refused(root, monkeypatch):
    (root / "manifest.sha256").write_bytes((root / "manifest.sha256").read_bytes() + b" " * 5000)
    with pytest.raises(ArtifactError, match=r"manifest.sha256 has \d+ bytes, more than the 4096 allowed"):
        sparsecc.runtime.load(root)
    rehash(root)
    (root / "extra.bin").write_bytes(b"x" * 100)
    rewrite_manifest(root, lambda m: m["files"].update({"extra.bin": {"sha256": "", "bytes": 0}}))
    monkeypatch.setattr(artifact, "MAX_KERNEL_BYTES", 64)
    with pytest.raises(ArtifactError, match="extra.bin has 100 bytes, more than the 64 allowed"):
        sparsecc.runtime.load(root)


def test_weights_longer_than_listed_are_refused(root):
    with open(root / "weights.safetensors", "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(ArtifactError, match="weights.safetensors has .* bytes, the manifest says"):
        sparsecc.runtime.load(root)


@pytest.mark.parametrize("edit", [
    lambda m: m.update(files=[]),
    lambda m: m.update(files={"weights.safetensors": "abc"}),
    lambda m: m["files"]["weights.safetensors"].update(bytes="12"),
    lambda m: m["files"]["weights.safetensors"].update(bytes=-1),
    lambda m: m["files"]["weights.safetensors"].update(sha256=None),
    lambda m: m.update(weights=["weights.safetensors"]),
    lambda m: m.update(kernels=5),
    lambda m: m.update(kernels=[{"binaries": []}]),
    lambda m: m.update(targets=5),
    lambda m: m.update(program=[]),
    lambda m: m["program"].update(instructions=3),
    lambda m: m["program"].update(input_specs=[{"nme": "x"}]),
    lambda m: m["program"].pop("outputs"),
], ids=["files-list", "entry-str", "bytes-str", "bytes-negative", "sha-none", "weights-list", "kernels-int",
        "binaries-list", "targets-int", "program-list", "instructions-int", "input-spec-field", "no-outputs"])
def test_wrong_typed_manifest_fields_are_artifact_errors(root, edit):
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    write_manifest_text(root, json.dumps(manifest).encode())    # as edited: no entry recomputed
    with pytest.raises(ArtifactError):
        sparsecc.runtime.load(root)


def test_json_nested_past_the_recursion_limit_is_an_artifact_error(root):
    text = (root / "manifest.json").read_bytes()
    write_manifest_text(root, text[:-1] + b', "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(ArtifactError, match="malformed manifest.json"):
        sparsecc.runtime.load(root)


def test_the_intact_copy_still_loads(root):
    assert json.loads((root / "manifest.json").read_text())["format_version"] == artifact.ARTIFACT_VERSION
    sparsecc.runtime.load(root)
