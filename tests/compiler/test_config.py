import pytest
import torch

import sparsecc
import sparsecc.api
import sparsecc.calibrate
from sparsecc.config import SparsityConfig, WeightsConfig, parse_sparsity
from sparsecc.errors import ConfigError
from sparsecc.passes import Cleanup, MoEDispatch, Pass, PruneNM, SparseAttention
from sparsecc.passes.options import OptionError
from sparsecc.passes.pipeline import PipelineError, build_pipeline


def test_shorthand_is_magnitude_weights():
    config = parse_sparsity("2:4")
    assert config.weights == WeightsConfig(pattern="2:4")
    assert config.pipeline() == "moe-dispatch,prune-nm{n=2,m=4,method=magnitude,include=[*]},fold-constants,cleanup"
    assert config.implied() == ["moe-dispatch"] and parse_sparsity({"moe": "dispatch"}).implied() == []


def test_dict_and_dataclass_agree():
    from_dict = parse_sparsity({"weights": {"pattern": "4:8", "exclude": ["lm_head", "*.gate"]}})
    from_class = parse_sparsity(SparsityConfig(weights=WeightsConfig(pattern="4:8", exclude=("lm_head", "*.gate"))))
    assert from_dict == from_class
    assert "exclude=[lm_head,*.gate]" in from_dict.pipeline()


def test_none_means_no_rewrite():
    assert parse_sparsity(None).pipeline() == "fold-constants,cleanup"


@pytest.mark.parametrize("pattern, words", [
    ("3:2", "M must be one of"), ("0:4", "1 <= N < M"), ("2:3:4", "expected 'N:M'"),
    ("2:5", "M must be one of"), ("2-4", "expected 'N:M'"), ("4:4", "1 <= N < M"),
])
def test_invalid_patterns_are_named(pattern, words):
    with pytest.raises(ConfigError, match=words) as err:
        parse_sparsity(pattern)
    assert str(err.value).startswith("weights.pattern") and pattern in str(err.value)


def test_unknown_top_level_key_lists_accepted():
    with pytest.raises(ConfigError, match=r"unknown key 'weigths' \(accepted: weights"):
        parse_sparsity({"weigths": "2:4"})


def test_unknown_weights_key_lists_accepted():
    with pytest.raises(ConfigError, match=r"sparsity.weights: unknown key 'patern' \(accepted: pattern, method"):
        parse_sparsity({"weights": {"patern": "2:4"}})


def test_unknown_method_lists_available():
    with pytest.raises(ConfigError, match=r"unknown method 'obs' \(available: magnitude, wanda, sparsegpt\)"):
        parse_sparsity({"weights": {"pattern": "2:4", "method": "obs"}})


def test_bad_section_values_are_named():
    with pytest.raises(ConfigError, match=r"tokens.capacity: expected a number in \(0, 1\], got 1.5"):
        parse_sparsity({"tokens": {"capacity": 1.5}})
    with pytest.raises(ConfigError, match="policy 'blasst' .*available: mask, window, topk, threshold"):
        parse_sparsity({"attention": {"policy": "blasst"}})
    with pytest.raises(ConfigError, match="attention.block: expected 64 or 128"):
        parse_sparsity({"attention": {"block": 96}})


def test_moe_comes_before_weights():
    config = parse_sparsity({"weights": "2:4", "moe": {"capacity_factor": 1.25}})
    assert config.pipeline().startswith("moe-dispatch{capacity_factor=1.25},prune-nm")
    assert parse_sparsity({"moe": "dispatch"}).pipeline() == "moe-dispatch,fold-constants,cleanup"
    with pytest.raises(ConfigError, match="unknown key 'capacity'"):
        parse_sparsity({"moe": {"capacity": 2}})
    with pytest.raises(ConfigError, match="moe.capacity_factor: expected a finite number >= 0, got -1"):
        parse_sparsity({"moe": {"capacity_factor": -1}})


def test_wrong_types():
    with pytest.raises(ConfigError, match="expected a string like '2:4'"):
        parse_sparsity(24)
    with pytest.raises(ConfigError, match="weights.exclude: expected a list"):
        parse_sparsity({"weights": {"exclude": "lm_head"}})


@pytest.mark.parametrize("section, message", [
    ({"moe": {"capacity_factor": float("nan")}}, "moe.capacity_factor: expected a finite number >= 0, got nan"),
    ({"moe": {"capacity_factor": float("inf")}}, "moe.capacity_factor: expected a finite number >= 0, got inf"),
    ({"weights": {"method": "sparsegpt", "percdamp": float("nan")}},
     "weights.percdamp: expected a finite number >= 0, got nan"),
    ({"weights": {"percdamp": -float("inf")}}, "weights.percdamp: expected a finite number >= 0, got -inf"),
    ({"tokens": {"capacity": float("nan")}}, r"tokens.capacity: expected a number in \(0, 1\], got nan"),
    ({"tokens": "inf"}, r"tokens.capacity: expected a number in \(0, 1\], got inf"),
    ({"attention": {"policy": "topk", "topk": float("nan")}},
     r"attention.topk: expected a fraction in \(0, 1\) or a whole count >= 1, got nan"),
    ({"attention": {"policy": "threshold", "threshold": float("inf")}},
     r"attention.threshold: expected a number in \(0, 1\), got inf"),
    ({"attention": {"policy": "window", "window": 0}}, "attention.window: expected an integer >= 1, got 0"),
    ({"attention": {"policy": "window", "window": 4.0}}, "attention.window: expected an integer, got 4.0"),
    ({"attention": {"policy": "window", "sinks": -1}}, "attention.sinks: expected an integer >= 0, got -1"),
])
def test_non_finite_and_out_of_range_numbers_name_key_and_range(section, message):
    with pytest.raises(ConfigError, match=message):
        parse_sparsity(section)


@pytest.mark.parametrize("request_, error", [
    ({"pipeline": "prune-nm{n=2,m=4},moe-dispatch{capacity_factor=nan}"}, "option 'capacity_factor'"),
    ({"pipeline": "sparse-attention{policy=threshold,threshold=2.0}"}, "option 'threshold'"),
    ({"pipeline": "token-routing{capacity=inf}"}, "option 'capacity'"),
    ({"sparsity": {"moe": {"capacity_factor": float("nan")}}}, "moe.capacity_factor"),
])
def test_bad_options_are_refused_before_capture(monkeypatch, request_, error):
    def capture(*args, **kwargs):
        raise AssertionError("capture ran before the options were checked")
    monkeypatch.setattr(sparsecc.calibrate, "capture", capture)
    with pytest.raises((ConfigError, PipelineError), match=error):
        sparsecc.compile(torch.nn.Linear(8, 8), (torch.randn(2, 8),), **request_)


@pytest.mark.parametrize("spec", [
    "2:4",
    {"weights": {"pattern": "4:8", "method": "sparsegpt", "percdamp": 0.1, "blocksize": 64, "exclude": ["lm_head"]}},
    {"moe": {"capacity_factor": 1.25}, "tokens": {"capacity": 0.25, "layers": [1, "model.*"]}},
    {"attention": {"policy": "topk", "topk": 3, "sinks": 0}, "tokens": {"router": "weights", "weights_file": "a b"}},
])
def test_sections_become_passes_and_the_text_reads_back_to_them(spec):
    config = parse_sparsity(spec)
    passes = config.passes()
    assert passes[-1] == Cleanup() and all(isinstance(p, Pass) for p in passes)
    assert build_pipeline(config.pipeline()) == passes


def test_weights_section_sets_the_prune_nm_options():
    [dispatch, prune, _, _] = parse_sparsity({"weights": {"pattern": "4:8", "method": "wanda",
                                                       "include": ["*.mlp.*"]}}).passes()
    assert prune == PruneNM(n=4, m=8, method="wanda", include=("*.mlp.*",))
    assert dispatch == MoEDispatch()   # implied: stacked experts become N:M only inside sparsecc.moe


def test_section_errors_are_the_pass_errors_under_the_config_key():
    with pytest.raises(OptionError) as from_pass:
        SparseAttention(policy="window", window=0)
    with pytest.raises(ConfigError) as from_config:
        parse_sparsity({"attention": {"policy": "window", "window": 0}})
    assert str(from_config.value) == f"attention.window: {from_pass.value.problem}"
