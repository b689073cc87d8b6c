"""Benchmark the Triton MoE and block-attention kernels on a CUDA GPU against what a user would pick.

    python bench/gpu_kernels.py [--quick] [--json PATH]

Times are medians of `triton.testing.do_bench` (ms), every column of a row measured in one run.

MoE (bf16, Mixtral-8x7B-shaped E=8 k=2 H=4096 I=14336 and a fine-grained E=64 k=2 H=2048 I=1024):
    dense       every expert on every token, weighted by the top-k routing matrix (E/k times the FLOPs)
    loop        plain torch: sort pairs by expert, one mm pair per expert that got tokens
    grouped_mm  torch._grouped_mm over the expert-sorted rows (what transformers 5.x runs by default),
                when this torch has it for the dtype
    sparsecc    sparsecc::moe, the Triton grouped GEMMs (align-and-sort, gate/up fused with SiLU)
Each column is checked against `loop` before timing (max |diff| / max |ref|).

Attention (fp16, B=1, 32 heads, head dim 128, causal LM shapes):
    sdpa_mask    SDPA with an explicit bool causal mask
    sdpa_causal  SDPA is_causal=True (flash)
    flex         torch.compile(flex_attention) with a causal BlockMask
    mask         sparsecc::block_layout + sparsecc::block_attention from the bool mask (exact)
    window       sparsecc::block_attention over a 1024 + 4 sinks window layout (lossy), layout built once
    window_mask  what a compiled model runs: block_layout(mask, policy window) per call + block_attention
    topk         top-k 10 % key blocks from pooled q/k, per call (lossy)
Errors of lossy policies are ||out - causal|| / ||causal||.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import sparsecc.runtime.ops  # noqa: F401  (registers the sparsecc ops)
from sparsecc.runtime.attention_layout import layout_from_mask, topk_layout, window_layout
from sparsecc.runtime.moe_routing import sort_by_expert


def bench_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    weights, experts = logits.float().softmax(-1).topk(top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True)).to(logits.dtype), experts


def moe_dense(x, logits, gate_up, down, top_k):
    weights, experts = route(logits, top_k)
    routing = torch.zeros_like(logits).scatter_(1, experts, weights)  # [T, E]
    projected = torch.einsum("th,eoh->eto", x, gate_up)
    gate, up = projected.chunk(2, dim=-1)
    out = torch.einsum("eti,ehi->eth", F.silu(gate) * up, down)
    return torch.einsum("eth,te->th", out, routing)


def moe_loop(x, logits, gate_up, down, top_k):
    weights, experts = route(logits, top_k)
    order, counts = sort_by_expert(experts, gate_up.shape[0])
    token = order // top_k
    rows = x.index_select(0, token)
    out, start = torch.empty_like(rows), 0
    for e, count in enumerate(counts.tolist()):
        if count:
            gate, up = F.linear(rows[start:start + count], gate_up[e]).chunk(2, dim=-1)
            out[start:start + count] = F.linear(F.silu(gate) * up, down[e])
            start += count
    out *= weights.reshape(-1)[order][:, None]
    return torch.zeros_like(x).index_add_(0, token, out)


def moe_grouped(x, logits, gate_up_t, down_t, top_k):
    """torch._grouped_mm over expert-sorted rows; weights pre-transposed to [E, H, 2I] / [E, I, H]."""
    weights, experts = route(logits, top_k)
    order, counts = sort_by_expert(experts, gate_up_t.shape[0])
    token = order // top_k
    rows = x.index_select(0, token)
    offsets = counts.cumsum(0).to(torch.int32)
    gate, up = torch._grouped_mm(rows, gate_up_t, offs=offsets).chunk(2, dim=-1)
    out = torch._grouped_mm((F.silu(gate) * up).contiguous(), down_t, offs=offsets)
    out = out * weights.reshape(-1)[order][:, None]
    return torch.zeros_like(x).index_add_(0, token, out)


def moe_rows(quick: bool) -> list[dict]:
    shapes = [(8, 2, 4096, 14336), (64, 2, 2048, 1024)] if not quick else [(8, 2, 512, 1024)]
    tokens = (1, 16, 512, 4096) if not quick else (1, 64)
    rows = []
    for experts, top_k, hidden, inter in shapes:
        torch.manual_seed(0)
        dev, dt = "cuda", torch.bfloat16
        gate_up = (torch.randn(experts, 2 * inter, hidden, device=dev) / hidden ** 0.5).to(dt)
        down = (torch.randn(experts, hidden, inter, device=dev) / inter ** 0.5).to(dt)
        gate_up_t, down_t = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
        for t in tokens:
            x = torch.randn(t, hidden, device=dev, dtype=dt)
            logits = torch.randn(t, experts, device=dev, dtype=dt)
            fns = {"loop": lambda: moe_loop(x, logits, gate_up, down, top_k),
                   "sparsecc": lambda: torch.ops.sparsecc.moe(x, logits, gate_up, down, None, None, None, top_k,
                                                              True, "softmax", "silu", True)}
            if t * experts * inter * hidden * 6 < 4e13:  # dense FLOPs; skip the hopeless ones
                fns["dense"] = lambda: moe_dense(x, logits, gate_up, down, top_k)
            if hasattr(torch, "_grouped_mm"):
                fns["grouped_mm"] = lambda: moe_grouped(x, logits, gate_up_t, down_t, top_k)
            ref = fns["loop"]()
            row = {"E": experts, "k": top_k, "H": hidden, "I": inter, "T": t}
            for name, fn in fns.items():
                try:
                    row[f"{name}_err"] = rel_error(fn(), ref)
                    row[name] = bench_ms(fn)
                except Exception as err:  # noqa: BLE001  (reported in the table)
                    row[name] = None
                    row[f"{name}_why"] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
            rows.append(row)
            print(format_moe(row), flush=True)
    return rows


def format_moe(row: dict) -> str:
    def cell(name):
        ms = row.get(name)
        if ms is None:
            return f"{name} n/a ({row.get(name + '_why', 'skipped')})"
        return f"{name} {ms:.3f} ms err {row[name + '_err']:.1e}"
    head = f"MoE E={row['E']} k={row['k']} H={row['H']} I={row['I']} T={row['T']}:"
    ratio = ""
    if row.get("sparsecc") and row.get("grouped_mm"):
        ratio = f" | grouped_mm / sparsecc = {row['grouped_mm'] / row['sparsecc']:.2f}"
    return " ".join([head] + [cell(n) for n in ("dense", "loop", "grouped_mm", "sparsecc")]) + ratio


def attention_rows(quick: bool) -> list[dict]:
    heads, dim = 32, 128
    rows = []
    for seq in ((4096, 16384, 32768) if not quick else (1024,)):
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.float16) for _ in range(3))
        scale = dim ** -0.5
        mask = torch.ones(seq, seq, dtype=torch.bool, device="cuda").tril()[None, None]
        window = window_layout(seq, seq, 1024, 4, 128, 128, device="cuda")

        def run(layout, with_mask):
            return torch.ops.sparsecc.block_attention(q, k, v, *layout, mask if with_mask else None,
                                                      scale, 128, 128)

        def masked():
            return torch.ops.sparsecc.block_attention(q, k, v, *torch.ops.sparsecc.block_layout(mask, 128, 128),
                                                      mask, scale, 128, 128)

        fns = {"sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
               "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
               "mask": masked,
               "window": lambda: run(window, False),
               "window_mask": lambda: torch.ops.sparsecc.block_attention(
                   q, k, v, *torch.ops.sparsecc.block_layout(mask, 128, 128, "window", 1024, 4), mask, scale,
                   128, 128),
               "topk": lambda: run(topk_layout(q, k, 0.1, 128, 128), False)}
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            causal = create_block_mask(lambda b, h, i, j: j <= i, None, None, seq, seq, device="cuda")
            flex = torch.compile(flex_attention)
            fns["flex"] = lambda: flex(q, k, v, block_mask=causal)
        except Exception as err:  # noqa: BLE001
            print(f"flex n/a: {err}")
        ref = fns["sdpa_causal"]()
        row = {"S": seq}
        for name, fn in fns.items():
            try:
                out = fn()
                row[f"{name}_err"] = (torch.linalg.vector_norm((out - ref).float())
                                      / torch.linalg.vector_norm(ref.float())).item()
                row[name] = bench_ms(fn)
            except Exception as err:  # noqa: BLE001
                row[name] = None
                row[f"{name}_why"] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
        rows.append(row)
        print(format_attention(row), flush=True)
    return rows


def format_attention(row: dict) -> str:
    parts = [f"attention S={row['S']}:"]
    for name in ("sdpa_mask", "sdpa_causal", "flex", "mask", "window", "window_mask", "topk"):
        ms = row.get(name)
        if ms is None:
            parts.append(f"{name} n/a ({row.get(name + '_why', '')})")
        else:
            parts.append(f"{name} {ms:.3f} ms (x{row['sdpa_causal'] / ms:.2f} vs causal, err {row[name + '_err']:.1e})"
                         if row.get("sdpa_causal") else f"{name} {ms:.3f} ms")
    return " | ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke run")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--only", choices=("moe", "attention"), help="run one of the two tables")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_kernels.py needs CUDA")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    result = {}
    if args.only in (None, "moe"):
        result["moe"] = moe_rows(args.quick)
    if args.only in (None, "attention"):
        result["attention"] = attention_rows(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
