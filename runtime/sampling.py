"""Next-token choice from logits, as transformers' `generate` makes it: greedy, or sampled after
temperature, top-k and top-p (nucleus) filtering, in that order."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .errors import InputMismatchError


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise InputMismatchError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and (type(self.top_k) is not int or self.top_k < 1):
            raise InputMismatchError(f"top_k must be a positive int or None, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputMismatchError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")

    def next_tokens(self, logits: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[B, V] logits -> [B] token ids."""
        if not self.do_sample:
            return logits.argmax(-1)
        scores = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            scores = _nucleus(scores, self.top_p)
        return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


def _nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most probable tokens whose mass reaches `top_p` (always at least the best one)."""
    ordered, order = scores.sort(dim=-1, descending=False)
    tail_mass = ordered.softmax(-1).cumsum(-1)
    drop = tail_mass <= 1 - top_p
    drop[..., -1] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
