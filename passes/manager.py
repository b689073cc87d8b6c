"""`Pass`, its result and statistics, the shared `PassContext`, and the `PassManager`.

A pass is a frozen dataclass whose `name` and fields are its pipeline
spelling (`prune-nm{n=2,m=4}`). It rewrites the GraphModule in place and
returns `PassResult(gm, modified, stats)`. The manager runs passes in order
and, after each one that modified the graph, lints, recompiles and verifies
it; after one that did not, it only confirms that the printed IR is unchanged
(far cheaper than re-propagating shapes). It records the stats in `ctx.stats`,
and optionally prints or dumps the IR:

    dump_dir/00-input.mlir, 00-input.dot     the graph before any pass
    dump_dir/01-prune-nm.mlir, .dot          after pass 1, and so on
"""
from __future__ import annotations

import dataclasses
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence, TextIO

from torch.fx import GraphModule
from tqdm import tqdm

from .graph import to_dot
from .options import OptionBounds, OptionError, OptionProblem, check_bounds, check_types, format_option
from .printer import print_graph
from .verify import VerificationError, verify_graph


@dataclass(frozen=True)
class Skip:
    """A match a rule declined: where (module path or node name), which rule, why."""
    where: str
    rule: str
    reason: str


@dataclass
class PassStats:
    matched: int = 0
    rewritten: int = 0
    skipped: list[Skip] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # pass-specific counters

    def to_dict(self) -> dict[str, Any]:
        return {"matched": self.matched, "rewritten": self.rewritten,
                "skipped": [dataclasses.asdict(s) for s in self.skipped], "extra": dict(self.extra)}

    def summary(self) -> str:
        extra = "".join(f", {k} {v}" for k, v in self.extra.items())
        return f"matched {self.matched}, rewritten {self.rewritten}, skipped {len(self.skipped)}{extra}"


def _log_to_stderr(message: str) -> None:
    tqdm.write(message, file=sys.stderr)   # above any progress bar, not through it


@dataclass
class PassContext:
    """What passes share: inputs for calibration/checks, per-layer records, stats, logging."""
    example_inputs: tuple = ()                    # flat tensors, in placeholder order
    calibration: object = None
    records: list = field(default_factory=list)   # per-layer rewrite records, read by the report
    stats: dict[str, PassStats] = field(default_factory=dict)
    progress: bool = False
    log: Callable[[str], None] = _log_to_stderr
    # planning without weights (constants on the meta device): rewrites are decided from shapes alone;
    # nothing is recorded, confirmed on values or calibrated, and records say what was not measured
    shapes_only: bool = False
    # prune-nm takes these compressed weights as given instead of choosing masks (passes/nm/given.py)
    nm_given: object = None


@dataclass
class PassResult:
    """What a pass returns; `modified` False promises the graph is as it was (the manager then skips verifying)."""
    gm: GraphModule
    modified: bool
    stats: PassStats = field(default_factory=PassStats)


@dataclass(frozen=True)
class Pass:
    """Base class; subclasses are `@dataclass(frozen=True)` with a kebab-case `name`; their fields are the
    options, checked here (passes/options.py) however the pass is made."""
    name: ClassVar[str] = ""
    option_bounds: ClassVar[dict[str, OptionBounds]] = {}   # every int/float option's accepted values
    always_spelled: ClassVar[tuple[str, ...]] = ()           # options the pipeline text shows even at their default

    def __post_init__(self) -> None:
        """Options are checked when the pass is made, so a bad pipeline or config fails before capture."""
        owner = f"pass '{self.name}'"
        check_types(self, self.option_types(), owner)
        problem = self.options_problem()
        if problem:
            raise OptionError(f"{owner}: {problem.text}", problem.option, problem.text)
        check_bounds(self, self.option_bounds, owner)

    def options_problem(self) -> Optional[OptionProblem]:
        """What is wrong with well-typed options beyond their bounds (choices, combinations); None when nothing."""
        return None

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"pass '{self.name}' does not implement run()")

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        """Option name -> resolved type annotation, in declaration order."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def option_choices(cls, option: str) -> tuple:
        """The values a Literal option accepts (command-line `choices`, say)."""
        return typing.get_args(cls.option_types()[option])

    def spelled_options(self) -> tuple[str, ...]:
        """Options the pipeline text shows even at their default (a pass may add those its mode uses)."""
        return self.always_spelled

    def spelling(self) -> str:
        """The pipeline text of this pass; options at their default are left out unless `spelled_options`."""
        shown = self.spelled_options()
        options = [f"{f.name}={format_option(getattr(self, f.name))}" for f in dataclasses.fields(self)
                   if f.name in shown or not _is_default(f, getattr(self, f.name))]
        return self.name + ("{" + ",".join(options) + "}" if options else "")


def _is_default(f: dataclasses.Field, value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return value == f.default
    if f.default_factory is not dataclasses.MISSING:
        return value == f.default_factory()
    return False


def _stats_key(stats: dict[str, PassStats], name: str) -> str:
    if name not in stats:
        return name
    index = 2
    while f"{name}#{index}" in stats:
        index += 1
    return f"{name}#{index}"


@dataclass
class PassManager:
    passes: Sequence[Pass]
    verify: bool = True
    print_ir_after_all: bool = False
    dump_dir: Optional[str | Path] = None
    out: Optional[TextIO] = None  # where printed IR goes; stderr when None

    def spelling(self) -> str:
        return ",".join(p.spelling() for p in self.passes)

    def run(self, gm: GraphModule, ctx: Optional[PassContext] = None) -> GraphModule:
        """Run every pass on `gm` (in place) and return the final GraphModule."""
        ctx = ctx if ctx is not None else PassContext()
        self._check(gm, "before any pass (input graph)")
        self._dump(gm, 0, "input")
        for index, pass_ in enumerate(self.passes, start=1):
            gm = self._run_one(pass_, gm, ctx, index)
        return gm

    def _run_one(self, pass_: Pass, gm: GraphModule, ctx: PassContext, index: int) -> GraphModule:
        start, before = time.perf_counter(), print_graph(gm)
        try:
            result = pass_.run(gm, ctx)
        except Exception as err:
            err.add_note(f"while running pass '{pass_.spelling()}'")
            raise
        key = _stats_key(ctx.stats, pass_.name)
        ctx.stats[key] = result.stats
        gm = result.gm
        if result.modified:
            self._check(gm, f"after pass '{key}'")
        elif print_graph(gm) != before:
            raise VerificationError(f"pass '{key}' returned modified=False but changed the graph")
        if ctx.progress:
            ctx.log(f"[{index}/{len(self.passes)}] {key}: {result.stats.summary()} ({time.perf_counter() - start:.2f}s)")
        self._print(gm, pass_.name)
        self._dump(gm, index, pass_.name)
        return gm

    def _check(self, gm: GraphModule, when: str) -> None:
        """lint, recompile (the generated code must follow the graph), then verify."""
        try:
            gm.graph.lint()
            gm.recompile()
            if self.verify:
                verify_graph(gm)
        except VerificationError as err:
            raise VerificationError(f"verification failed {when}: {err}", node=err.node) from err
        except Exception as err:  # lint's and codegen's own errors
            raise VerificationError(f"verification failed {when}: {err}") from err

    def _print(self, gm: GraphModule, name: str) -> None:
        if self.print_ir_after_all:
            out = self.out if self.out is not None else sys.stderr
            out.write(f"// -----// IR after {name} //----- //\n{print_graph(gm)}\n")

    def _dump(self, gm: GraphModule, index: int, name: str) -> None:
        if self.dump_dir is None:
            return
        folder = Path(self.dump_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:02d}-{name}.mlir").write_text(print_graph(gm))
        (folder / f"{index:02d}-{name}.dot").write_text(to_dot(gm))


__all__ = ["Pass", "PassContext", "PassManager", "PassResult", "PassStats", "Skip"]
