"""`sparsecc.plan`: the report of a model without weights equals a real compile's, from shapes alone."""
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import sparsecc
from sparsecc.cli import main
from sparsecc.errors import ConfigError
from sparsecc.passes.region import NOT_PLANNED
from sparsecc.report import NOT_MEASURED

hf = pytest.importorskip("transformers")

VOCAB = 128
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             use_cache=False)
MOE = {"moe": "dispatch", "weights": "2:4"}


def llama_config():
    return hf.LlamaConfig(**SHAPE, intermediate_size=64)


def mixtral_config():
    return hf.MixtralConfig(**SHAPE, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)


def on_meta(model_cls, config):
    with torch.device("meta"):
        return model_cls(config).eval()


def with_weights(model_cls, config):
    """The same config with random weights; norms drawn too, so no two constants are equal by chance
    (compile merges equal constants, which a plan cannot see)."""
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "norm" in name:
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    return model


def rows(report):
    return [(r.layer, r.op, r.pattern, r.shape, r.params_before, r.params_after, r.bytes_before, r.bytes_after,
             r.flops_before, r.flops_after) for r in report.layers]


def skips(report):
    return [(s["layer"], s["reason"]) for s in report.skipped]


def assert_same_plan(planned, compiled):
    assert rows(planned) == rows(compiled)
    assert skips(planned) == skips(compiled)
    assert planned.totals() == compiled.totals()
    assert planned.model_bytes_before == compiled.model_bytes_before
    # compile also merges constants of equal value (the rotary tables every layer folds): a plan keeps each
    assert compiled.model_bytes_after <= planned.model_bytes_after < planned.model_bytes_before


@pytest.mark.parametrize("model_cls, config, sparsity", [
    (hf.LlamaForCausalLM, llama_config, "2:4"),
    (hf.MixtralForCausalLM, mixtral_config, MOE),
], ids=["llama-2:4", "mixtral-moe+2:4"])
def test_plan_on_meta_lists_what_compile_rewrites(model_cls, config, sparsity):
    ids = torch.randint(0, VOCAB, (2, 6))
    planned = sparsecc.plan(on_meta(model_cls, config()), (ids.to("meta"),), sparsity=sparsity)
    compiled = sparsecc.compile(with_weights(model_cls, config()), (ids,), sparsity=sparsity, check=False).report()
    assert len(planned.layers) > 0
    assert_same_plan(planned, compiled)
    assert planned.planned and planned.error_vs_dense is None and planned.backend.startswith("none")
    text = str(planned)
    assert f"error vs dense model: {NOT_MEASURED}" in text
    moe = [r for r in planned.layers if r.op == "sparsecc.moe"]
    assert all(r.details["tokens_per_expert"] is None and "not confirmed" in r.details["confirmed"] for r in moe)
    assert ("tokens/expert " + NOT_MEASURED in text) == bool(moe)


def test_plan_reads_attention_sites_and_their_mask_rules():
    sparsity = {"attention": {"policy": "window", "window": 128, "sinks": 4}}
    ids = torch.randint(0, VOCAB, (1, 256))
    planned = sparsecc.plan(on_meta(hf.LlamaForCausalLM, llama_config()), (ids.to("meta"),), sparsity=sparsity)
    compiled = sparsecc.compile(with_weights(hf.LlamaForCausalLM, llama_config()), (ids,), sparsity=sparsity,
                                check=False).report()
    sites = lambda report: [(r.layer, r.shape, r.flops_before, r.details["mask"]) for r in report.layers]  # noqa: E731
    assert sites(planned) == sites(compiled) and len(sites(planned)) == 2
    assert all("read as a rule" in r.details["mask"] and r.details["density"] is None for r in planned.layers)
    assert f"block density {NOT_MEASURED}" in str(planned)


def test_plan_reads_fake_tensor_models_and_puts_their_weights_back():
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = hf.LlamaForCausalLM(llama_config()).eval()
        ids = torch.zeros(2, 6, dtype=torch.long)
    planned = sparsecc.plan(model, (ids,), sparsity="2:4")
    meta = sparsecc.plan(on_meta(hf.LlamaForCausalLM, llama_config()), (ids.to("meta"),), sparsity="2:4")
    assert rows(planned) == rows(meta) and len(planned.layers) == 15
    assert all(isinstance(p, FakeTensor) for p in model.parameters())


def test_data_driven_methods_plan_without_calibration():
    model = on_meta(hf.LlamaForCausalLM, llama_config())
    ids = torch.zeros(2, 6, dtype=torch.long, device="meta")
    planned = sparsecc.plan(model, (ids,), sparsity={"weights": {"pattern": "2:4", "method": "wanda"}})
    assert {r.details["method"] for r in planned.layers} == {"wanda"}
    assert all("planned without weights" in r.details["calibration"] for r in planned.layers)


def test_rewrites_decided_on_values_are_skipped_with_the_reason():
    config = llama_config()
    config.num_hidden_layers = 3   # token routing keeps the first and last blocks dense: one is a candidate
    model = on_meta(hf.LlamaForCausalLM, config)
    ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
    planned = sparsecc.plan(model, (ids,), sparsity={"tokens": {"capacity": 0.5}}, verify=True)
    reasons = [(s["layer"], s["reason"]) for s in planned.skipped if s["reason"] == NOT_PLANNED]
    assert len(reasons) == 1 and "layers.1" in reasons[0][0] and not planned.layers
    assert any("rewrote nothing" in line for line in planned.noops)


def test_compile_refuses_a_model_without_weights_and_points_to_plan():
    model = on_meta(hf.LlamaForCausalLM, llama_config())
    with pytest.raises(ConfigError, match=r"sparsecc\.plan\(model"):
        sparsecc.compile(model, (torch.zeros(1, 4, dtype=torch.long, device="meta"),), sparsity="2:4")


def test_plan_refuses_a_model_with_weights():
    with pytest.raises(ConfigError, match="has weights"):
        sparsecc.plan(torch.nn.Linear(8, 8), (torch.randn(2, 8),), sparsity="2:4")


def meta_mixtral():
    """CLI factory: a tiny Mixtral on the meta device and its example input_ids."""
    return on_meta(hf.MixtralForCausalLM, mixtral_config()), (torch.zeros(1, 6, dtype=torch.long, device="meta"),)


def test_cli_plan_prints_the_report(capsys):
    code = main(["plan", f"{__name__}:meta_mixtral", "--sparsity", json.dumps(MOE), "--json", "-q"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["planned"] and report["error_vs_dense"] is None
    assert sum(layer["op"] == "sparsecc.moe" for layer in report["layers"]) == 2
