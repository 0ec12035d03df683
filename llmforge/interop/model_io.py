"""The one-process TP=1/PP=1 model that every conversion goes through.

Export loads a checkpoint of any TP/PP layout into it (megatron's dist_checkpointing
reshards on load), so the HF side only ever sees whole tensors; import fills it from HF
tensors and saves it with the same sharded writer training uses, so a training run of any
layout can `init_from` the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmforge.interop.hf_mapping import canonical_name
from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    import torch

    from llmforge.spec.components import GPTModel


def single_process_model(options: GPTModel, *, seed: int = 0) -> torch.nn.Module:
    """A TP=1/PP=1 megatron GPTModel built from `options` in this process (weights from `seed`)."""
    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.distributed import init_distributed
    from llmforge.spec.schema import ParallelismConfig

    layout = ParallelismConfig.model_validate({})
    context = init_distributed(layout, seed=0)
    if context.world_size != 1:
        raise UserError(f"export and import run in one process, but this one is rank {context.rank} of {context.world_size}",
                        "run `llmforge export` / `llmforge import` directly, not under torchrun or srun")
    (model,) = build_gpt(options, layout, precision="fp32", seed=seed)
    return model


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


def _global_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint key → global shape of every tensor the model would load (factories built)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    shapes = {}
    for item in nested_values(module.sharded_state_dict()):
        built = nested_values(item.build()) if isinstance(item, ShardedTensorFactory) else [item]
        shapes.update({t.key: tuple(t.global_shape) for t in built if isinstance(t, ShardedTensor)})
    return shapes


def load_checkpoint(model_dir: Path, module: torch.nn.Module) -> None:
    """Load a sharded checkpoint's weights into `module`, after naming any tensor that does not fit.

    dist_checkpointing would fail too, but with a traceback from inside torch's planner; a
    spec edited after training (or a checkpoint of another run) deserves a message.
    """
    from megatron.core import dist_checkpointing

    from llmforge.runtime.sharded_io import load_sharded

    saved = {key: tuple(t.global_shape) for key, t in dist_checkpointing.load_tensors_metadata(str(model_dir)).items()}
    expected = _global_shapes(module)
    problems = [f"missing tensor {key}" for key in expected if key not in saved]
    problems += [f"{key} has shape {saved[key]}, the model spec implies {shape}"
                 for key, shape in expected.items() if key in saved and saved[key] != shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{model_dir}: the checkpoint does not fit the run's model spec: {'; '.join(problems[:3])}{more}",
                        "export the checkpoint with the spec of the run that wrote it (spec.resolved.yaml or model.yaml)")
    load_sharded(model_dir, [module], None)


def load_module_weights(step_dir: Path, module) -> None:
    """One plain module's weights from any checkpoint (export, generate); full ones get their shapes checked first."""
    from llmforge.finetune.checkpoints import load_weights

    if (Path(step_dir) / "model").is_dir():
        load_checkpoint(Path(step_dir) / "model", module)
    else:
        load_weights(step_dir, [module])  # LoRA adapters alone: merged on load
