"""sparsecc::moe fed by nm_decompress of constant experts runs on the compressed experts (runtime/expert_fusion.py)."""
import warnings

import pytest
import torch

import sparsecc
from sparsecc.runtime import executor
from sparsecc.runtime.expert_fusion import fused_expert_calls
from sparsecc.runtime.program import Instruction, Program

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def mixtral():
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=64, intermediate_size=128, num_local_experts=4,
                                        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=128)
    model = transformers.MixtralForCausalLM(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = sparsecc.compile(model, (torch.randint(0, 128, (1, 6)),),
                                    sparsity={"moe": "dispatch", "weights": "2:4"})
    return model, compiled


def test_every_moe_layer_runs_on_compressed_experts_with_the_same_numbers(mixtral, monkeypatch):
    _, compiled = mixtral
    moes = [i for i, inst in enumerate(compiled.program.instructions) if inst.op == "sparsecc::moe"]
    assert len(moes) == 2 and set(moes) <= set(compiled._executor.fused)   # registers reused across layers
    ids = torch.randint(0, 128, (1, 6))   # ~3 rows per used expert: the decode kernels (1-16 rows)
    fused = compiled(ids)
    monkeypatch.setattr(executor, "fused_expert_calls", lambda program, constants: {})
    unfused = executor.Executor(compiled.program, compiled.constants).run([ids])
    got = fused.logits if hasattr(fused, "logits") else fused[0]
    torch.testing.assert_close(got, unfused[0], atol=1e-5, rtol=1e-4)


def decompress(out, values, indices):
    return Instruction("sparsecc::nm_decompress", [{"c": values}, {"c": indices}, 2, 4, 8], {}, [out])


def moe(out, gate_up, down):
    return Instruction("sparsecc::moe", [{"r": 0}, {"r": 1}, {"r": gate_up}, {"r": down}, None, None, None,
                                         2, True, "softmax", "silu", True], {}, [out])


def program(*instructions, outputs=({"r": 0},)):
    return Program(inputs=[0, 1], input_specs=[], instructions=list(instructions), outputs=list(outputs),
                   num_registers=8, constant_names=["gv", "gi", "dv", "di"])


CONSTANTS = {"gv": torch.zeros(4, 16, 4), "gi": torch.zeros(4, 16, 1, dtype=torch.uint8),
             "dv": torch.zeros(4, 8, 8), "di": torch.zeros(4, 8, 2, dtype=torch.uint8)}


def test_fused_only_where_nothing_else_reads_the_dense_experts():
    plain = program(decompress(2, "gv", "gi"), decompress(3, "dv", "di"), moe(4, 2, 3))
    assert set(fused_expert_calls(plain, CONSTANTS)) == {0, 1, 2}
    read_again = program(decompress(2, "gv", "gi"), decompress(3, "dv", "di"), moe(4, 2, 3),
                         Instruction("aten::add.Tensor", [{"r": 2}, {"r": 2}], {}, [5]))
    assert fused_expert_calls(read_again, CONSTANTS) == {}
    returned = program(decompress(2, "gv", "gi"), decompress(3, "dv", "di"), moe(4, 2, 3), outputs=[{"r": 3}])
    assert fused_expert_calls(returned, CONSTANTS) == {}
    overwritten = program(decompress(2, "gv", "gi"), decompress(3, "dv", "di"), moe(4, 2, 3),
                          Instruction("aten::relu.default", [{"r": 4}], {}, [2]),
                          Instruction("aten::add.Tensor", [{"r": 2}, {"r": 2}], {}, [5]))
    assert set(fused_expert_calls(overwritten, CONSTANTS)) == {0, 1, 2}   # register 2 rewritten before its read
    one_dense = program(decompress(2, "gv", "gi"), moe(4, 2, 3))          # w_down not decompressed here
    assert fused_expert_calls(one_dense, CONSTANTS) == {}
