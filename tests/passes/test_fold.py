"""fold-constants: constant subgraphs run at compile time, within a size limit, never random ops; results exact."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecc
from sparsecc.lower import lower
from sparsecc.passes import PassContext, PassManager, build_pipeline
from sparsecc.passes.fold import FoldConstants, foldable_op
from sparsecc.passes.options import OptionError
from sparsecc.passes.pipeline import PipelineError
from sparsecc.passes.records import RewriteRecord

from .helpers import call_targets, capture


class CausalMask(nn.Module):
    """Attention under a causal mask built from `arange` (S x S bool), the way models write it."""

    def __init__(self, seq: int):
        super().__init__()
        self.seq = seq

    def forward(self, q, k, v):
        pos = torch.arange(self.seq, device=q.device)
        mask = pos[:, None] >= pos[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Rotary(nn.Module):
    """A cos table from a constant frequency vector, applied to an input whose length may be dynamic."""

    def __init__(self, length: int = 8):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 4).float() / 4))
        self.length = length

    def forward(self, x):
        table = torch.cos(torch.arange(self.length).float()[:, None] * self.inv_freq[None, :])
        ramp = torch.arange(x.shape[0]).float()[:, None]   # x.shape[0] may be a symbol: never folded
        return x * table[: x.shape[0]] + ramp


class Noisy(nn.Module):
    """Random ops over constants: each call must draw anew (the runtime runs no rand: pass level only)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("base", torch.ones(4))

    def forward(self, x):
        return x + torch.rand(4) * self.base + F.dropout(self.base, p=0.5, training=True)


def qkv(seq: int):
    torch.manual_seed(0)
    return tuple(torch.randn(1, 2, seq, 8) for _ in range(3))


def ops(gm) -> set[str]:
    """The op packets the graph calls (`aten.ge`, not `aten.ge.Tensor`)."""
    return {".".join(target.split(".")[:2]) for target in call_targets(gm)}


def layout_ops(program) -> list[str]:
    return [i.op for i in program.instructions if i.op in ("sparsecc::rule_layout", "sparsecc::block_layout")]


def fold(gm, verify: bool = True, **options):
    """Run fold-constants then cleanup (verified unless told not to); returns fold's stats."""
    ctx = PassContext()
    PassManager([FoldConstants(**options), *build_pipeline("cleanup")], verify=verify).run(gm, ctx)
    return ctx.stats["fold-constants"]


def test_small_mask_folds_into_one_constant_and_stays_exact():
    model, inputs = CausalMask(16), qkv(16)
    gm = capture(model, inputs)
    stats = fold(gm)
    assert "aten.ge" not in ops(gm) and "aten.arange" not in ops(gm)
    assert stats.rewritten == 1 and stats.extra["folded_bytes"] == 16 * 16
    masks = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    assert [m.shape for m in masks] == [(16, 16)] and torch.equal(masks[0], torch.ones(16, 16).tril().bool())
    assert torch.equal(gm(*inputs), model(*inputs))


def test_mask_over_the_size_limit_is_left_to_run_but_its_inputs_fold():
    gm = capture(CausalMask(2048), qkv(2048))
    stats = fold(gm)
    assert "aten.ge" in ops(gm) and "aten.arange" not in ops(gm)
    assert stats.extra["left_too_large"] == 1
    assert all(getattr(gm, n.target).numel() <= 2048 for n in gm.graph.nodes if n.op == "get_attr")


def test_max_bytes_option_moves_the_limit():
    gm = capture(CausalMask(16), qkv(16))
    stats = fold(gm, max_bytes=255)
    assert "aten.ge" in ops(gm) and stats.extra["left_too_large"] == 1


def test_random_ops_never_fold():
    gm = capture(Noisy(), (torch.zeros(4),))
    before = call_targets(gm)
    stats = fold(gm, verify=False)
    assert stats.rewritten == 0 and stats.extra["folded_bytes"] == 0
    assert call_targets(gm) == before and {"aten.rand", "aten.dropout"} <= ops(gm)
    first, second = gm(torch.zeros(4)), gm(torch.zeros(4))
    assert not torch.equal(first, second)


def test_dynamic_shape_graph_folds_only_static_parts():
    model, x = Rotary(), torch.randn(6, 4)
    batch = torch.export.Dim("batch", min=2, max=8)
    gm = capture(model, (x,), dynamic_shapes=({0: batch},))
    stats = fold(gm)
    assert stats.rewritten == 1 and "aten.cos" not in ops(gm)
    assert "aten.arange" in ops(gm) and "aten.sym_size" in ops(gm)   # the ramp over x's length
    for rows in (3, 6, 8):
        shorter = torch.randn(rows, 4)
        assert torch.equal(gm(shorter), model(shorter))


def test_folded_constants_own_their_storage():
    model = Rotary()
    gm = capture(model, (torch.randn(6, 4),))
    fold(gm)
    weights = {model.inv_freq.untyped_storage().data_ptr()}
    folded = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    assert folded and all(t.untyped_storage().data_ptr() not in weights for t in folded)


def test_max_bytes_is_validated_naming_the_option():
    with pytest.raises(OptionError, match="option 'max_bytes': expected a byte count >= 0, got -1"):
        FoldConstants(max_bytes=-1)
    with pytest.raises(PipelineError, match="max_bytes"):
        build_pipeline("fold-constants{max_bytes=-5}")
    assert build_pipeline("fold-constants{max_bytes=4096}") == [FoldConstants(max_bytes=4096)]
    assert FoldConstants().spelling() == "fold-constants"


def test_a_pipeline_that_folds_nothing_warns_nothing(recwarn):
    compiled = sparsecc.compile(CausalMask(16), qkv(16), pipeline="fold-constants{max_bytes=0},cleanup", check=False)
    assert compiled.report().passes["fold-constants"]["rewritten"] == 0
    assert not [w for w in recwarn if "fold-constants" in str(w.message)]


def test_artifact_round_trip_keeps_folded_constants(tmp_path):
    model, inputs = CausalMask(16), qkv(16)
    compiled = sparsecc.compile(model, inputs, check=False)
    assert compiled.report().passes["fold-constants"]["rewritten"] == 1
    names = [n for n in compiled.program.constant_names if "folded" in n]
    assert len(names) == 1 and compiled.constants[names[0]].shape == (16, 16)
    compiled.save(tmp_path / "artifact", targets=["cpu"], progress=False)
    loaded = sparsecc.runtime.load(tmp_path / "artifact")
    assert torch.equal(loaded(*inputs), model(*inputs))


def test_llama_rope_tables_fold_and_the_model_stays_exact():
    from .hf_attention import llama   # imports transformers (skips without it)
    model, ids = llama("sdpa"), torch.randint(0, 64, (1, 16))
    gm = capture(model, (ids,))
    dense_program, _ = lower(gm)
    stats = fold(gm)
    assert "aten.cos" not in ops(gm) and "aten.sin" not in ops(gm) and "aten.arange" not in ops(gm)
    folded = [n.target for n in gm.graph.nodes if n.op == "get_attr" and "folded" in n.target]
    assert stats.rewritten == len(folded) and any(t.startswith("model.layers.0.self_attn.") for t in folded)
    program, _ = lower(gm)
    assert len(program.instructions) < len(dense_program.instructions) - 40
    assert torch.equal(gm(ids).logits, model(ids).logits)


def test_which_ops_may_fold():
    import sparsecc.runtime.ops  # noqa: F401  (registers the sparsecc ops)
    graph, aten, sparse = torch.fx.Graph(), torch.ops.aten, torch.ops.sparsecc
    assert foldable_op(graph.call_function(aten.add.Tensor))
    assert foldable_op(graph.call_function(sparse.rule_layout.default))
    for never in (aten.rand.default, aten.bernoulli.p, aten.empty.memory_format, aten.add_.Tensor,
                  aten._assert_scalar.default, sparse.nm_decompress.default):
        assert not foldable_op(graph.call_function(never)), never


def test_constants_a_rewrite_record_names_are_kept():
    class Projection(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("weight", torch.randn(8, 8))

        def forward(self, x):
            return x @ self.weight.t()

    gm, ctx = capture(Projection(), (torch.randn(2, 8),)), PassContext()
    ctx.records.append(RewriteRecord("proj", "sparsecc.nm_linear", "aten.linear", "2:4", [8, 8], 64, 32, 256, 160,
                                     256, 128, details={"values": "weight"}))
    assert FoldConstants().run(gm, ctx).stats.rewritten == 0 and "aten.t" in ops(gm)
    assert FoldConstants().run(gm, PassContext()).stats.rewritten == 1


def test_a_value_the_program_returns_is_computed_per_call():
    class Returns(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("angle", torch.arange(4.0))

        def forward(self, x):
            return x + 1, torch.cos(self.angle * 2)   # the caller may write the table it gets

    gm = capture(Returns(), (torch.randn(4),))
    stats = fold(gm)
    assert "aten.cos" in ops(gm) and "aten.mul" not in ops(gm) and stats.rewritten == 1
    gm(torch.zeros(4))[1].add_(1)
    assert torch.equal(gm(torch.zeros(4))[1], torch.cos(torch.arange(4.0) * 2))


def test_a_view_the_program_returns_is_not_an_alias_of_a_constant():
    class ReturnsView(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.ones(4))

        def forward(self, x):
            return x + 1, (self.c * 2).view(2, 2)   # a view of a foldable value

    gm = capture(ReturnsView(), (torch.randn(4),))
    fold(gm)
    gm(torch.zeros(4))[1].add_(100)
    assert torch.equal(gm(torch.zeros(4))[1], torch.full((2, 2), 2.0))


def test_an_attention_layout_over_constants_folds_into_program_data():
    model, inputs = CausalMask(128), qkv(128)
    compiled = sparsecc.compile(model, inputs, sparsity={"attention": {"policy": "mask", "block": 64}}, check=False)
    unfolded = sparsecc.compile(model, inputs, pipeline="sparse-attention{policy=mask,block=64},cleanup", check=False)
    assert layout_ops(unfolded.program) and not layout_ops(compiled.program)
    assert len(compiled.program.instructions) < len(unfolded.program.instructions)
    assert torch.equal(compiled(*inputs), unfolded(*inputs))
