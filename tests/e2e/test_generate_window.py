"""mode="generate" under the `window` attention policy: a ring cache of sinks + window slots.

The reference is the transformers model itself with no cache, re-run on the whole sequence at each step
under a hand-built 4-D mask of the policy (a query at position p sees keys j <= p with j < sinks or
p - j < window, never left padding); greedy, fp32, a left-padded batch whose prompts exceed the window.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import sparsecc
from sparsecc.errors import ConfigError
from sparsecc.generation_cache import WindowCache, WindowPolicy, window_cache_policy
from sparsecc.generation_step import CachedStep
from sparsecc.passes import build_pipeline
from sparsecc.runtime.errors import ArtifactError
from sparsecc.runtime.generation import GenerationSpec

from .prompts import left_padded

transformers = pytest.importorskip("transformers")

WINDOW, SINKS, MAX_LENGTH, NEW_TOKENS = 8, 2, 64, 40
HEADS, KV_HEADS, HIDDEN, LAYERS = 4, 2, 64, 2
LENGTHS = (5, 17)   # prompt chunks of 8, 8 and 1 token (the last one runs as a decode step)


def llama(attention: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=128,
                                      max_position_embeddings=128)
    config._attn_implementation = attention
    return transformers.LlamaForCausalLM(config).eval()


def policy_mask(mask: torch.Tensor, attention: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(4-D mask of the window policy in the implementation's format, position ids) for a whole sequence."""
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    query = positions[:, None, :, None]
    key = torch.where(mask.bool(), positions, -1)[:, None, None, :]
    visible = (key >= 0) & (key <= query) & ((key < SINKS) | (query - key < WINDOW))
    return (visible if attention == "sdpa" else (~visible).float() * torch.finfo(torch.float32).min), positions


def reference_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, attention: str) -> torch.Tensor:
    attention_mask, positions = policy_mask(mask, attention)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
    return out.logits[:, -1]


def reference_generate(model, ids, mask, new_tokens: int, attention: str = "sdpa") -> torch.Tensor:
    for _ in range(new_tokens):
        token = reference_logits(model, ids, mask, attention).argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


@pytest.fixture(scope="module")
def window_gen():
    model = llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = sparsecc.compile(model, left_padded(LENGTHS), mode="generate", max_length=MAX_LENGTH,
                               sparsity={"attention": {"policy": "window", "window": WINDOW, "sinks": SINKS}})
    return model, gen


def test_greedy_tokens_equal_the_window_reference(window_gen):
    model, gen = window_gen
    ids, mask = left_padded(LENGTHS)
    got = gen.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    want = reference_generate(model, ids, mask, NEW_TOKENS)
    assert torch.equal(got, want), f"first differing position {(got != want).nonzero()[:1].tolist()}"
    dense = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert not torch.equal(got, dense), "the window changed no token: the test would not see a wrong ring"


def test_kv_state_is_sinks_plus_window_slots(window_gen):
    _, gen = window_gen
    slots, batch = SINKS + WINDOW, len(LENGTHS)
    kv = LAYERS * 2 * batch * KV_HEADS * slots * (HIDDEN // HEADS) * 4
    prefill, decode = gen.prefill, gen.decode
    state = [prefill.constants[name] for name in prefill.program.state_names]
    assert sum(t.numel() * t.element_size() for t in state) == kv + batch * slots * 8   # + slot positions
    assert gen.spec.cache == {"kind": "window", "window": WINDOW, "sinks": SINKS, "slots": slots,
                              "bytes": kv + batch * slots * 8, "dense_bytes": kv // slots * MAX_LENGTH, "chunk": WINDOW}
    assert gen.report().generation["cache"]["dense_bytes"] > gen.report().generation["cache"]["bytes"]
    for a, b in zip(prefill.program.state_names, decode.program.state_names):
        assert prefill.constants[a].data_ptr() == decode.constants[b].data_ptr()
    assert "sparse-attention" not in prefill.report().pipeline   # the ring is the policy, not a block layout


def test_saved_window_generator_generates_the_same(window_gen, tmp_path):
    _, gen = window_gen
    ids, mask = left_padded((12, 3), seed=5)
    want = gen.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    gen.save(str(tmp_path / "gen"))
    loaded = sparsecc.runtime.load(str(tmp_path / "gen"))
    assert loaded.spec.cache == gen.spec.cache
    assert torch.equal(loaded.generate(ids, mask, max_new_tokens=12, eos_token_id=[]), want)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_one_step_longer_than_the_window_keeps_the_last_window(attention):
    """Uncompiled CachedStep: a 20-token prefill in one call (the gather keeps sinks + last 8), decode steps
    past a full turn of the ring, then a new sequence over the stale ring."""
    model = llama(attention)
    step = CachedStep(model, 2, MAX_LENGTH, WindowPolicy(WINDOW, SINKS))
    ids, mask = left_padded((20, 11), seed=2)
    full = torch.ones(2, MAX_LENGTH, dtype=torch.long)
    full[:, :ids.shape[1]] = mask
    with torch.no_grad():
        logits = step(ids, full, torch.arange(ids.shape[1]))
        torch.testing.assert_close(logits, reference_logits(model, ids, mask, attention), rtol=1e-5, atol=1e-5)
        assert step.cache.slot_positions.tolist() == [[0, 1, 18, 19, 12, 13, 14, 15, 16, 17],
                                                      [0, 1, 10, 3, 4, 5, 6, 7, 8, 9]]
        for _ in range(WINDOW + 3):   # past a full turn of the ring
            token = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
            logits = step(token, full, torch.tensor([ids.shape[1] - 1]))
            torch.testing.assert_close(logits, reference_logits(model, ids, mask, attention), rtol=1e-5, atol=1e-5)
        ids, mask = left_padded((6, 9), seed=4)   # a new sequence, no reset: position 0 empties the ring
        full[:, :ids.shape[1]] = mask
        logits = step(ids, full, torch.arange(ids.shape[1]))
        torch.testing.assert_close(logits, reference_logits(model, ids, mask, attention), rtol=1e-5, atol=1e-5)


def test_attention_without_a_4d_mask_is_refused():
    probe = transformers.StaticCache(config=llama().config, max_cache_len=2)
    probe.early_initialization(1, KV_HEADS, HIDDEN // HEADS, torch.float32, "cpu")
    with pytest.raises(ConfigError, match="flash_attention_2.*does not take a 4-D mask"):
        WindowCache(probe, WindowPolicy(WINDOW, SINKS), 1, "flash_attention_2")


def test_the_window_pass_becomes_the_ring_policy():
    passes = build_pipeline("prune-nm{n=2,m=4},sparse-attention{policy=window,window=8,sinks=2},cleanup")
    policy, kept = window_cache_policy(passes)
    assert policy == WindowPolicy(8, 2) and policy.slots == 10
    assert [p.name for p in kept] == ["prune-nm", "cleanup"]
    assert window_cache_policy(build_pipeline("sparse-attention{policy=mask},cleanup"))[0] is None


def test_a_saved_spec_with_a_bad_prefill_chunk_is_refused():
    spec = {"format": "sparsecc-generator", "batch_size": 1, "max_length": 64, "vocab_size": 128,
            "cache": {"kind": "window", "chunk": 0}}
    with pytest.raises(ArtifactError, match="cache.chunk"):
        GenerationSpec.from_dict(spec)


def test_layer_policies_ring_sliding_layers_and_apply_a_request_to_full_ones():
    from sparsecc.generation_cache import layer_policies
    request = WindowPolicy(6, 2)
    assert layer_policies([None, None], None) == [None, None]
    assert layer_policies([8, None], None) == [WindowPolicy(8, 0), None]               # the model's own window
    assert layer_policies([8, None], request) == [request, request]                   # narrower request wins
    assert layer_policies([4, None], request) == [WindowPolicy(4, 0), request]        # never wider than its own


@pytest.mark.parametrize("family", ["mistral", "gemma2"])   # every layer sliding; sliding + full layer types
def test_sliding_window_layers_are_rings_and_exact(family):
    torch.manual_seed(0)
    shape = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 num_key_value_heads=KV_HEADS, vocab_size=128, max_position_embeddings=128, sliding_window=WINDOW)
    model = (transformers.MistralForCausalLM(transformers.MistralConfig(**shape)) if family == "mistral" else
             transformers.Gemma2ForCausalLM(transformers.Gemma2Config(head_dim=16, **shape))).eval()
    ids, mask = left_padded(LENGTHS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = sparsecc.compile(model, (ids, mask), mode="generate", max_length=MAX_LENGTH)
        want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(gen.generate(ids, mask, max_new_tokens=NEW_TOKENS), want)
    cache = gen.spec.cache
    assert cache["kind"] == "window" and cache["chunk"] == WINDOW
    full_layers = 0 if family == "mistral" else 1    # Gemma2 alternates sliding and full layers
    per_layer = cache["dense_bytes"] // LAYERS
    assert cache["bytes"] < full_layers * per_layer + (LAYERS - full_layers) * per_layer * WINDOW // MAX_LENGTH + 1024
