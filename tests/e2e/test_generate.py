"""mode="generate": prefill + decode programs over one static KV cache, checked token for token
against transformers' `generate` on the pruned dense model (fp32, greedy, left-padded batch)."""
from __future__ import annotations

import copy
import hashlib
import json
import warnings

import pytest
import torch

import sparsecc
from sparsecc.errors import ConfigError
from sparsecc.runtime.errors import InputMismatchError
from sparsecc.runtime.sampling import Sampling

from .prompts import left_padded

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 32
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
            max_position_embeddings=128)


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(intermediate_size=128, **TINY)).eval()


def mixtral() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **TINY)
    return transformers.MixtralForCausalLM(config).eval()


def qwen3_moe() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                         num_experts_per_tok=2, head_dim=16, **TINY)
    return transformers.Qwen3MoeForCausalLM(config).eval()


def gpt_oss() -> torch.nn.Module:
    """Sliding-window layers (their static cache layer keeps a Python-int length: replaced by a full one)."""
    torch.manual_seed(0)
    config = transformers.GptOssConfig(intermediate_size=64, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                       sliding_window=8, **TINY)
    return transformers.GptOssForCausalLM(config).eval()


def deepseek_v3() -> torch.nn.Module:
    """Multi-head latent attention: keys and values of different head sizes in the cache."""
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(**{**TINY, "num_key_value_heads": 4}, intermediate_size=64,
                                           moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                                           n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
                                           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1)
    return transformers.DeepseekV3ForCausalLM(config).eval()


def reference(model: torch.nn.Module, gen) -> torch.nn.Module:
    pruned = copy.deepcopy(model)
    pruned.load_state_dict(gen.pruned_state_dict(), strict=False)
    return pruned


def compile_generator(model, sparsity, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsecc.compile(model, left_padded(), sparsity=sparsity, mode="generate", max_length=64, **options)


CASES = {
    "llama-2:4": (llama, "2:4"),
    "mixtral-moe-2:4": (mixtral, {"moe": "dispatch", "weights": "2:4"}),
    "qwen3moe-moe-2:4": (qwen3_moe, {"moe": "dispatch", "weights": "2:4"}),
    "llama-mask": (llama, {"attention": "mask"}),
    "gpt-oss-moe-2:4": (gpt_oss, {"moe": "dispatch", "weights": "2:4"}),
    "deepseek-v3-moe-2:4": (deepseek_v3, {"moe": "dispatch", "weights": "2:4"}),
}


@pytest.fixture(scope="module")
def compiled():
    """case -> (model, generator, the model's state before compiling): each case compiles once per module
    (a generator compile takes seconds; llama-2:4 also serves the tests below)."""
    cache = {}

    def get(case: str):
        if case not in cache:
            build, sparsity = CASES[case]
            model = build()
            before = {name: t.clone() for name, t in model.state_dict().items()}
            cache[case] = model, compile_generator(model, sparsity), before
        return cache[case]
    return get


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_equals_transformers_on_the_pruned_model(compiled, case):
    model, gen, before = compiled(case)
    ids, mask = left_padded()
    got = gen.generate(ids, mask, max_new_tokens=NEW_TOKENS)
    want = reference(model, gen).generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(got, want), f"{case}: first differing position {(got != want).nonzero()[:1].tolist()}"
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items()), "the user's model changed"
    assert gen.report().layers, f"{case}: nothing was rewritten"


@pytest.fixture(scope="module")
def llama_gen(compiled):
    model, gen, _ = compiled("llama-2:4")
    return model, gen


def test_decode_shares_the_prefill_cache_and_weights(llama_gen):
    _, gen = llama_gen
    prefill, decode = gen.prefill, gen.decode
    for a, b in zip(prefill.program.state_names, decode.program.state_names):
        assert prefill.constants[a].data_ptr() == decode.constants[b].data_ptr()
    weights = [n for n in decode.program.constant_names if n not in decode.program.state_names and n in prefill.constants]
    shared = [n for n in weights if prefill.constants[n].data_ptr() == decode.constants[n].data_ptr()]
    assert len(shared) >= 0.9 * len(weights) and shared


def test_the_generator_keeps_one_copy_of_each_weight(llama_gen):
    """The graphs the decode model keeps read the shared storages, not the copies sharing gave up (which
    doubled a 2:4 generator's compressed weights), and no capture's dense weights stay alive."""
    model, gen = llama_gen
    kept = {t.untyped_storage().data_ptr() for program in (gen.prefill, gen.decode) for t in program.constants.values()}
    kept |= {p.untyped_storage().data_ptr() for p in model.parameters()}
    for gm in gen.decode.graph_modules():
        tensors = [t for _, t in gm.named_parameters()] + [t for _, t in gm.named_buffers()]
        tensors += [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr" and "." not in n.target]
        stray = [tuple(t.shape) for t in tensors if isinstance(t, torch.Tensor) and t.numel() > 64
                 and t.untyped_storage().data_ptr() not in kept]
        assert not stray, f"the decode graph holds its own copies of {stray[:4]}"


def test_short_prompts_batches_beyond_the_compiled_size_and_eos(llama_gen):
    model, gen = llama_gen
    ref = reference(model, gen)
    one = torch.tensor([[17]])   # shorter than the prefill program's minimum prompt: padded on the left
    assert torch.equal(gen.generate(one, max_new_tokens=8), ref.generate(one, max_new_tokens=8, do_sample=False))
    ids, mask = left_padded((4, 7, 6), seed=3)   # 3 rows, compiled for 2: two groups
    got = gen.generate(ids, mask, max_new_tokens=6)
    for row in range(3):
        keep = mask[row].bool()
        want = ref.generate(ids[row:row + 1, keep], max_new_tokens=6, do_sample=False)
        assert torch.equal(got[row, -6:], want[0, -6:]), f"row {row}"
    first = int(got[0, ids.shape[1]])
    stopped = gen.generate(ids, mask, max_new_tokens=6, eos_token_id=first, pad_token_id=0)
    assert stopped[0, ids.shape[1]] == first and (stopped[0, ids.shape[1] + 1:] == 0).all()


def test_streamer_sees_the_prompt_then_each_token(llama_gen):
    _, gen = llama_gen

    class Collect:
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, value):
            self.parts.append(value.clone())

        def end(self):
            self.ended = True

    ids, mask = left_padded()
    streamer = Collect()
    out = gen.generate(ids, mask, max_new_tokens=5, streamer=streamer)
    assert streamer.ended and torch.equal(streamer.parts[0], ids)
    assert torch.equal(torch.stack(streamer.parts[1:], 1), out[:, ids.shape[1]:])


def test_sampling(llama_gen):
    _, gen = llama_gen
    ids, mask = left_padded()
    greedy = gen.generate(ids, mask, max_new_tokens=6)
    assert torch.equal(gen.generate(ids, mask, max_new_tokens=6, do_sample=True, top_k=1), greedy)
    seeded = [gen.generate(ids, mask, max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9,
                           generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*seeded)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    kept = {int(Sampling(True, top_k=2).next_tokens(logits)) for _ in range(50)}
    assert kept == {2, 3}
    assert {int(Sampling(True, top_p=0.5).next_tokens(logits)) for _ in range(20)} == {3}


def test_saved_generator_loads_and_generates_the_same(llama_gen, tmp_path):
    _, gen = llama_gen
    ids, mask = left_padded()
    want = gen.generate(ids, mask, max_new_tokens=12)
    gen.save(str(tmp_path / "gen"), progress=False)
    loaded = sparsecc.runtime.load(str(tmp_path / "gen"))
    assert type(loaded).__name__ == "LoadedGenerator"
    assert torch.equal(loaded.generate(ids, mask, max_new_tokens=12), want)
    state = loaded.prefill.program.state_names
    assert all(loaded.prefill.constants[a].data_ptr() == loaded.decode.constants[b].data_ptr()
               for a, b in zip(state, loaded.decode.program.state_names))
    # the decode folder stores only what prefill lacks: its shared weights are borrowed, not saved twice
    sizes = {d: (tmp_path / "gen" / d / "weights.safetensors").stat().st_size for d in ("prefill", "decode")}
    assert sizes["decode"] < 1024, sizes
    borrowed = json.loads((tmp_path / "gen" / "decode" / "manifest.json").read_text())["borrowed_constants"]
    assert borrowed and all(loaded.decode.constants[n] is loaded.prefill.constants[n] for n in borrowed)
    with pytest.raises(sparsecc.runtime.ArtifactError, match="load the generator folder"):
        sparsecc.runtime.load(str(tmp_path / "gen" / "decode"))


def test_a_tampered_generator_spec_is_refused(llama_gen, tmp_path):
    _, gen = llama_gen
    gen.save(str(tmp_path / "gen"), progress=False)
    manifest = tmp_path / "gen" / "prefill" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"max_length": 64', '"max_length": 99999'))
    with pytest.raises(sparsecc.runtime.ArtifactError, match="does not match"):
        sparsecc.runtime.load(str(tmp_path / "gen"))
    text = manifest.read_text().replace('"max_length": 99999', '"max_length": "64"')   # hash recomputed: still checked
    manifest.write_text(text)
    (manifest.parent / "manifest.sha256").write_text(hashlib.sha256(text.encode()).hexdigest() + "  manifest.json\n")
    with pytest.raises(sparsecc.runtime.ArtifactError, match="positive ints"):
        sparsecc.runtime.load(str(tmp_path / "gen"))
    rewrite_manifest(manifest, '"max_length": "64"', '"max_length": 65')    # valid, but no program takes it
    with pytest.raises(sparsecc.runtime.ArtifactError, match="attention_mask \\[2, 65\\]"):
        sparsecc.runtime.load(str(tmp_path / "gen"))


def test_a_decode_program_from_elsewhere_is_refused(llama_gen, tmp_path):
    _, gen = llama_gen
    gen.save(str(tmp_path / "gen"), progress=False)
    decode_manifest = tmp_path / "gen" / "decode" / "manifest.json"
    rewrite_manifest(decode_manifest, '"targets": [', '"targets": [ ')   # any other decode, hashes consistent
    with pytest.raises(sparsecc.runtime.ArtifactError, match="not the one this generator was saved with"):
        sparsecc.runtime.load(str(tmp_path / "gen"))


def rewrite_manifest(manifest, old: str, new: str) -> None:
    """Edit a manifest and recompute its manifest.sha256, as an attacker rewriting the folder can."""
    text = manifest.read_text()
    assert old in text
    text = text.replace(old, new)
    manifest.write_text(text)
    (manifest.parent / "manifest.sha256").write_text(hashlib.sha256(text.encode()).hexdigest() + "  manifest.json\n")


def test_bad_requests_are_clear(llama_gen):
    _, gen = llama_gen
    ids, mask = left_padded()
    with pytest.raises(InputMismatchError, match="max_length"):
        gen.generate(ids, mask, max_new_tokens=60)
    right_padded = mask.flip(1)
    with pytest.raises(InputMismatchError, match="left-padded"):
        gen.generate(ids, right_padded, max_new_tokens=2)
    with pytest.raises(ConfigError, match="max_length"):
        sparsecc.compile(llama(), left_padded(), mode="generate")
    with pytest.raises(ConfigError, match="causal LM"):
        sparsecc.compile(torch.nn.Linear(4, 4), left_padded(), mode="generate", max_length=16)
    with pytest.raises(ConfigError, match="mode"):
        sparsecc.compile(llama(), left_padded(), mode="decode")


FACTORY = '''
import torch, transformers
def build():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()
'''


def test_cli_streams_tokens_and_runs_a_saved_generator(tmp_path, capsys):
    from sparsecc.cli import main
    (tmp_path / "tiny_lm.py").write_text(FACTORY)
    prompts = ["--prompt-ids", "5,6,7", "--prompt-ids", "9,10,11,12,13"]
    saved = tmp_path / "gen"
    assert main(["generate", str(tmp_path / "tiny_lm.py") + ":build", *prompts, "--sparsity", "2:4",
                 "--max-new-tokens", "6", "--save", str(saved), "-q"]) == 0
    compiled = capsys.readouterr().out.splitlines()
    assert len(compiled) == 6 + 2 and all(len(line.split()) == 2 for line in compiled[:6])   # one line per step
    assert compiled[-2].startswith("5 6 7 ") and len(compiled[-2].split()) == 3 + 6
    assert main(["generate", str(saved), *prompts, "--max-new-tokens", "6", "-q"]) == 0
    assert capsys.readouterr().out.splitlines() == compiled
    assert main(["generate", str(saved), "--prompt-ids", "5,x"]) == 2
    assert "comma-separated token ids" in capsys.readouterr().err
    assert main(["generate", str(saved), *prompts, "--sparsity", "4:8"]) == 2
    assert "already compiled" in capsys.readouterr().err
