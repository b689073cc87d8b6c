"""Kernels made for one program instruction (OpDef.instruction_kernels): nm_linear keeps its last runner
while x's shape, the constants' versions and pointers and the settings hold, and re-checks otherwise."""
from __future__ import annotations

import copy

import torch

import sparsecc
from sparsecc.runtime.kernels.cpu import nm_paths
from sparsecc.runtime.kernels.cpu.nm_linear import InstructionCall, call_key, instruction_call, nm_linear_cpu
from sparsecc.runtime.nm_format import compress_nm, decompress_nm, nm_mask


def layer(rows: int = 24, k: int = 64):
    weight = torch.randn(rows, k)
    values, indices = compress_nm(weight, 2, 4, mask=nm_mask(weight.abs(), 2, 4))
    return values, indices, torch.randn(rows)


def reference(x, values, indices, bias):
    return x @ decompress_nm(values, indices, 2, 4, values.shape[1] * 2).T + bias


def test_a_compiled_program_runs_nm_linear_through_an_instruction_call():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).eval()
    x = torch.randn(1, 64)
    compiled = sparsecc.compile(model, (x,), sparsity="2:4", check=False, progress=False)
    calls = [step[0] for step in compiled._executor.steps if isinstance(step[0], InstructionCall)]
    assert len(calls) == 2
    pruned = copy.deepcopy(model)
    pruned.load_state_dict(compiled.pruned_state_dict(), strict=False)     # the rewritten weights, pruned
    for _ in range(3):      # the first call chooses, the next ones reuse
        torch.testing.assert_close(compiled(x), pruned(x), rtol=1e-5, atol=1e-5)
    assert all(call.last is not None for call in calls)


def test_another_x_shape_or_a_changed_weight_is_checked_again():
    values, indices, bias = layer()
    call = InstructionCall(values, indices, bias)
    for tokens in (1, 3, 1):
        x = torch.randn(tokens, 64)
        torch.testing.assert_close(call(x, values, indices, bias, 2, 4, 64), reference(x, values, indices, bias),
                                   rtol=1e-5, atol=1e-5)
        assert call.last[0] == call_key(x, values, indices, bias, 2, 4, 64, "memory")   # kept for this x
    before = call.last
    values.mul_(2)          # in place: a new version, the same tensor
    x = torch.randn(1, 64)
    torch.testing.assert_close(call(x, values, indices, bias, 2, 4, 64), reference(x, values, indices, bias),
                               rtol=1e-5, atol=1e-5)
    assert call.last[0] != before[0]


def test_a_forced_path_reaches_the_next_call(monkeypatch):
    values, indices, bias = layer()
    call, x, taken = InstructionCall(values, indices, bias), torch.randn(1, 64), []
    for path in ("tiles", "whole"):
        monkeypatch.setenv(nm_paths.FORCE_ENV, path)
        monkeypatch.setitem(nm_paths.RUNNERS, path,
                            lambda *args, p=path, run=nm_paths.RUNNERS[path]: taken.append(p) or run(*args))
        torch.testing.assert_close(call(x, values, indices, bias, 2, 4, 64), reference(x, values, indices, bias),
                                   rtol=1e-5, atol=1e-5)
    assert taken == ["tiles", "whole"]


def test_operands_other_than_its_own_are_not_kept():
    values, indices, bias = layer()
    other_values, other_indices, other_bias = layer()
    call, x = InstructionCall(values, indices, bias), torch.randn(1, 64)
    y = call(x, other_values, other_indices, other_bias, 2, 4, 64)
    torch.testing.assert_close(y, nm_linear_cpu(x, other_values, other_indices, other_bias, 2, 4, 64))
    assert call.last is None


def test_only_constant_operands_get_an_instruction_call():
    values, indices, bias = layer()
    assert isinstance(instruction_call([object(), values, indices, bias, 2, 4, 64], {}), InstructionCall)
    assert isinstance(instruction_call([object(), values, indices, None, 2, 4, 64], {}), InstructionCall)
    assert instruction_call([object(), object(), indices, bias, 2, 4, 64], {}) is None   # values in a register
    assert instruction_call([object()], {}) is None


def test_a_constant_swapped_behind_the_same_pointer_and_version_is_checked_again():
    """`.data =` keeps the version counter; a slice keeps the pointer: the shape in the state catches it."""
    values, indices, bias = layer(rows=64)
    call, x = InstructionCall(values, indices, bias), torch.randn(1, 64)
    assert call(x, values, indices, bias, 2, 4, 64).shape == (1, 64)
    versions = (values._version, indices._version, bias._version)
    values.data, indices.data, bias.data = values.data[:32], indices.data[:32], bias.data[:32]
    assert (values._version, indices._version, bias._version) == versions
    y = call(x, values, indices, bias, 2, 4, 64)
    assert y.shape == (1, 32)
    torch.testing.assert_close(y, reference(x, values, indices, bias), rtol=1e-5, atol=1e-5)


def test_clearing_the_compiled_kernels_drops_the_kept_runner():
    from sparsecc.runtime.kernels.cpu.mlir import jit
    values, indices, bias = layer()
    call = InstructionCall(values, indices, bias)
    call(torch.randn(1, 64), values, indices, bias, 2, 4, 64)
    assert call.last is not None
    jit.clear_compiled()
    assert call.last is None


def test_operands_passed_by_name_get_an_instruction_call_too():
    values, indices, bias = layer()
    made = instruction_call([object()], {"values": values, "indices": indices, "bias": bias})
    assert isinstance(made, InstructionCall) and made.operands == (values, indices, bias)
