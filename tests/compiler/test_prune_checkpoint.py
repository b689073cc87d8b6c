"""sparsecc.prune_checkpoint: a sharded tiny Llama pruned layer by layer equals what compile prunes,
loads with from_pretrained, and a run killed mid-way finishes with the same bytes."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sparsecc
from sparsecc.cli import main
from sparsecc.errors import ConfigError

transformers = pytest.importorskip("transformers")

VOCAB = 128


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A 3-layer Llama (untied head) saved as several safetensors shards."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path, safe_serialization=True, max_shard_size="100KB")
    assert len(list(path.glob("*.safetensors"))) >= 3
    return model, path


def _batches(count: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 16), generator=generator) for _ in range(count)]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pruned_weights_equal_compile(tiny_llama, tmp_path, monkeypatch, method):
    model, path = tiny_llama
    batches = _batches()
    # small blocks, so the head runs as 8 row blocks and masks/compression go 8 rows at a time
    monkeypatch.setattr("sparsecc.checkpoint_layers.HEAD_BLOCK_WEIGHTS", 16 * 64)
    monkeypatch.setattr("sparsecc.checkpoint_stage.ROW_BLOCK_WEIGHTS", 8 * 64)
    summary = sparsecc.prune_checkpoint(path, tmp_path / "out", "2:4", method, calibration=batches, progress=False)
    assert summary.stages == 4 and summary.weights == 3 * 7 + 1    # 7 linears per layer, and lm_head

    compiled = sparsecc.compile(model, (batches[0],), sparsity={"weights": {"pattern": "2:4", "method": method}},
                                calibration=batches, check=False)
    expected = compiled.pruned_state_dict()
    pruned = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    compressed = sparsecc.load_compressed(tmp_path / "out")
    assert set(compressed.weights) == set(expected) and len(expected) == 22
    for name, weight in expected.items():
        assert torch.equal(pruned[name], weight), name
        assert torch.equal(compressed.dense(name), weight), name
        assert ((weight.reshape(-1, 4) != 0).sum(1) <= 2).all()
    dense = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(pruned[name], dense[name])


def test_output_keeps_the_shard_layout(tiny_llama, tmp_path):
    _, path = tiny_llama
    sparsecc.prune_checkpoint(path, tmp_path, progress=False)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text()) == index
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(set(index["weight_map"].values()))
    assert (tmp_path / "config.json").read_text() == (path / "config.json").read_text()
    assert not (tmp_path / ".work").exists() and not list(tmp_path.rglob("*.partial"))


@pytest.fixture(scope="module")
def wanda_in_memory(tiny_llama, tmp_path_factory) -> tuple:
    """(summary, folder) of one uninterrupted Wanda run, hidden states in memory: two tests compare with it."""
    folder = tmp_path_factory.mktemp("wanda") / "out"
    return sparsecc.prune_checkpoint(tiny_llama[1], folder, method="wanda", calibration=_batches(),
                                     progress=False), folder


def test_hidden_states_on_disk_give_the_same_output(tiny_llama, wanda_in_memory, tmp_path):
    _, path = tiny_llama
    in_memory, folder = wanda_in_memory
    on_disk = sparsecc.prune_checkpoint(path, tmp_path / "b", method="wanda", calibration=_batches(),
                                        max_memory="1KB", progress=False)
    assert not in_memory.hidden_on_disk and on_disk.hidden_on_disk
    assert _hashes(folder) == _hashes(tmp_path / "b")


@pytest.mark.slow   # a subprocess (imports ~5 s) killed mid-way, then two runs to compare
def test_killed_run_resumes_to_identical_output(tiny_llama, wanda_in_memory, tmp_path):
    _, path = tiny_llama
    calibration = tmp_path / "calibration.safetensors"
    save_file({f"batch{i}": b for i, b in enumerate(_batches())}, calibration)
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "sparsecc", "prune", str(path), "-o", str(killed), "--method", "wanda",
               "--calibration", str(calibration), "-q"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = killed / ".work" / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["done"]:
            break
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert progress.is_file(), f"the run was not killed mid-way: {process.stderr.read().decode()[-2000:]}"
    done = len(json.loads(progress.read_text())["done"])
    assert 1 <= done < 4

    assert main(command[3:]) == 0                          # the same command again, in this process
    summary, fresh = wanda_in_memory                       # a run never interrupted
    assert summary.resumed_at == 0
    assert _hashes(killed) == _hashes(fresh)


def test_refusals(tiny_llama, tmp_path):
    _, path = tiny_llama
    with pytest.raises(ConfigError, match="needs calibration"):
        sparsecc.prune_checkpoint(path, tmp_path, method="wanda", progress=False)
    with pytest.raises(ValueError, match="M must be one of"):
        sparsecc.prune_checkpoint(path, tmp_path, sparsity="2:5", progress=False)
    (tmp_path / ".work").mkdir()
    (tmp_path / ".work" / "progress.json").write_text(json.dumps({"key": "another run", "done": []}))
    with pytest.raises(ConfigError, match="unfinished run with other settings"):
        sparsecc.prune_checkpoint(path, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="no config.json"):
        sparsecc.prune_checkpoint(tmp_path, tmp_path.parent / f"{tmp_path.name}-out", progress=False)


def test_untrusted_indexes_and_overlapping_folders_are_refused(tiny_llama, tmp_path):
    """The index is downloaded data: its shard names never reach outside the folders; nothing is written
    into the checkpoint being read."""
    _, path = tiny_llama
    with pytest.raises(ConfigError, match="must be outside the checkpoint"):
        sparsecc.prune_checkpoint(path, path, progress=False)
    with pytest.raises(ConfigError, match="must be outside the checkpoint"):
        sparsecc.prune_checkpoint(path, Path(path) / "pruned", progress=False)
    crafted = tmp_path / "crafted"
    shutil.copytree(path, crafted)
    index = json.loads((crafted / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../evil.safetensors"
    (crafted / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="not a plain file name"):
        sparsecc.prune_checkpoint(crafted, tmp_path / "out", progress=False)
    assert not (tmp_path / "evil.safetensors").exists()
