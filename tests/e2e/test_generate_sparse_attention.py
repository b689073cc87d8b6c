"""Sparse attention in decode: Quest page selection (`topk` over a KV cache) and BLASST `threshold`.

A tiny random Llama (fp32, 2 layers, 4 query / 2 kv heads, head dim 16) generates greedily from a
left-padded batch of two prompts. The decode program's `sparsecc::quest_layout` and
`sparsecc::block_attention` calls are recorded (their registry kernels wrapped before compiling), so
each decode step's chosen pages and attention output are checked against a reference the test
computes itself: from the page summaries, the cache and the token-level visibility rule.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import sparsecc
from sparsecc.runtime.attention_layout import Layout
from sparsecc.runtime.ops.block_attention import BLOCK_ATTENTION, block_attention_reference, skipped_blocks
from sparsecc.runtime.errors import RuntimeProgramError
from sparsecc.runtime.ops.quest_layout import QUEST_LAYOUT, page_bounds

from .prompts import left_padded

transformers = pytest.importorskip("transformers")

PAGE, MAX_LENGTH, NEW_TOKENS, LAYERS = 16, 96, 20, 2
SCALE = 16 ** -0.5


def llama(**config) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=256, eos_token_id=None, **config)
    return transformers.LlamaForCausalLM(config).eval()


class Recorder:
    """Wraps an op's torch kernel; keeps (args, output) of its one-query (decode) calls."""

    def __init__(self, monkeypatch, opdef, query_arg: int):
        self.calls, self.kernel, self.query_arg = [], opdef.kernels["torch"], query_arg
        monkeypatch.setitem(opdef.kernels, "torch", self)

    def __call__(self, *args):
        out = self.kernel(*args)
        if args[self.query_arg].shape[2] == 1:
            self.calls.append((args, out))
        return out


def compile_generator(model, ids, mask, sparsity):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsecc.compile(model, (ids, mask), sparsity=sparsity, mode="generate", max_length=MAX_LENGTH,
                                check=False)


@pytest.fixture(scope="module")
def quest_run():
    """A generator keeping 2 pages per decode step, its decode calls recorded."""
    patch = pytest.MonkeyPatch()
    layouts, attention = Recorder(patch, QUEST_LAYOUT, 4), Recorder(patch, BLOCK_ATTENTION, 0)
    ids, mask = left_padded((40, 23), seed=3)
    model = llama()
    try:
        gen = compile_generator(model, ids, mask, {"attention": {"policy": "topk", "topk": 2, "sinks": 0}})
        layouts.calls.clear(), attention.calls.clear()
        out = gen.generate(ids, mask, max_new_tokens=NEW_TOKENS)
    finally:
        patch.undo()
    return gen, ids, mask, out, layouts.calls, attention.calls


def visible_keys(mask: torch.Tensor, position: int) -> torch.Tensor:
    """[B, L] bool: the keys a query at `position` may attend (causal, not left padding)."""
    full = torch.ones(mask.shape[0], MAX_LENGTH, dtype=torch.bool)
    full[:, :mask.shape[1]] = mask.bool()
    return full & (torch.arange(MAX_LENGTH) <= position)


def page_bound(q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor) -> torch.Tensor:
    """[NP]: sum_d max(q_d * key_max_d, q_d * key_min_d) for one query head q [D] over pages [NP, D]."""
    return torch.maximum(q * key_max, q * key_min).sum(-1)


def listed_pages(layout: tuple, b: int, h: int) -> set[int]:
    kv_num, kv_idx, full_num, full_idx = (t[b, h, 0] for t in layout)
    return set(kv_idx[:kv_num].tolist()) | set(full_idx[:full_num].tolist())


def test_page_bound_is_an_upper_bound_and_bad_calls_are_refused():
    q, keys = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 4 * PAGE, 16)
    pages = keys.view(2, 2, 4, PAGE, 16)
    bound = page_bounds(q, pages.amin(3), pages.amax(3))
    best = (q @ keys.repeat_interleave(2, 1).transpose(-1, -2)).view(2, 4, 1, 4, PAGE).amax(-1)
    assert (bound >= best - 1e-5).all() and (bound > best + 1e-3).any()
    sample = QUEST_LAYOUT.samples()[0]
    with pytest.raises(RuntimeProgramError, match="page=8 must be a power of two"):
        QUEST_LAYOUT.kernel("torch")(*sample[:-1], 8)
    with pytest.raises(RuntimeProgramError, match="one floating query per row"):
        QUEST_LAYOUT.kernel("torch")(*sample[:4], sample[4].expand(-1, -1, 2, -1), *sample[5:])


def test_topk_over_all_pages_is_the_dense_generator():
    ids, mask = left_padded((40, 23), seed=3)
    model = llama()
    gen = compile_generator(model, ids, mask, {"attention": {"policy": "topk", "topk": MAX_LENGTH // PAGE}})
    assert "sparsecc.quest_layout" in gen.decode.ir() and "sparsecc.quest_layout" not in gen.prefill.ir()
    want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(gen.generate(ids, mask, max_new_tokens=NEW_TOKENS), want)


def test_decode_keeps_k_pages_and_attends_exactly_them(quest_run):
    gen, ids, mask, _, layouts, attention = quest_run
    assert len(layouts) == len(attention) == LAYERS * (NEW_TOKENS - 1)
    for call, ((visible_layout, q, key_min, key_max), (out_args, out)) in enumerate(
            zip(((a[:4], a[4], a[5], a[6]) for a, _ in layouts), attention)):
        position = ids.shape[1] + call // LAYERS
        layout, (_, cache_k, cache_v) = out_args[3:7], out_args[:3]
        visible = visible_keys(mask, position)
        for b in range(q.shape[0]):
            seen_pages = visible[b].view(-1, PAGE).any(-1)
            for h in range(q.shape[1]):
                kv = h // 2
                bound = page_bound(q[b, h, 0], key_min[b, kv], key_max[b, kv]).masked_fill(~seen_pages, -math.inf)
                bound[position // PAGE] = math.inf                      # the current page always stays
                chosen = set(bound.topk(min(2, int(seen_pages.sum()))).indices.tolist())
                assert listed_pages(layout, b, h) == chosen and len(chosen) <= 2
                keys = visible[b] & torch.isin(torch.arange(MAX_LENGTH) // PAGE, torch.tensor(sorted(chosen)))
                weights = torch.softmax(cache_k[b, kv, keys] @ q[b, h, 0] * SCALE, -1)
                torch.testing.assert_close(out[b, h, 0], weights @ cache_v[b, kv, keys], atol=1e-5, rtol=1e-5)


def test_page_summaries_are_min_max_of_the_written_keys(quest_run):
    gen, ids, _, _, _, _ = quest_run
    state = gen.decode.state_dict()
    last = ids.shape[1] + NEW_TOKENS - 2                 # the last decode step's position
    written = (torch.arange(MAX_LENGTH) <= last).view(-1, PAGE)
    summarized = [name for name in state if name.endswith("_page_min")]
    assert len(summarized) == LAYERS
    for name in summarized:
        cache = state[name.removesuffix("_page_min")]
        pages = cache.view(*cache.shape[:2], -1, PAGE, cache.shape[-1])
        for page in range(int(written.any(-1).sum())):
            keys = pages[:, :, page, written[page]]
            assert torch.equal(state[name][:, :, page], keys.amin(2))
            assert torch.equal(state[name.replace("_page_min", "_page_max")][:, :, page], keys.amax(2))


def test_quest_generator_saves_and_loads(quest_run, tmp_path):
    gen, ids, mask, out, _, _ = quest_run
    gen.save(str(tmp_path / "quest"), progress=False)
    loaded = sparsecc.runtime.load(str(tmp_path / "quest"))
    assert torch.equal(loaded.generate(ids, mask, max_new_tokens=NEW_TOKENS), out)


def report_lines(gen) -> list[str]:
    return [line for line in str(gen.decode.report()).splitlines() if "self_attn: policy" in line]


def test_quest_decode_report_names_pages_and_error(quest_run):
    lines = report_lines(quest_run[0])
    assert len(lines) == LAYERS and all("block 16" in line and "error vs dense attention" in line for line in lines)
    assert {r.pattern for r in quest_run[0].decode.records} == {"topk/quest-p16"}


BOS = 1


def peaked_llama() -> torch.nn.Module:
    """Layer 0 attends almost only to the BOS token: only BOS has a key (hidden dim 0, RoPE's slowest pair)
    and every query points at it, so a key block after BOS's block lies far below the running max."""
    model = llama(attention_bias=True)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, 0] = 0
        embed[BOS] = 0
        embed[BOS, 0] = 1.0
        attn = model.model.layers[0].self_attn
        for proj in (attn.k_proj, attn.q_proj):
            proj.weight.zero_(), proj.bias.zero_()
        attn.k_proj.weight[7::16, 0] = 8.0
        attn.q_proj.bias[7::16] = 1.0
    return model


def test_threshold_skips_blocks_in_decode_within_its_bound(monkeypatch):
    threshold, block = 0.01, 64
    attention = Recorder(monkeypatch, BLOCK_ATTENTION, 0)
    ids, mask = left_padded((70, 60), seed=3)
    ids[0, 0], ids[1, 10] = BOS, BOS
    gen = compile_generator(peaked_llama(), ids, mask,
                            {"attention": {"policy": "threshold", "threshold": threshold, "block": block}})
    attention.calls.clear()
    gen.generate(ids, mask, max_new_tokens=6)
    skipped_keys = 0
    for call, (args, out) in enumerate(attention.calls):
        q, k, v, layout = args[0], args[1], args[2], Layout(*args[3:7])
        assert args[11] == threshold
        torch.testing.assert_close(out, block_attention_reference(*args), atol=1e-5, rtol=1e-5)  # the skip rule
        visible = visible_keys(mask, ids.shape[1] + call // LAYERS)[:, None, None]
        logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * SCALE).masked_fill(~visible, -math.inf)
        skipped = skipped_blocks(logits, layout, threshold, block, block).repeat_interleave(block, -1)
        skipped = skipped[..., :MAX_LENGTH] & visible
        # a skipped key lies log(1/threshold) below the max: it holds <= threshold of the dense softmax, and
        # dropping mass m moves the output by <= 2 m max|v|
        bound = 2 * skipped.sum(-1, keepdim=True) * threshold * v.abs().amax() + 1e-6
        dense = block_attention_reference(*args[:11], 0.0, *args[12:])
        assert ((out - dense).abs() <= bound).all()
        skipped_keys += int(skipped.sum())
    assert skipped_keys > 0


def test_sink_pages_start_at_each_rows_first_visible_page():
    from sparsecc.runtime.ops.quest_layout import current_and_sink_pages
    visible = torch.tensor([[False, False, True, True, True, True, True],      # left-padded: tokens from page 2
                            [True, True, True, True, True, True, False]])
    kept = current_and_sink_pages(visible, sinks=4, page=16)
    assert kept.tolist() == [[False, False, True, True, False, False, True],   # 2 sink pages (+1: mid-page start)
                             [True, True, False, False, False, True, False]]
    assert current_and_sink_pages(visible, sinks=0, page=16).sum(-1).tolist() == [1, 1]
