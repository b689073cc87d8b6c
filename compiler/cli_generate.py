"""`sparsecc generate MODULE:FACTORY --prompt-ids 1,2,3 --sparsity 2:4`: compile a generator and stream tokens.

The factory returns a transformers causal LM (its example arguments, if any, are ignored: the prompts
are the example). `sparsecc generate DIR` runs a generator saved with `--save DIR` (or
`CompiledGenerator.save`) with the runtime alone. New token ids are printed as they are made: one id
per step for one prompt, one line per step for several; then the whole rows (prompt + new tokens).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from sparsecc.runtime.generation import GENERATOR_FILE, MIN_PROMPT

from .errors import ConfigError
from .factory import FACTORY_HELP, load_factory


def add_parser(sub: argparse._SubParsersAction, sparsity_type: Callable[[str], Any]) -> None:
    gen = sub.add_parser("generate", help="compile a causal LM for generation and stream new tokens")
    gen.add_argument("factory", help=f"{FACTORY_HELP}; or a folder holding a saved generator")
    gen.add_argument("--prompt-ids", action="append", required=True, metavar="IDS",
                     help="comma-separated token ids of one prompt (repeat for a batch; left-padded for you)")
    gen.add_argument("--sparsity", type=sparsity_type, help='"N:M" or a JSON dict (default: dense)')
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--max-length", type=int, help="cache length: prompt + new tokens (default: just enough)")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, help="seed of the sampling generator")
    gen.add_argument("--eos-token-id", type=int, action="append", help="stop ids (default: the model's)")
    gen.add_argument("--save", metavar="DIR", help="also save the compiled generator there (runtime.load runs it)")
    gen.add_argument("--trusted-key", action="append", dest="trusted_keys", metavar="FILE",
                     help="a saved generator must be signed by this Ed25519 public key (PEM; repeatable)")


def generate_command(args: argparse.Namespace) -> int:
    ids, mask = prompt_batch(args.prompt_ids)
    generator = _generator(args, ids, mask)
    sampler = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    # rows beyond the compiled batch run in groups, one after the other: then only the whole rows are printed
    streamer = PrintStreamer(rows=ids.shape[0]) if ids.shape[0] <= generator.spec.batch_size else None
    out = generator.generate(ids, mask, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             eos_token_id=args.eos_token_id, streamer=streamer, generator=sampler)
    for row, prompt in zip(out, mask.sum(1)):
        print(" ".join(str(int(t)) for t in row[ids.shape[1] - int(prompt):]))
    return 0


def _generator(args: argparse.Namespace, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    if Path(args.factory).is_dir() and (Path(args.factory) / GENERATOR_FILE).is_file():
        compile_only = [flag for flag, value in (("--sparsity", args.sparsity), ("--max-length", args.max_length),
                                                 ("--save", args.save)) if value is not None]
        if compile_only:
            raise ConfigError(f"{', '.join(compile_only)}: a saved generator is already compiled (these apply "
                              "when generate compiles MODULE:FACTORY)")
        import sparsecc.runtime
        keys = [Path(f).read_bytes() for f in args.trusted_keys or []]
        return sparsecc.runtime.load(args.factory, trusted_keys=keys or None)
    if args.trusted_keys:
        raise ConfigError("--trusted-key applies to a saved generator folder")
    import sparsecc
    call = load_factory(args.factory)
    max_length = args.max_length or max(ids.shape[1] + args.max_new_tokens, MIN_PROMPT + 1)
    generator = sparsecc.compile(call.model, (ids, mask), sparsity=args.sparsity, mode="generate",
                                 max_length=max_length, progress=args.progress)
    print(generator.report(), file=sys.stderr)
    if args.save:
        generator.save(args.save, progress=args.progress)
    return generator


def prompt_batch(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as left-padded ids and mask [rows, longest]."""
    rows = []
    for text in prompts:
        try:
            rows.append([int(part) for part in text.replace(" ", "").split(",") if part])
        except ValueError:
            raise ConfigError(f"--prompt-ids: expected comma-separated token ids, got {text!r}") from None
        if not rows[-1] or min(rows[-1]) < 0:
            raise ConfigError(f"--prompt-ids: a prompt needs at least one non-negative token id, got {text!r}")
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, width - len(row):] = torch.tensor(row)
        mask[index, width - len(row):] = 1
    return ids, mask


class PrintStreamer:
    """transformers' streamer protocol (`put`, `end`) printing token ids as they come; skips the prompt."""

    def __init__(self, rows: int):
        self.rows, self.seen_prompt = rows, False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        text = str(int(value[0])) if self.rows == 1 else " ".join(str(int(t)) for t in value)
        print(text, end=" " if self.rows == 1 else "\n", flush=True)

    def end(self) -> None:
        if self.rows == 1:
            print(flush=True)
