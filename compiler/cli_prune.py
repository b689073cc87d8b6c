"""`sparsecc prune MODEL_DIR -o OUT`: prune a transformers checkpoint to N:M by streaming its layers.

--calibration FILE holds token-id batches: a .safetensors file (every tensor one batch [batch, seq],
taken in name order) or a torch file (a tensor [batch, seq], or a list of them; loaded weights-only).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from sparsecc.passes.nm.methods import METHODS

from .errors import ConfigError
from .prune_state import map_large_blocks


def add_parser(sub: argparse._SubParsersAction) -> None:
    prune = sub.add_parser("prune", help="prune a transformers checkpoint to N:M one decoder layer at a time")
    prune.add_argument("model_dir", help="checkpoint folder (config.json + model.safetensors or shards + index)")
    prune.add_argument("-o", "--output", required=True, help="folder for the pruned checkpoint (resumed if unfinished)")
    prune.add_argument("--sparsity", default="2:4", help='"N:M" pattern (default 2:4)')
    prune.add_argument("--method", choices=METHODS, default="magnitude", help="how the kept N of every M are chosen")
    prune.add_argument("--calibration", metavar="FILE", help="token-id batches (.safetensors or torch file)")
    prune.add_argument("--max-memory", help="hidden states above this many bytes (e.g. 2GB) are kept on disk")
    prune.add_argument("--exclude", nargs="*", default=[], help="module-path globs kept dense")


def prune_command(args: argparse.Namespace) -> int:
    import sparsecc   # the lazy attribute: importing the submodule first leaves sparsecc.prune_checkpoint the module
    prune_checkpoint = sparsecc.prune_checkpoint

    map_large_blocks()   # this process only prunes: freed row blocks go back to the system (glibc, process-wide)
    summary = prune_checkpoint(args.model_dir, args.output, sparsity=args.sparsity, method=args.method,
                               calibration=read_calibration(args.calibration), max_memory=args.max_memory,
                               exclude=args.exclude, progress=args.progress)
    print(summary)
    return 0


def read_calibration(path: Optional[str]) -> Optional[list[torch.Tensor]]:
    """The token-id batches in `path` (None without a file)."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"prune: calibration file {path} does not exist")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(file)
        return [tensors[name] for name in sorted(tensors)]
    loaded = torch.load(file, weights_only=True)
    batches = [loaded] if isinstance(loaded, torch.Tensor) else loaded
    if not isinstance(batches, (list, tuple)) or not all(isinstance(b, torch.Tensor) for b in batches):
        raise ConfigError(f"prune: {path} must hold a tensor [batch, seq] of token ids or a list of them")
    return list(batches)
