"""node/model/cost.py predicts the bytes node/lowbit/layers.py and node/weights/loader.py really allocate."""

from __future__ import annotations

import pytest
import torch
from weights import FloatSrc

from edgeshard.node.lowbit.factory import make_linear
from edgeshard.node.lowbit.layers import module_weight_bytes
from edgeshard.node.model.config import ModelConfig, ShardSpec
from edgeshard.node.model.cost import QUANTS, ModelCost, linear_bytes


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize(("out_f", "in_f", "bias"), [(64, 64, False), (40, 96, True), (200, 32, False)])
def test_linear_bytes_match_the_modules(quant, out_f, in_f, bias):
    w = torch.randn(out_f, in_f) * 0.02
    b = torch.randn(out_f) if bias else None
    module = make_linear(FloatSrc(w), b, quant)
    # the node's own kernels (AMX or dot products) pad int8 rows to 16; torch's kernels do not
    padded = getattr(module, "kernel", "torch") != "torch"
    assert linear_bytes(out_f, in_f, quant, bias, padded) == module_weight_bytes(module)


def test_model_cost_of_a_config():
    cfg = ModelConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
    )
    cost = ModelCost.of(cfg, "int8")
    assert cost.weight_bytes(0, 6) == 6 * cost.layer_bytes + cost.embed_bytes + cost.head_bytes
    assert cost.weight_bytes(2, 4) == 2 * cost.layer_bytes
    assert cost.kv_bytes_per_token == 2 * 2 * 32 * 2  # K and V, 2 kv heads of 32, bf16
    assert cost.kv_bytes(3, 100) == 3 * 256 * cost.kv_bytes_per_token  # the cache grows in steps of 256
    assert ModelCost.of(cfg, "f32").kv_bytes_per_token == 2 * cost.kv_bytes_per_token


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int4", "int8", "bf16"])
def test_shard_bytes_match_the_loader(smollm2_path, quant):
    from edgeshard.node.weights.checkpoint import open_checkpoint
    from edgeshard.node.weights.loader import load_stage, stage_weight_bytes

    torch.set_num_threads(1)
    ckpt = open_checkpoint(smollm2_path)
    cost = ModelCost.of(ckpt.config, quant)
    n = ckpt.config.num_hidden_layers
    for start, end in [(0, 1), (10, 12), (n - 1, n)]:
        stage = load_stage(ckpt, ShardSpec(start, end, n), quant=quant)
        assert cost.weight_bytes(start, end) == stage_weight_bytes(stage), (quant, start, end)
