"""The family x request matrix of docs/models.md: what sparsecc does with each stock model.

    python bench/models.py [family ...]

Each tiny stock transformers model (tests/models/families.py: random weights, default settings,
the library's default expert path) is compiled with each request of tests/models/requests.py. A
cell says how many sparse ops the program holds, the error the report gives (exact rewrites:
against the model, or for 2:4 against the model with the pruned weights; lossy ones: against the
dense model) and, when layers stayed dense, how many and the first reason. Prints markdown.
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sparsecc  # noqa: E402
from tests.models.families import FAMILIES, MOE, tokens  # noqa: E402
from tests.models.requests import EXACT, REQUESTS, skip_reasons, sparse_ops  # noqa: E402


def cell(family: str, request: str) -> str:
    if request == "moe" and family not in MOE:
        return "— (no MoE)"
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = sparsecc.compile(FAMILIES[family](), (tokens(),), sparsity=REQUESTS[request], progress=False)
    except Exception as err:  # a failure is a result of the matrix, not the end of it
        return f"**fails**: {type(err).__name__}: {str(err).splitlines()[0][:90]}"
    seconds = time.perf_counter() - start
    report, rewritten, reasons = compiled.report(), sparse_ops(compiled, request), skip_reasons(compiled, request)
    key = EXACT.get(request, "error_vs_dense") if rewritten else "error_vs_dense"
    error = getattr(report, key)
    text = f"{rewritten} ops, {key.removeprefix('error_vs_')} err {error:.1e}" if rewritten else "not rewritten"
    if reasons:
        text += f"; {len(reasons)} dense: {reasons[0][:80]}"
    return f"{text} ({seconds:.1f} s)"


def main(families: list[str]) -> None:
    print("| family | " + " | ".join(REQUESTS) + " |")
    print("|---" * (len(REQUESTS) + 1) + "|")
    for family in families:
        print(f"| {family} | " + " | ".join(cell(family, r).replace("|", "/") for r in REQUESTS) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(FAMILIES))
