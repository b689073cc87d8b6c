"""What the command line shows besides its results: progress bars, and library noise only with `-v`.

Progress bars (tqdm, on stderr) are drawn when stderr is a terminal and `-q` is not given. Library
warnings and log lines that say nothing about the user's model (torch's ONNX exporter listing the
torchvision ops it skips, deprecation and future warnings from torch, onnxscript, transformers and
friends) are hidden unless `-v` is given; sparsecc's own warnings about the model always show.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# packages whose warnings and logs describe themselves, not the model being compiled
LIBRARIES = ("torch", "torchvision", "onnx", "onnxscript", "onnx_ir", "onnxruntime", "transformers", "triton",
             "torch_mlir", "safetensors", "networkx")
NOISE_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show library warnings and log lines (torch's exporter, deprecations)")


def wants_progress(args: argparse.Namespace) -> bool:
    """Bars only for a person watching: stderr is a terminal and -q was not given."""
    return not args.quiet and sys.stderr.isatty()


@contextmanager
def library_noise_hidden(verbose: bool) -> Iterator[None]:
    """Within the block, hide library warnings and library log records below ERROR, and every deprecation /
    future warning (whoever raises it: torch attributes many to the caller's frame), unless `verbose`."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in LIBRARIES]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for category in NOISE_CATEGORIES:
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", module=rf"({'|'.join(LIBRARIES)})(\.|$)")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
