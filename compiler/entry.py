"""`sparsecc.compile`: one entry for both modes.

`mode="forward"` (default) is `sparsecc.api.compile`: one program for the model's forward.
`mode="generate"` is `sparsecc.generation.compile_generator`: prefill and decode programs over one
static KV cache, with `generate(...)` as in transformers (docs/generation.md).
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

from .api import compile as compile_forward
from .errors import ConfigError
from .generation import compile_generator
from .memory import release_freed_memory

MODES = ("forward", "generate")
GENERATE_OPTIONS = frozenset({"pipeline", "backend", "check", "verify", "print_ir_after_all", "dump_dir", "progress",
                              "compressed"})


def compile(model: Any, example_inputs: Any = None, sparsity: Any = None, calibration: Optional[Iterable] = None,
            *args: Any, mode: str = "forward", max_length: Optional[int] = None, batch_size: Optional[int] = None,
            **options: Any) -> Any:
    if mode == "forward":
        if max_length is not None or batch_size is not None:
            raise ConfigError("max_length / batch_size apply to mode='generate' only")
        compiled = compile_forward(model, example_inputs, sparsity, calibration, *args, **options)
    elif mode == "generate":
        unsupported = sorted(set(options) - GENERATE_OPTIONS)
        if args or unsupported:
            raise ConfigError(f"mode='generate' takes {', '.join(sorted(GENERATE_OPTIONS))} by keyword; not "
                              f"{', '.join(unsupported) or 'positional options'} (the inputs are the generator's own)")
        compiled = compile_generator(model, example_inputs, sparsity, calibration, max_length=max_length,
                                     batch_size=batch_size, **options)
    else:
        raise ConfigError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    release_freed_memory(model)   # compile's temporaries (pruning, captures, checks): freed, kept by the heap until trimmed
    return compiled


compile.__doc__ = (compile_forward.__doc__ + """
    `mode="generate"` (a transformers causal LM; `example_inputs` a prompt: input_ids, (input_ids,
    attention_mask) or a dict) returns a CompiledGenerator: prefill and decode programs over one static
    KV cache of `max_length` positions for up to `batch_size` rows (default: the prompt's), with
    `generate(...)` as in transformers, `report()`, `ir()`, `pruned_state_dict()`, `save()` and
    `export_onnx()` (docs/generation.md).
    """)
