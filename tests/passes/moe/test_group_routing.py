"""Group-limited routing (DeepSeek-V3 style) is read only when sparsecc.moe picks the same experts: groups scored
by their best two experts, and experts outside the best groups filled with -inf, or with 0 while no kept expert
can score below 0 (no negative correction bias)."""
import warnings

import pytest
import torch
from torch import nn

import sparsecc

from .. import moe_models as mm


class GroupRouter(nn.Module):
    """sigmoid scores + correction bias; the best `topk_group` of 4 groups (scored by `group_score`) kept."""

    def __init__(self, hidden=32, experts=8, top_k=2, fill=float("-inf"), bias=0.1, group_score="top2"):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.register_buffer("correction", torch.full((experts,), bias))
        self.top_k, self.fill, self.group_score = top_k, fill, group_score

    def forward(self, h):
        scores = self.gate(h).sigmoid()
        choice = scores + self.correction
        grouped = choice.view(-1, 4, choice.shape[-1] // 4)
        best = grouped.topk(2, dim=-1)[0].sum(-1) if self.group_score == "top2" else grouped.amax(-1)
        kept = torch.zeros_like(best).scatter_(1, best.topk(2, dim=-1)[1], 1)
        mask = kept.unsqueeze(-1).expand_as(grouped).reshape(choice.shape)
        selected = choice.masked_fill(~mask.bool(), self.fill).topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, selected)
        return weights / weights.sum(-1, keepdim=True), selected


def block(**router) -> nn.Module:
    torch.manual_seed(0)
    moe = mm.LoopMoE(hidden=32, inner=16, experts=8, top_k=2)
    moe.router = GroupRouter(**router)
    return moe.eval()


def _compile(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a refused block warns that moe-dispatch rewrote nothing
        return sparsecc.compile(model, (x,), pipeline="moe-dispatch,cleanup")


@pytest.mark.parametrize("fill, bias", [(float("-inf"), -0.3), (0.0, 0.1)])
def test_group_limited_routing_is_read_and_exact(fill, bias):
    model, x = block(fill=fill, bias=bias), torch.randn(2, 6, 32)
    compiled = _compile(model, x)
    [record] = compiled.report().layers
    assert record.details["n_group"] == 4 and record.details["topk_group"] == 2
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router, reason", [
    (dict(fill=0.0, bias=-0.3), "negative score-correction bias"),
    (dict(fill=-5.0), "with -5.0, not -inf or 0"),
    (dict(group_score="max"), "each scored by the sum of its best 2 experts"),
])
def test_other_group_limits_are_refused_with_the_reason(router, reason):
    model, x = block(**router), torch.randn(2, 6, 32)
    compiled = _compile(model, x)
    assert not compiled.report().layers
    assert any(reason in s["reason"] for s in compiled.report().skipped), compiled.report().skipped
    torch.testing.assert_close(compiled(x), model(x))
