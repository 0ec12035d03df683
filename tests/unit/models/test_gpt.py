"""The `gpt` builder honours every key of the model options, and refuses layouts that do not divide.

The builds run in one child process (`python test_gpt.py --out facts.json`), started with
no launcher at all, so that the single-process path of init_distributed is used and
megatron's global state stays out of the pytest process.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from tests.child import worker_facts

from llmforge.models.presets import shrink
from llmforge.spec.components import GPTModel
from llmforge.spec.errors import UserError
from llmforge.spec.schema import ParallelismConfig

GPT2 = shrink("gpt2-124m", norm_epsilon=1e-6, hidden_dropout=0.1, attention_dropout=0.2, max_position_embeddings=48, num_layers=3)
LLAMA = shrink("llama2-7b", num_query_groups=2, rotary_base=500000, num_layers=3)


def _facts(options: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from llmforge.models.gpt import build_gpt

    parallelism = ParallelismConfig()
    (model,) = build_gpt(GPTModel(**options), parallelism, precision="fp32", seed=3)
    config = model.config
    params = dict(model.named_parameters())
    x = torch.linspace(-3, 3, 7)
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))]
    ids = torch.randint(0, options["vocab_size"], (2, options["seq_length"] + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(ids[:, :-1], torch.arange(options["seq_length"]).expand(2, -1), None, labels=ids[:, 1:]).mean().item()
    return {
        "params": {name: list(p.shape) for name, p in params.items()},
        "norm_types": sorted({type(m).__name__ for m in norms}),
        "norm_eps": sorted({m.eps for m in norms}),
        "activation_is_tanh_gelu": bool(torch.equal(config.activation_func(x), F.gelu(x, approximate="tanh"))),
        "activation_is_exact_gelu": bool(torch.equal(config.activation_func(x), F.gelu(x))),
        "activation_is_silu": bool(torch.equal(config.activation_func(x), F.silu(x))),
        "gated": config.gated_linear_unit,
        "dropout": [config.hidden_dropout, config.attention_dropout],
        "tied": model.share_embeddings_and_output_weights,
        # inv_freq[1] = base ** (-2 / head_dim)
        "rotary_inv_freq_1": model.rotary_pos_emb.inv_freq[1].item() if hasattr(model, "rotary_pos_emb") else None,
        "has_rotary": hasattr(model, "rotary_pos_emb"),
        "fusions": [config.bias_activation_fusion, config.bias_dropout_fusion, config.masked_softmax_fusion, config.apply_rope_fusion],
        "layouts": [config.tensor_model_parallel_size, config.pipeline_model_parallel_size],
        "norms_are_one": all(bool((m.weight == 1).all()) for m in norms),
        "biases_are_zero": all(bool((p == 0).all()) for n, p in params.items() if n.endswith("bias")),
        "std": {n: p.std().item() for n, p in params.items() if p.dim() == 2},
        "tp_tags": {n: [getattr(p, "partition_dim", None), getattr(p, "partition_stride", None)] for n, p in params.items() if p.dim() == 2},
        "initial_loss": loss,
    }


def _init_memory() -> dict:
    """Peak anonymous memory of building a ~90M-parameter model, against its parameter bytes.

    Anonymous pages only (RssAnon = resident - shared in /proc/self/statm), sampled every
    0.5 ms while the build runs: the weights and any transient copy of them are anonymous, and
    with no swap they stay resident. Whole RSS is not a measure here: this machine pages cold
    library pages out proactively (DAMON), and code faulted back in during the build read as
    growth (CI 1.24×, one full-suite run 1.22×; alone always 1.00×). A transient copy takes
    tens of milliseconds to fault in, far longer than the sampling period.
    """
    import os
    import threading
    import time

    from llmforge.models.gpt import build_gpt

    page, fd = os.sysconf("SC_PAGE_SIZE"), os.open("/proc/self/statm", os.O_RDONLY)

    def anonymous() -> int:
        size, resident, shared = os.pread(fd, 256, 0).split()[:3]
        return (int(resident) - int(shared)) * page

    peak, done = [anonymous()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anonymous())
            time.sleep(0.0005)

    before = anonymous()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    options = GPTModel(**shrink("llama2-7b", num_layers=2, hidden_size=1024, num_attention_heads=8, vocab_size=32000, seq_length=64))
    (model,) = build_gpt(options, ParallelismConfig(), precision="fp32", seed=3)
    done.set()
    sampler.join()
    peak_growth = max(peak[0], anonymous()) - before
    os.close(fd)
    return {"param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()), "peak_growth": peak_growth}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from llmforge.runtime.distributed import init_distributed, shutdown

    context = init_distributed(ParallelismConfig(), seed=3)
    facts = {"gpt2": _facts(GPT2), "llama": _facts(LLAMA), "context": [context.world_size, context.backend, str(context.device)]}
    facts["memory"] = _init_memory()
    args.out.write_text(json.dumps(facts))
    shutdown()


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict:
    return worker_facts(__file__, tmp_path_factory.mktemp("gpt") / "facts.json", timeout=300)


@pytest.mark.slow
def test_gpt2_shape(facts):
    got = facts["gpt2"]
    params = got["params"]
    assert got["norm_types"] == ["LayerNorm"] and got["norm_eps"] == [1e-6]
    assert got["activation_is_tanh_gelu"] and not got["activation_is_exact_gelu"] and not got["gated"]
    assert got["dropout"] == [0.1, 0.2]
    assert got["tied"] and "output_layer.weight" not in params
    assert params["embedding.position_embeddings.weight"] == [48, 64] and not got["has_rotary"]
    assert params["decoder.layers.0.self_attention.linear_qkv.bias"] == [3 * 64]
    assert params["decoder.layers.0.mlp.linear_fc1.weight"] == [256, 64]
    assert sum(name.startswith("decoder.layers.") and name.endswith("linear_qkv.weight") for name in params) == 3


@pytest.mark.slow
def test_llama_shape(facts):
    got = facts["llama"]
    params = got["params"]
    head_dim = 64 // 4
    assert got["norm_types"] == ["FP32RMSNorm"] and got["norm_eps"] == [1e-5]
    assert got["activation_is_silu"] and got["gated"]
    assert params["decoder.layers.0.mlp.linear_fc1.weight"] == [2 * 172, 64]  # gate and up
    assert params["decoder.layers.0.self_attention.linear_qkv.weight"] == [(4 + 2 * 2) * head_dim, 64]  # 2 KV groups
    assert got["has_rotary"] and "embedding.position_embeddings.weight" not in params
    assert got["rotary_inv_freq_1"] == pytest.approx(500000 ** (-2 / head_dim))
    assert not got["tied"] and params["output_layer.weight"] == [256, 64]
    assert not any(name.endswith("bias") for name in params)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["gpt2", "llama"])
def test_megatron_style_initialization(facts, shape):
    got = facts[shape]
    assert got["norms_are_one"] and got["biases_are_zero"]
    scaled = 0.02 / math.sqrt(2 * 3)
    for name, std in got["std"].items():
        expected = scaled if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else 0.02
        assert abs(std - expected) < 0.15 * expected, name
    # megatron's own pass tagged every weight for TP (what grad norms and DistOpt rely on)
    assert all(tags[0] in (0, 1) for name, tags in got["tp_tags"].items() if "position_embeddings" not in name)
    assert got["tp_tags"]["decoder.layers.0.self_attention.linear_proj.weight"][0] == 1
    assert got["tp_tags"]["decoder.layers.0.self_attention.linear_qkv.weight"][0] == 0
    assert abs(got["initial_loss"] - math.log(256)) < 0.05
    assert got["fusions"] == [False, False, False, False] and got["layouts"] == [1, 1]


@pytest.mark.slow
def test_initialization_needs_no_memory_beyond_the_weights(facts):
    memory = facts["memory"]
    assert memory["param_bytes"] > 300e6
    assert memory["peak_growth"] < 1.15 * memory["param_bytes"]


@pytest.mark.slow
def test_single_process_without_a_launcher(facts):
    assert facts["context"] == [1, "gloo", "cpu"]


@pytest.mark.parametrize(
    "options, parallelism, words",
    [
        ({"num_layers": 3}, {"pipeline_model_parallel_size": 2}, "num_layers 3 is not divisible by pipeline"),
        ({"num_layers": 4}, {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 4}, "virtual pipeline stages 8"),
        ({"vocab_size": 50257}, {"tensor_model_parallel_size": 2}, "vocab_size 50257 is not divisible by tensor_model_parallel_size 2"),
        ({"num_query_groups": 1}, {"tensor_model_parallel_size": 2}, "num_query_groups 1"),
    ],
)
def test_layouts_that_do_not_divide_the_model_are_refused(options, parallelism, words):
    from llmforge.models.gpt import check_layout

    with pytest.raises(UserError, match=words):
        check_layout(GPTModel(**shrink("llama2-7b", **options)), ParallelismConfig(**parallelism))


def test_gpt_is_registered_with_its_builder():
    from llmforge.models.gpt import build_gpt
    from llmforge.registry.manager import get_registry

    assert get_registry().factory("model", "gpt") is build_gpt


if __name__ == "__main__":
    main()
