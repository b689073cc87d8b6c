"""The README's promise "compile never modifies the model", as a check the tests share."""
from __future__ import annotations

import torch


def snapshot(model: torch.nn.Module) -> dict:
    """Copies of every parameter and buffer (non-persistent ones too), plus each submodule's training flag."""
    tensors = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    return {"tensors": tensors, "training": [m.training for m in model.modules()]}


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    """Same tensors (values and dtypes) and training flags as at `snapshot`."""
    after = snapshot(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    changed = [name for name, t in before["tensors"].items()
               if not (torch.equal(t, after["tensors"][name]) and t.dtype == after["tensors"][name].dtype)]
    assert changed == [], f"compile or the compiled program wrote {changed} of the user's model"
    assert after["training"] == before["training"]
