"""The sparsity request: a string shorthand, a dict, or these dataclasses.

    "2:4"                                   -> weights pruned 2:4 by magnitude
    {"weights": {"pattern": "2:4", "exclude": ["lm_head"]}}
    SparsityConfig(weights=WeightsConfig(pattern="4:8"))

Validation errors name the bad key and the accepted values.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError

NM_GROUP_SIZES = (4, 8, 16)
WEIGHT_METHODS = ("magnitude",)
# Parts of the request that later rewrites will handle; named here so the error says so.
NOT_BUILT = {"tokens": "token routing"}
ATTENTION_POLICIES = ("mask", "window")


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


@dataclass(frozen=True)
class WeightsConfig:
    pattern: str = "2:4"
    method: str = "magnitude"
    include: tuple[str, ...] = ("*",)     # module-path globs a weight's layer must match
    exclude: tuple[str, ...] = ()         # module-path globs that are kept dense

    def __post_init__(self):
        parse_pattern(self.pattern)
        if self.method not in WEIGHT_METHODS:
            raise ConfigError(f"weights.method: unknown method {self.method!r} (available: {', '.join(WEIGHT_METHODS)})")
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
        if not isinstance(self.capacity_factor, (int, float)) or self.capacity_factor < 0:
            raise ConfigError(f"moe.capacity_factor: expected a number >= 0, got {self.capacity_factor!r}")


@dataclass(frozen=True)
class AttentionConfig:
    """Block-sparse attention; `mask` is exact (the layout the model's mask implies)."""
    policy: str = "mask"
    block: int = 128
    window: int = 1024
    sinks: int = 4

    def __post_init__(self):
        if self.policy not in ATTENTION_POLICIES:
            raise ConfigError(f"attention.policy: unknown or not yet available policy {self.policy!r} "
                              f"(available: {', '.join(ATTENTION_POLICIES)})")
        if self.block not in (64, 128):
            raise ConfigError(f"attention.block: expected 64 or 128, got {self.block!r}")


@dataclass(frozen=True)
class SparsityConfig:
    weights: Optional[WeightsConfig] = field(default=None)
    moe: Optional[MoEConfig] = field(default=None)
    attention: Optional[AttentionConfig] = field(default=None)

    def pipeline(self) -> str:
        """The pass pipeline this request stands for."""
        steps = []
        if self.moe is not None:
            cf = self.moe.capacity_factor
            steps.append("moe-dispatch" + (f"{{capacity_factor={cf}}}" if cf else ""))
        if self.attention is not None:
            a = self.attention
            extra = f",window={a.window},sinks={a.sinks}" if a.policy == "window" else ""
            steps.append(f"sparse-attention{{policy={a.policy},block={a.block}{extra}}}")
        if self.weights is not None:
            n, m = self.weights.nm
            opts = [f"n={n}", f"m={m}", f"method={self.weights.method}",
                    f"include=[{','.join(self.weights.include)}]"]
            if self.weights.exclude:
                opts.append(f"exclude=[{','.join(self.weights.exclude)}]")
            steps.append("prune-nm{" + ",".join(opts) + "}")
        steps.append("cleanup")
        return ",".join(steps)


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
}
