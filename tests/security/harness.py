"""Runs attacked artifacts in a long-lived worker process and judges each outcome.

The worker (`worker.py`) imports the runtime once, so a case costs milliseconds. The parent:
- enforces a per-case timeout: a hang is killed and is a failure;
- sees a worker that died (by a signal or otherwise) as a crash, a failure, and starts a new one;
- plants payload.py in the worker's working folder and in each artifact folder (both on the
  worker's sys.path) and checks its marker never appears: "no code run".
Accepted outcomes: ArtifactError at load, RuntimeProgramError / InputMismatchError at call, or
the program ran. Anything else escaping ("other"), a crash, a hang or a planted payload that ran
is a failure.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .attacker import plant_payload

WORKER = Path(__file__).with_name("worker.py")
ACCEPTED = ("refused_load", "refused_call", "ran")
WORKER_MAX_BYTES = 8 << 30    # address-space cap of the worker: a huge allocation fails, the machine survives
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Outcome:
    kind: str          # refused_load | refused_call | ran | other | crash | hang | payload_ran
    error: str = ""
    correct: Optional[bool] = None   # for "ran": the outputs equal the intact artifact's

    @property
    def ok(self) -> bool:
        return self.kind in ACCEPTED

    def __str__(self) -> str:
        return f"{self.kind}: {self.error}" if self.error else self.kind


class Harness:
    def __init__(self, timeout_s: float = 30.0, max_bytes: int = WORKER_MAX_BYTES):
        self.timeout_s, self.max_bytes = timeout_s, max_bytes
        self.scratch = Path(tempfile.mkdtemp(prefix="sparsecc-harness-"))
        self.marker = self.scratch / "PAYLOAD_RAN"
        plant_payload(self.scratch, self.marker)
        self.log = open(self.scratch / "worker.log", "ab")
        self.process: Optional[subprocess.Popen] = None
        self.restarts = 0

    def run(self, artifact: Path, inputs: Path, reference: Optional[Path] = None,
            save_outputs: Optional[Path] = None, timeout_s: Optional[float] = None,
            trusted_keys: Optional[list[bytes]] = None) -> Outcome:
        """Load `artifact` (with `trusted_keys`, raw Ed25519 public keys, if given) and call it with `inputs`
        in the worker; the judged outcome."""
        if Path(artifact).is_dir():
            plant_payload(Path(artifact), self.marker)
        request = {"artifact": str(artifact), "inputs": str(inputs), "reference": _str(reference),
                   "save_outputs": _str(save_outputs), "payload_dirs": [str(self.scratch), str(artifact)],
                   "trusted_keys": [k.hex() for k in trusted_keys or []]}
        return self._judged(request, timeout_s or self.timeout_s)

    def self_test(self, name: str, timeout_s: float = 5.0) -> Outcome:
        """Ask the worker to crash, hang, raise or import payload.py on purpose (tests of the harness)."""
        request = {"self_test": name, "payload_dirs": [str(self.scratch)]}
        return self._judged(request, timeout_s)

    def _judged(self, request: dict, timeout_s: float) -> Outcome:
        """The worker's answer, overruled by the payload's marker: code that ran is a failure whatever else."""
        outcome = self._exchange(request, timeout_s)
        if self.marker.exists():
            self.marker.unlink()
            return Outcome("payload_ran", f"payload.py was imported ({outcome})")
        return outcome

    def _exchange(self, request: dict, timeout_s: float) -> Outcome:
        process = self._worker()
        try:
            process.stdin.write((json.dumps(request) + "\n").encode())
            process.stdin.flush()
        except BrokenPipeError:
            return self._died("before the case")
        line = self._read_line(process, timeout_s)
        if line is None:
            self._stop()
            return Outcome("hang", f"no answer within {timeout_s:.0f} s; worker killed")
        if not line:
            return self._died("during the case")
        reply = json.loads(line)
        return Outcome(reply["outcome"], reply.get("error", ""), reply.get("correct"))

    def _died(self, when: str) -> Outcome:
        code = self.process.wait(timeout=START_TIMEOUT_S)   # its pipe closed: it is exiting
        self.process = None
        self.restarts += 1
        name = signal.Signals(-code).name if code < 0 and -code in signal.valid_signals() else f"exit {code}"
        return Outcome("crash", f"worker died {when} ({name}); see {self.scratch / 'worker.log'}")

    def _worker(self) -> subprocess.Popen:
        if self.process is not None and self.process.poll() is None:
            return self.process
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), str(self.max_bytes)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, cwd=self.scratch, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        ready = self._read_line(self.process, START_TIMEOUT_S)
        if not ready:
            raise RuntimeError(f"the harness worker did not start; see {self.scratch / 'worker.log'}")
        return self.process

    @staticmethod
    def _read_line(process: subprocess.Popen, timeout_s: float) -> Optional[bytes]:
        """One line from the worker; b"" at end of stream (it died), None on timeout (it hangs)."""
        deadline, chunks = time.monotonic() + timeout_s, []
        fd = process.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b""
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                return b"".join(chunks)

    def _stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
            self.restarts += 1

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._stop()
        self.process = None
        self.log.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _str(path: Optional[Path]) -> Optional[str]:
    return None if path is None else str(path)
