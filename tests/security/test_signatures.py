"""What signatures add: with trusted keys, any rewrite of the artifact is refused at load, even one
whose hashes were recomputed; without keys, hashes catch only accidents (a rehashed edit loads)."""
from __future__ import annotations

import pytest
import torch

from sparsecc.runtime.signing import generate_key, raw_public_bytes, sign_manifest

from .attacker import Pristine, copy_artifact, rewrite_weights
from .attacks import ATTACKS

SIGNATURE = "manifest.sig"


@pytest.fixture(scope="module")
def owner_key():
    return generate_key()


def signed_copy(pristine, folder, key):
    copy_artifact(pristine, folder)
    (folder / SIGNATURE).write_bytes(sign_manifest((folder / "manifest.json").read_bytes(), key))
    return folder


def trusted(key) -> list[bytes]:
    return [raw_public_bytes(key.public_key())]


def test_signed_artifact_loads_with_its_key(pristine, harness, owner_key, tmp_path):
    folder = signed_copy(pristine, tmp_path / "artifact", owner_key)
    outcome = harness.run(folder, pristine.inputs, pristine.reference, trusted_keys=trusted(owner_key))
    assert (outcome.kind, outcome.correct) == ("ran", True), str(outcome)


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_every_attack_on_a_signed_artifact_is_refused_at_load(attack, pristine, harness, owner_key, tmp_path):
    folder = signed_copy(pristine, tmp_path / "artifact", owner_key)
    attack.edit(folder)
    outcome = harness.run(folder, pristine.inputs, trusted_keys=trusted(owner_key), timeout_s=20.0)
    assert outcome.kind == "refused_load", f"{attack.name}: {outcome}"


def _swap_weights(folder):
    rewrite_weights(folder, lambda w: w.update({"embed.weight": torch.zeros_like(w["embed.weight"])}))


def test_a_signature_by_another_key_is_refused(pristine, harness, owner_key, tmp_path):
    folder = signed_copy(pristine, tmp_path / "artifact", owner_key)
    _swap_weights(folder)
    (folder / SIGNATURE).write_bytes(sign_manifest((folder / "manifest.json").read_bytes(), generate_key()))
    outcome = harness.run(folder, pristine.inputs, trusted_keys=trusted(owner_key))
    assert outcome.kind == "refused_load", str(outcome)


def test_a_removed_signature_is_refused_when_keys_are_given(pristine, harness, owner_key, tmp_path):
    folder = signed_copy(pristine, tmp_path / "artifact", owner_key)
    _swap_weights(folder)
    (folder / SIGNATURE).unlink()
    outcome = harness.run(folder, pristine.inputs, trusted_keys=trusted(owner_key))
    assert outcome.kind == "refused_load", str(outcome)


def test_without_keys_a_rehashed_weight_swap_loads(pristine, harness, tmp_path):
    """The documented limit of unkeyed hashes: a writer who recomputes them changes what the model computes."""
    folder = copy_artifact(pristine, tmp_path / "artifact")
    _swap_weights(folder)
    outcome = harness.run(folder, pristine.inputs, pristine.reference)
    assert (outcome.kind, outcome.correct) == ("ran", False), str(outcome)
