"""Softcap and sink forms that are not what block_attention computes are skipped with a reason."""
import pytest
import torch

import sparsecc

PIPELINE = "sparse-attention{block=64},cleanup"


class Eager(torch.nn.Module):
    """Eager attention under a causal where(visible, 0, min) mask; `variant` bends one step of it."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant

    def forward(self, q, k, v):
        seq = q.shape[-2]
        scores = q @ k.transpose(2, 3) * 0.25
        if self.variant == "tanh":   # tanh(x / 3) * 5 is no softcap
            scores = torch.tanh(scores / 3.0) * 5.0
        visible = (torch.arange(seq)[:, None] >= torch.arange(seq)[None, :])[None, None]
        scores = scores + torch.where(visible, torch.zeros(()), torch.finfo(torch.float32).min)
        if self.variant == "sliced":  # the last column dropped, but it was a key, not a sink
            return torch.softmax(scores, -1)[..., :-1] @ v[:, :, :-1]
        if self.variant == "strided":  # every other column kept: no sink column dropped
            return torch.softmax(scores, -1)[..., 0:-1:2] @ v[:, :, : seq // 2]
        if self.variant == "column_max":  # a max over the query dim is no softmax shift: the scores change
            scores = scores - scores.max(dim=-2, keepdim=True).values
            return torch.softmax(scores, -1) @ v
        return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("variant, reason", [
    ("tanh", "not as softcapping tanh(x / c) * c (c = 5.0)"),
    ("sliced", "that column is not concatenated sink logits"),
    ("strided", "sliced other than dropping its last (sink) column"),
    ("column_max", "the softmax does not read q @ k^T")])
def test_other_forms_are_skipped_with_the_reason(variant, reason):
    q, k, v = (torch.randn(1, 2, 128, 16) for _ in range(3))
    with pytest.warns(UserWarning, match="rewrote nothing"):
        compiled = sparsecc.compile(Eager(variant), (q, k, v), pipeline=PIPELINE)
    assert [i.op for i in compiled.program.instructions].count("sparsecc::block_attention") == 0
    skipped, = compiled.report().skipped
    assert reason in skipped["reason"]


def test_a_max_over_another_dim_is_not_taken_for_the_softmax_shift():
    """x - max(x, dim=-2) changes the softmax (only a max over the softmax dim cancels): left dense, exact."""
    q, k, v = (torch.randn(1, 2, 128, 16) for _ in range(3))
    with pytest.warns(UserWarning, match="rewrote nothing"):
        compiled = sparsecc.compile(Eager("column_max"), (q, k, v), pipeline=PIPELINE)
    torch.testing.assert_close(compiled(q, k, v), Eager("column_max")(q, k, v))
