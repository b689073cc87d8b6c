"""Snapshots of the printed IR for single tiny modules. Refresh: SPARSECC_UPDATE_SNAPSHOTS=1 pytest ..."""
from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from sparsecc.passes import printer
from sparsecc.passes.printer import format_type, op_name, print_graph, short_dtype

from .helpers import TinyLinear, capture, check_snapshot
from .sparse_ops import nm_linear_graph

LINEAR = """\
func @forward(%x: f32[2,16,64]) -> (f32[2,16,16]) {
  %l_weight = const "l.weight" : f32[16,64]
  %l_bias = const "l.bias" : f32[16]
  %linear = aten.linear(%x, %l_weight, %l_bias) : f32[2,16,16]
  return (%linear)
}
"""

SPLIT_DYNAMIC = """\
func @forward(%x: f32[s77,8]) -> (bf16[s77,4], f32[]) {
  %split = aten.split.Tensor(%x, 4, -1) : (f32[s77,4], f32[s77,4])
  %getitem = getitem(%split, 0) : f32[s77,4]
  %getitem_1 = getitem(%split, 1) : f32[s77,4]
  %add = aten.add.Tensor(%getitem, %getitem_1) : f32[s77,4]
  %_assert_tensor_metadata_default = aten._assert_tensor_metadata(%add, dtype=f32, device=cpu, layout=strided)
  %to = aten.to.dtype(%add, bf16) : bf16[s77,4]
  %sum_1 = aten.sum(%getitem) : f32[]
  return (%to, %sum_1)
}
"""

NM_LINEAR = """\
func @forward(%x: f32[2,8]) -> (f32[2,4]) {
  %l_weight_nm_values = const "l.weight_nm_values" : f32[4,4]
  %l_weight_nm_indices = const "l.weight_nm_indices" : u8[4,1]
  %nm_linear = sparsecc.nm_linear(%x, %l_weight_nm_values, %l_weight_nm_indices, None) {n=2, m=4, in_features=8} : f32[2,4]
  return (%nm_linear)
}
"""


class _SplitAdd(nn.Module):
    def forward(self, x):
        a, b = x.split(4, dim=-1)
        return (a + b).to(torch.bfloat16), a.sum()


def test_linear_snapshot():
    gm = capture(TinyLinear(d_in=64, d_out=16), (torch.randn(2, 16, 64),))
    check_snapshot(__file__, "LINEAR", print_graph(gm))


def test_dynamic_tuple_snapshot():
    gm = capture(_SplitAdd(), (torch.randn(3, 8),), dynamic_shapes=({0: Dim("batch")},))
    check_snapshot(__file__, "SPLIT_DYNAMIC", print_graph(gm))


def test_sparse_op_attrs_snapshot():
    check_snapshot(__file__, "NM_LINEAR", print_graph(nm_linear_graph()))


def test_sparse_op_without_registry_prints_positionally(monkeypatch):
    gm = nm_linear_graph()
    monkeypatch.setattr(printer, "_sparse_op_lookup", lambda: None)
    assert "sparsecc.nm_linear(%x, %l_weight_nm_values, %l_weight_nm_indices, None, 2, 4, 8) :" in print_graph(gm)


def test_printing_is_deterministic():
    model = TinyLinear()
    assert print_graph(capture(model, (torch.randn(2, 8),))) == print_graph(capture(model, (torch.randn(2, 8),)))


def test_type_and_name_formatting():
    assert [short_dtype(d) for d in (torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool)] == \
        ["f16", "bf16", "i64", "u8", "b8"]
    assert format_type(torch.zeros(())) == "f32[]" and format_type(None) == "none"
    assert format_type((torch.zeros(2, dtype=torch.int32), 3)) == "(i32[2], int)"
    assert op_name(torch.ops.aten.add.Tensor) == "aten.add.Tensor" and op_name(torch.ops.aten.mm.default) == "aten.mm"
