"""Peak memory of sparsecc.prune_checkpoint on a multi-GB Llama checkpoint (random weights).

    python bench/prune_checkpoint_scale.py [--dir /tmp/prune_scale] [--layers 16] [--keep]

1. Writes a transformers Llama checkpoint (hidden 2048, intermediate 5632, vocab 32000, fp32,
   untied head, `--layers` decoder layers; 16 -> 3.8 GB) as ~1 GB safetensors shards with an index,
   one tensor at a time (header first, then each tensor generated and written), so the generator
   never holds more than one tensor.
2. Prunes it 2:4 with magnitude and with Wanda (4 calibration batches [1, 256]), each in a fresh
   process that reports its peak RSS (getrusage ru_maxrss) and its RSS after the imports (the
   interpreter's baseline, read from /proc/self/status before pruning starts).
3. Checks every pruned tensor of the output, streamed: the 2:4 pattern holds and the compressed
   tensors decompress to it. Prints a table; target: peak - baseline <= checkpoint size / 3.
The checkpoint and outputs are deleted at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

SHARD_BYTES = 1 << 30


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False, use_cache=False)


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape, from the model built on the meta device."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def write_shard(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    """A safetensors file written tensor by tensor: norms are ones, matrices N(0, 0.02)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 4 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes.items():
            tensor = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
            f.write(memoryview(tensor.numpy()))
            del tensor


def write_checkpoint(folder: Path, layers: int) -> int:
    """The checkpoint in `folder`; returns its size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    config = llama_config(layers)
    config.save_pretrained(folder)
    shards, current, size = [], {}, 0
    for name, shape in tensor_shapes(config).items():
        nbytes = 4 * int(torch.Size(shape).numel())
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name], size = shape, size + nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for index, shapes in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(folder / file, shapes, seed=index)
        weight_map.update({name: file for name in shapes})
        total += sum(4 * int(torch.Size(s).numel()) for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measure(model_dir: str, out_dir: str, method: str) -> None:
    """Run in a fresh process: prune, then print one JSON line with the timings and memory."""
    import sparsecc
    from sparsecc.prune_checkpoint import prune_checkpoint
    from sparsecc.prune_state import map_large_blocks
    from transformers import LlamaForCausalLM  # noqa: F401  (library code: part of the baseline, not the pruning)

    baseline = _rss_now()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 32000, (1, 256), generator=generator) for _ in range(4)]
    map_large_blocks()   # as `sparsecc prune` does
    start = time.perf_counter()
    summary = prune_checkpoint(model_dir, out_dir, "2:4", method,
                               calibration=None if method == "magnitude" else batches, progress=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"method": method, "seconds": time.perf_counter() - start, "baseline": baseline,
                      "peak": peak, "weights": summary.weights, "version": sparsecc.__version__}))


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def check_output(out_dir: Path) -> int:
    """Every compressed weight decompresses to the dense tensor in the output shards, which is 2:4."""
    from safetensors import safe_open

    from sparsecc.runtime.nm_format import decompress_nm

    index = json.loads((out_dir / "sparsecc_nm" / "index.json").read_text())
    weight_map = json.loads((out_dir / "model.safetensors.index.json").read_text())["weight_map"]
    for name, entry in index["weights"].items():
        with safe_open(out_dir / weight_map[name], "pt") as f:
            dense = f.get_tensor(name)
        with safe_open(out_dir / "sparsecc_nm" / entry["file"], "pt") as f:
            values, indices = f.get_tensor(name + ".values"), f.get_tensor(name + ".indices")
        assert ((dense.reshape(-1, 4) != 0).sum(1) <= 2).all(), name
        assert torch.equal(decompress_nm(values, indices, 2, 4, dense.shape[-1]), dense), name
    return len(index["weights"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/prune_scale")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--measure", nargs=3, metavar=("MODEL", "OUT", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    root = Path(args.dir)
    start = time.perf_counter()
    size = write_checkpoint(root / "model", args.layers)
    print(f"checkpoint: {args.layers} layers, {size / 2**30:.2f} GiB, written in {time.perf_counter() - start:.0f} s")
    print(f"{'method':<10} {'time s':>7} {'baseline GiB':>13} {'peak GiB':>9} {'peak-base GiB':>14} "
          f"{'(peak-base)/size':>17} {'weights':>8}")
    try:
        for method in ("magnitude", "wanda"):
            out = root / f"out-{method}"
            line = subprocess.run([sys.executable, __file__, "--measure", str(root / "model"), str(out), method],
                                  check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
            row = json.loads(line)
            checked = check_output(out)
            extra = row["peak"] - row["baseline"]
            print(f"{method:<10} {row['seconds']:>7.0f} {row['baseline'] / 2**30:>13.2f} {row['peak'] / 2**30:>9.2f} "
                  f"{extra / 2**30:>14.2f} {extra / size:>17.3f} {checked:>8}", flush=True)
            shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
