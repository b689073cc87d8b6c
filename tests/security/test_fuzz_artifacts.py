"""Hypothesis mutates the saved program; each mutant is loaded and called in the harness's worker.

The property: every outcome is refused_load, refused_call or ran; no crash, hang, other exception
or payload that ran. SPARSECC_FUZZ_EXAMPLES sets the number of cases (default 200, under a minute
on two cores); bench/fuzz_artifacts.py runs more and prints the table docs/security.md records.
"""
from __future__ import annotations

import os

from .attacker import pristine_artifact
from .fuzz import fuzz
from .harness import Harness

EXAMPLES = int(os.environ.get("SPARSECC_FUZZ_EXAMPLES", "200"))


def test_mutated_artifacts_are_refused_or_run():
    harness = Harness(timeout_s=15.0)
    try:
        counts = fuzz(pristine_artifact(), harness, EXAMPLES)
    finally:
        harness.close()
    print("\n" + counts.table())
    assert counts.tried == EXAMPLES
    failures = "\n".join(f"  {outcome}\n    after: {description}" for description, outcome in counts.failures[:15])
    assert not counts.failures, f"{len(counts.failures)} of {counts.tried} mutants failed:\n{failures}"
