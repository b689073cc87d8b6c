"""Expert parallelism (sparsecc::moe_ep, expert-parallel, artifacts split per rank), checked against one process.

The torchrun tests launch real process groups (gloo, CPU) of 2 and 4 ranks over a Mixtral-like
block (8 experts, top-2): each rank's output equals the one-process output on that rank's input,
each rank holds only its E/W experts, compiled or loaded from the artifact, and the moe_ep op with a
capacity and a different token count per rank equals moe (ep_worker.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsecc
from sparsecc.errors import ConfigError
from sparsecc.passes import ExpertParallel, PassContext
from sparsecc.runtime.errors import ArtifactError, RuntimeProgramError
from sparsecc.runtime.ops.moe import with_options
from tests.distributed.ep_worker import DIM, EXPERTS, MOE_CALL, block, moe_arguments

WORKER = Path(__file__).with_name("ep_worker.py")


def _one_process(seed: int = 0):
    torch.manual_seed(seed)
    model = block()
    x = torch.randn(2, 16, DIM)
    return model, x, sparsecc.compile(model, (x,), sparsity={"moe": "dispatch"}, check=False)


def test_one_rank_moe_ep_is_moe_and_needs_no_process_group():
    call = with_options((*moe_arguments(12, 3), *MOE_CALL, 0.0))
    assert torch.equal(torch.ops.sparsecc.moe_ep(*call, world_size=1), torch.ops.sparsecc.moe(*call))


def test_moe_ep_refuses_a_missing_group_and_an_uneven_split():
    hidden, logits, w_gate_up, w_down, *shared = moe_arguments(6, 0)
    with pytest.raises(RuntimeProgramError, match="process group"):
        torch.ops.sparsecc.moe_ep(hidden, logits, w_gate_up[:4], w_down[:4], *shared, *MOE_CALL, world_size=2)
    with pytest.raises(RuntimeProgramError, match="E % world_size"):
        torch.ops.sparsecc.moe_ep(hidden, logits, w_gate_up[:3], w_down[:3], *shared, *MOE_CALL, world_size=3)


def test_expert_parallel_pass_keeps_this_ranks_experts():
    model, x, compiled = _one_process()
    gm = compiled.graph_module
    result = ExpertParallel(world_size=4, rank=3).run(gm, PassContext(records=compiled.records))
    assert result.stats.rewritten == 1
    assert compiled.records[0].details["expert_parallel"] == {"world_size": 4, "rank": 3, "experts": [6, 8]}
    ep = [n for n in gm.graph.nodes if n.target is torch.ops.sparsecc.moe_ep.default]
    assert len(ep) == 1 and ep[0].kwargs["world_size"] == 4
    w_gate_up = getattr(gm, ep[0].args[2].target)
    assert torch.equal(w_gate_up, compiled.constants["moe_w_gate_up"][6:8])
    assert [n for n in gm.graph.nodes if n.target is torch.ops.sparsecc.moe.default] == []


def test_distributed_experts_need_a_process_group():
    with pytest.raises(ConfigError, match="process group"):
        sparsecc.compile(block(), (torch.randn(4, DIM),), sparsity={"moe": "dispatch"},
                         distributed={"experts": "ep"})
    with pytest.raises(ConfigError, match="distributed.experts"):
        sparsecc.compile(block(), (torch.randn(4, DIM),), distributed={"experts": "tp"})


def test_artifact_for_four_ranks_loads_one_ranks_experts(tmp_path):
    model, x, compiled = _one_process()
    manifest = compiled.save(tmp_path, world_size=4, progress=False)
    assert manifest["expert_parallel"]["files"] == [f"experts-rank{r}.safetensors" for r in range(4)]
    assert not any("moe_w_" in k for k in load_file(tmp_path / "weights.safetensors"))
    full = compiled.constants["moe_w_down"]
    for rank in range(4):
        loaded = sparsecc.runtime.load(tmp_path, rank=rank)
        assert torch.equal(loaded.constants["moe_w_down"], full[2 * rank:2 * rank + 2])
        assert loaded.constants["moe_w_gate_up"].shape[0] == 2
    (tmp_path / "experts-rank3.safetensors").unlink()   # another rank's file is never read
    assert sparsecc.runtime.load(tmp_path, rank=0).constants["moe_w_down"].shape[0] == 2
    with pytest.raises(ArtifactError, match="pass rank="):
        sparsecc.runtime.load(tmp_path)
    with pytest.raises(ArtifactError, match="not one of"):
        sparsecc.runtime.load(tmp_path, rank=4)


def _torchrun(folder: Path, world: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-port",
               str(29500 + world), str(WORKER), str(folder)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_torchrun_ranks_equal_one_process(tmp_path, world):
    model, _, compiled = _one_process()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    inputs = {f"x{r}": torch.randn(2, 16, DIM, generator=torch.Generator().manual_seed(r)) for r in range(world)}
    inputs.update({f"y{r}": compiled(inputs[f"x{r}"]) for r in range(world)})   # every rank its own tokens
    save_file(inputs, tmp_path / "inputs.safetensors")
    compiled.save(tmp_path / "artifact", world_size=world, progress=False)
    full_expert_bytes = sum(v.numel() * v.element_size() for k, v in compiled.constants.items() if "moe_w_" in k)
    for result in _torchrun(tmp_path, world):
        rank = result["rank"]
        for name in ("compiled", "loaded"):
            assert result[name]["error"] <= 1e-6, (name, rank, result[name]["error"])
            experts = [shape for k, shape in result[name]["constants"].items() if "moe_w_" in k]
            assert len(experts) == 2 and all(shape[0] == EXPERTS // world for shape in experts), (name, experts)
        assert result["loaded"]["expert_bytes"] * world == full_expert_bytes
        assert f"world_size={world}" in result["ir"] and "sparsecc.moe_ep" in result["ir"]
        assert result["moe_ep_error"] <= 1e-6, (rank, result["moe_ep_error"])   # the op alone, capacity 1.0
