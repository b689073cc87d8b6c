"""The `tokens` section of the sparsity request: parsing, errors, and the pipeline it implies."""
import pytest
from sparsecc.config import TokensConfig, parse_sparsity
from sparsecc.errors import ConfigError
from sparsecc.passes import build_pipeline


def test_tokens_section_becomes_a_token_routing_pass_after_moe_dispatch():
    config = parse_sparsity({"moe": "dispatch", "weights": "2:4",
                             "tokens": {"capacity": 0.25, "router": "calibrated", "layers": [1, "model.*"]}})
    text = config.pipeline()
    assert text.index("moe-dispatch") < text.index("token-routing") < text.index("prune-nm")
    routing = build_pipeline(text)[1]
    assert (routing.capacity, routing.router, routing.layers) == (0.25, "calibrated", ("1", "model.*"))


def test_shorthand_is_the_capacity():
    assert parse_sparsity({"tokens": "0.5"}).tokens == TokensConfig(capacity=0.5)
    with pytest.raises(ConfigError, match="tokens.capacity: expected a number"):
        parse_sparsity({"tokens": "half"})


def test_weights_file_with_spaces_survives_the_pipeline_string():
    config = parse_sparsity({"tokens": {"router": "weights", "weights_file": "/tmp/my routers.safetensors"}})
    assert build_pipeline(config.pipeline())[0].weights_file == "/tmp/my routers.safetensors"


@pytest.mark.parametrize("section, message", [
    ({"capacity": 0}, "tokens.capacity: expected a number in \\(0, 1\\]"),
    ({"capacity": 1.5}, "tokens.capacity"),
    ({"router": "learned"}, "tokens.router: expected one of norm, calibrated, weights, got 'learned'"),
    ({"where": "attention"}, "tokens.where: expected one of mlp, layer, got 'attention'"),
    ({"router": "weights"}, "tokens.weights_file"),
    ({"layers": [1.5]}, "tokens.layers"),
    ({"capcity": 0.5}, "unknown key 'capcity'"),
])
def test_bad_tokens_sections_name_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        parse_sparsity({"tokens": section})
