"""Issue 13's attacks on a saved artifact (hashes recomputed), each loaded and called in the harness's worker.

Every attack must end in a refusal of the right type where the runtime can know (see `attacks.py`),
never in a crash, a hang, another exception type or the planted payload running.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from .attacker import Pristine, copy_artifact
from .attacks import ATTACKS, route_gather_from_another_sequence, unroute_into_another_sequence


def test_the_intact_artifact_runs_correctly(pristine, harness):
    outcome = harness.run(pristine.folder, pristine.inputs, pristine.reference)
    assert (outcome.kind, outcome.correct) == ("ran", True), str(outcome)


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_is_refused(attack, pristine, harness, tmp_path):
    folder = copy_artifact(pristine, tmp_path / "artifact")
    attack.edit(folder)
    outcome = harness.run(folder, pristine.inputs, pristine.reference, timeout_s=20.0)
    assert outcome.kind in attack.expect, f"{attack.name}: expected {' or '.join(attack.expect)}, got {outcome}"


def _other_sequence_changed(inputs, tmp_path):
    """The example inputs with sequence 1's tokens changed (sequence 0 is the one under attack)."""
    tokens = load_file(str(inputs))["0"].clone()
    tokens[1] = (tokens[1] + 1) % int(tokens.max() + 1)
    path = tmp_path / "changed.safetensors"
    save_file({"0": tokens}, str(path))
    return path


def test_unroute_cannot_write_into_another_sequence(pristine, harness, tmp_path):
    folder = copy_artifact(pristine, tmp_path / "artifact")
    unroute_into_another_sequence(folder)
    outcome = harness.run(folder, pristine.inputs, pristine.reference, save_outputs=tmp_path / "out.safetensors")
    assert outcome.kind in ("refused_load", "refused_call", "ran"), str(outcome)
    if outcome.kind == "ran":   # made safe by construction: sequence 1 is exactly what the intact artifact gives
        got, want = load_file(str(tmp_path / "out.safetensors"))["0"], load_file(str(pristine.reference))["0"]
        torch.testing.assert_close(got[1:], want[1:], rtol=0, atol=0)


def test_route_gather_cannot_read_another_sequence(pristine, harness, tmp_path):
    folder = copy_artifact(pristine, tmp_path / "artifact")
    route_gather_from_another_sequence(folder)
    first = harness.run(folder, pristine.inputs, save_outputs=tmp_path / "a.safetensors")
    second = harness.run(folder, _other_sequence_changed(pristine.inputs, tmp_path),
                         save_outputs=tmp_path / "b.safetensors")
    assert {first.kind, second.kind} <= {"refused_load", "refused_call", "ran"}, f"{first}; {second}"
    if first.kind == second.kind == "ran":   # sequence 0's output may not depend on sequence 1's tokens
        a, b = (load_file(str(tmp_path / f"{n}.safetensors"))["0"] for n in "ab")
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)

