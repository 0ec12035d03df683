"""The one-process TP=1/PP=1 model that every conversion goes through, whole or as a skeleton.

Checkpoints of any TP/PP layout read into it (megatron's dist_checkpointing reshards on
load), so the HF side only ever sees whole tensors; what import writes is the checkpoint this
model saves, so a training run of any layout can `init_from` it. Full-model conversions use
its skeleton (`skeleton_model`, no storage) and stream tensors through it (`streaming`); LoRA
and PEFT exports build it whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmforge.interop.hf_mapping import canonical_name
from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    import torch

    from llmforge.spec.components import GPTModel


def _one_process_layout():
    """megatron's parallel state for one process (TP=1, PP=1); UserError when launched as one rank of several."""
    from llmforge.runtime.distributed import init_distributed
    from llmforge.spec.schema import ParallelismConfig

    layout = ParallelismConfig.model_validate({})
    context = init_distributed(layout, seed=0)
    if context.world_size != 1:
        raise UserError(f"export and import run in one process, but this one is rank {context.rank} of {context.world_size}",
                        "run `llmforge export` / `llmforge import` directly, not under torchrun or srun")
    return layout


def single_process_model(options: GPTModel, *, seed: int = 0) -> torch.nn.Module:
    """A TP=1/PP=1 megatron GPTModel built from `options` in this process (weights from `seed`)."""
    from llmforge.models.gpt import build_gpt

    (model,) = build_gpt(options, _one_process_layout(), precision="fp32", seed=seed)
    return model


def skeleton_model(options: GPTModel) -> torch.nn.Module:
    """The TP=1/PP=1 GPTModel of `single_process_model` with every parameter on the meta device: no storage.

    Its `sharded_state_dict()` is the checkpoint layout of the real model (keys, global shapes,
    offsets), which is what a streamed conversion needs; `streaming` gives it weights a layer at a
    time. Built from the same config and layer spec as `build_gpt` (tests/unit/interop checks that
    the two agree); megatron allocates on the default device only with `use_cpu_initialization`.
    """
    import dataclasses

    import torch
    from megatron.core.models.gpt.gpt_model import GPTModel as MegatronGPT

    from llmforge.models.gpt import layer_spec, transformer_config

    config = dataclasses.replace(transformer_config(options, _one_process_layout(), precision="fp32"), use_cpu_initialization=True)
    if config.num_moe_experts:  # as build_gpt does: the export's self-check runs this skeleton's MoE layers
        from llmforge.models import cpu_compat

        cpu_compat.fix_moe_without_transformer_engine()
    with torch.device("meta"):
        return MegatronGPT(
            config=config,
            transformer_layer_spec=layer_spec(config, options.num_layers, moe_layer=getattr(options, "is_moe_layer", None)),
            vocab_size=options.vocab_size,
            max_sequence_length=options.max_positions,
            pre_process=True,
            post_process=True,
            share_embeddings_and_output_weights=not options.untie_embeddings_and_output_weights,
            position_embedding_type=options.position_embedding_type,
            rotary_base=options.rotary_base,
            rope_scaling=options.rope_scaling_factor is not None,
            rope_scaling_factor=options.rope_scaling_factor or 1.0,
        )


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under canonical names (`_extra_state` dropped)."""
    import torch

    return {canonical_name(n): t for n, t in model.state_dict().items() if isinstance(t, torch.Tensor) and not n.endswith("._extra_state")}


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy canonical-named tensors into the model's parameters (casting to their dtype)."""
    import torch

    own = {canonical_name(n): t for n, t in model.state_dict().items() if isinstance(t, torch.Tensor) and not n.endswith("._extra_state")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        # from_hf builds `state` from the same options as the model, so this is a bug, not bad input.
        raise RuntimeError(f"megatron model and converted tensors disagree: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def global_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint key → global shape of every tensor the model would load (factories built)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    shapes = {}
    for item in nested_values(module.sharded_state_dict()):
        built = nested_values(item.build()) if isinstance(item, ShardedTensorFactory) else [item]
        shapes.update({t.key: tuple(t.global_shape) for t in built if isinstance(t, ShardedTensor)})
    return shapes


def check_fits(model_dir: Path, module: torch.nn.Module) -> dict[str, torch.dtype]:
    """Name any tensor of a sharded checkpoint that does not fit `module` (a UserError); returns each saved key's dtype.

    dist_checkpointing would fail too, but with a traceback from inside torch's planner; a
    spec edited after training (or a checkpoint of another run) deserves a message.
    """
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(model_dir))
    saved = {key: tuple(t.global_shape) for key, t in metadata.items()}
    expected = global_shapes(module)
    problems = [f"missing tensor {key}" for key in expected if key not in saved]
    problems += [f"{key} has shape {saved[key]}, the model spec implies {shape}"
                 for key, shape in expected.items() if key in saved and saved[key] != shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{model_dir}: the checkpoint does not fit the run's model spec: {'; '.join(problems[:3])}{more}",
                        "export the checkpoint with the spec of the run that wrote it (spec.resolved.yaml or model.yaml)")
    return {key: t.dtype for key, t in metadata.items()}


def load_checkpoint(model_dir: Path, module: torch.nn.Module) -> None:
    """Load a sharded checkpoint's weights into `module`, after naming any tensor that does not fit."""
    from llmforge.runtime.sharded_io import load_sharded

    check_fits(model_dir, module)
    load_sharded(model_dir, [module], None)


def load_module_weights(step_dir: Path, module) -> None:
    """One plain module's weights from any checkpoint (export, generate); full ones get their shapes checked first."""
    from llmforge.finetune.checkpoints import load_weights

    if (Path(step_dir) / "model").is_dir():
        load_checkpoint(Path(step_dir) / "model", module)
    else:
        load_weights(step_dir, [module])  # LoRA adapters alone: merged on load
