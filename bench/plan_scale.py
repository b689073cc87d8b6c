"""Plan a 70B Llama and DeepSeek-V3 (671B) on the meta device: wall time, peak RSS and the report.

Each (model, request) runs in a fresh process, so the peak RSS it prints is that plan's own
(interpreter, torch and transformers included). Targets (issue 19): < 60 s and < 2 GB each.
Wall and CPU seconds count from the imports to the finished report; on a shared machine the CPU
seconds say what a quiet one would take (planning is single-threaded).

    python bench/plan_scale.py                        # all four cases, a summary table at the end
    python bench/plan_scale.py --case llama70b:2:4 --report   # one case, with its full report
    python bench/plan_scale.py --layers 4             # smaller configs, to try the script quickly
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODELS = ("llama70b", "deepseek_v3")
REQUESTS = {"2:4": "2:4", "moe+2:4": {"moe": "dispatch", "weights": "2:4"}}
TOKENS = (1, 128)   # example input_ids: batch 1, 128 tokens (the FLOPs in the report are per such call)


def build(model: str, layers: int | None):
    """The model on the meta device, from its config alone (no weights materialised)."""
    import torch
    import transformers as hf

    if model == "llama70b":
        config = hf.LlamaConfig(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                num_key_value_heads=8, intermediate_size=28672, vocab_size=128256)
        cls = hf.LlamaForCausalLM
    else:
        config, cls = hf.DeepseekV3Config(), hf.DeepseekV3ForCausalLM   # defaults: 61 layers, 256 experts
    config.use_cache = False
    if layers is not None:
        config.num_hidden_layers = layers
    with torch.device("meta"):
        return cls(config).eval().to(torch.bfloat16)   # the checkpoints' dtype: bytes as they would be


def example_ids():
    import torch
    return torch.zeros(TOKENS, dtype=torch.long, device="meta")


def llama70b():
    """CLI factory: `sparsecc plan bench/plan_scale.py:llama70b --sparsity 2:4`."""
    return build("llama70b", None), (example_ids(),)


def deepseek_v3():
    """CLI factory: `sparsecc plan bench/plan_scale.py:deepseek_v3 --sparsity '{"moe": "dispatch", ...}'`."""
    return build("deepseek_v3", None), (example_ids(),)


def run_case(case: str, layers: int | None, show_report: bool) -> dict:
    import sparsecc

    model_name, request = case.split(":", 1)
    start = time.perf_counter()
    report = sparsecc.plan(build(model_name, layers), (example_ids(),), sparsity=REQUESTS[request])
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss * 1024   # Linux: KiB
    if show_report:
        print(report)
    totals = report.totals()
    return {"case": case, "seconds": round(seconds, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gib": round(peak / 2**30, 2),
            "rewritten": len(report.layers), "skipped": len(report.skipped),
            "weight_gib_before": round(totals["bytes_before"] / 2**30, 1),
            "weight_gib_after": round(totals["bytes_after"] / 2**30, 1),
            "model_gib_before": round(report.model_bytes_before / 2**30, 1),
            "model_gib_after": round(report.model_bytes_after / 2**30, 1), "timings": report.timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help="one case, MODEL:REQUEST (e.g. llama70b:2:4, deepseek_v3:moe+2:4)")
    parser.add_argument("--layers", type=int, help="override the number of decoder layers")
    parser.add_argument("--report", action="store_true", help="print each case's full report")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.layers, args.report)))
        return
    rows = []
    for case in (f"{m}:{r}" for m in MODELS for r in REQUESTS):
        command = [sys.executable, __file__, "--case", case] + (["--layers", str(args.layers)] if args.layers else [])
        done = subprocess.run(command + (["--report"] if args.report else []), capture_output=True, text=True)
        if done.returncode:
            print(f"{case}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        lines = done.stdout.strip().splitlines()
        print("\n".join(lines[:-1]))
        rows.append(json.loads(lines[-1]))
    print(f"\n{'case':<22} {'wall s':>7} {'CPU s':>6} {'peak RSS GiB':>13} {'rewritten':>9} {'skipped':>7} "
          f"{'weights GiB before -> after':>28} {'model GiB before -> after':>26}")
    for r in rows:
        print(f"{r['case']:<22} {r['seconds']:>7} {r['cpu_seconds']:>6} {r['peak_rss_gib']:>13} {r['rewritten']:>9} {r['skipped']:>7} "
              f"{r['weight_gib_before']:>14} -> {r['weight_gib_after']:<10} {r['model_gib_before']:>12} -> "
              f"{r['model_gib_after']:<10}")


if __name__ == "__main__":
    main()
