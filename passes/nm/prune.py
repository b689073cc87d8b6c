"""`prune-nm`: prune constant linear/conv/expert weights to N:M and run them as sparse ops.

    linear / addmm / mm / matmul   -> sparsecc.nm_linear      (nm/linear.py; x @ W.T in any spelling)
    conv2d                         -> sparsecc.nm_conv2d      (nm/conv.py)
    sparsecc.moe's stacked experts -> sparsecc.nm_decompress  (nm/experts.py)

The kept N of every M are chosen by `method` (nm/methods.py): magnitude,
or Wanda / SparseGPT from calibration activations, computed layer by layer
before the rules run; the rules then compress what the method chose.
The weight is pruned along the reduction dim and compressed once, even when
several layers share it (nm/compressed.py); a weight that also feeds
anything else (a tied embedding, say) is skipped with the reason, and so is
every other >= 2-D weight that stays dense (nm/dense_weights.py).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from sparsecc.runtime.kernels.cpu.nm_paths import KEEPS
from sparsecc.runtime.nm_format import check_nm
from sparsecc.runtime.ops import get_op  # noqa: F401  (registers the sparsecc ops)

from ..manager import Pass, PassContext, PassResult
from ..match import match
from ..options import Bounds, OptionBounds, OptionProblem
from ..rewrite import CheckResult, RuleSet, apply_rules, fail, ok
from .compressed import NMWeights
from .conv import ConvRule
from .dense_weights import unexplained_dense
from .experts import ExpertRule
from .given import take_given
from .layerwise import LayerTarget
from .linear import LINEAR_FORMS, LinearRule
from .methods import METHODS, prune_calibrated


@dataclass(frozen=True)
class PruneNM(Pass):
    name: ClassVar[str] = "prune-nm"
    n: int = 2
    m: int = 4
    method: str = "magnitude"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    percdamp: float = 0.01     # sparsegpt: dampening, a fraction of mean(diag H)
    blocksize: int = 128       # sparsegpt: columns updated together (a multiple of M)
    keep: str = "memory"       # nm_linear at run time: "memory" stays compressed; "speed" may keep a dense
                               # copy of a layer where that measures faster (kernels/cpu/nm_paths.py)
    option_bounds: ClassVar[dict[str, OptionBounds]] = {
        "n": Bounds(1, whole=True), "m": Bounds(1, whole=True), "percdamp": Bounds(0),
        "blocksize": Bounds(1, whole=True)}
    always_spelled: ClassVar[tuple[str, ...]] = ("n", "m", "method", "include")

    def spelled_options(self) -> tuple[str, ...]:
        spelled = self.always_spelled + (("percdamp", "blocksize") if self.method == "sparsegpt" else ())
        return spelled + (("keep",) if self.keep != "memory" else ())

    def options_problem(self) -> Optional[OptionProblem]:
        if self.method not in METHODS:
            return OptionProblem("method", f"unknown method {self.method!r} (available: {', '.join(METHODS)})")
        try:
            check_nm(self.n, self.m)
        except ValueError as err:
            return OptionProblem("n", str(err))
        if self.keep not in KEEPS:
            return OptionProblem("keep", f"keep must be one of {', '.join(KEEPS)}, got {self.keep!r}")
        if self.blocksize % self.m:
            return OptionProblem("blocksize",
                                 f"blocksize must be a positive multiple of M={self.m}, got {self.blocksize}")
        return None

    def selects(self, path: str) -> CheckResult:
        """Whether the layer at module path `path` is inside `include` and outside `exclude`."""
        if not any(fnmatch.fnmatchcase(path, g) for g in self.include):
            return fail(f"not matched by include {list(self.include)}")
        excluded = [g for g in self.exclude if fnmatch.fnmatchcase(path, g)]
        return fail(f"excluded by '{excluded[0]}'") if excluded else ok()

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        rules = NMRules(self, gm, ctx)
        weights = rules.weights
        if ctx.nm_given is not None and not ctx.shapes_only:   # a pruned checkpoint's masks: no method runs
            weights.pruned = take_given(self, gm, ctx, rules.targets())
            weights.calibration = f"none: masks taken from {ctx.nm_given.source}"
        elif self.method != "magnitude" and ctx.shapes_only:   # no activations to observe: sizes are the same
            weights.calibration = "none: planned without weights (the mask is chosen when compiled)"
        elif self.method != "magnitude":
            weights.pruned, weights.calibration = prune_calibrated(self, gm, ctx, rules.targets(), weights.tokens)
        stats = apply_rules(gm, rules.ruleset(), ctx)
        stats.skipped += unexplained_dense(gm, weights, {skip.where for skip in stats.skipped})
        stats.extra["method"] = self.method
        if weights.calibration:
            stats.extra["calibration"] = weights.calibration
        return PassResult(gm, stats.rewritten > 0, stats)


class NMRules:
    """The rules of one prune-nm run, in the order they are tried, sharing one `NMWeights`."""

    def __init__(self, options: PruneNM, gm: torch.fx.GraphModule, ctx: PassContext):
        self.weights = NMWeights(options, gm, ctx)
        self.linear = [LinearRule(self.weights, form) for form in LINEAR_FORMS]
        self.conv, self.experts = ConvRule(self.weights), ExpertRule(self.weights)

    def ruleset(self) -> RuleSet:
        return (RuleSet("nm-linear", [rule.rule() for rule in self.linear])
                + RuleSet("nm-conv", [self.conv.rule()]) + RuleSet("nm-experts", [self.experts.rule()]))

    def targets(self) -> list[LayerTarget]:
        """The weights the rules will rewrite, in graph order, with how each reads its calibration inputs."""
        found = []
        for node in self.weights.gm.graph.nodes:
            if node.op != "call_function":
                continue
            for rule in (*self.linear, self.conv, self.experts):
                m = match(rule.pattern, node)
                if m is not None and rule.check(m, self.weights.ctx):
                    found += rule.targets(m)
                    break
        return found
