"""`prune-nm`: prune constant linear/conv weights to N:M and run them as `sparsecc::nm_linear` / `nm_conv2d`.

Rules, one per way a linear reaches the graph; `transposed` says whether the
constant is stored `[in, out]` (GPT-2 Conv1D, `x @ W`) rather than `[out, in]`:

    aten.linear(x, W, b?)                 W [out, in]
    aten.addmm(b, x, aten.t(W))           W [out, in]   (decomposed linear)
    aten.mm(x, aten.t(W))                 W [out, in]
    aten.matmul(x, aten.t(W))             W [out, in]   (x @ W.t())
    aten.addmm(b, x, W)                   W [in, out]   (Conv1D)
    aten.mm(x, W) / aten.matmul(x, W)     W [in, out]
    aten.conv2d(x, W, b?, ...)            W [out, C, kh, kw], pruned along C*kh*kw (passes/nm_conv.py)

The kept N of every M are chosen by `method` (passes/nm_methods.py): magnitude,
or Wanda / SparseGPT from calibration activations, computed layer by layer
before the rules run; the rules then compress what the method chose.
The weight is pruned along the reduction dim and compressed once, even when
several layers share it; a weight that also feeds anything else (a tied
embedding, say) is skipped with the reason.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch.fx import Node

from sparsecc.runtime.nm_format import check_nm, compress_nm, nm_mask
from sparsecc.runtime.ops import get_op  # noqa: F401  (registers the sparsecc ops)

from .fake import resolve_attr
from .layerwise import LayerTarget
from .manager import Pass, PassContext, PassResult
from .match import AnyArg, Const, Match, Op, Var, match
from .nm_conv import CONV_PATTERN, ConvRule
from .nm_methods import METHODS, prune_calibrated
from .options import Bounds, OptionBounds
from .records import RewriteRecord
from .rewrite import CheckResult, Rewriter, Rule, RuleSet, apply_rules, fail, ok

aten = torch.ops.aten
_W, _X, _B = Const("w"), Var("x"), Var("b")


@dataclass(frozen=True)
class _Form:
    """How one rule sees the weight: its layout and where the bias comes from."""
    source_op: str
    transposed: bool


PATTERNS = {
    "linear": (Op(aten.linear.default, _X, _W, Var("b", optional=True)), _Form("aten.linear", False)),
    "addmm-t": (Op(aten.addmm.default, _B, _X, Op(aten.t.default, _W)), _Form("aten.addmm", False)),
    "mm-t": (Op(aten.mm.default, _X, Op(aten.t.default, _W)), _Form("aten.mm", False)),
    "matmul-t": (Op(aten.matmul.default, _X, Op(aten.t.default, _W)), _Form("aten.matmul", False)),
    "addmm": (Op(aten.addmm.default, _B, _X, _W), _Form("aten.addmm", True)),
    "mm": (Op(aten.mm.default, _X, _W), _Form("aten.mm", True)),
    "matmul": (Op(aten.matmul.default, _X, _W), _Form("aten.matmul", True)),
}
# Beta/alpha of addmm are not named in the patterns, so they must be at their default 1.
# Uses of a weight node this pass can rewrite consistently: (target, argument slot) -> layout.
_WEIGHT_SLOTS = {(aten.linear.default, 1): False, (aten.addmm.default, 2): True,
                 (aten.mm.default, 1): True, (aten.matmul.default, 1): True, (aten.conv2d.default, 1): False}


def layer_path(weight: Node) -> str:
    """'blocks.0.mlp.up.weight' -> 'blocks.0.mlp.up' (the module owning the weight)."""
    return weight.target.rpartition(".")[0] or weight.target


def _layouts_of(weight: Node) -> dict:
    """Layout in which each use reads `weight` (True = [in, out]); None for a use this pass cannot rewrite."""
    layouts = {}
    for user in weight.users:
        if user.target is aten.t.default:
            for u in user.users:
                slot = _WEIGHT_SLOTS.get((u.target, u.args.index(user) if user in u.args else -1))
                layouts[u] = None if slot is None else not slot
        else:
            layouts[user] = _WEIGHT_SLOTS.get((user.target, user.args.index(weight) if weight in user.args else -1))
    return layouts


_RESHAPES = (aten.reshape.default, aten.view.default, aten._to_copy.default, aten.to.dtype)


def feeds_moe_router(node: Node) -> bool:
    """Whether `node` (through reshapes and casts) is the router_logits of a `sparsecc::moe`."""
    for user in node.users:
        if user.target is torch.ops.sparsecc.moe.default and user.args[1] is node:
            return True
        if user.target in _RESHAPES and feeds_moe_router(user):
            return True
    return False


def _op_text(node: Node) -> str:
    return str(node.target).removesuffix(".default")


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
    option_bounds: ClassVar[dict[str, OptionBounds]] = {
        "n": Bounds(1, whole=True), "m": Bounds(1, whole=True), "percdamp": Bounds(0),
        "blocksize": Bounds(1, whole=True)}

    def options_problem(self) -> Optional[str]:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.n, self.m, self.blocksize)):
            return f"n, m and blocksize must be integers, got n={self.n!r}, m={self.m!r}, blocksize={self.blocksize!r}"
        if self.method not in METHODS:
            return f"unknown method {self.method!r} (available: {', '.join(METHODS)})"
        try:
            check_nm(self.n, self.m)
        except ValueError as err:
            return str(err)
        if self.blocksize % self.m:
            return f"blocksize must be a positive multiple of M={self.m}, got {self.blocksize}"
        return None

    def selects(self, path: str) -> CheckResult:
        """Whether the layer at module path `path` is inside `include` and outside `exclude`."""
        if not any(fnmatch.fnmatchcase(path, g) for g in self.include):
            return fail(f"not matched by include {list(self.include)}")
        excluded = [g for g in self.exclude if fnmatch.fnmatchcase(path, g)]
        return fail(f"excluded by '{excluded[0]}'") if excluded else ok()

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        rewriter = _NMRewrite(self, gm, ctx)
        if self.method != "magnitude":
            rewriter.pruned, rewriter.calibration = prune_calibrated(self, gm, ctx, rewriter.targets())
        stats = apply_rules(gm, rewriter.ruleset(), ctx)
        stats.extra["method"] = self.method
        if rewriter.calibration:
            stats.extra["calibration"] = rewriter.calibration
        return PassResult(gm, stats.rewritten > 0, stats)


class _NMRewrite:
    """The rules of one prune-nm run, sharing a cache of compressed weights."""

    def __init__(self, options: PruneNM, gm: torch.fx.GraphModule, ctx: PassContext):
        self.options, self.gm, self.ctx = options, gm, ctx
        self.compressed: dict[str, tuple[str, str]] = {}   # weight name -> (values, indices) attrs
        self.pruned: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # weight -> ([out, K] weight, mask)
        self.calibration = ""                                # where the method's activations came from
        self.conv = ConvRule(self)

    def linear_rules(self) -> RuleSet:
        rules = [Rule(f"nm-{name}", pattern, self._replacer(form), self._checker(form))
                 for name, (pattern, form) in PATTERNS.items()]
        return RuleSet("nm-linear", rules) + RuleSet("nm-conv", [Rule("nm-conv2d", CONV_PATTERN,
                                                                      self.conv.replace, self.conv.check)])

    def ruleset(self) -> RuleSet:
        experts = _ExpertRule(self)
        return self.linear_rules() + RuleSet("nm-experts", [Rule("nm-moe-experts", MOE_PATTERN,
                                                                 experts.replace, experts.check)])

    def targets(self) -> list[LayerTarget]:
        """The layers the linear and conv rules will rewrite, in graph order, with how to read their inputs."""
        found = []
        for node in self.gm.graph.nodes:
            if node.op != "call_function":
                continue
            for rule in self.linear_rules():
                m = match(rule.pattern, node)
                if m is not None and rule.check(m, self.ctx):
                    is_conv = rule.name == "nm-conv2d"
                    found.append(self.conv.target(m) if is_conv else self._target(m, PATTERNS[rule.name[3:]][1]))
                    break
        return found

    def _target(self, m: Match, form: _Form) -> LayerTarget:
        k = self.weight(m, form).shape[1]
        flip = (lambda w: w.t()) if form.transposed else (lambda w: w)
        return LayerTarget(node=m.node, x=m["x"], weight=m["w"], layer=layer_path(m["w"]),
                           columns=lambda x: x.reshape(-1, k), to_matrix=flip, from_matrix=flip,
                           between=tuple(m.nodes[1:]))

    def _checker(self, form: _Form):
        def check(m: Match, ctx: PassContext) -> CheckResult:
            result = self.check(m, form)
            return result if result else fail(result.reason, where=layer_path(m["w"]))
        return check

    def _replacer(self, form: _Form):
        return lambda m, rw: self.replace(m, rw, form)

    def weight(self, m: Match, form: _Form) -> torch.Tensor:
        w = resolve_attr(self.gm, m["w"].target)
        return w.t() if form.transposed else w

    def check(self, m: Match, form: _Form) -> CheckResult:
        path, n, mm = layer_path(m["w"]), self.options.n, self.options.m
        chosen = self.options.selects(path)
        if not chosen:
            return chosen
        if feeds_moe_router(m.node):
            return fail("router of an MoE block, kept dense: pruning it would change which experts tokens reach")
        w = resolve_attr(self.gm, m["w"].target)
        if w.dim() != 2 or not w.is_floating_point():
            return fail(f"weight is {w.dim()}-D {w.dtype}; prune-nm needs a 2-D floating-point weight")
        layouts = _layouts_of(m["w"])
        others = sorted({_op_text(u) for u, layout in layouts.items() if layout is None})
        if others:
            return fail(f"weight is tied to {', '.join(others)}; pruning it would change that use too")
        if len(set(layouts.values())) > 1:
            return fail("weight is used both as [out, in] and [in, out]; one compressed layout cannot serve both")
        k = w.shape[0] if form.transposed else w.shape[1]
        if k % mm:
            return fail(f"reduction dim {k} is not divisible by M={mm} (pattern {n}:{mm})")
        if isinstance(m.get("x"), Node) and _val(m["x"]).dtype != w.dtype:
            return fail(f"input dtype {_val(m['x']).dtype} differs from weight dtype {w.dtype}")
        return ok()

    def replace(self, m: Match, rw: Rewriter, form: _Form) -> Node:
        n, mm = self.options.n, self.options.m
        weight = self.weight(m, form)
        values, indices = self.compress(m["w"].target, weight, rw)
        bias = m.get("b")
        out = rw.call(torch.ops.sparsecc.nm_linear.default,
                      m["x"], values, indices, bias, n, mm, weight.shape[1])
        self.ctx.records.append(self._record(m, form, weight, values, indices))
        return out

    def compress(self, target: str, weight: torch.Tensor, rw: Rewriter) -> tuple[Node, Node]:
        """(values, indices) constants of `weight` [out, K] pruned by the method (once per weight)."""
        if target not in self.compressed:
            if target in self.pruned:
                weight, mask = self.pruned[target]
            else:
                mask = nm_mask(weight.abs(), self.options.n, self.options.m)
            values, indices = compress_nm(weight, self.options.n, self.options.m, mask=mask)
            v = rw.add_constant(target + "_nm_values", values)
            i = rw.add_constant(target + "_nm_indices", indices)
            self.compressed[target] = (v.target, i.target)
            return v, i
        return tuple(rw.get_constant(name) for name in self.compressed[target])

    def _record(self, m: Match, form: _Form, weight: torch.Tensor, values: Node, indices: Node) -> RewriteRecord:
        out_features, k = weight.shape
        v, i = resolve_attr(self.gm, values.target), resolve_attr(self.gm, indices.target)
        tokens = _tokens(_val(m["x"]), k)
        flops = 2 * tokens * out_features * k
        n, mm = self.options.n, self.options.m
        return RewriteRecord(
            layer=layer_path(m["w"]), op="sparsecc.nm_linear", source_op=form.source_op, pattern=f"{n}:{mm}",
            shape=[out_features, k], params_before=weight.numel(), params_after=v.numel(),
            bytes_before=weight.numel() * weight.element_size(),
            bytes_after=v.numel() * v.element_size() + i.numel() * i.element_size(),
            flops_before=flops, flops_after=flops * n // mm,
            details={"weight": m["w"].target, "values": values.target, "indices": indices.target,
                     "n": n, "m": mm, "in_features": k, "transposed": form.transposed, **self.method_details()})

    def method_details(self) -> dict:
        """What the report says about how the mask was chosen."""
        details = {"method": self.options.method}
        if self.calibration:
            details["calibration"] = self.calibration
        return details


# sparsecc.moe(hidden, router_logits, w_gate_up, w_down, <9 more arguments>)
MOE_PATTERN = Op(torch.ops.sparsecc.moe.default, Var("h"), Var("logits"), Const("w"), Const("w2"),
                 *[AnyArg() for _ in range(9)])


class _ExpertRule:
    """Stacked expert weights of `sparsecc.moe`, pruned per expert along their reduction dims and kept
    compressed at rest; `sparsecc.nm_decompress` expands them for each call (the grouped GEMMs read dense)."""

    def __init__(self, owner: "_NMRewrite"):
        self.owner = owner

    def layer(self, m: Match) -> str:
        return layer_path(m["w"]) + ".experts"

    def check(self, m: Match, ctx: PassContext) -> CheckResult:
        opts, path = self.owner.options, self.layer(m)
        chosen = opts.selects(path)
        if not chosen:
            return fail(chosen.reason, where=path)
        for node in (m["w"], m["w2"]):
            k = resolve_attr(self.owner.gm, node.target).shape[-1]
            if k % opts.m:
                return fail(f"expert reduction dim {k} is not divisible by M={opts.m}", where=path)
        return ok()

    def replace(self, m: Match, rw: Rewriter) -> Node:
        opts, gm = self.owner.options, self.owner.gm
        dense = [self._compressed(rw, resolve_attr(gm, node.target), node.target) for node in (m["w"], m["w2"])]
        args = list(m.node.args)
        args[2:4] = [rw.call(torch.ops.sparsecc.nm_decompress.default, v, i, opts.n, opts.m, k) for v, i, k in dense]
        self.owner.ctx.records.append(self._record(m, dense))
        return rw.call(torch.ops.sparsecc.moe.default, *args)

    def _compressed(self, rw: Rewriter, weight: torch.Tensor, target: str):
        n, mm = self.owner.options.n, self.owner.options.m
        values, indices = compress_nm(weight, n, mm, mask=nm_mask(weight.abs(), n, mm))
        return (rw.add_constant(target + "_nm_values", values), rw.add_constant(target + "_nm_indices", indices),
                weight.shape[-1])

    def _record(self, m: Match, dense) -> RewriteRecord:
        gm, n, mm = self.owner.gm, self.owner.options.n, self.owner.options.m
        weights = [resolve_attr(gm, node.target) for node in (m["w"], m["w2"])]
        stored = [resolve_attr(gm, node.target) for v, i, _ in dense for node in (v, i)]
        tokens = _tokens(_val(m["h"]), weights[0].shape[-1])
        top_k = m.node.args[7]
        flops = 2 * tokens * top_k * sum(w[0].numel() for w in weights)
        return RewriteRecord(
            layer=self.layer(m), op="sparsecc.moe+nm_decompress", source_op="sparsecc.moe", pattern=f"{n}:{mm}",
            shape=list(weights[0].shape), params_before=sum(w.numel() for w in weights),
            params_after=sum(t.numel() for t in stored[::2]),
            bytes_before=sum(w.numel() * w.element_size() for w in weights),
            bytes_after=sum(t.numel() * t.element_size() for t in stored),
            flops_before=flops, flops_after=flops * n // mm,
            details={"n": n, "m": mm, "reference": "unavailable", "method": "magnitude",
                     "compressed": {node.target: [v.target, i.target] for node, (v, i, _) in zip((m["w"], m["w2"]), dense)}})


def _val(node: Node):
    return node.meta["val"]


def _tokens(x, k: int) -> int:
    """Rows the linear sees on the example inputs (symbolic sizes use their example hint)."""
    numel = x.numel()
    if not isinstance(numel, int):
        numel = numel.node.hint if numel.node.hint is not None else k
    return int(numel) // k
