"""`sparsecc build` (compile a model and write an AOT artifact) and `sparsecc inspect` (describe one)."""
from __future__ import annotations

import argparse
from typing import Callable


def add_parsers(sub: argparse._SubParsersAction, add_model_args: Callable, sparsity_type: Callable) -> None:
    build = sub.add_parser("build", help="compile a model and write an AOT artifact (program, weights, kernels)")
    add_model_args(build)
    build.add_argument("--sparsity", type=sparsity_type, default="2:4", help='"N:M" or a JSON dict (default 2:4)')
    build.add_argument("--target", action="append", dest="targets", default=[], metavar="TARGET",
                       help="cpu, cpu:x86-64-v4, cpu:x86-64-v3 (generated CPU kernels for that CPU), cuda:80, "
                            "cuda:86, cuda:89, cuda:90 or hip:gfx942, built besides this machine's own targets "
                            "(cpu and its GPUs); repeat for several")
    build.add_argument("--no-host-targets", action="store_true",
                       help="build only the --target targets, not this machine's own")
    build.add_argument("-o", "--output", required=True, help="artifact folder to write")
    build.add_argument("--workers", type=int, help="parallel kernel build processes (default: CPU count)")
    build.add_argument("--cache-dir", help="kernel cache folder (default $SPARSECC_KERNEL_CACHE or ~/.cache/sparsecc)")
    build.add_argument("--no-check", action="store_true", help="skip the error check against the dense model")
    build.add_argument("--sign-key", metavar="FILE", help="sign the manifest with this Ed25519 private key (PEM)")
    build.add_argument("--compressed", metavar="DIR", help="take the N:M weights of this `sparsecc prune` output "
                       "instead of choosing masks (the model must be built from it)")
    inspect = sub.add_parser("inspect", help="check an artifact's hashes and print what it holds")
    inspect.add_argument("artifact", help="artifact folder")
    inspect.add_argument("--trusted-key", action="append", dest="trusted_keys", metavar="FILE",
                         help="also check the signature against this Ed25519 public key (PEM); repeatable")
    keygen = sub.add_parser("keygen", help="write an Ed25519 key pair for signing artifacts")
    keygen.add_argument("-o", "--output", required=True, help="folder for sparsecc.key (private) and sparsecc.pub")


def build_command(args) -> int:
    import sparsecc
    from .factory import load_factory

    call = load_factory(args.factory)
    compiled = sparsecc.compile(call.model, call.args, sparsity=args.sparsity, pipeline=args.pipeline,
                                example_kwargs=call.kwargs,
                                check=not args.no_check, progress=args.progress,
                                print_ir_after_all=args.print_ir_after_all, dump_dir=args.dump_dir,
                                compressed=args.compressed)
    manifest = compiled.save(args.output, targets=build_targets(args.targets, not args.no_host_targets),
                             cache_dir=args.cache_dir, workers=args.workers, sign_with=args.sign_key,
                             progress=args.progress)
    if args.html:
        compiled.report().save_html(args.html)
    binaries = sum(len(k["binaries"]) for k in manifest["kernels"])
    print(f"wrote {args.output}: targets {', '.join(manifest['targets'])}; {len(manifest['kernels'])} kernel "
          f"specialisations, {binaries} binaries; {compiled.program.summary()}")
    return 0


def host_targets() -> list[str]:
    """The targets this machine loads artifacts for: cpu, and each visible GPU's that kernels are built for."""
    import torch
    from .cached_launch import cache_target
    gpus = [cache_target(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
    return ["cpu"] + [target for target in gpus if target is not None]


def build_targets(asked: list[str], with_host: bool) -> list[str]:
    """Those asked for, then the host's (when `with_host`), each once, in that order."""
    targets = list(asked) + (host_targets() if with_host else [])
    if not targets:
        raise ValueError("--no-host-targets needs at least one --target")
    return list(dict.fromkeys(targets))


def inspect_command(args) -> int:
    from pathlib import Path
    from .inspect_artifact import describe_artifact
    try:
        keys = [Path(f).read_bytes() for f in args.trusted_keys or []]
    except OSError as err:
        raise ValueError(f"cannot read the trusted key: {err}") from None
    print(describe_artifact(args.artifact, trusted_keys=keys or None))
    return 0


def keygen_command(args) -> int:
    from sparsecc.runtime.signing import key_id, public_key, write_key_pair
    private, public = write_key_pair(args.output)
    print(f"wrote {private} (private: keep it secret) and {public} (key id "
          f"{key_id(public_key(public.read_bytes()))}); sign with `sparsecc build --sign-key {private}`, "
          f"load with sparsecc.runtime.load(path, trusted_keys=[pathlib.Path({str(public)!r})])")
    return 0
