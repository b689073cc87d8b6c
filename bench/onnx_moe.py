"""Benchmark an exported sparsecc MoE model in onnxruntime against transformers' own ONNX export.

    python bench/onnx_moe.py [--quick] [--json PATH]

One Mixtral-style causal LM (random weights, fp32), exported four ways and run in
onnxruntime on CPU (default session options, same input ids):

    hf_batched_mm   torch.onnx.export of the transformers model with experts_implementation
                    "batched_mm" (the default grouped_mm form does not export); it gathers
                    each (token, expert) pair's expert weights
    sparsecc        sparsecc.compile(model, moe-dispatch) -> export_onnx(): a `sparsecc::moe`
                    node whose local function routes each expert only its own tokens
    sparsecc_contrib  the same with contrib=True: com.microsoft.MoE (swiglu, interleaved)
    sparsecc_2:4    moe-dispatch + prune-nm: expert and attention weights 2:4-compressed in the
                    file (lossy: its error vs the dense model is printed)
    sparsecc_from_onnx  the hf_batched_mm file itself run through sparsecc: imported, moe-dispatch,
                    exported (`sparsecc sparsify hf.onnx --sparsity '{"moe": "dispatch"}'`), for
                    users who only have the ONNX file; the time that conversion took is printed

Every column is checked against the PyTorch model's logits (max |diff| / max |ref|) before
timing; times are medians of timed runs after warm-up. Target: hf_batched_mm / sparsecc >= 10.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import onnxruntime as ort
import sparsecc
import torch
import transformers


def build(quick: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    config = transformers.MixtralConfig(
        vocab_size=1024, hidden_size=256 if quick else 512, intermediate_size=512 if quick else 1024,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
        num_experts_per_tok=2, use_cache=False)
    config._experts_implementation = "batched_mm"
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    ids = torch.randint(0, 1024, (1, 64 if quick else 128))
    return model, ids


def export_hf(model, ids, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids,), path, dynamo=True, optimize=True, verbose=False)


def session(path: str) -> ort.InferenceSession:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def time_session(sess: ort.InferenceSession, feeds: dict, reps: int) -> float:
    for _ in range(2):
        sess.run(None, feeds)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer reps")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    model, ids = build(args.quick)
    with torch.no_grad():
        reference = model(ids).logits.numpy()
    reps = 5 if args.quick else 10
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"hf_batched_mm": os.path.join(tmp, "hf.onnx")}
        export_hf(model, ids, paths["hf_batched_mm"])
        exact = sparsecc.compile(model, (ids,), pipeline="moe-dispatch,cleanup")
        for name, contrib in (("sparsecc", False), ("sparsecc_contrib", True)):
            paths[name] = os.path.join(tmp, f"{name}.onnx")
            exact.export_onnx(paths[name], contrib=contrib)
        pruned = sparsecc.compile(model, (ids,), pipeline="moe-dispatch,prune-nm,cleanup")
        paths["sparsecc_2:4"] = os.path.join(tmp, "pruned.onnx")
        pruned.export_onnx(paths["sparsecc_2:4"])
        start = time.perf_counter()
        paths["sparsecc_from_onnx"] = os.path.join(tmp, "from_onnx.onnx")
        from_onnx = sparsecc.compile(paths["hf_batched_mm"], (ids,), pipeline="moe-dispatch,cleanup", check=False)
        from_onnx.export_onnx(paths["sparsecc_from_onnx"])
        convert_s = time.perf_counter() - start
        for name, path in paths.items():
            sess = session(path)
            feeds = {sess.get_inputs()[0].name: ids.numpy()}
            got = sess.run(None, feeds)[0]
            error = float(np.abs(got - reference).max() / np.abs(reference).max())
            stored = sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.exists(p))  # + external data
            rows.append({"export": name, "file_MB": stored / 2**20,
                         "ms": 1e3 * time_session(sess, feeds, reps), "error_vs_dense": error})
    rows[-1]["convert_s"] = convert_s
    base = rows[0]["ms"]
    print(f"Mixtral-style LM: hidden {model.config.hidden_size}, expert width {model.config.intermediate_size}, "
          f"{model.config.num_local_experts} experts top-{model.config.num_experts_per_tok}, "
          f"{model.config.num_hidden_layers} layers, {ids.shape[1]} tokens; onnxruntime {ort.__version__} CPU")
    print(f"{'export':<18} {'file MB':>8} {'ms/run':>9} {'speedup':>8} {'error vs dense':>15}")
    for row in rows:
        row["speedup_vs_hf"] = base / row["ms"]
        print(f"{row['export']:<18} {row['file_MB']:>8.2f} {row['ms']:>9.2f} {row['speedup_vs_hf']:>7.1f}x "
              f"{row['error_vs_dense']:>15.2e}")
    print(f"sparsecc_from_onnx: {len(from_onnx.records)} MoE blocks rewritten; import + moe-dispatch + export "
          f"took {convert_s:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
