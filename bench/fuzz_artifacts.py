"""Fuzz saved artifacts outside pytest and print the counts docs/security.md records.

    python bench/fuzz_artifacts.py [N]        (default 1000 cases)

Each case mutates the saved program of a small compiled model (N:M weights, MoE dispatch, block
attention, token routing; see tests/security/fuzz.py), recomputes every hash as an attacker
would, loads and calls it in a long-lived worker process, and is counted as refused at load,
refused at call, ran (same output / changed output) or failed (crash, hang, other exception,
planted payload ran). Failures are listed with the mutations that caused them.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.security.attacker import pristine_artifact  # noqa: E402
from tests.security.fuzz import fuzz  # noqa: E402
from tests.security.harness import Harness  # noqa: E402


def main(examples: int) -> int:
    pristine = pristine_artifact()
    harness = Harness(timeout_s=15.0)
    start = time.perf_counter()
    try:
        counts = fuzz(pristine, harness, examples)
    finally:
        harness.close()
    seconds = time.perf_counter() - start
    print(f"{counts.tried} cases in {seconds:.0f} s ({harness.restarts} worker restarts)\n")
    print("| outcome                | cases  |\n|------------------------|--------|")
    print(counts.table())
    for description, outcome in counts.failures[:30]:
        print(f"\nFAILED {outcome}\n  after: {description}")
    return 1 if counts.failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
