"""Token routing by threshold: each token runs a routed block when its router score reaches the block's
threshold, calibrated at `capacity`; in mode="generate" the prefill calibrates and decode reuses it."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import sparsecc
from sparsecc.errors import ConfigError
from sparsecc.passes.tokens.threshold import calibrated_threshold, passing_tokens, rescale_flat

from ..passes.routing_models import stack
from .prompts import left_padded

transformers = pytest.importorskip("transformers")

THRESHOLD = "token-routing{capacity=0.5,layers=[*],decision=threshold},cleanup"


def _quiet_compile(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsecc.compile(*args, **kwargs)


def _routed_by_rule(model, x: torch.Tensor, thresholds: list[float]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The stack eagerly, each block applied to the tokens whose ||norm(h)|| >= its threshold."""
    h, passed = x, []
    for layer, threshold in zip(model.layers, thresholds):
        n = layer.norm(h)
        keep = torch.linalg.vector_norm(n, dim=-1) >= threshold
        h = torch.where(keep[..., None], h + layer.mlp(n), h)
        passed.append(keep)
    return h, passed


def test_threshold_decision_routes_exactly_the_tokens_whose_score_passes():
    model, x = stack(layers=2), torch.randn(2, 12, 32)
    compiled = _quiet_compile(model, (x,), pipeline=THRESHOLD)
    records = compiled.report().layers
    thresholds = [r.details["threshold"] for r in records]
    assert [r.details["decision"] for r in records] == ["threshold"] * 2
    ops = [i.op for i in compiled.program.instructions]
    assert ops.count("aten::nonzero.default") == 2 and ops.count("sparsecc::unroute") == 2
    with torch.no_grad():
        _, passed = _routed_by_rule(model, x, thresholds)
        assert [r.details["kept"] for r in records] == [int(p.sum()) for p in passed]
        other = torch.randn(2, 12, 32) * torch.rand(2, 12, 1) * 2   # new data: other tokens pass
        want, passed = _routed_by_rule(model, other, thresholds)
        got = compiled(other)
    skipped = ~(passed[0] | passed[1])
    assert 0 < int(skipped.sum()) < skipped.numel() and int(passed[0].sum()) != int(passed[1].sum())
    assert torch.equal(got[skipped], other[skipped])   # tokens no block took ride the residual bit for bit
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_calibrated_threshold_passes_capacity_of_the_calibration_tokens():
    model, capacity = stack(layers=1), 0.3
    generator = torch.Generator().manual_seed(4)
    batches = [(torch.randn(2, 10, 32, generator=generator) * (1 + i),) for i in range(3)]
    pipeline = f"token-routing{{capacity={capacity},layers=[*],decision=threshold}},cleanup"
    compiled = _quiet_compile(model, (torch.randn(2, 10, 32),), pipeline=pipeline, calibration=batches)
    threshold = compiled.report().layers[0].details["threshold"]
    with torch.no_grad():
        scores = torch.cat([torch.linalg.vector_norm(model.layers[0].norm(b[0]), dim=-1).reshape(-1) for b in batches])
    assert abs(int((scores >= threshold).sum()) - capacity * scores.numel()) <= 1
    assert calibrated_threshold(scores, capacity) == threshold
    assert passing_tokens(scores.reshape(6, 10), threshold).shape[1] == int((scores >= threshold).sum())


def test_shape_literals_become_one_sequence_of_the_passing_tokens():
    assert rescale_flat([2, 12, 32], 2, 12, 5) == [1, 5, 32]      # [B, S, H] -> [1, N, H]
    assert rescale_flat([24, 32], 2, 12, 5) == [5, 32]            # [B*S, H] -> [N, H] (GPT-2's Conv1D)
    assert rescale_flat([1, 1, 64], 1, 1, 5) == [1, 5, 64]        # decode at batch 1: [B, S] first
    assert rescale_flat([2, 1, 64], 2, 1, 5) == [1, 5, 64]
    assert rescale_flat([-1, 32], 2, 12, 5) == [-1, 32]


def test_given_thresholds_must_match_the_routed_blocks_and_the_decision():
    model, x = stack(layers=2), torch.randn(1, 8, 32)
    with pytest.raises(Exception, match="1 thresholds for 2 routed blocks"):
        _quiet_compile(model, (x,), pipeline="token-routing{layers=[*],decision=threshold,thresholds=[2.5]}")
    with pytest.raises(Exception, match="thresholds need decision 'threshold'"):
        _quiet_compile(model, (x,), pipeline="token-routing{layers=[*],thresholds=[2.5,2.5]}")


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():   # random norm gains: token norms differ, so the norm router has something to rank
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.uniform_(0.2, 2.0)
    return model


@pytest.fixture(scope="module")
def routed_generator():
    model = _llama()
    calibration = [left_padded((7, 8), 2), left_padded((6, 6), 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = sparsecc.compile(model, left_padded((5, 9), 1), sparsity={"tokens": {"capacity": 0.5, "layers": ["*"]}},
                               mode="generate", max_length=48, calibration=calibration)
    return model, gen


def _reference(model, thresholds: dict[str, float], counts: dict[str, list[int]]) -> torch.nn.Module:
    """The model with each MLP's update kept only for the tokens whose ||post-attention norm|| >= threshold."""
    ref = copy.deepcopy(model)

    def routed(path: str):
        def hook(module, args, out):
            keep = torch.linalg.vector_norm(args[0].float(), dim=-1) >= thresholds[path]
            step = counts["decode" if args[0].shape[1] == 1 else "prefill"]
            step[0], step[1] = step[0] + int(keep.sum()), step[1] + keep.numel()
            return out * keep[..., None]
        return hook

    for index, layer in enumerate(ref.model.layers):
        layer.mlp.register_forward_hook(routed(f"model.model.layers.{index}.mlp"))
    return ref


def test_generate_decodes_like_an_eager_model_routing_by_the_same_thresholds(routed_generator, tmp_path):
    model, gen = routed_generator
    thresholds = {r.layer: r.details["threshold"] for r in gen.prefill.records}
    assert len(thresholds) == 2
    counts = {"prefill": [0, 0], "decode": [0, 0]}
    ids, mask = left_padded((4, 10), 5)
    got = gen.generate(ids, mask, max_new_tokens=12)
    want = _reference(model, thresholds, counts).generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want), f"first difference at {(got != want).nonzero()[:1].tolist()}"
    routed, total = counts["decode"]
    assert 0 < routed < total, f"decode routed {routed} of {total} tokens: the test would not tell routing apart"
    gen.save(str(tmp_path / "gen"))   # the loaded runtime guards each call after a data-dependent size: slow, 3 steps
    loaded = sparsecc.runtime.load(str(tmp_path / "gen")).generate(ids, mask, max_new_tokens=3)
    assert torch.equal(loaded, got[:, :ids.shape[1] + 3])


def test_decode_program_is_given_the_prefill_thresholds_and_reports_what_it_routed(routed_generator):
    _, gen = routed_generator
    prefill = [r.details["threshold"] for r in gen.prefill.records]
    decode = gen.report().generation["decode_token_routing"]
    assert [d["threshold"] for d in decode.values()] == prefill
    assert all(0 <= d["routed_fraction"] <= 1 and d["tokens"] == 2 for d in decode.values())
    assert "decision=threshold" in gen.prefill.report().pipeline
    assert f"thresholds=[{','.join(repr(t) for t in prefill)}]" in gen.decode.report().pipeline


def test_calibrated_router_is_refused_in_generate_mode():
    model = _llama()
    with pytest.raises(ConfigError, match="router 'calibrated'"):
        sparsecc.compile(model, left_padded((5, 9), 1), sparsity={"tokens": {"capacity": 0.5, "router": "calibrated"}},
                         mode="generate", max_length=48)
