"""Issue 13, item 2: memory-unsafe ATen ops, crafted into a Program by hand, are refused at load.

Each refusal is an ArtifactError naming the instruction index and the op; the
executor refuses the same ops when built without validation.
"""
from __future__ import annotations

import pytest
import torch

from sparsecc.runtime import ArtifactError, Executor, RuntimeProgramError
from sparsecc.runtime.op_table import ATEN_OPS, argument_problem, overload_of
from sparsecc.runtime.validate import validate_program

from ..runtime.handmade import inst, program, weights

X, W, TINY = {"r": 0}, {"c": "w"}, {"c": "tiny"}
F32 = {"dtype": "float32"}
UNSAFE = [   # op, args, kwargs: each would read or write memory it does not own, or run no tensor math
    ("aten::_reshape_alias.default", [TINY, [1 << 20], [1]], {}),
    ("aten::as_strided.default", [TINY, [1 << 20], [1]], {}),
    ("aten::segment_reduce.default", [W, "sum"], {"lengths": X, "unsafe": True}),
    ("aten::_convert_indices_from_csr_to_coo.default", [X, X], {}),
    ("aten::_sobol_engine_draw.default", [W, 4, W, 1, 1, F32], {}),
    ("aten::_sparse_coo_tensor_unsafe.default", [X, W, [8, 8]], {}),
    ("aten::sparse_coo_tensor.indices", [X, W], {}),
    ("aten::to_sparse.default", [W], {}),
    ("aten::_indices.default", [W], {}),
    ("aten::_values.default", [W], {}),
    ("aten::_unsafe_index.Tensor", [W, [X]], {}),
    ("aten::set_.source_Tensor", [W, X], {}),
    ("aten::resize_.default", [W, [1 << 30]], {}),
    ("aten::from_file.default", ["/etc/passwd"], {}),
    ("aten::normal.Tensor_float", [X], {}),
    ("aten::randperm.default", [8], {}),
    ("aten::_nested_tensor_from_mask.default", [W, X], {}),
    ("aten::quantize_per_tensor.default", [W, 0.1, 0, F32], {}),
    ("os::system", ["echo pwned"], {}),
]


@pytest.mark.parametrize("op, args, kwargs", UNSAFE, ids=[u[0] for u in UNSAFE])
def test_unsafe_op_is_refused_at_load_naming_index_and_op(op, args, kwargs):
    steps = [inst("aten::relu.default", [X], [1]), inst(op, args, [2], kwargs)]
    crafted = program(steps, [{"r": 2}], num_registers=3, constants=weights())
    with pytest.raises(ArtifactError, match=rf"instruction 1 \({op}, node '.*'\): .*op table"):
        validate_program(crafted, weights(), device="cpu")
    with pytest.raises(RuntimeProgramError, match="op table"):
        Executor(crafted, weights())


def test_the_table_holds_only_existing_overloads_without_generators():
    for qualname in ATEN_OPS:
        schema = overload_of(qualname)._schema
        assert not any("Generator" in str(a.real_type) for a in schema.arguments), qualname
    assert not [q for q in ATEN_OPS if "unsafe" in q and "_unsafe_view" not in q]
    assert not [q for q in ATEN_OPS if any(bad in q for bad in ("sparse", "strided", "::_indices", "nested"))]


def test_a_sparse_tensor_built_and_written_through_its_indices_is_refused_at_its_first_step():
    steps = [inst("aten::to_sparse.default", [W], [1]), inst("aten::_indices.default", [{"r": 1}], [2]),
             inst("aten::fill_.Scalar", [{"r": 2}, 1 << 40], [2])]
    crafted = program(steps, [{"r": 1}], num_registers=3, constants=weights())
    with pytest.raises(ArtifactError, match=r"instruction 0 \(aten::to_sparse.default"):
        validate_program(crafted, weights(), device="cpu")


@pytest.mark.parametrize("args, kwargs, reason", [
    ([X, W], {"bogus": 1}, "unexpected keyword argument 'bogus'"),
    ([X, W, 1, 2], {}, "4 positional arguments"),
    ([X], {}, "missing argument 'other'"),
    ([X, W], {"alpha": {"r": 0}, "other": W}, "given twice"),
    ([X, "text"], {}, "argument 'other' expects Tensor"),
    ([X, W], {"alpha": [1]}, "argument 'alpha' expects number"),
    ([X, {"c": 3}], {}, "argument 'other' expects Tensor"),
    ([X, {"r": 0, "c": "w"}], {}, "argument 'other' expects Tensor"),
])
def test_arguments_are_checked_against_the_overload_schema(args, kwargs, reason):
    assert reason in (argument_problem("aten::add.Tensor", args, kwargs) or "")


@pytest.mark.parametrize("kwargs, reason", [
    ({"dtype": {"dtype": "__class__"}}, "argument 'dtype'"),
    ({"dtype": {"dtype": "Tensor"}}, "argument 'dtype'"),
    ({"dtype": "float32"}, "argument 'dtype'"),
    ({"layout": {"layout": "sparse_coo"}}, "argument 'layout'"),
    ({"device": {"device": "disk"}}, "argument 'device'"),
    ({"memory_format": {"memory_format": "__dict__"}}, "argument 'memory_format'"),
])
def test_dtype_layout_device_and_memory_format_come_from_fixed_tables(kwargs, reason):
    assert reason in (argument_problem("aten::_to_copy.default", [X], kwargs) or "")
    assert argument_problem("aten::_to_copy.default", [X], {"dtype": {"dtype": "bfloat16"},
                            "layout": {"layout": "strided"}, "device": {"device": "cuda:0"}}) is None


def test_sparse_and_python_ops_are_checked_too():
    assert "at most 8" in argument_problem("sparsecc::nm_linear", [X] * 7 + ["memory", 1], {})
    assert "expects int" in argument_problem("sparsecc::nm_linear", [X, W, W, None, 2.5, 4, 8], {})
    assert argument_problem("sparsecc::nm_linear", [X, W, W, None, 2, 4, 8], {}) is None
    assert "numbers or registers" in argument_problem("py::mul", [[1, 2], 10 ** 9], {})
    assert "(register, int)" in argument_problem("py::getitem", [W, 0], {})
    assert "not in the sparsecc runtime's op table" in argument_problem("py::system", [], {})


def test_python_arithmetic_stays_in_int64_and_on_numbers():
    from sparsecc.runtime.op_table import PY_OPS
    with pytest.raises(OverflowError):
        PY_OPS["py::pow"](10, 10 ** 9)
    with pytest.raises(OverflowError):
        PY_OPS["py::mul"](1 << 40, 1 << 40)
    with pytest.raises(TypeError):
        PY_OPS["py::mul"]([0], 1 << 30)
    assert PY_OPS["py::floordiv"](7, 2) == 3 and PY_OPS["py::sym_max"](3, 4) == 4
    assert PY_OPS["py::getitem"]((torch.ones(1), 5), 1) == 5
