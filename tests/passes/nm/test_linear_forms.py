"""prune-nm reaches every spelling of a linear (`x @ W.T`, `W.t()`, `W.permute(1, 0)`, ...) and gives a
reason for every weight it leaves dense (stacked experts outside sparsecc.moe, routers, embeddings)."""
import pytest
import torch

import sparsecc

from ..moe.families import gpt_oss, mixtral, tokens

hf = pytest.importorskip("transformers")


class Spellings(torch.nn.Module):
    """Four linears, each written as a matmul of the activation with a transposed constant."""

    def __init__(self):
        super().__init__()
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(16, 16)) for _ in range(4)])

    def forward(self, x):
        a, b, c, d = self.weights
        x = x @ a.T
        x = torch.matmul(x, b.t())
        x = x @ c.permute(1, 0)
        return x @ d.transpose(0, 1)


def _nm_linears(compiled) -> int:
    return sum(n.target is torch.ops.sparsecc.nm_linear.default for n in compiled.graph_module.graph.nodes)


def test_every_spelling_of_a_transposed_weight_becomes_nm_linear():
    compiled = sparsecc.compile(Spellings().eval(), (torch.randn(2, 5, 16),), sparsity="2:4")
    report = compiled.report()
    assert _nm_linears(compiled) == 4 and len(report.layers) == 4
    assert report.error_vs_reference is not None and report.error_vs_reference < 1e-5


@pytest.fixture(scope="module")
def falcon():
    torch.manual_seed(0)
    config = hf.FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             use_cache=False)
    model = hf.FalconForCausalLM(config).eval()
    return model, sparsecc.compile(model, (tokens(),), sparsity="2:4")


def test_falcon_linears_are_nm_and_match_the_pruned_model(falcon):
    model, compiled = falcon
    report = compiled.report()
    falcon_linears = [name for name, m in model.named_modules() if type(m).__name__ == "FalconLinear"]
    assert len(falcon_linears) == 8
    assert sorted(r.layer for r in report.layers) == sorted(falcon_linears)
    assert _nm_linears(compiled) == 8
    assert report.error_vs_reference is not None and report.error_vs_reference < 1e-5
    assert {s["layer"]: s["reason"] for s in report.skipped}["lm_head"].startswith("weight is tied")


@pytest.mark.parametrize("family", [gpt_oss, mixtral], ids=["gpt_oss", "mixtral"])
def test_weights_request_alone_makes_batched_mm_experts_nm_inside_moe(family):
    """"2:4" alone implies moe-dispatch (exact): the stacked experts are pruned inside sparsecc.moe."""
    model = family("batched_mm")
    compiled = sparsecc.compile(model, (tokens(),), sparsity="2:4")
    report = compiled.report()
    assert report.pipeline.startswith("moe-dispatch")
    moes = [n for n in compiled.graph_module.graph.nodes if n.target is torch.ops.sparsecc.moe.default]
    assert len(moes) == len(model.model.layers)
    assert all(a.target is torch.ops.sparsecc.nm_decompress.default for n in moes for a in n.args[2:4])
    assert not any("stacked expert weights" in s["reason"] for s in report.skipped)
    routers = [s["layer"] for s in report.skipped if s["reason"].startswith("router of an MoE block")]
    assert len(routers) == len(model.model.layers)
    assert not report.noops     # the implied moe-dispatch is no request of its own
    assert report.error_vs_reference is not None and report.error_vs_reference < 1e-5


def test_a_pipeline_without_moe_dispatch_lists_stacked_experts_with_the_reason():
    model = mixtral("batched_mm")
    report = sparsecc.compile(model, (tokens(),), pipeline="prune-nm,cleanup").report()
    experts = {s["layer"]: s["reason"] for s in report.skipped if ".experts (" in s["layer"]}
    assert len(experts) == 2 * len(model.model.layers)       # gate_up_proj and down_proj per layer
    assert all("moe-dispatch did not rewrite this block" in reason for reason in experts.values())
    assert not any(".mlp" in r.layer for r in report.layers)   # neither router nor experts pruned
    assert report.error_vs_reference is not None and report.error_vs_reference < 1e-5


def test_every_dense_weight_of_two_or_more_dims_has_a_reason(falcon):
    model, compiled = falcon
    report = compiled.report()
    explained = {r.layer for r in report.layers} | {s["layer"].split(" (")[0] for s in report.skipped}
    owners: dict[int, set[str]] = {}   # a tied weight is explained under either of its modules
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if parameter.dim() >= 2:
            owners.setdefault(id(parameter), set()).add(name.rpartition(".")[0])
    assert all(modules & explained for modules in owners.values()), [m for m in owners.values() if not m & explained]


class ArgmaxHead(torch.nn.Module):
    """A head whose argmax the forward returns: not an MoE router, so it is pruned like any linear."""

    def __init__(self):
        super().__init__()
        self.a, self.head = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def forward(self, x):
        logits = self.head(torch.relu(self.a(x)))
        return logits, logits.max(-1).indices


def test_a_head_whose_argmax_is_returned_is_not_kept_dense_as_a_router():
    compiled = sparsecc.compile(ArgmaxHead().eval(), (torch.randn(4, 64),), sparsity="2:4")
    assert [r.layer for r in compiled.report().layers] == ["a", "head"]
