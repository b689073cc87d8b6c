"""Every sparse op's ONNX local function, run alone in onnxruntime on the op's registry samples,
against the op's own CPU kernel. No torch exporter involved: one node, its function, its inputs."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from sparsecc.onnx.export.body import DOMAIN
from sparsecc.onnx.export.rules import EXPORT_RULES, rule_for, rule_name
from sparsecc.onnx.export.schemas import node_inputs, split_arguments
from sparsecc.onnx.export.spec import CallSpec, Operand
from sparsecc.runtime.ops import OPS

WITH_RULES = [name for name, opdef in OPS.items() if rule_name(opdef) in EXPORT_RULES]
CASES = [(name, i) for name in WITH_RULES for i, _ in enumerate(OPS[name].samples())]


def _elem_type(t: torch.Tensor) -> int:
    return helper.np_dtype_to_tensor_dtype(t.numpy().dtype)


def _as_input(value):
    """A tensor as it is; a length (SymInt argument) as the int64 scalar the node takes."""
    return value if isinstance(value, torch.Tensor) or value is None else torch.tensor(value)


def single_op_model(name: str, sample: tuple, results: tuple) -> tuple[onnx.ModelProto, dict]:
    opdef = OPS[name]
    _, attrs = split_arguments(opdef.op)
    bound = dict(zip([a.name for a in opdef.op._schema.arguments], sample))
    for a in attrs:
        bound.setdefault(a.name, a.default_value)
    inputs = [(n, _as_input(v)) for n, v in node_inputs(opdef.op, bound)]
    while inputs and inputs[-1][1] is None:
        inputs.pop()
    attributes = {a.name: bound[a.name] for a in attrs}
    spec = CallSpec(name, f"{name}_0", attributes,
                    tuple(None if v is None else Operand(tuple(v.shape), _elem_type(v)) for _, v in inputs), 20)
    rule = rule_for(name)
    node = helper.make_node(name, [n if v is not None else "" for n, v in inputs],
                            [f"out{i}" for i in range(len(opdef.op._schema.returns))], domain=DOMAIN,
                            overload=spec.key(), **{k: int(v) if isinstance(v, bool) else v for k, v in attributes.items()})
    graph_inputs = [helper.make_tensor_value_info(n, _elem_type(v), list(v.shape)) for n, v in inputs if v is not None]
    outputs = [helper.make_tensor_value_info(o, t, list(r.shape))
               for o, t, r in zip(node.output, rule.output_types(spec), results)]
    model = helper.make_model(helper.make_graph([node], name, graph_inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)],
                              functions=[rule.function(spec)])
    return model, {n: v.numpy() for n, v in inputs if v is not None}


def test_every_op_with_an_onnx_export_name_has_that_rule():
    for opdef in OPS.values():
        if opdef.onnx_export is not None:
            assert opdef.onnx_export in EXPORT_RULES, opdef.name


@pytest.mark.parametrize("name, index", CASES)
def test_function_matches_the_cpu_kernel(name, index):
    sample = OPS[name].samples()[index]
    if any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in sample):
        pytest.skip("onnxruntime CPU has no bfloat16 MatMul")
    want = OPS[name].op(*sample)
    want = want if isinstance(want, (tuple, list)) else (want,)
    model, feeds = single_op_model(name, sample, want)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5, equal_nan=True)
