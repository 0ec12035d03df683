"""Streamed conversions: the storage-free skeleton saves and reads exactly what the real model does,
and llmforge's layer-at-a-time forward pass equals its ordinary one."""

from __future__ import annotations

import pytest
import torch

from llmforge.interop.model_io import skeleton_model, state_of
from llmforge.interop.streaming import CheckpointReader, save_streamed, streamed_logits
from llmforge.runtime.sharded_io import load_sharded, model_sharded_state

from .tiny import MODELS, build, forward, random_ids, write_run

# Every switch that changes the tensors: GQA, untied output, biases, QKV bias, q/k norms with wide heads, GPT-2.
SHAPES = {
    "llama-untied-bias": {**MODELS["llama"], "untie_embeddings_and_output_weights": True, "add_bias_linear": True},
    "qwen2": {**MODELS["llama"], "add_qkv_bias": True},
    "qwen3": {**MODELS["llama"], "qk_layernorm": True, "kv_channels": 32},
    "gpt2": MODELS["gpt2"],
}


def _layout(module) -> dict[str, tuple]:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}
    for name, item in model_sharded_state([module])["chunk0"].items():
        if isinstance(item, ShardedTensor):
            out[name] = (item.key, item.global_shape, item.global_offset, item.prepend_axis_num, item.replica_id, item.dtype)
        else:
            out[name] = (type(item).__name__, item.key, isinstance(item, ShardedTensorFactory) and tuple(item.data.shape))
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_the_skeleton_saves_reads_and_runs_as_the_real_model(tmp_path, shape):
    from llmforge.spec.components import GPTModel

    options = GPTModel.model_validate(SHAPES[shape])
    real = build(SHAPES[shape])
    skeleton = skeleton_model(options)
    assert all(p.is_meta for p in skeleton.parameters())
    assert _layout(skeleton) == _layout(real)

    # A checkpoint streamed through the skeleton loads into the real model exactly.
    state = state_of(real)
    (tmp_path / "streamed").mkdir()
    save_streamed(tmp_path / "streamed", skeleton, lambda name: state[name].clone(), {})
    other = build(SHAPES[shape], seed=9)
    load_sharded(tmp_path / "streamed", [other], None)
    assert all(torch.equal(t, state[n]) for n, t in state_of(other).items())

    # The reader gives every tensor back from a checkpoint the ordinary writer saved, and the
    # layer-at-a-time forward pass computes exactly what the model does.
    step_dir = write_run(tmp_path / "run", SHAPES[shape], real)
    reader = CheckpointReader(step_dir / "model", skeleton)
    assert set(reader.names) <= set(state) and all(torch.equal(reader.get(name), state[name]) for name in reader.names)
    ids = random_ids()
    assert torch.equal(streamed_logits(skeleton, reader, ids), forward(real, ids))
    assert all(p.is_meta for p in skeleton.parameters())  # the weights were only lent for the pass
