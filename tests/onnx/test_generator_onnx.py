"""A generator's ONNX decoder (past/present KV) run by sparsecc.onnx.runner.generate gives gen.generate's tokens."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import pytest
import torch
import transformers
from sparsecc.onnx.export.exporter import OnnxExportError
from sparsecc.onnx.export.generator_sites import window_of
from sparsecc.onnx.runner import OnnxDecoder, generate

import sparsecc
from sparsecc.runtime.errors import InputMismatchError

from .helpers import node_types

NEW_TOKENS = 16
LAYERS = 2


def _names(layers: int) -> tuple[list[str], list[str]]:
    caches = [(i, kind) for i in range(layers) for kind in ("key", "value")]
    return (["input_ids", "attention_mask", "cache_position", *[f"past_key_values.{i}.{k}" for i, k in caches]],
            ["logits", *[f"present.{i}.{k}" for i, k in caches]])


def _prompts(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 5 and 9 tokens, left-padded to 9."""
    prompts = [torch.randint(3, vocab, (5,)), torch.randint(3, vocab, (9,))]
    ids, mask = torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 9 - len(prompt):], mask[row, 9 - len(prompt):] = prompt, 1
    return ids, mask


def _compiled(model: torch.nn.Module, sparsity) -> tuple:
    ids, mask = _prompts(model.config.vocab_size)
    gen = sparsecc.compile(model, (ids, mask), sparsity=sparsity, mode="generate", max_length=32)
    return gen, ids, mask, gen.generate(ids, mask, max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=128)
    return _compiled(transformers.LlamaForCausalLM(config).eval(), "2:4")


def _exported(gen, folder, contrib: bool, layers: int = LAYERS):
    path = str(folder / f"decoder{int(contrib)}.onnx")
    result = gen.export_onnx(path, contrib=contrib)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    model = onnx.load(path)
    assert ([i.name for i in model.graph.input], [o.name for o in model.graph.output]) == _names(layers)
    return path, result


@pytest.fixture(scope="module")
def llama_files(llama, tmp_path_factory):
    """contrib -> (path, ExportResult), each exported once (an export takes seconds)."""
    folder, files = tmp_path_factory.mktemp("decoders"), {}

    def export(contrib: bool):
        if contrib not in files:
            files[contrib] = _exported(llama[0], folder, contrib)
        return files[contrib]
    return export


@pytest.mark.parametrize("contrib", [False, True])
def test_llama_2_4_decoder_gives_generate_tokens(llama, llama_files, contrib):
    gen, ids, mask, want = llama
    path, result = llama_files(contrib)
    ops = node_types(path)
    assert ops.count("sparsecc::nm_linear") == 15
    if contrib:   # each layer's cache write and attention became one GroupQueryAttention
        assert ops.count("com.microsoft::GroupQueryAttention") == LAYERS and "ScatterND" not in ops
        mapped = "GroupQueryAttention with its KV cache (local_window_size=-1"
        assert sum(mapped in line for line in result.log) == LAYERS
    else:
        assert not any(op.startswith("com.microsoft") for op in ops) and ops.count("ScatterND") == 2 * LAYERS
    got = generate(path, ids, mask, max_new_tokens=NEW_TOKENS)
    assert got.shape == (2, 9 + NEW_TOKENS)
    assert torch.equal(got, want)


def test_runner_groups_rows_and_stops_at_eos(llama, llama_files):
    """Three rows through a batch-2 decoder; an eos id that occurs in the output ends those rows with padding."""
    gen, ids, mask, want = llama
    path, _ = llama_files(True)
    rows, row_mask = torch.cat([ids, ids[:1]]), torch.cat([mask, mask[:1]])
    eos = int(want[0, 9 + 3])
    expected = gen.generate(rows, row_mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    got = generate(path, rows.numpy(), row_mask.numpy(), max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    assert isinstance(got, np.ndarray) and (got[0, 9 + 4:] == 0).all()
    assert np.array_equal(got, expected.numpy())


def test_one_token_prompt_is_padded_like_generate(llama, llama_files):
    gen, ids, _, _ = llama
    want = gen.generate(ids[:, -1:], max_new_tokens=4)
    assert torch.equal(generate(llama_files(True)[0], ids[:, -1:], max_new_tokens=4), want)


def test_runner_refuses_long_prompts_and_right_padding(llama, llama_files):
    _, ids, mask, _ = llama
    decoder = OnnxDecoder(llama_files(False)[0])
    with pytest.raises(InputMismatchError, match="exceeds the generator's max_length 32"):
        decoder.generate(ids, mask, max_new_tokens=24)
    with pytest.raises(InputMismatchError, match="left-padded"):
        decoder.generate(ids, mask.flip(1), max_new_tokens=4)


def test_window_cache_is_refused(llama, tmp_path):
    gen = copy.copy(llama[0])
    gen.spec = dataclasses.replace(gen.spec, cache={"kind": "window", "slots": 8})
    with pytest.raises(OnnxExportError, match=r"'window' cache \(ring caches of a window attention policy or of the model's own sliding-window layers\) has no ONNX decoder form"):
        gen.export_onnx(str(tmp_path / "window.onnx"))


def test_plain_onnx_file_is_not_a_decoder(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    path = str(tmp_path / "plain.onnx")
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)]), path)
    with pytest.raises(ValueError, match="not a generator decoder"):
        OnnxDecoder(path)


@pytest.mark.slow
def test_mixtral_dispatch_2_4_decoder_gives_generate_tokens(tmp_path):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
    gen, ids, mask, want = _compiled(transformers.MixtralForCausalLM(config).eval(),
                                     {"moe": "dispatch", "weights": "2:4"})
    path, _ = _exported(gen, tmp_path, False, layers=1)
    assert node_types(path).count("sparsecc::moe") == 1
    assert torch.equal(generate(path, ids, mask, max_new_tokens=NEW_TOKENS), want)


def _step(padding: list[int], position: list[int], length: int, rule) -> tuple:
    """One sample step as window_of reads it, the attention mask made by `rule(query position, key)`."""
    mask = torch.ones(len(padding), length, dtype=torch.long)
    for row, pad in enumerate(padding):
        mask[row, :pad] = 0
    at, keys = torch.tensor(position)[:, None], torch.arange(length)[None, :]
    attended = (rule(at, keys)[None] & (mask[:, None, :] != 0))[:, None]
    return mask, torch.tensor(position), attended, torch.tensor(position), torch.tensor(position)


@pytest.mark.parametrize("window", [-1, 3])
def test_window_of_reads_the_causal_band(window):
    def band(at, keys):
        return (keys <= at) & ((keys > at - window) if window > 0 else True)
    steps = [_step([0, 4], list(range(6)), 16, band), _step([0, 4], [6], 16, band), _step([0, 0], [15], 16, band)]
    assert window_of(steps) == window


def test_window_of_names_what_does_not_fit():
    def causal(at, keys):
        return keys <= at
    last = _step([0, 0], [15], 16, causal)
    def everything(at, keys):
        return (keys >= 0) | (at >= 0)
    assert "not the causal band" in window_of([_step([0, 4], list(range(6)), 16, everything), last])
    assert "not written at cache_position" in window_of([(*last[:3], last[3] - 1, last[4])])
    additive = torch.where(last[2], 0.0, -1e30)
    assert "not one boolean mask" in window_of([(*last[:2], additive, *last[3:])])
