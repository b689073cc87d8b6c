"""The sparsity request: a string shorthand, a dict, or these dataclasses.

    "2:4"                                   -> weights pruned 2:4 by magnitude
    {"weights": {"pattern": "2:4", "exclude": ["lm_head"]}}
    SparsityConfig(weights=WeightsConfig(pattern="4:8"))

Validation errors name the bad key and the accepted values. Numbers are checked
against the bounds of the pass options they become (NaN and inf never pass).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from sparsecc.passes.moe_dispatch import MoEDispatch
from sparsecc.passes.options import bounds_problem
from sparsecc.passes.prune_nm import PruneNM
from sparsecc.passes.sparse_attention import SparseAttention
from sparsecc.passes.token_routing import TokenRouting

from .errors import ConfigError

NM_GROUP_SIZES = (4, 8, 16)
WEIGHT_METHODS = ("magnitude", "wanda", "sparsegpt")
# Parts of the request that later rewrites will handle; named here so the error says so.
NOT_BUILT: dict[str, str] = {}
TOKEN_WHERE = ("mlp", "layer")
TOKEN_ROUTERS = ("norm", "calibrated", "weights")
ATTENTION_POLICIES = ("mask", "window", "topk", "threshold")


def parse_pattern(pattern: Any) -> tuple[int, int]:
    """'2:4' -> (2, 4); every way the string can be wrong gets its own message."""
    if not isinstance(pattern, str) or not re.fullmatch(r"\s*\d+\s*:\s*\d+\s*", pattern):
        raise ConfigError(f"weights.pattern: expected 'N:M' such as '2:4', got {pattern!r}")
    n, m = (int(p) for p in pattern.split(":"))
    if not 0 < n < m:
        raise ConfigError(f"weights.pattern {pattern!r}: N must satisfy 0 < N < M, got N={n}, M={m}")
    if m not in NM_GROUP_SIZES:
        raise ConfigError(f"weights.pattern {pattern!r}: M must be one of {NM_GROUP_SIZES}, got {m}")
    return n, m


def check_numbers(section: str, config: Any, pass_cls: type, keys: tuple[str, ...]) -> None:
    """Each of `keys` within the bounds of the pass option of the same name."""
    for key in keys:
        problem = bounds_problem(getattr(config, key), pass_cls.option_bounds[key])
        if problem:
            raise ConfigError(f"{section}.{key}: {problem}")


@dataclass(frozen=True)
class WeightsConfig:
    pattern: str = "2:4"
    method: str = "magnitude"
    include: tuple[str, ...] = ("*",)     # module-path globs a weight's layer must match
    exclude: tuple[str, ...] = ()         # module-path globs that are kept dense
    percdamp: float = 0.01                # sparsegpt: Hessian dampening, fraction of mean(diag H)
    blocksize: int = 128                  # sparsegpt: columns updated together (a multiple of M)

    def __post_init__(self):
        parse_pattern(self.pattern)
        if self.method not in WEIGHT_METHODS:
            raise ConfigError(f"weights.method: unknown method {self.method!r} (available: {', '.join(WEIGHT_METHODS)})")
        check_numbers("weights", self, PruneNM, ("percdamp",))
        if not isinstance(self.blocksize, int) or self.blocksize <= 0 or self.blocksize % self.nm[1]:
            raise ConfigError(f"weights.blocksize: expected a positive multiple of M={self.nm[1]}, got {self.blocksize!r}")
        for key in ("include", "exclude"):
            value = getattr(self, key)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"weights.{key}: expected a list of module-path globs, got {value!r}")
            object.__setattr__(self, key, tuple(value))

    @property
    def nm(self) -> tuple[int, int]:
        return parse_pattern(self.pattern)


@dataclass(frozen=True)
class MoEConfig:
    """Rewrite mixture-of-experts blocks into sorted, grouped expert GEMMs (exact)."""
    capacity_factor: float = 0.0          # > 0 drops (token, expert) pairs over ceil(cf * T * k / E)

    def __post_init__(self):
        check_numbers("moe", self, MoEDispatch, ("capacity_factor",))


@dataclass(frozen=True)
class AttentionConfig:
    """Block-sparse attention; `mask` is exact (the layout the model's mask implies), the others lossy."""
    policy: str = "mask"
    block: int = 128
    window: int = 1024          # window: keys each query sees besides the sinks
    sinks: int = 4              # window, topk: first keys always kept
    topk: float = 0.1           # topk: fraction in (0, 1) of a query block's visible key blocks, or a count >= 1
    threshold: float = 1e-4     # threshold: skip key blocks whose logits lie log(1/threshold) below the row max

    def __post_init__(self):
        if self.policy not in ATTENTION_POLICIES:
            raise ConfigError(f"attention.policy: unknown or not yet available policy {self.policy!r} "
                              f"(available: {', '.join(ATTENTION_POLICIES)})")
        if self.block not in (64, 128):
            raise ConfigError(f"attention.block: expected 64 or 128, got {self.block!r}")
        for key in ("window", "sinks"):   # pipeline text spells them as ints: 4.0 would not parse back
            if not isinstance(getattr(self, key), int) or isinstance(getattr(self, key), bool):
                raise ConfigError(f"attention.{key}: expected an integer, got {getattr(self, key)!r}")
        check_numbers("attention", self, SparseAttention, ("window", "sinks", "topk", "threshold"))

    def pass_options(self) -> str:
        """The sparse-attention pass options this section stands for."""
        extra = {"window": f",window={self.window},sinks={self.sinks}",
                 "topk": f",topk={self.topk!r},sinks={self.sinks}",
                 "threshold": f",threshold={self.threshold!r}"}.get(self.policy, "")
        return f"policy={self.policy},block={self.block}{extra}"


@dataclass(frozen=True)
class TokensConfig:
    """Token routing (lossy, reported): only the top `capacity` fraction of tokens run routed blocks."""
    capacity: float = 0.5                 # kept tokens per sequence: ceil(capacity * S), at least 1
    where: str = "mlp"                    # mlp: the MLP residual sub-block; layer: the whole decoder layer
    router: str = "norm"                  # norm | calibrated | weights
    layers: Optional[tuple[str, ...]] = None   # block indices or module globs; None: all but first and last
    weights_file: Optional[str] = None    # router "weights": safetensors with <block>.router.weight/bias

    def __post_init__(self):
        check_numbers("tokens", self, TokenRouting, ("capacity",))
        if self.where not in TOKEN_WHERE:
            raise ConfigError(f"tokens.where: unknown or not yet available {self.where!r} "
                              f"(available: {', '.join(TOKEN_WHERE)})")
        if self.router not in TOKEN_ROUTERS:
            raise ConfigError(f"tokens.router: unknown router {self.router!r} (available: {', '.join(TOKEN_ROUTERS)})")
        if self.router == "weights" and not self.weights_file:
            raise ConfigError("tokens.weights_file: router 'weights' needs a .safetensors file of router weights")
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, (str, int)) else tuple(self.layers)
            if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in layers):
                raise ConfigError(f"tokens.layers: expected block indices or module-path globs, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(str(v) for v in layers))

    def pass_options(self) -> str:
        """The token-routing pass options this section stands for."""
        opts = [f"capacity={self.capacity!r}", f"where={self.where}", f"router={self.router}"]
        if self.layers is not None:
            opts.append(f"layers=[{','.join(self.layers)}]")
        if self.weights_file:
            opts.append(f"weights_file={json.dumps(self.weights_file)}")
        return ",".join(opts)


@dataclass(frozen=True)
class SparsityConfig:
    weights: Optional[WeightsConfig] = field(default=None)
    moe: Optional[MoEConfig] = field(default=None)
    attention: Optional[AttentionConfig] = field(default=None)
    tokens: Optional[TokensConfig] = field(default=None)

    def pipeline(self) -> str:
        """The pass pipeline this request stands for."""
        steps = []
        if self.moe is not None:
            cf = self.moe.capacity_factor
            steps.append("moe-dispatch" + (f"{{capacity_factor={cf}}}" if cf else ""))
        if self.tokens is not None:   # after moe-dispatch: only routed tokens reach the experts
            steps.append(f"token-routing{{{self.tokens.pass_options()}}}")
        if self.attention is not None:
            steps.append(f"sparse-attention{{{self.attention.pass_options()}}}")
        if self.weights is not None:
            n, m = self.weights.nm
            opts = [f"n={n}", f"m={m}", f"method={self.weights.method}",
                    f"include=[{','.join(self.weights.include)}]"]
            if self.weights.exclude:
                opts.append(f"exclude=[{','.join(self.weights.exclude)}]")
            if self.weights.method == "sparsegpt":
                opts += [f"percdamp={self.weights.percdamp}", f"blocksize={self.weights.blocksize}"]
            steps.append("prune-nm{" + ",".join(opts) + "}")
        steps.append("cleanup")
        return ",".join(steps)


def _number(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{key}: expected a number such as '0.5', got {text!r}") from None


def parse_sparsity(spec: Any) -> SparsityConfig:
    """Accept "N:M", a dict, a SparsityConfig or None (no sparsity: capture and lower only)."""
    if spec is None:
        return SparsityConfig()
    if isinstance(spec, SparsityConfig):
        return spec
    if isinstance(spec, WeightsConfig):
        return SparsityConfig(weights=spec)
    if isinstance(spec, str):
        return SparsityConfig(weights=WeightsConfig(pattern=spec))
    if isinstance(spec, dict):
        return _from_dict(spec)
    raise ConfigError(f"sparsity: expected a string like '2:4', a dict or a SparsityConfig, got {type(spec).__name__}")


def _from_dict(spec: dict) -> SparsityConfig:
    accepted = [f.name for f in dataclasses.fields(SparsityConfig)] + list(NOT_BUILT)
    for key in spec:
        if key in NOT_BUILT:
            raise ConfigError(f"sparsity.{key}: {NOT_BUILT[key]} is not available in this version of sparsecc "
                              f"(available: {', '.join(f.name for f in dataclasses.fields(SparsityConfig))})")
        if key not in accepted:
            raise ConfigError(f"sparsity: unknown key {key!r} (accepted: {', '.join(accepted)})")
    return SparsityConfig(**{key: _section(key, value) for key, value in spec.items() if value is not None})


def _section(name: str, spec: Any) -> Any:
    """One part of the request: its config object, a string shorthand, or a dict of its fields."""
    cls, shorthand = _SECTIONS[name]
    if isinstance(spec, cls):
        return spec
    if isinstance(spec, str):
        spec = shorthand(spec)
    if not isinstance(spec, dict):
        raise ConfigError(f"sparsity.{name}: expected a string or a dict, got {spec!r}")
    accepted = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in spec if k not in accepted]
    if unknown:
        raise ConfigError(f"sparsity.{name}: unknown key {unknown[0]!r} (accepted: {', '.join(accepted)})")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})


# section -> (config class, what its string shorthand means)
_SECTIONS = {
    "weights": (WeightsConfig, lambda text: {"pattern": text}),
    "moe": (MoEConfig, lambda text: {} if text == "dispatch" else text),
    "attention": (AttentionConfig, lambda text: {"policy": text}),
    "tokens": (TokensConfig, lambda text: {"capacity": _number("tokens.capacity", text)}),
}
