"""The call guard: what a load cannot bound is checked at each call of a loaded program.

Each program here passes the load-time checks; without the guard it allocates past the
limit, reads past a buffer or writes a weight or the caller's input (see the reviews
that found them: `docs/security.md`).
"""
from __future__ import annotations

import pytest
import torch

from sparsecc.runtime.call_guard import CallGuard
from sparsecc.runtime.errors import ArtifactError, RuntimeProgramError
from sparsecc.runtime.executor import Executor
from sparsecc.runtime.validate import validate_program
from tests.runtime.handmade import inst, program

CPU = torch.device("cpu")
MIB = 1 << 20


def guarded(p, constants, limit=MIB) -> Executor:
    found = validate_program(p, constants, device=CPU, max_bytes=limit)
    return Executor(p, constants, guard=CallGuard(p, constants, CPU, limit, found))


def test_an_allocation_sized_by_a_data_dependent_value_is_refused_before_it_happens():
    consts = {"n": torch.tensor(300_000_000, dtype=torch.int64)}   # 1.2 GB of float32
    p = program([inst("aten::_local_scalar_dense.default", [{"c": "n"}], [1]),
                 inst("aten::full.default", [[{"r": 1}], 1.0], [2])],
                [{"r": 2}], num_registers=3, constants=consts)
    run = guarded(p, consts)
    with pytest.raises(RuntimeProgramError, match=r"instruction 1 \(aten::full.default.*over the limit"):
        run.run([torch.zeros(4, 8)])
    consts["n"].fill_(1000)   # the same program within the limit runs
    assert run.run([torch.zeros(4, 8)])[0].shape == (1000,)


def test_the_limit_holds_at_the_calls_own_dynamic_sizes_not_only_at_the_hint():
    p = program([inst("aten::outer.default", [{"r": 0}, {"r": 0}], [1]), inst("aten::sum.default", [{"r": 1}], [2])],
                [{"r": 2}], num_registers=3, shape=["s0"], symbol_ranges={"s0": [1, None]}, symbol_hints={"s0": 1})
    run = guarded(p, {})
    assert run.run([torch.ones(100)])[0].item() == 100 * 100   # 40 kB temporary: fine
    with pytest.raises(RuntimeProgramError, match=r"dynamic dims \{'s0': 20000\}.*over the limit"):
        run.run([torch.ones(20_000)])                            # a 1.6 GB temporary is refused


def test_batch_norm_with_running_stats_smaller_than_the_channels_is_refused_at_load():
    consts = {"mean": torch.zeros(1), "var": torch.ones(1)}
    p = program([inst("aten::_native_batch_norm_legit_no_training.default",
                      [{"r": 0}, None, None, {"c": "mean"}, {"c": "var"}, 0.1, 1e-5], [1, 2, 3], unpack=True)],
                [{"r": 1}], num_registers=4, shape=[1, 64, 1], constants=consts)
    with pytest.raises(ArtifactError, match=r"instruction 0 .*per-channel argument 3 has 1 elements, the input has 64"):
        validate_program(p, consts, device=CPU)


@pytest.mark.parametrize("view", [
    inst("aten::dropout.default", [{"c": "w"}, 0.5, False], [1]),
    inst("aten::type_as.default", [{"c": "w"}, {"c": "w"}], [1]),
    inst("aten::einsum.default", ["ij->ji", [{"c": "w"}]], [1]),
    inst("aten::_unsafe_view.default", [{"c": "w"}, [8, 8]], [1]),
], ids=["dropout", "type_as", "einsum", "unsafe_view"])
def test_a_write_through_an_op_that_returns_its_input_unannotated_never_reaches_the_weight(view):
    consts = {"w": torch.zeros(8, 8)}
    p = program([view, inst("aten::add_.Scalar", [{"r": 1}, 1.0], [2]), inst("aten::add.Tensor", [{"r": 0}, 0.0], [3])],
                [{"r": 3}], num_registers=4, constants=consts)
    with pytest.raises(RuntimeProgramError, match=r"instruction 1 \(aten::add_.Scalar.*writes into a weight"):
        guarded(p, consts).run([torch.zeros(4, 8)])
    assert consts["w"].abs().sum() == 0


def test_a_program_never_writes_the_callers_input():
    p = program([inst("aten::mul_.Tensor", [{"r": 0}, 0.0], [1])], [{"r": 1}], num_registers=2, constants={})
    x = torch.ones(4, 8)
    with pytest.raises(RuntimeProgramError, match="writes into the caller's input"):
        guarded(p, {}).run([x])
    assert x.sum() == 32


def test_program_state_is_still_written():
    consts = {"calls": torch.zeros(())}
    p = program([inst("aten::add_.Scalar", [{"c": "calls"}, 1.0], [1]), inst("aten::mul.Tensor", [{"r": 0}, {"r": 1}], [2])],
                [{"r": 2}], num_registers=3, constants=consts, state=["calls"])
    run = guarded(p, consts)
    run.run([torch.ones(4, 8)]), run.run([torch.ones(4, 8)])
    assert consts["calls"].item() == 2


def test_a_scatter_back_into_a_known_tensor_stays_bounded_at_load():
    # rows picked by nonzero are data-dependent, but index_add into x keeps x's shape: only the
    # nonzero and the gather need the per-call check; the scatter and what follows are bounded at load
    p = program([inst("aten::nonzero.default", [{"r": 0}], [1]),
                 inst("aten::view.default", [{"r": 1}, [-1]], [2]),
                 inst("aten::index_select.default", [{"r": 0}, 0, {"r": 2}], [3]),
                 inst("aten::index_add.default", [{"r": 0}, 0, {"r": 2}, {"r": 3}], [4]),
                 inst("aten::mul.Tensor", [{"r": 4}, {"r": 4}], [5])],
                [{"r": 5}], num_registers=6, shape=[8])
    found = validate_program(p, {}, device=CPU, max_bytes=MIB)
    assert found.unbounded == {0, 1, 2}   # nonzero, its view, the gather
    x = torch.tensor([0.0, 1, 0, 2, 0, 0, 3, 0])
    assert torch.equal(guarded(p, {}).run([x])[0], (2 * x) ** 2)
