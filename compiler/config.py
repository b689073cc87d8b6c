"""The sparsity request: a string shorthand, a dict, or these dataclasses.

    "2:4"                                   -> weights pruned 2:4 by magnitude
    {"weights": {"pattern": "2:4", "exclude": ["lm_head"]}}
    SparsityConfig(weights=WeightsConfig(pattern="4:8"))

Each section stands for one pass: its keys are that pass's options (weights
spells n and m as `pattern`), its defaults are the pass's, and `to_pass()`
makes the pass. The pass checks its own options (passes/options.py), so a
section is checked by making it; the error names the section's key and says
what the pass accepts (NaN and inf never pass).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from sparsecc.passes import (Cleanup, ExpertParallel, FoldConstants, MoEDispatch, Pass, PruneNM, SparseAttention,
                             TokenRouting)
from sparsecc.passes.options import OptionError
from sparsecc.passes.pipeline import format_pipeline

from .errors import ConfigError


def parse_pattern(pattern: Any) -> tuple[int, int]:
    """'2:4' -> (2, 4); which N and M are accepted is the prune-nm pass's to say."""
    if not isinstance(pattern, str) or not re.fullmatch(r"\s*\d+\s*:\s*\d+\s*", pattern):
        raise ConfigError(f"weights.pattern: expected 'N:M' such as '2:4', got {pattern!r}")
    n, m = (int(p) for p in pattern.split(":"))
    return n, m


class Section:
    """A part of the request (a frozen dataclass) that becomes one pass; lists become tuples."""
    key: ClassVar[str]                 # the section's name in the request, "weights"
    pass_class: ClassVar[type[Pass]]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        self.to_pass()   # refuse a bad section when it is made, before the slow capture

    def pass_options(self) -> dict[str, Any]:
        """The pass's options this section sets (by default its fields, by the same names)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def config_key(self, option: str) -> str:
        """The section key a pass option comes from (the option itself unless a section spells it otherwise)."""
        return f"{self.key}.{option}"

    def to_pass(self) -> Pass:
        try:
            return self.pass_class(**self.pass_options())
        except OptionError as err:
            raise ConfigError(f"{self.config_key(err.option)}: {err.problem}") from None


@dataclass(frozen=True)
class WeightsConfig(Section):
    """N:M weight sparsity (prune-nm)."""
    key: ClassVar[str] = "weights"
    pass_class: ClassVar[type[Pass]] = PruneNM
    pattern: str = "2:4"
    method: str = PruneNM.method
    include: tuple[str, ...] = PruneNM.include     # module-path globs a weight's layer must match
    exclude: tuple[str, ...] = PruneNM.exclude     # module-path globs that are kept dense
    percdamp: float = PruneNM.percdamp             # sparsegpt: Hessian dampening, fraction of mean(diag H)
    blocksize: int = PruneNM.blocksize             # sparsegpt: columns updated together (a multiple of M)
    keep: str = PruneNM.keep                       # "memory": always compressed; "speed": a dense copy may be
                                                   # kept per layer where the CPU autotune measures it faster

    def pass_options(self) -> dict[str, Any]:
        options = super().pass_options()
        options["n"], options["m"] = parse_pattern(options.pop("pattern"))
        return options

    def config_key(self, option: str) -> str:
        return "weights.pattern" if option in ("n", "m") else super().config_key(option)


@dataclass(frozen=True)
class MoEConfig(Section):
    """Rewrite mixture-of-experts blocks into sorted, grouped expert GEMMs (exact)."""
    key: ClassVar[str] = "moe"
    pass_class: ClassVar[type[Pass]] = MoEDispatch
    capacity_factor: float = MoEDispatch.capacity_factor   # > 0 drops (token, expert) pairs over ceil(cf * T * k / E)


@dataclass(frozen=True)
class AttentionConfig(Section):
    """Block-sparse attention; `mask` is exact (the layout the model's mask implies), the others lossy."""
    key: ClassVar[str] = "attention"
    pass_class: ClassVar[type[Pass]] = SparseAttention
    policy: str = SparseAttention.policy
    block: int = SparseAttention.block
    window: int = SparseAttention.window          # window: keys each query sees besides the sinks
    sinks: int = SparseAttention.sinks            # window, topk: first keys always kept
    topk: float = SparseAttention.topk            # topk: fraction in (0, 1) of a query block's visible key blocks,
                                                  # or a count >= 1
    threshold: float = SparseAttention.threshold  # threshold: skip key blocks whose logits lie log(1/threshold)
                                                  # below the row max
    page: int = SparseAttention.page              # topk in decode: keys per Quest page (min/max summaries)


@dataclass(frozen=True)
class TokensConfig(Section):
    """Token routing (lossy, reported): only the top `capacity` fraction of tokens run routed blocks."""
    key: ClassVar[str] = "tokens"
    pass_class: ClassVar[type[Pass]] = TokenRouting
    capacity: float = TokenRouting.capacity     # kept tokens per sequence: ceil(capacity * S), at least 1
    where: str = TokenRouting.where             # mlp: the MLP residual sub-block; layer: the whole decoder layer
    router: str = TokenRouting.router           # norm | calibrated | weights
    layers: Optional[tuple[str, ...]] = TokenRouting.layers   # block indices or module globs; None: all but
                                                              # the first and last
    weights_file: Optional[str] = None          # router "weights": safetensors with <block>.router.weight/bias
    decision: str = TokenRouting.decision       # topk: top `capacity` of a call's tokens; threshold: score >= a
                                                # threshold calibrated to pass `capacity` (causal; generation)

    def __post_init__(self) -> None:
        layers = (self.layers,) if isinstance(self.layers, (str, int)) else self.layers
        if layers is not None:   # block indices may be written as ints
            layers = tuple(str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in layers)
        object.__setattr__(self, "layers", layers)
        super().__post_init__()

    def pass_options(self) -> dict[str, Any]:
        return {**super().pass_options(), "weights_file": self.weights_file or TokenRouting.weights_file}


@dataclass(frozen=True)
class SparsityConfig:
    weights: Optional[WeightsConfig] = field(default=None)
    moe: Optional[MoEConfig] = field(default=None)
    attention: Optional[AttentionConfig] = field(default=None)
    tokens: Optional[TokensConfig] = field(default=None)

    def passes(self) -> list[Pass]:
        """The passes this request stands for, in the order they run. A weights request implies
        moe-dispatch (exact): stacked expert weights become N:M only inside sparsecc.moe. Constants fold after
        the rewrites (an attention layout over constant inputs becomes program data), then cleanup."""
        moe = self.moe if self.moe is not None or self.weights is None else MoEConfig()
        # tokens after moe-dispatch: only routed tokens reach the experts
        sections = (moe, self.tokens, self.attention, self.weights)
        return [s.to_pass() for s in sections if s is not None] + [FoldConstants(), Cleanup()]

    def implied(self) -> list[str]:
        """Names of the passes `passes()` runs that no section asked for."""
        return [MoEDispatch.name] if self.moe is None and self.weights is not None else []

    def pipeline(self) -> str:
        """The pipeline text of `passes()`, for reports and printing."""
        return format_pipeline(self.passes())



EXPERT_MODES = ("ep",)   # ep: each rank of the process group holds E/world experts (sparsecc::moe_ep)


@dataclass(frozen=True)
class DistributedConfig:
    """How the program spreads over the initialised torch.distributed process group (docs/scale.md)."""
    experts: Optional[str] = None

    def __post_init__(self) -> None:
        if self.experts is not None and self.experts not in EXPERT_MODES:
            raise ConfigError(f"distributed.experts: expected one of {', '.join(EXPERT_MODES)}, got {self.experts!r}")

    def placed(self, passes: list[Pass]) -> list[Pass]:
        """`passes` with this request's passes before the closing fold-constants / cleanup (after every
        rewrite that runs the graph: the expert exchange is a collective)."""
        if self.experts is None:
            return passes
        rank, world_size = _process_group()
        closing = next((i for i, p in enumerate(passes) if isinstance(p, (FoldConstants, Cleanup))), len(passes))
        return [*passes[:closing], ExpertParallel(world_size=world_size, rank=rank), *passes[closing:]]


def _process_group() -> tuple[int, int]:
    """(rank, world size) of torch.distributed's default process group."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("distributed.experts='ep': needs an initialised torch.distributed process group "
                          "(launch with torchrun and call torch.distributed.init_process_group first)")
    return dist.get_rank(), dist.get_world_size()


def parse_distributed(spec: Any) -> DistributedConfig:
    """Accept None (one process), {"experts": "ep"} or a DistributedConfig."""
    if spec is None or isinstance(spec, DistributedConfig):
        return spec or DistributedConfig()
    return _from_fields("distributed", DistributedConfig, spec, "a dict such as {'experts': 'ep'}")


def _from_fields(key: str, cls: type, spec: Any, expected: str) -> Any:
    """`cls(**spec)` for a dict of cls's fields; errors name the request's `key`."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{key}: expected {expected}, got {spec!r}")
    accepted = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in spec if k not in accepted]
    if unknown:
        raise ConfigError(f"{key}: unknown key {unknown[0]!r} (accepted: {', '.join(accepted)})")
    return cls(**spec)


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
    accepted = [f.name for f in dataclasses.fields(SparsityConfig)]
    for key in spec:
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
    return _from_fields(f"sparsity.{name}", cls, spec, "a string or a dict")


# section -> (config class, what its string shorthand means)
_SECTIONS = {
    "weights": (WeightsConfig, lambda text: {"pattern": text}),
    "moe": (MoEConfig, lambda text: {} if text == "dispatch" else text),
    "attention": (AttentionConfig, lambda text: {"policy": text}),
    "tokens": (TokensConfig, lambda text: {"capacity": _number("tokens.capacity", text)}),
}
