"""`sparsecc.compile` and the `CompiledModel` it returns."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Optional

import torch
from torch.utils import _pytree as pytree
from tqdm import tqdm

from sparsecc.passes import (Cleanup, FoldConstants, PassContext, PassManager, build_pipeline, format_pipeline,
                             print_graph)
from sparsecc.passes.records import RewriteRecord
from sparsecc.runtime.errors import InputMismatchError
from sparsecc.runtime.executor import BACKENDS, Executor
from sparsecc.runtime.kernels.triton.launch import use_launcher
from sparsecc.runtime.program import Program
from sparsecc.runtime.validate import validate_program

from .cached_launch import CachedKernelLauncher, jit_forced
from .calibrate import capture_calibrated
from .capture import Captured, check_model, normalize_inputs, refuse_weightless
from .checkpoint_io import given_masks
from .config import parse_distributed, parse_sparsity
from .errors import ConfigError
from .library_ops import lower_library_ops, prepare_for_passes
from .lower import lower
from .numerics import locate_non_finite, relative_error
from .reference import pruned_state_dict
from .report import Report, noop_lines


def compile(model: torch.nn.Module, example_inputs: Any = None, sparsity: Any = None, calibration: Optional[Iterable] = None,
            backend: Optional[str] = None, pipeline: Optional[str] = None, dynamic_shapes: Any = None, *,
            example_kwargs: Optional[dict] = None, check: bool = True, verify: bool = True,
            print_ir_after_all: bool = False, dump_dir: Optional[str] = None, progress: bool = False,
            distributed: Optional[dict] = None, compressed: Any = None) -> "CompiledModel":
    """Capture `model`, rewrite it for `sparsity`, lower it to a Program and return a callable.

    `sparsity` is "N:M", a dict or a SparsityConfig; `pipeline` (a pass pipeline string)
    replaces the pipeline the sparsity request implies. `check` computes the output error
    against the dense model on the example inputs for the report. The model is never modified.
    `calibration` is an iterable of batches shaped like `example_inputs`: the activations the
    Wanda/SparseGPT weight methods observe (the example inputs when None; the report says which).
    `model` may be the path of an ONNX file (docs/onnx.md): its graph is imported as ATen ops,
    specialised to `example_inputs` (a tuple or {input name: tensor}; declared shapes when None).
    `distributed={"experts": "ep"}`, called on every rank of an initialised process group, keeps on each
    rank only its E/world experts and exchanges token rows between ranks (docs/scale.md).
    `compressed` (the out_dir of `sparsecc.prune_checkpoint`, or what `sparsecc.load_compressed` returned) gives
    the N:M weights prune-nm takes as they are instead of choosing masks; `model` must be built from that
    pruned checkpoint (docs/scale.md).
    """
    if isinstance(model, (str, os.PathLike)):
        from .onnx.frontend.import_model import import_for_compile
        model, example_inputs = import_for_compile(model, example_inputs)
    steps = Steps(progress, total=4 if check else 3)   # capture, rewrite, lower (, check)
    check_model(model)
    refuse_weightless(model)
    config = parse_sparsity(sparsity)
    args = normalize_inputs(example_inputs)
    backend = _pick_backend(backend, model)
    passes = build_pipeline(pipeline) if pipeline is not None else config.passes()
    passes = parse_distributed(distributed).placed(passes)
    given = given_masks(compressed, passes)   # refused before the capture when it cannot fit the request
    with steps("capture"):
        # dims where a calibration batch differs from the example are captured dynamic
        captured, batches = capture_calibrated(model, args, example_kwargs, dynamic_shapes, calibration)
    graph_kwargs = captured.bound.graph_kwargs(example_kwargs)   # without the constants capture baked in
    flat_inputs = _tensor_leaves((args, graph_kwargs))   # the graph's placeholders, in order
    ctx = PassContext(example_inputs=flat_inputs, calibration=batches, progress=progress, nm_given=given)
    with steps("rewrite"):
        manager = PassManager(passes, verify=verify, print_ir_after_all=print_ir_after_all, dump_dir=dump_dir)
        gm = manager.run(prepare_for_passes(captured.gm), ctx)   # regions inlined, ATen outside the table decomposed
    with steps("lower"):
        gm = lower_library_ops(gm)   # what the passes did not absorb becomes ATen ops the runtime runs
        program, constants = lower(gm, captured.symbol_ranges, captured.in_spec, captured.out_spec,
                                   captured.bound.constants)
        if os.environ.get("SPARSECC_VALIDATE_PROGRAMS") == "1":   # tests load-check every program they lower
            validate_program(program, constants, device=next((t.device for t in constants.values()), "cpu"))
    compiled = CompiledModel(program, constants, backend, gm, captured, list(ctx.records))
    compiled.reset_state()   # passes that ran the graph (calibration, region recording) advanced it
    captured.reset_dense_state()
    compiled.example_inputs = flat_inputs   # what `save` runs to find the kernel specialisations to build
    report = _build_report(model, format_pipeline(passes), ctx, compiled, captured)
    report.noops = noop_lines(request_stats(config if pipeline is None else None, passes, ctx))
    if check:
        with steps("check"):
            _check_against_dense(compiled, report, args, graph_kwargs)
    report.timings = dict(steps.timings)
    report.kernels = nm_kernel_choices(compiled)
    compiled._report = report
    _warn_noops(report)
    _warn_dropped(captured)
    return compiled


class CompiledModel:
    """The rewritten program; call it like the original model. Buffers its forward writes
    (counters, KV caches) are the program's own state, updated per call as eager would update
    the model's: see `state_dict`, `reset_state` and docs/pipeline.md ("State")."""

    def __init__(self, program: Program, constants: dict[str, torch.Tensor], backend: str,
                 gm: torch.fx.GraphModule, captured: Captured, records: list[RewriteRecord]):
        self.program, self.constants, self.backend = program, constants, backend
        self.graph_module = gm
        self.records = records          # one per rewritten layer, as the passes reported them
        self._captured = captured
        self._executor = Executor(program, constants, backend)
        # state a pass added (Quest's page summaries) starts from its value at lowering; the rest from capture
        self._added_state = {name: constants[name].detach().clone() for name in program.state_names
                             if name not in captured.initial_state}
        self._report: Optional[Report] = None
        # Triton launches on a GPU run binaries from the sparsecc kernel cache (docs/aot.md)
        self.kernel_launcher = CachedKernelLauncher() if backend == "triton" and not jit_forced() else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs and len(args) == self._positional_tensors and all(type(a) is torch.Tensor for a in args):
            leaves = args     # the structure compiled for: no pytree walk (12-28 us a call, measured twice)
        else:
            kwargs = self._captured.bound.graph_kwargs(kwargs)   # constant keywords: the compiled value or left out
            flat, spec = pytree.tree_flatten((args, kwargs))
            if spec != self._captured.in_spec:
                raise InputMismatchError(f"inputs have structure {spec}, but the model was compiled for "
                                         f"{self._captured.in_spec}")
            leaves = _tensor_leaves(flat)
        if self.kernel_launcher is None:
            outputs = self._executor.run(leaves)
        else:
            with use_launcher(self.kernel_launcher):
                outputs = self._executor.run(leaves)
        if self._one_output:
            return outputs[0]
        return pytree.tree_unflatten(outputs, self._captured.out_spec)

    @functools.cached_property
    def _positional_tensors(self) -> int:
        """N where the model was compiled for N positional inputs and no keywords (its inputs then need no
        pytree walk when they are N plain tensors), else -1."""
        count = self._captured.in_spec.num_leaves
        return count if pytree.tree_structure((tuple(range(count)), {})) == self._captured.in_spec else -1

    @functools.cached_property
    def _one_output(self) -> bool:
        return self._captured.out_spec.is_leaf()

    def graph_modules(self) -> list[torch.nn.Module]:
        """The graphs this model keeps (rewritten, captured): what program sharing re-points with its constants."""
        return [self.graph_module, self._captured.gm]

    @property
    def captured(self) -> Captured:
        """What capture made: the dense reference graph (`dense_gm`; `reset_dense_state()` puts its state back
        to the compile-time value), the input/output structure and the dynamic dims' ranges (`symbol_ranges`)."""
        return self._captured

    def report(self) -> Report:
        return self._report

    def ir(self) -> str:
        """The rewritten graph in sparsecc's MLIR-like text form."""
        return print_graph(self.graph_module)

    def save(self, path: str, targets: Iterable[str] = ("cpu",), *, example_inputs: Any = None,
             cache_dir: Optional[str] = None, workers: Optional[int] = None, progress: bool = True,
             sign_with: Any = None, world_size: int = 1, described: Optional[dict] = None,
             borrowed: Iterable[str] = ()) -> dict:
        """Write an AOT artifact (program, weights, kernels cross-compiled for `targets`) that
        `sparsecc.runtime.load` runs; returns its manifest. `sign_with` (an Ed25519 private key, PEM
        bytes or a PEM file, see `sparsecc.runtime.signing`) also writes manifest.sig. The program's
        state is saved at its value now (`reset_state()` first for the compile-time value). See docs/aot.md.
        `world_size` W > 1 splits every MoE block's experts over W ranks, each rank's in its own file, for
        `sparsecc.runtime.load(path, rank=r)` under torchrun (docs/scale.md). `borrowed`: weights left out of
        this folder, taken at load from a sibling program's constants of the same names (a generator's decode)."""
        from .build import save_artifact
        inputs = getattr(self, "example_inputs", None) if example_inputs is None else _tensor_leaves(example_inputs)
        if inputs is None:
            raise ConfigError("save: pass example_inputs (this CompiledModel was not made by sparsecc.compile)")
        sources = nm_sources(self)   # runtime.load(path, compressed=checkpoint) swaps these constants
        described = {**({"nm_sources": sources} if sources else {}), **(described or {})}
        return save_artifact(self.program, self.constants, inputs, path, list(targets), cache_dir=cache_dir,
                             workers=workers, progress=progress, sign_with=sign_with, world_size=world_size,
                             described=described, borrowed=borrowed)

    def export_onnx(self, path: str, contrib: bool = False, opset: Optional[int] = None, *,
                    compare_dense: bool = False):
        """Write the rewritten model as ONNX that stock onnxruntime runs; see docs/onnx.md.
        Returns an ExportResult (file size, sparse/contrib node counts, the export log)."""
        from .onnx.export.exporter import export_compiled
        return export_compiled(self, path, contrib=contrib, opset=opset, compare_dense=compare_dense)

    def export_mlir(self, path: str):
        """Write the rewritten model as linalg-on-tensors MLIR, N:M weights as structured[N, M] sparse tensors
        (docs/mlir.md). Returns an MlirExportResult (file size, the structured weights)."""
        from .mlir_export import export_mlir
        return export_mlir(self, path)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the program's state (the buffers its forward writes: counters, KV caches), by
        the model's names; calls update the program's own copy, never the user's module."""
        return {name: self.constants[name].detach().clone() for name in self.program.state_names}

    def reset_state(self) -> None:
        """Put the program's state back to its value at compile time (e.g. an empty KV cache)."""
        with torch.no_grad():
            for name in self.program.state_names:
                self.constants[name].copy_(self._captured.initial_state.get(name, self._added_state.get(name)))

    def pruned_state_dict(self) -> dict[str, torch.Tensor]:
        """Dense weights equal to what the compiled program computes with, keyed by the model's names."""
        return pruned_state_dict(self.records, self.constants)

    def __repr__(self) -> str:
        return f"CompiledModel(backend={self.backend!r}, {self.program.summary()})"


def _warn_dropped(captured: Captured) -> None:
    if captured.bound.dropped_outputs:   # e.g. a DynamicCache: the program returns the rest, in the model's class
        warnings.warn("sparsecc.compile: left out of the compiled program's outputs: "
                      f"{'; '.join(captured.bound.dropped_outputs)}", stacklevel=3)


def request_stats(config: Any, passes: list, ctx: PassContext) -> list[tuple[str, Any]]:
    """(what the user asked for, the stats of the pass that did it), cleanup left out: a request is named
    by its sparsity section ('weights', 'moe', ...) and its pass, or by the pass alone for a pipeline.
    Housekeeping (cleanup, fold-constants) is no request: finding nothing to do is normal for it."""
    if config is None:
        return [(p.spelling(), stats) for p, stats in zip(passes, ctx.stats.values())
                if not isinstance(p, (Cleanup, FoldConstants))]
    chosen = [getattr(config, f.name) for f in dataclasses.fields(config)]
    sections = {s.pass_class.name: s.key for s in chosen if s is not None}
    # a pass the request implies (moe-dispatch under weights) is no request: rewriting nothing is expected
    return [(f"{sections[p.name]} ({p.spelling()})", stats)
            for p, stats in zip(passes, ctx.stats.values()) if p.name in sections]


def _warn_noops(report: Report) -> None:
    for line in report.noops:   # a request that changed nothing is easy to miss in a long report
        warnings.warn(f"sparsecc.compile: {line}", stacklevel=3)


def _tensor_leaves(tree: Any) -> tuple:
    """The tensors of a pytree, in flattening order: what the captured graph takes as placeholders."""
    return tuple(leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor))


def _pick_backend(backend: Optional[str], model: torch.nn.Module) -> str:
    if backend is None:
        on_cuda = any(p.is_cuda for p in model.parameters())
        return "triton" if on_cuda else "torch"
    if backend not in BACKENDS:
        raise ConfigError(f"backend: unknown backend {backend!r} (accepted: {', '.join(BACKENDS)})")
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("backend 'triton' needs a CUDA device, or TRITON_INTERPRET=1 to run the kernels "
                          "in Triton's interpreter on CPU")
    return backend


def _build_report(model, pipeline: str, ctx: PassContext, compiled: CompiledModel, captured: Captured) -> Report:
    skipped = [{"layer": s.where, "rule": s.rule, "reason": s.reason}
               for stats in ctx.stats.values() for s in stats.skipped]
    return Report(
        model=type(model).__name__,
        pipeline=pipeline,
        backend=compiled.backend,
        layers=compiled.records,
        skipped=skipped,
        passes={name: stats.to_dict() for name, stats in ctx.stats.items()},
        model_bytes_before=state_bytes(captured.dense_gm),
        model_bytes_after=sum(t.numel() * t.element_size() for t in compiled.constants.values()),
        constant_inputs=dict(captured.bound.constants),
        dropped_outputs=list(captured.bound.dropped_outputs),
    )


def nm_kernel_choices(compiled: "CompiledModel") -> list[dict]:
    """Per N:M linear on CPU, the path the runtime measured fastest for each token bucket seen so far."""
    from sparsecc.runtime.kernels.cpu.nm_paths import decisions
    found = []
    for r in compiled.records:
        values = compiled.constants.get(r.details.get("values", ""))
        if r.op != "sparsecc.nm_linear" or values is None or values.device.type != "cpu":
            continue
        for entry in decisions(values.dtype, r.details["n"], r.details["m"], *r.shape):
            found.append({"layer": r.layer, **entry})
    return found + dense_kernel_choices(compiled)


def nm_sources(compiled: "CompiledModel") -> dict[str, dict]:
    """{constant: {"weight": the model weight it compresses, "part": "values" | "indices"}} for every N:M constant;
    empty when any N:M weight is stacked MoE experts (built from several checkpoint tensors: a checkpoint could
    then replace only some of the artifact's N:M weights)."""
    sources = {}
    for record in compiled.records:
        weight = record.details.get("weight")
        if not isinstance(weight, str) or "values" not in record.details:
            continue
        if record.op.startswith("sparsecc.moe"):
            return {}
        for part in ("values", "indices"):
            constant = record.details.get(part)
            if constant in compiled.program.constant_names:
                sources[constant] = {"weight": weight, "part": part}
    return sources


def dense_kernel_choices(compiled: "CompiledModel") -> list[dict]:
    """Per dense linear of the program on CPU whose weight is a constant, the path measured faster per token
    bucket (runtime/kernels/cpu/dense_paths.py: F.linear or the generated decode kernel), once it ran."""
    from sparsecc.runtime.kernels.cpu.dense_paths import decisions
    found, seen = [], set()
    for inst in compiled.program.instructions:
        weight = inst.args[1] if inst.op == "aten::linear.default" and len(inst.args) > 1 else None
        tensor = compiled.constants.get(weight["c"]) if isinstance(weight, dict) and "c" in weight else None
        if tensor is None or tensor.device.type != "cpu" or tensor.dim() != 2:
            continue
        for entry in decisions(tensor.dtype, *tensor.shape):
            if (inst.name, entry["tokens"]) not in seen:
                seen.add((inst.name, entry["tokens"]))
                found.append({"layer": f"{inst.name} (dense)", "keep": "-", **entry})
    return found


def state_bytes(gm: torch.fx.GraphModule) -> int:
    tensors = {id(t): t for t in list(gm.parameters()) + list(gm.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _check_against_dense(compiled: CompiledModel, report: Report, args: tuple, kwargs: dict) -> None:
    with torch.no_grad(), _from_initial_state(compiled) as restart:
        got = _copied(compiled(*args, **kwargs))        # outputs may alias the state restart() rewrites
        dense = _copied(compiled.captured.dense_gm(*args, **kwargs))
        report.error_vs_dense = relative_error(got, dense)
        collective = any(i.op == "sparsecc::moe_ep" for i in compiled.program.instructions)
        # name the layer where it started; not with collectives: one rank re-running alone would hang the group
        if not math.isfinite(report.error_vs_dense) and not collective:
            restart()
            report.non_finite = locate_non_finite(got, dense, compiled.graph_module, compiled.captured.dense_gm,
                                                  tuple(pytree.tree_leaves((args, kwargs))))
        weights = compiled.pruned_state_dict()
        invertible = all(r.details.get("reference") != "unavailable" for r in compiled.records)
        if weights and invertible:
            restart()
            pruned = torch.func.functional_call(compiled.captured.dense_gm, weights, args, kwargs, strict=False)
            report.error_vs_reference = relative_error(got, pruned)


@contextmanager
def _from_initial_state(compiled: CompiledModel):
    """Every run of the check starts from the state at compile time (call `restart` between runs),
    and the check leaves the program's and the dense reference's state there."""
    def restart() -> None:
        compiled.reset_state()
        compiled.captured.reset_dense_state()
    try:
        yield restart
    finally:
        restart()


def _copied(outputs: Any) -> Any:
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, outputs)


class Steps:
    """Times each compile step; with `progress`, one bar on stderr names the step running."""

    def __init__(self, progress: bool, total: int, desc: str = "sparsecc compile"):
        self.timings = {}
        self.bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, file=sys.stderr,
                        leave=False, bar_format="{desc}: {n}/{total} steps [{elapsed}{postfix}]")

    @contextmanager
    def __call__(self, name: str):
        self.bar.set_postfix_str(name)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.bar.close()   # a failed step leaves no bar behind on the terminal
            raise
        self.timings[name] = time.perf_counter() - start
        self.bar.update(1)
        if self.bar.n == self.bar.total:
            self.bar.close()
