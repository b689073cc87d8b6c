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
# N:M path choices measured by the tests stay out of the user's ~/.cache (and a stale file cannot steer a test);
# each xdist worker gets its own (a worker inherits the main process's environment, folder included)
if "SPARSECC_CACHE_DIR" not in os.environ or os.environ.get("SPARSECC_TEST_OWN_CACHE_DIR"):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    os.environ["SPARSECC_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"sparsecc-test-tuning-{worker}-")
    os.environ["SPARSECC_TEST_OWN_CACHE_DIR"] = "1"
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.hookimpl(optionalhook=True)   # an xdist hook: unknown to pytest without the plugin
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per core, at most 4 (each holds torch, transformers and
    compiled kernels; tests that fork ranks or builds add their own processes). Each worker is a fresh
    process, so this file gives each its own tuning cache directory. PYTEST_XDIST_AUTO_NUM_WORKERS still
    sets the count; refreshing snapshots (SPARSECC_UPDATE_SNAPSHOTS) runs in one process, as the files are
    rewritten test by test."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    if os.environ.get("SPARSECC_UPDATE_SNAPSHOTS"):
        return 0
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
