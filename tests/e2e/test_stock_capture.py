"""Stock transformers models compile as they are: no config edits, the model's own output class back.

Tiny random-init models built from their config classes (2 layers, hidden 32, vocab 128; no
downloads), left at their defaults: `use_cache` on, so the eager model returns a DynamicCache.
"""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

import sparsecc
from sparsecc.runtime.errors import InputMismatchError

transformers = pytest.importorskip("transformers")

VOCAB = 128
ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2)


def build(family: str, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    llama = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, vocab_size=VOCAB, **ATTENTION)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama)).eval()
    if family == "llama-base":
        return transformers.LlamaModel(transformers.LlamaConfig(**llama)).eval()
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**llama)).eval()
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return transformers.GPT2LMHeadModel(config).eval()
    if family == "mixtral":   # batched_mm: the default grouped_mm path leaves transformers' own op (issue 15)
        config = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **llama)
        config._experts_implementation = "batched_mm"
        return transformers.MixtralForCausalLM(config).eval()
    raise ValueError(family)


def token_ids(seq: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(1))


def first_field(output):
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def compile_quietly(model, *args, **kwargs):
    with pytest.warns(UserWarning, match="KV cache") if model.config.use_cache else nullcontext():
        return sparsecc.compile(model, *args, **kwargs)


@pytest.mark.parametrize("family", ["llama", "llama-base", "qwen2", "gpt2", "mixtral"])
def test_stock_model_compiles_as_it_is_and_keeps_its_output_class(family):
    model, ids = build(family), token_ids()
    compiled = compile_quietly(model, (ids,), sparsity="2:4")
    report = compiled.report()
    assert report.layers, "2:4 rewrote nothing"
    assert report.error_vs_reference < 1e-5
    assert 0 < report.error_vs_dense < 1     # pruning changes the output, and the error is measured
    got = compiled(ids)
    eager = torch.func.functional_call(model, compiled.pruned_state_dict(), (ids,), {"use_cache": False},
                                       strict=False)
    assert type(got) is type(eager)
    torch.testing.assert_close(first_field(got), first_field(eager), rtol=1e-5, atol=1e-5)
    assert got[0] is first_field(got) and list(got.keys())[0] in ("logits", "last_hidden_state")


@pytest.mark.parametrize("use_cache", [None, False, True])
def test_dense_compile_matches_the_model_with_and_without_use_cache(use_cache):
    model, ids = build("llama"), token_ids()
    kwargs = {} if use_cache is None else {"use_cache": use_cache}
    with pytest.warns(UserWarning, match="KV cache") if use_cache is not False else nullcontext():
        compiled = sparsecc.compile(model, (ids,), example_kwargs=kwargs, check=True)
    assert compiled.report().error_vs_dense < 1e-6
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    torch.testing.assert_close(compiled(ids, **kwargs).logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(ids)["logits"], want, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(model)    # the capture's bound forward is gone again


def test_constant_keywords_are_baked_in_and_checked_at_call():
    model, ids = build("llama"), token_ids()
    flags = {"use_cache": False, "return_dict": True, "output_attentions": False}
    compiled = sparsecc.compile(model, (ids,), example_kwargs=flags, check=False)
    assert compiled.captured.bound.constants == flags
    assert compiled.program.input_specs[0].name == "input_ids" and len(compiled.program.input_specs) == 1
    torch.testing.assert_close(compiled(ids, **flags).logits, compiled(ids).logits)
    with pytest.raises(InputMismatchError, match="'use_cache'.*use_cache=False"):
        compiled(ids, use_cache=True)
    with pytest.raises(InputMismatchError, match="'return_dict'"):
        compiled(ids, return_dict=False)
    with pytest.raises(InputMismatchError, match="'output_attentions'"):
        compiled(ids, output_attentions=1)     # 1 == True, but not the bool it was compiled with


def test_tensor_keywords_stay_inputs_beside_constants():
    model, ids = build("llama"), token_ids()
    mask = torch.ones(1, 8, dtype=torch.long)
    compiled = sparsecc.compile(model, (ids,), example_kwargs={"attention_mask": mask, "use_cache": False},
                                check=False)
    assert [spec.name for spec in compiled.program.input_specs] == ["input_ids", "attention_mask"]
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(compiled(ids, attention_mask=mask).logits, want, rtol=1e-5, atol=1e-5)


def test_return_dict_false_gives_the_models_tuple_without_the_cache():
    model, ids = build("gpt2"), token_ids()
    with pytest.warns(UserWarning, match="KV cache"):
        compiled = sparsecc.compile(model, (ids,), example_kwargs={"return_dict": False}, check=False)
    got = compiled(ids, return_dict=False)
    with torch.no_grad():
        want = model(ids, return_dict=False, use_cache=False)
    assert isinstance(got, tuple) and len(got) == len(want) == 1
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_keeps_the_output_class(tmp_path):
    model, ids = build("llama"), token_ids()
    compiled = compile_quietly(model, (ids,), sparsity="2:4", check=False)
    compiled.save(str(tmp_path / "artifact"), targets=["cpu"], progress=False)
    loaded = sparsecc.runtime.load(str(tmp_path / "artifact"), device="cpu")
    got, want = loaded(ids), compiled(ids)
    assert type(got).__name__ == "CausalLMOutputWithPast" and type(got) is type(want)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got[0], got["logits"])


def test_readme_attention_example_runs_as_written_on_a_stock_llama():
    llama, ids = build("llama"), token_ids()
    mask = torch.ones(1, 8, dtype=torch.long)
    with pytest.warns(UserWarning, match="KV cache"):
        cm = sparsecc.compile(llama, (ids,), example_kwargs={"attention_mask": mask},
                              sparsity={"attention": {"policy": "window", "window": 4, "sinks": 1}})
    assert "sparsecc.block_attention" in cm.ir()
    assert cm.report().error_vs_dense is not None and cm(ids, attention_mask=mask).logits.shape == (1, 8, VOCAB)


def test_readme_token_routing_example_runs_as_written_on_a_stock_llama():
    llama, ids = build("llama", layers=3), token_ids()   # the first and last blocks stay dense by default
    with pytest.warns(UserWarning, match="KV cache"):
        cm = sparsecc.compile(llama, (ids,), sparsity={"tokens": {"capacity": 0.5, "where": "mlp"}})
    assert [r.layer for r in cm.report().layers] == ["model.layers.1.mlp"]
    assert 0 < cm.report().error_vs_dense < 1 and cm(ids).logits.shape == (1, 8, VOCAB)


class Opaque:
    """Neither a tensor nor plain data: torch.export cannot return it."""


class ScaledWithExtras(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, scale: float = 1.0, mode: str = "plain"):
        y = self.proj(x) * scale
        return (y if mode == "plain" else -y), Opaque(), 3


def test_plain_module_constants_dynamic_shapes_by_name_and_an_opaque_output():
    model, x = ScaledWithExtras(), torch.randn(2, 5, 8)
    batch = torch.export.Dim("batch", min=1, max=16)
    with pytest.warns(UserWarning, match=r"\[1\] \(Opaque\)"):
        compiled = sparsecc.compile(model, (x,), example_kwargs={"scale": 0.5, "mode": "negated"},
                                    dynamic_shapes={"x": {0: batch}, "scale": None, "mode": None})
    assert compiled.captured.bound.dropped_outputs == ["[1] (Opaque)"]
    y, three = compiled(torch.ones(3, 5, 8), scale=0.5)
    with torch.no_grad():
        torch.testing.assert_close(y, -model.proj(torch.ones(3, 5, 8)) * 0.5)
    assert three == 3
    with pytest.raises(InputMismatchError, match="'mode'.*mode='negated'.*'plain'"):
        compiled(x, mode="plain")


def test_a_saved_artifact_accepts_the_constant_keywords_and_refuses_others(tmp_path):
    model, ids = build("llama"), token_ids()
    flags = {"use_cache": False, "return_dict": True}
    compiled = sparsecc.compile(model, (ids,), example_kwargs=flags, check=False)
    report = compiled.report()
    assert report.constant_inputs == flags and "constant inputs: use_cache=False" in str(report)
    assert report.to_dict()["constant_inputs"] == flags
    compiled.save(str(tmp_path / "artifact"), targets=["cpu"], progress=False)
    loaded = sparsecc.runtime.load(str(tmp_path / "artifact"), device="cpu")
    assert loaded.program.constant_kwargs == flags
    torch.testing.assert_close(loaded(ids, **flags).logits, compiled(ids).logits)
    torch.testing.assert_close(loaded(ids).logits, compiled(ids).logits)
    with pytest.raises(InputMismatchError, match="'use_cache'.*use_cache=False"):
        loaded(ids, use_cache=True)
    with pytest.raises(InputMismatchError, match="'return_dict'"):
        loaded(ids, return_dict=1)


def test_the_report_names_the_dropped_cache():
    model, ids = build("llama"), token_ids()
    report = compile_quietly(model, (ids,), check=False).report()
    assert any("KV cache" in line for line in report.dropped_outputs)
    assert "dropped output: KV cache" in str(report)
