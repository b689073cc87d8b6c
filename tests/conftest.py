"""Test set-up shared by every folder.

Triton kernels run under the interpreter when no GPU is present; the
variable must be set before triton is first imported, so it is set here.
Tests marked `interpreter` run Triton kernels on CPU tensors, which only the
interpreter can do: on a CUDA machine (without TRITON_INTERPRET=1) they skip,
and the `gpu`-marked tests cover the same kernels there.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
os.environ.setdefault("SPARSECC_VALIDATE_PROGRAMS", "1")   # every program a test lowers passes load-time validation
# N:M path choices measured by the tests stay out of the user's ~/.cache (and a stale file cannot steer a test)
os.environ.setdefault("SPARSECC_CACHE_DIR", tempfile.mkdtemp(prefix="sparsecc-test-tuning-"))
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per core, at most 4 (each holds torch, transformers and
    compiled kernels; tests that fork ranks or builds add their own processes). Each worker is a fresh
    process, so this file gives each its own tuning cache directory."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def pytest_collection_modifyitems(config, items):
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interpreter = pytest.mark.skip(reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        elif "interpreter" in item.keywords and "gpu" not in item.keywords and not interpreting:
            item.add_marker(skip_interpreter)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
