"""Lowering to a Program and running it with the executor, without any rewrite."""
import json
import math

import pytest
import torch

from sparsecc.capture import capture
from sparsecc.errors import LoweringError
from sparsecc.lower import lower, op_qualname
from sparsecc.passes.verify import VerificationError, verify_graph
from sparsecc.runtime.errors import InputMismatchError, RuntimeProgramError
from sparsecc.runtime.executor import Executor
from sparsecc.runtime.program import Program
from sparsecc.runtime.validate import validate_program


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, x):
        a, b = torch.split(self.fc(x), 4, dim=-1)
        return {"sum": a + b, "max": x.max(dim=-1).values}


def _lowered(model, args, dynamic_shapes=None):
    c = capture(model, args, dynamic_shapes=dynamic_shapes)
    return c, *lower(c.gm, c.symbol_ranges, c.in_spec, c.out_spec)


def test_program_runs_like_the_model_and_survives_json():
    model, x = Net(), torch.randn(3, 16)
    _, program, constants = _lowered(model, (x,))
    program = Program.from_dict(json.loads(json.dumps(program.to_dict())))
    got = Executor(program, constants).run([x])
    want = model(x)
    torch.testing.assert_close(got[0], want["sum"])
    torch.testing.assert_close(got[1], want["max"])


def test_tuple_results_unpack_into_registers():
    _, program, _ = _lowered(Net(), (torch.randn(3, 16),))
    split = [i for i in program.instructions if i.op.startswith("aten::split")]
    assert len(split) == 1 and split[0].unpack and len(split[0].outputs) == 2


def test_registers_are_reused():
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
    _, program, _ = _lowered(model, (torch.randn(2, 8),))
    assert len(program.instructions) == 6
    assert program.num_registers == 1    # each linear reads its input before writing the same register


def test_wrong_shape_and_dtype_are_named():
    _, program, constants = _lowered(Net(), (torch.randn(3, 16),))
    ex = Executor(program, constants)
    with pytest.raises(InputMismatchError, match=r"input 'x' dim 0: expected size 3, got 5"):
        ex.run([torch.randn(5, 16)])
    with pytest.raises(InputMismatchError, match=r"expected dtype float32, got float64"):
        ex.run([torch.randn(3, 16, dtype=torch.float64)])
    with pytest.raises(InputMismatchError, match=r"expected 1 tensor inputs"):
        ex.run([])


def test_dynamic_dims_accept_other_sizes():
    batch = torch.export.Dim("batch", min=1, max=64)
    _, program, constants = _lowered(Net(), (torch.randn(3, 16),), dynamic_shapes={"x": {0: batch}})
    ex = Executor(program, constants)
    assert ex.run([torch.randn(7, 16)])[0].shape[0] == 7
    with pytest.raises(InputMismatchError, match="outside the range"):
        ex.run([torch.randn(65, 16)])


def test_ops_outside_the_allowlist_are_refused():
    _, program, constants = _lowered(Net(), (torch.randn(3, 16),))
    data = program.to_dict()
    data["instructions"][0]["op"] = "os::system"
    with pytest.raises(RuntimeProgramError, match="not in the sparsecc runtime's op table"):
        Executor(Program.from_dict(data), constants)
    data["instructions"][0]["op"] = "aten::no_such_op.default"
    with pytest.raises(RuntimeProgramError, match="not in the sparsecc runtime's op table"):
        Executor(Program.from_dict(data), constants)
    data["instructions"][0]["op"] = "sparsecc::no_such_op"
    with pytest.raises(RuntimeProgramError, match="unknown sparse op"):
        Executor(Program.from_dict(data), constants)


def test_symbol_hints_hold_the_example_sizes():
    batch = torch.export.Dim("batch", min=1, max=64)
    _, program, _ = _lowered(Net(), (torch.randn(3, 16),), dynamic_shapes={"x": {0: batch}})
    symbol = program.input_specs[0].shape[0]
    assert program.symbol_hints == {symbol: 3} and symbol in program.symbol_ranges


def test_ops_outside_the_runtime_table_do_not_lower():
    c = capture(Net(), (torch.randn(3, 16),))
    node = next(n for n in c.gm.graph.nodes if n.target == torch.ops.aten.linear.default)
    node.target = torch.ops.aten._reshape_alias.default
    with pytest.raises(LoweringError, match=r"node 'linear' in module fc: cannot lower call to "
                                            r"aten._reshape_alias.default: the sparsecc runtime's op table"):
        lower(c.gm, c.symbol_ranges, c.in_spec, c.out_spec)


def test_qualnames():
    assert op_qualname(torch.ops.aten.add.Tensor) == "aten::add.Tensor"
    assert op_qualname(torch.ops.aten.linear.default) == "aten::linear.default"


class SizeArithmetic(torch.nn.Module):
    """Sizes computed with the Python operators export leaves for SymInt arithmetic."""

    def forward(self, x):
        n = x.shape[0]
        return x.new_zeros(torch.sym_max(n, 4)), x.new_ones(n ** 2), x.new_ones(math.ceil(n / 3))


def test_python_size_arithmetic_verifies_lowers_and_runs():
    batch = torch.export.Dim("batch", min=4, max=64)
    c, program, constants = _lowered(SizeArithmetic(), (torch.randn(5, 3),), dynamic_shapes={"x": {0: batch}})
    verify_graph(c.gm)
    assert {"py::sym_max", "py::pow", "py::ceil"} <= {i.op for i in program.instructions}
    validate_program(program, constants, device="cpu")
    assert [o.shape for o in Executor(program, constants).run([torch.randn(7, 3)])] == [(7,), (49,), (3,)]


def test_what_the_verifier_refuses_the_lowering_refuses():
    c = capture(Net(), (torch.randn(3, 16),))
    node = next(n for n in c.gm.graph.nodes if n.target == torch.ops.aten.linear.default)
    node.target = math.hypot   # a Python call the runtime's op table does not hold
    with pytest.raises(VerificationError, match="allowed Python operator"):
        verify_graph(c.gm)
    with pytest.raises(LoweringError, match="cannot lower call to <built-in function hypot>"):
        lower(c.gm, c.symbol_ranges, c.in_spec, c.out_spec)


class Conversions(torch.nn.Module):
    def forward(self, x):
        kept = x.to(torch.float32)          # no change: aten.to returns x itself
        return kept * 2, x.to(torch.float64), kept.to(torch.float32, copy=True)


def test_checks_and_conversions_that_change_nothing_cost_no_instruction():
    x = torch.randn(3, 4)
    c, program, constants = _lowered(Conversions(), (x,))
    in_graph = [n.target for n in c.gm.graph.nodes if n.op == "call_function"]
    ops = [i.op for i in program.instructions]
    assert torch.ops.aten.to.dtype in in_graph and "aten::_assert_tensor_metadata.default" not in ops
    assert ops.count("aten::to.dtype") + ops.count("aten::_to_copy.default") == 2   # float64 and the copy stay
    doubled, widened, copied = Executor(program, constants).run([x])
    torch.testing.assert_close(doubled, x * 2)
    assert widened.dtype == torch.float64 and copied.data_ptr() != x.data_ptr()
