"""`sparsecc export` (a model factory to ONNX, or to MLIR with --mlir) and `sparsecc sparsify`
(an ONNX file to a sparse ONNX file)."""
from __future__ import annotations

import argparse
from collections.abc import Callable


def add_parsers(sub: argparse._SubParsersAction, add_model_args: Callable, sparsity_type: Callable) -> None:
    export = sub.add_parser("export", help="compile a model and write it as ONNX that stock onnxruntime runs "
                                           "(or as MLIR with --mlir)")
    add_model_args(export)
    export.add_argument("--sparsity", type=sparsity_type, default="2:4", help='"N:M" or a JSON dict (default 2:4)')
    export.add_argument("-o", "--output", required=True, help="the .onnx (or .mlir with --mlir) file to write")
    export.add_argument("--mlir", action="store_true", help="write linalg-on-tensors MLIR through torch-mlir, N:M "
                                                            "weights as structured[N, M] sparse tensors (docs/mlir.md)")
    _add_onnx_args(export)
    export.add_argument("--compare-dense", action="store_true", help="also export the dense model and report sizes")
    sparsify = sub.add_parser("sparsify", help="import an ONNX file, rewrite it for a sparsity request, export it")
    sparsify.add_argument("input", help="the .onnx file to read")
    sparsify.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    sparsify.add_argument("--sparsity", type=sparsity_type, default="2:4", help='"N:M" or a JSON dict (default 2:4)')
    sparsify.add_argument("--pipeline", help='pass pipeline, e.g. "prune-nm{n=2,m=4},cleanup"')
    sparsify.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                          help="size of a symbolic input dimension (default 1 each); repeat for several")
    _add_onnx_args(sparsify)


def _add_onnx_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contrib", action="store_true",
                   help="use onnxruntime contrib ops (com.microsoft MoE, GroupQueryAttention, SparseAttention) where "
                        "they compute the same thing; run files with SparseAttention through "
                        "sparsecc.onnx.runner.OnnxRunner, which binds its past/present buffers")
    p.add_argument("--opset", type=int, help="ONNX opset of the written file (default 20)")


def export_command(args) -> int:
    import sparsecc

    from .factory import load_factory

    call = load_factory(args.factory)
    compiled = sparsecc.compile(call.model, call.args, sparsity=args.sparsity, pipeline=args.pipeline,
                                example_kwargs=call.kwargs, progress=args.progress,
                                print_ir_after_all=args.print_ir_after_all, dump_dir=args.dump_dir)
    print(compiled.report())
    if args.mlir:
        print(compiled.export_mlir(args.output))
        return 0
    print(compiled.export_onnx(args.output, contrib=args.contrib, opset=args.opset,
                               compare_dense=args.compare_dense))
    return 0


def sparsify_command(args) -> int:
    import sparsecc

    from .onnx.frontend.load import example_inputs, load_model, parse_dims

    inputs = example_inputs(load_model(args.input), parse_dims(args.dim))
    compiled = sparsecc.compile(args.input, inputs, sparsity=args.sparsity, pipeline=args.pipeline,
                                progress=args.progress)
    print(compiled.report())
    print(compiled.export_onnx(args.output, contrib=args.contrib, opset=args.opset))
    return 0
