"""Load-time validation (`sparsecc.runtime.validate`): every register, constant, shape and allocation.

Programs are written by hand (tests/runtime/handmade.py) the way an attacker
would edit an artifact; each must be refused with an ArtifactError that names
the instruction, before anything runs. The models the compiler tests lower
all validate (tests/conftest.py turns SPARSECC_VALIDATE_PROGRAMS on).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import sparsecc
from sparsecc.runtime import ArtifactError, Executor, RuntimeProgramError
from sparsecc.runtime.program import InputSpec
from sparsecc.runtime.validate import (DEFAULT_MAX_BYTES_RULE, MIN_MAX_BYTES, default_max_bytes,
                                       validate_program)

from ..compiler.models import Projections, TiedLM
from .handmade import inst, program, weights

X, W = {"r": 0}, {"c": "w"}


def _refused(crafted, match, **kwargs):
    with pytest.raises(ArtifactError, match=match):
        validate_program(crafted, weights(), device="cpu", **kwargs)


def test_a_well_formed_program_validates_and_runs():
    steps = [inst("aten::mm.default", [X, W], [1]), inst("aten::relu.default", [{"r": 1}], [1])]
    good = program(steps, [{"r": 1}], num_registers=2, constants=weights())
    validate_program(good, weights(), device="cpu")
    x, w = torch.randn(4, 8), weights()
    torch.testing.assert_close(Executor(good, w).run([x])[0], torch.relu(x @ w["w"]))


@pytest.mark.parametrize("steps, outputs, match", [
    ([inst("aten::relu.default", [{"r": 5}], [1])], [{"r": 1}], r"instruction 0 .*register 5 outside 0..1"),
    ([inst("aten::relu.default", [{"r": -1}], [1])], [{"r": 1}], r"instruction 0 .*register -1 outside"),
    ([inst("aten::relu.default", [X], [-2])], [{"r": 0}], r"instruction 0 .*output register -2"),
    ([inst("aten::relu.default", [{"r": 1}], [1])], [{"r": 1}], r"instruction 0 .*reads register 1 before"),
    ([inst("aten::relu.default", [X], [1])], [{"r": 7}], r"program outputs: register 7 outside"),
    ([inst("aten::relu.default", [X], [1])], [{"dtype": "int8"}], r"program outputs: 'dtype' is not an encoding"),
    ([inst("aten::mm.default", [X, {"c": "nope"}], [1])], [{"r": 1}], r"constant 'nope' is not among"),
    ([inst("aten::relu.default", [X], [1, 0])], [{"r": 1}], r"does not unpack writes one register"),
    ([inst("aten::split.Tensor", [X, 2], [1], unpack=True)], [{"r": 1}], r"unpacks 1 results, the op returns 2"),
])
def test_registers_and_constants_are_checked(steps, outputs, match):
    _refused(program(steps, outputs, num_registers=2, constants=weights()), match)


def test_register_count_is_bounded_by_what_the_program_writes():
    steps = [inst("aten::relu.default", [X], [1])]
    _refused(program(steps, [{"r": 1}], num_registers=10 ** 10, constants=weights()), r"num_registers=10000000000")


@pytest.mark.parametrize("spec, match", [
    (InputSpec("x", "Tensor", [4, 8]), "dtype 'Tensor' is not one of"),
    (InputSpec("x", "__class__", [4, 8]), "dtype '__class__' is not one of"),
    (InputSpec("x", "float32", [4, -8]), "dim -8 is neither"),
    (InputSpec("x", "float32", [4, "s9"]), "dim 's9' is neither"),
    (InputSpec("x", "float32", [10 ** 6, 10 ** 6]), r"needs 4000000000000 bytes"),
])
def test_input_specs_are_checked(spec, match):
    steps = [inst("aten::relu.default", [X], [1])]
    crafted = dataclasses.replace(program(steps, [{"r": 1}], num_registers=2), input_specs=[spec])
    _refused(crafted, match)


def test_symbol_hints_must_lie_inside_their_ranges():
    steps = [inst("aten::relu.default", [X], [1])]
    ranged = dict(shape=["s0", 8], symbol_ranges={"s0": [1, 64]})
    _refused(program(steps, [{"r": 1}], num_registers=2, symbol_hints={"s0": 65}, **ranged), "hint 65 outside")
    _refused(program(steps, [{"r": 1}], num_registers=2, symbol_hints={"s1": 2}, **ranged), "has no range")
    validate_program(program(steps, [{"r": 1}], num_registers=2, symbol_hints={"s0": 9}, **ranged), {}, device="cpu")


def test_a_shape_mismatch_is_caught_at_load():
    steps = [inst("aten::mm.default", [W, X], [1])]    # [8, 8] @ [4, 8]
    _refused(program(steps, [{"r": 1}], num_registers=2, constants=weights()),
             r"instruction 0 \(aten::mm.default, node 'mm'\): fails on its input shapes")


def test_a_huge_allocation_is_refused_with_its_size():
    steps = [inst("aten::empty.memory_format", [[10 ** 12]], [1], {"dtype": {"dtype": "float32"}})]
    _refused(program(steps, [{"r": 1}], num_registers=2), r"instruction 0 .*needs 4000000000\d+ bytes")
    steps = [inst("aten::mm.default", [X, W], [1])]
    _refused(program(steps, [{"r": 1}], num_registers=2, constants=weights()), "over the limit of 100", max_bytes=100)


def test_the_default_limit_follows_its_rule():
    assert "8" in DEFAULT_MAX_BYTES_RULE and default_max_bytes(weights()) == MIN_MAX_BYTES
    assert default_max_bytes({"big": torch.empty(1 << 28)}) == 8 * 4 * (1 << 28)


def test_writing_into_a_weight_is_refused_but_state_may_be_updated():
    write = [inst("aten::mm.default", [X, W], [1]), inst("aten::fill_.Scalar", [W, 0.0], [2])]
    _refused(program(write, [{"r": 1}], num_registers=3, constants=weights()),
             r"instruction 1 .*writes into weight 'w'")
    view = [inst("aten::view.default", [W, [64]], [1]), inst("aten::fill_.Scalar", [{"r": 1}, 0.0], [1])]
    _refused(program(view, [{"r": 1}], num_registers=2, constants=weights()), r"instruction 1 .*weight 'w'")
    count = [inst("aten::add_.Tensor", [{"c": "calls"}, 1], [1]), inst("aten::relu.default", [X], [1])]
    validate_program(program(count, [{"r": 1}], num_registers=2, constants=weights(), state=["calls"]),
                     weights(), device="cpu")


def test_data_dependent_values_skip_the_fake_run_but_not_the_structure():
    steps = [inst("aten::nonzero.default", [X], [1]), inst("aten::relu.default", [{"r": 1}], [1])]
    validate_program(program(steps, [{"r": 1}], num_registers=2), {}, device="cpu")
    steps.append(inst("aten::relu.default", [{"r": 9}], [1]))
    _refused(program(steps, [{"r": 1}], num_registers=2), r"instruction 2 .*register 9 outside")


def test_a_call_time_failure_names_the_instruction():
    steps = [inst("aten::index_select.default", [W, 0, X], [1], name="gather_rows")]
    crafted = program(steps, [{"r": 1}], num_registers=2, shape=[2], dtype="int64", constants=weights())
    validate_program(crafted, weights(), device="cpu")
    with pytest.raises(RuntimeProgramError, match=r"instruction 0 \(aten::index_select.default, node "
                                                  r"'gather_rows'\): IndexError") as caught:
        Executor(crafted, weights()).run([torch.tensor([0, 100])])
    assert isinstance(caught.value.__cause__, IndexError)


@pytest.mark.parametrize("make, x", [(Projections, torch.randn(4, 32)), (TiedLM, torch.randint(0, 64, (2, 5)))])
def test_the_example_models_validate(make, x):
    compiled = sparsecc.compile(make().eval(), (x,), sparsity="2:4", check=False)
    validate_program(compiled.program, compiled.constants, device="cpu")


@pytest.mark.parametrize("constant_kwargs", [
    {"use_cache": float("nan")}, {"flags": list(range(1000))}, {"nested": {1: True}}, ["use_cache"],
    {"x": {"__class__": object()}},
])
def test_constant_keyword_inputs_must_be_plain_json(constant_kwargs):
    steps = [inst("aten::relu.default", [X], [1])]
    crafted = dataclasses.replace(program(steps, [{"r": 1}], num_registers=2, constants=weights()),
                                  constant_kwargs=constant_kwargs)
    _refused(crafted, "constant_kwargs must map keyword names to plain JSON")
