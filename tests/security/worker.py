"""The worker process of the security harness: imports `sparsecc.runtime` once, then serves cases.

Protocol: one JSON request per line on stdin,
    {"artifact": dir, "inputs": safetensors, "reference": safetensors|null, "save_outputs": path|null,
     "trusted_keys": [hex of a raw Ed25519 public key, ...]|null, "payload_dirs": [dir, ...]}
and one JSON reply per line on the protocol pipe (the original stdout; anything the runtime prints goes
to stderr): {"outcome": "refused_load" | "refused_call" | "ran" | "other", "error": str, "correct": bool|null}.
`payload_dirs` go on sys.path for the case, so a runtime that imports a name from the artifact
would find the attacker's payload.py. Run as a script (`python worker.py MAX_BYTES`): it imports
nothing from the test package, and its address space is capped at MAX_BYTES so a huge
allocation fails fast instead of swapping the machine.
"""
from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import sys
import time
import traceback

import torch
from safetensors.torch import load_file, save_file

import sparsecc.runtime as rt


def flat_tensors(value) -> list:
    """Leaves of an output tree (tuple / list / dict / HF-style output object) in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flat_tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flat_tensors(v)]
    return [value]


def matches(outputs: list, reference: dict) -> bool:
    if len(outputs) != len(reference):
        return False
    for i, out in enumerate(outputs):
        want = reference[str(i)]
        if not isinstance(out, torch.Tensor) or out.shape != want.shape or out.dtype != want.dtype:
            return False
        if not torch.allclose(out, want, rtol=1e-5, atol=1e-5, equal_nan=True):
            return False
    return True


def self_test(name: str) -> dict:
    """The harness's own checks: what a crash, a hang, an escaping error and code run look like."""
    if name == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if name == "hang":
        time.sleep(3600)
    if name == "import_payload":
        importlib.import_module("payload")
    return other("call", IndexError("raised on purpose"))


def run_case(request: dict) -> dict:
    if "self_test" in request:
        return run_with_path(request, lambda: self_test(request["self_test"]))
    return run_with_path(request, lambda: classify(request))


def run_with_path(request: dict, case) -> dict:
    added = [d for d in request.get("payload_dirs", []) if d not in sys.path]
    sys.path[:0] = added
    try:
        return case()
    finally:
        for d in added:
            sys.path.remove(d)


def classify(request: dict) -> dict:
    inputs = load_file(request["inputs"])
    args = [inputs[str(i)] for i in range(len(inputs))]
    keys = [bytes.fromhex(k) for k in request.get("trusted_keys") or []]   # raw Ed25519 public keys
    try:
        model = rt.load(request["artifact"], trusted_keys=keys) if keys else rt.load(request["artifact"])
    except rt.ArtifactError as err:
        return {"outcome": "refused_load", "error": str(err)[:500], "correct": None}
    except BaseException as err:   # noqa: BLE001 - anything else escaping load is what we look for
        return other("load", err)
    torch.manual_seed(0)
    try:
        outputs = flat_tensors(model(*args))
    except (rt.RuntimeProgramError, rt.InputMismatchError) as err:
        return {"outcome": "refused_call", "error": f"{type(err).__name__}: {str(err)[:500]}", "correct": None}
    except BaseException as err:   # noqa: BLE001
        return other("call", err)
    return {"outcome": "ran", "error": "", "correct": ran_correctly(outputs, request)}


def ran_correctly(outputs: list, request: dict):
    if request.get("save_outputs"):
        tensors = {str(i): t.contiguous() for i, t in enumerate(outputs) if isinstance(t, torch.Tensor)}
        save_file(tensors, request["save_outputs"])
    return matches(outputs, load_file(request["reference"])) if request.get("reference") else None


def other(stage: str, err: BaseException) -> dict:
    where = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    at = f" at {where[0].filename}:{where[0].lineno}" if where else ""
    message = " ".join(str(err).split())[:300]
    return {"outcome": "other", "error": f"{stage}: {type(err).__name__}: {message}{at}", "correct": None}


def serve(max_bytes: int) -> None:
    if max_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                  # prints from the runtime must not corrupt the protocol
    protocol.write(json.dumps({"ready": True}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        reply = run_case(json.loads(line))
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
