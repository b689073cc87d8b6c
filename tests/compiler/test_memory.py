"""compile hands freed heap back only where the model is large enough for it to matter."""
from __future__ import annotations

import torch

from sparsecc import memory


def test_model_bytes_of_modules_files_and_anything_else(tmp_path):
    model = torch.nn.Linear(64, 32)   # 64*32 + 32 fp32 values
    assert memory.model_bytes(model) == (64 * 32 + 32) * 4
    path = tmp_path / "m.onnx"
    path.write_bytes(b"x" * 123)
    assert memory.model_bytes(str(path)) == 123
    assert memory.model_bytes(object()) == 0


def test_small_models_skip_the_collection(monkeypatch):
    collected = []
    monkeypatch.setattr(memory.gc, "collect", lambda *a: collected.append(1))
    memory.release_freed_memory(torch.nn.Linear(8, 8))
    assert not collected
    big = torch.nn.Module()
    big.register_buffer("w", torch.empty(memory.MIN_MODEL_BYTES // 4, device="meta"))   # counts bytes, holds none
    memory.release_freed_memory(big)
    assert collected == [1]
