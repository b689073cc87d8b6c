"""compile(..., compressed=): the N:M weights sparsecc.prune_checkpoint wrote are taken as they are (no
method runs), equal compile's own pruning, survive save/load, and anything that does not fit is refused."""
from __future__ import annotations

import dataclasses
import textwrap

import pytest
import torch

import sparsecc
from sparsecc.cli import main
from sparsecc.errors import ConfigError
from sparsecc.passes.nm.given import GivenMaskError

transformers = pytest.importorskip("transformers")

VOCAB = 128
WANDA = {"weights": {"pattern": "2:4", "method": "wanda"}}


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 16), generator=generator) for _ in range(2)]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """(dense model, pruned checkpoint folder, model loaded from it): a 1-layer Llama pruned 2:4 by Wanda."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    dense_dir, out = tmp_path_factory.mktemp("dense"), tmp_path_factory.mktemp("pruned")
    model.save_pretrained(dense_dir, max_shard_size="100KB")
    sparsecc.prune_checkpoint(dense_dir, out, "2:4", "wanda", calibration=_batches(), progress=False)
    return model, out, transformers.LlamaForCausalLM.from_pretrained(out).eval()


@pytest.fixture(scope="module")
def from_checkpoint(pruned):
    _, out, model = pruned
    return sparsecc.compile(model, (_batches()[0],), sparsity=WANDA, compressed=out, check=False)


def test_masks_and_values_come_from_the_checkpoint(pruned, from_checkpoint):
    dense_model, out, _ = pruned
    batches = _batches()
    by_method = sparsecc.compile(dense_model, (batches[0],), sparsity=WANDA, calibration=batches, check=False)
    stored = sparsecc.load_compressed(out)
    records = [r for r in from_checkpoint.report().layers if "values" in r.details]
    assert len(records) == len(stored.weights) == 7 + 1
    for record in records:   # the compiled constants are the checkpoint's tensors, bit for bit
        values, indices = stored.weights[record.details["weight"]]
        assert torch.equal(from_checkpoint.constants[record.details["values"]], values)
        assert torch.equal(from_checkpoint.constants[record.details["indices"]], indices)
        assert record.details["calibration"] == f"none: masks taken from {out}"
    expected = by_method.pruned_state_dict()
    assert from_checkpoint.pruned_state_dict().keys() == expected.keys()
    for name, weight in from_checkpoint.pruned_state_dict().items():
        assert torch.equal(weight, expected[name]), name
    for ids in batches:
        assert torch.equal(from_checkpoint(ids).logits, by_method(ids).logits)
    assert f"masks taken from {out}" in str(from_checkpoint.report())


def test_saved_artifact_runs_the_checkpoint_weights(from_checkpoint, tmp_path):
    from_checkpoint.save(tmp_path / "artifact")
    loaded = sparsecc.runtime.load(tmp_path / "artifact")
    for ids in _batches():
        assert torch.equal(loaded(ids).logits, from_checkpoint(ids).logits)


def test_what_does_not_fit_is_refused(pruned):
    dense_model, out, model = pruned
    ids = _batches()[0]
    with pytest.raises(ConfigError, match=r"holds 2:4 wanda masks .* the request asks 2:4 magnitude"):
        sparsecc.compile(model, (ids,), sparsity="2:4", compressed=out)
    with pytest.raises(ConfigError, match="the request prunes no weights"):
        sparsecc.compile(model, (ids,), sparsity={"moe": "dispatch"}, compressed=out)
    with pytest.raises(ConfigError, match="compressed= takes the folder"):
        sparsecc.compile(model, (ids,), sparsity=WANDA, compressed=42)
    with pytest.raises(GivenMaskError, match=r"'model.layers.0.self_attn.q_proj.weight' .* differs from the model's "
                                             r"dense weight \(1 of 4096"):
        changed = transformers.LlamaForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            changed.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0   # someone changed the model
        sparsecc.compile(changed, (ids,), sparsity=WANDA, compressed=out, check=False)
    with pytest.raises(GivenMaskError, match=r"differs from the model's dense weight"):   # the unpruned model
        sparsecc.compile(dense_model, (ids,), sparsity=WANDA, compressed=out, check=False)
    stored = sparsecc.load_compressed(out)
    lacking = dataclasses.replace(stored, weights={k: v for k, v in stored.weights.items() if k != "lm_head.weight"})
    with pytest.raises(GivenMaskError, match=r"prunes 1 weights the compressed checkpoint .* does not hold \(lm_head"):
        sparsecc.compile(model, (ids,), sparsity=WANDA, compressed=lacking, check=False)
    kept_dense = sparsecc.compile(model, (ids,), sparsity={"weights": {**WANDA["weights"], "exclude": ["lm_head"]}},
                                  compressed=lacking, check=False)   # excluded: nothing lacks
    assert "lm_head" not in {r.layer for r in kept_dense.report().layers}


def test_cli_compile_takes_the_checkpoint(pruned, tmp_path, capsys):
    _, out, _ = pruned
    factory = tmp_path / "factory.py"
    factory.write_text(textwrap.dedent(f"""
        import torch, transformers
        def build():
            model = transformers.LlamaForCausalLM.from_pretrained({str(out)!r}).eval()
            return model, (torch.zeros(1, 8, dtype=torch.long),)
    """))
    assert main(["compile", f"{factory}:build", "--method", "wanda", "--compressed", str(out), "--no-check",
                 "-q"]) == 0
    assert f"masks taken from {out}" in capsys.readouterr().out


def test_a_generator_takes_the_checkpoint_masks(pruned):
    """mode="generate": the prefill program takes the checkpoint's tensors (under the step's `model.` prefix),
    decode keeps them; greedy tokens equal transformers' generate on the pruned checkpoint's model."""
    _, out, model = pruned
    prompt = _batches()[0][:1, :8]
    gen = sparsecc.compile(model, prompt, sparsity=WANDA, compressed=out, mode="generate", max_length=32)
    stored = sparsecc.load_compressed(out)
    records = [r for r in gen.prefill.report().layers if "values" in r.details]
    assert records and all(r.details["calibration"] == f"none: masks taken from {out}" for r in records)
    for record in records:
        values, _ = stored.weights[record.details["weight"].removeprefix("model.")]
        assert torch.equal(gen.prefill.constants[record.details["values"]], values)
    want = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(gen.generate(prompt, max_new_tokens=12), want)


def test_runtime_load_takes_another_pruned_checkpoint(pruned, from_checkpoint, tmp_path):
    """An artifact built from the Wanda checkpoint, loaded with compressed= a magnitude checkpoint of the same
    model, runs the magnitude weights: the same outputs as compiling from that checkpoint."""
    dense_model, wanda_dir, _ = pruned
    dense_dir, magnitude_dir = tmp_path / "dense", tmp_path / "magnitude"
    dense_model.save_pretrained(dense_dir)
    sparsecc.prune_checkpoint(dense_dir, magnitude_dir, "2:4", "magnitude", progress=False)
    x = _batches()[1]   # the artifact's static input shape [2, 16]
    from_checkpoint.save(tmp_path / "artifact", progress=False)
    swapped = sparsecc.runtime.load(tmp_path / "artifact", compressed=magnitude_dir)
    magnitude_model = transformers.LlamaForCausalLM.from_pretrained(magnitude_dir).eval()
    want = sparsecc.compile(magnitude_model, (x,), sparsity="2:4", compressed=magnitude_dir, check=False)(x)
    got, before = swapped(x), sparsecc.runtime.load(tmp_path / "artifact")(x)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before.logits, got.logits)     # the Wanda weights were really replaced
    with pytest.raises(sparsecc.runtime.ArtifactError, match="no index.json"):
        sparsecc.runtime.load(tmp_path / "artifact", compressed=dense_dir)
