"""The `sparsecc` command line: compile a model and print its report, or run a pipeline and print IR."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

from sparsecc.passes import PruneNM
from sparsecc.passes.nm.methods import METHODS
from sparsecc.runtime.executor import BACKENDS

from . import cli_build, cli_generate, cli_onnx, cli_prune
from .cli_output import add_output_args, library_noise_hidden, wants_progress
from .errors import SparseccError
from .report_html import save_html
from .factory import FACTORY_HELP, load_factory


def _sparsity(text: str) -> Any:
    text = text.strip()
    return json.loads(text) if text.startswith("{") else text


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("factory", help=FACTORY_HELP)
    p.add_argument("--pipeline", help='pass pipeline, e.g. "prune-nm{n=2,m=4},cleanup"')
    p.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every pass (stderr)")
    p.add_argument("--dump-dir", help="write the IR (.mlir) and graph (.dot) after every pass here")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsecc", description="A compiler for sparsity in neural networks.")
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="compile a model and print its report")
    _add_model_args(comp)
    comp.add_argument("--sparsity", type=_sparsity, default="2:4", help='"N:M" or a JSON dict (default 2:4)')
    comp.add_argument("--method", choices=METHODS, help="how N:M masks are chosen (sets weights.method)")
    comp.add_argument("--backend", choices=BACKENDS, help="kernel backend (default: by device)")
    comp.add_argument("--json", action="store_true", help="print the report as JSON")
    comp.add_argument("--ir", action="store_true", help="also print the final IR")
    comp.add_argument("--no-check", action="store_true", help="skip the error check against the dense model")
    comp.add_argument("--compressed", metavar="DIR", help="take the N:M weights of this `sparsecc prune` output "
                      "instead of choosing masks (the model must be built from it)")
    plan = sub.add_parser("plan", help="the report of a model without weights (meta device), from shapes alone")
    plan.add_argument("factory", help=FACTORY_HELP + " (built under `with torch.device('meta'):`)")
    plan.add_argument("--pipeline", help='pass pipeline, e.g. "prune-nm{n=2,m=4},cleanup"')
    plan.add_argument("--sparsity", type=_sparsity, default="2:4", help='"N:M" or a JSON dict (default 2:4)')
    plan.add_argument("--method", choices=METHODS, help="how N:M masks would be chosen (sets weights.method)")
    plan.add_argument("--json", action="store_true", help="print the report as JSON")
    opt = sub.add_parser("opt", help="run a pass pipeline on a captured model and print the IR")
    _add_model_args(opt)
    cli_build.add_parsers(sub, _add_model_args, _sparsity)
    cli_onnx.add_parsers(sub, _add_model_args, _sparsity)
    cli_prune.add_parser(sub)
    cli_generate.add_parser(sub, _sparsity)
    sweep = sub.add_parser("sweep", help="measure output error against the amount of sparsity")
    kinds = sweep.add_subparsers(dest="sweep_kind", required=True)
    weights = kinds.add_parser("weights", help="error per layer group pruned alone, and whole-model error "
                                               "at 1:4 / 2:4 / 4:8 / unstructured 50%%")
    weights.add_argument("factory", help=FACTORY_HELP)
    weights.add_argument("--pattern", default="2:4", help="N:M pattern of the per-group rows (default 2:4)")
    weights.add_argument("--method", choices=METHODS, default=PruneNM.method, help="mask method")
    weights.add_argument("--depth", type=int, help="group layers by the first DEPTH parts of their module path")
    weights.add_argument("--exclude", nargs="*", default=[], help="module-path globs kept dense")
    weights.add_argument("--json", action="store_true", help="print the sweep as JSON")
    weights.set_defaults(run=_sweep_weights)
    from .sweep_tokens import add_sweep_tokens_parser
    add_sweep_tokens_parser(kinds)
    for command in [*(p for name, p in sub.choices.items() if p is not sweep), *kinds.choices.values()]:
        add_output_args(command)
    for command in (comp, sub.choices["build"], *kinds.choices.values()):
        command.add_argument("--html", metavar="PATH", help="also write the report as one self-contained HTML page")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    args.progress = wants_progress(args)
    try:
        with library_noise_hidden(args.verbose):
            return _COMMANDS[args.command](args)
    except (SparseccError, ValueError) as err:
        print(f"sparsecc {args.command}: error: {err}", file=sys.stderr)
        return 2


def _compile(args) -> int:
    import sparsecc

    call = load_factory(args.factory)
    sparsity = _with_method(args.sparsity, args.method)
    compiled = sparsecc.compile(call.model, call.args, sparsity=sparsity, pipeline=args.pipeline,
                                example_kwargs=call.kwargs,
                                backend=args.backend, check=not args.no_check, progress=args.progress,
                                print_ir_after_all=args.print_ir_after_all, dump_dir=args.dump_dir,
                                compressed=args.compressed)
    report = compiled.report()
    print(report.to_json() if args.json else report)
    if args.html:
        report.save_html(args.html)
    if args.ir:
        print(compiled.ir())
    return 0


def _plan(args) -> int:
    import sparsecc

    call = load_factory(args.factory)
    report = sparsecc.plan(call.model, call.args, sparsity=_with_method(args.sparsity, args.method),
                           pipeline=args.pipeline, example_kwargs=call.kwargs, progress=args.progress)
    print(report.to_json() if args.json else report)
    return 0


def _with_method(sparsity: Any, method: Optional[str]) -> Any:
    """The --sparsity request with weights.method set by --method."""
    if method is None:
        return sparsity
    if isinstance(sparsity, str):
        return {"weights": {"pattern": sparsity, "method": method}}
    weights = sparsity.get("weights")
    if weights is None:
        raise ValueError("--method needs a weights section in --sparsity")
    weights = {"pattern": weights} if isinstance(weights, str) else dict(weights)
    return {**sparsity, "weights": {**weights, "method": method}}


def _sweep_weights(args) -> int:
    from .sweep_weights import sweep_weights

    call = load_factory(args.factory)
    sweep = sweep_weights(call.model, call.args, example_kwargs=call.kwargs, pattern=args.pattern,
                          method=args.method, depth=args.depth, exclude=args.exclude, progress=args.progress)
    print(json.dumps(sweep.to_dict(), indent=2) if args.json else sweep)
    if args.html:
        save_html(args.html, sweeps=[sweep.to_dict()])
    return 0


def _opt(args) -> int:
    import torch
    from torch.utils import _pytree as pytree

    from sparsecc.passes import PassContext, PassManager, build_pipeline, print_graph
    from .capture import capture, normalize_inputs
    from .library_ops import prepare_for_passes

    call = load_factory(args.factory)
    inputs = normalize_inputs(call.args)
    captured = capture(call.model, inputs, call.kwargs)
    manager = PassManager(build_pipeline(args.pipeline or "cleanup"),
                          print_ir_after_all=args.print_ir_after_all, dump_dir=args.dump_dir)
    leaves = pytree.tree_leaves((inputs, captured.bound.graph_kwargs(call.kwargs)))
    flat_inputs = tuple(t for t in leaves if isinstance(t, torch.Tensor))   # the placeholders, in order
    ctx = PassContext(example_inputs=flat_inputs, progress=args.progress)
    print(print_graph(manager.run(prepare_for_passes(captured.gm), ctx)))   # as compile prepares it
    return 0


_COMMANDS = {"compile": _compile, "plan": _plan, "opt": _opt, "build": cli_build.build_command,
             "inspect": cli_build.inspect_command, "keygen": cli_build.keygen_command,
             "sweep": lambda args: args.run(args),
             "export": cli_onnx.export_command, "sparsify": cli_onnx.sparsify_command,
             "prune": cli_prune.prune_command, "generate": cli_generate.generate_command}

if __name__ == "__main__":
    sys.exit(main())
