"""sparse-attention on stock Gemma2 (logit softcapping) and GPT-OSS (learned sink logits), tiny and random:
every layer, sliding-window and full, becomes block attention; exact under `mask`, reported under `window`.
Both families attend eagerly only (transformers 5.24: `_supports_sdpa = False` for each)."""
import pytest
import torch

import sparsecc

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, sliding_window=48, use_cache=False, attn_implementation="eager")


def gemma2():
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**SIZES)).eval()


def gpt_oss():
    config = transformers.GptOssConfig(**SIZES, num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "batched_mm"  # the attention is under test, not the expert path
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():  # random init leaves the sinks near 0; spread them so they weigh in
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, 4))
    return model


@pytest.fixture(scope="module", params=[gemma2, gpt_oss], ids=["gemma2", "gpt_oss"])
def model(request):
    return request.param()


def inputs(seq=256, pad=70):
    """Token ids and an attention mask whose second row is left-padded (those queries see no key)."""
    torch.manual_seed(1)
    attention_mask = torch.ones(2, seq, dtype=torch.long)
    attention_mask[1, :pad] = 0
    return torch.randint(0, 128, (2, seq)), {"attention_mask": attention_mask}


def compiled_attention(model, request):
    ids, kwargs = inputs()
    compiled = sparsecc.compile(model, (ids,), {"attention": request}, example_kwargs=kwargs)
    instructions = [i.op for i in compiled.program.instructions]
    return compiled, instructions.count("sparsecc::block_attention"), compiled.report()


def test_mask_rewrites_every_layer_exactly(model):
    compiled, count, report = compiled_attention(model, {"policy": "mask", "block": 64})
    assert count == 2 and not report.skipped
    ids, kwargs = inputs()
    got, want = compiled(ids, **kwargs)["logits"], model(ids, **kwargs)["logits"]
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    for layer in report.layers:
        assert layer.details["error_vs_dense"] < 1e-5 and 0 < layer.details["density"] < 1


def test_window_is_lossy_and_reported(model):
    _, count, report = compiled_attention(model, {"policy": "window", "block": 64, "window": 16, "sinks": 4})
    assert count == 2
    errors = [layer.details["error_vs_dense"] for layer in report.layers]
    assert all(error is not None for error in errors) and max(errors) > 1e-4
    assert all(layer.details["density"] < 0.6 for layer in report.layers)
