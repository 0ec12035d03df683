"""Optimizers: the torch factories registered as `adamw`/`sgd`, and megatron's wrapper around them.

A registered optimizer (built-in or a plugin's, e.g. Lion) is a plain torch optimizer over
`param_groups(...)`. `wrap_optimizer` then puts the model chunks in megatron's DDP (a
contiguous fp32 grad buffer, all-reduced over DP) and the optimizer in megatron's
FP32Optimizer, or for bf16 parameters (`precision: bf16`) its Float16OptimizerWithFloat16Params
(fp32 master weights the torch optimizer steps, copied back to the bf16 parameters), or, with
`use_distributed_optimizer` (AdamW only: validate refuses others), in megatron's
DistributedOptimizer (ZeRO-1: fp32 master weights and Adam state sharded over DP).
"""

from __future__ import annotations

import collections
import contextlib
import copy
from typing import TYPE_CHECKING, Any

import torch

from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    from llmforge.spec.components import SGD, AdamW
    from llmforge.spec.schema import ParallelismConfig


def _no_decay(name: str, param: torch.nn.Parameter, decay_embeddings: bool) -> bool:
    if param.dim() < 2 or name.endswith("bias"):
        return True  # norms and biases
    return not decay_embeddings and "embedding" in name


def param_groups(model_chunks: list[torch.nn.Module], weight_decay: float, decay_embeddings: bool = True) -> list[dict[str, Any]]:
    """Two groups, decay then no-decay (norms, biases, and embeddings unless `decay_embeddings`);
    an MoE model's routed experts get two more of their own (`is_expert_parallel`).

    All are always present, even if empty on some pipeline stage, because distributed
    checkpoints need every rank to have the same groups. The `*_mult` and `is_*` keys are the
    ones megatron matches groups by when it loads optimizer state.
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {(e, d): [] for e in (False, True) for d in (True, False)}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if param.requires_grad:
                # Routed experts (models.moe) go to groups of their own, which wrap_optimizer
                # hands to a second megatron optimizer over the expert-data-parallel group.
                groups[(not getattr(param, "allreduce", True), not _no_decay(name, param, decay_embeddings))].append(param)
    # Decided by the config, not by what this rank holds, so every pipeline stage has the same groups.
    moe = any(getattr(getattr(chunk, "config", None), "num_moe_experts", None) for chunk in model_chunks)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "wd_mult": 1.0 if decay else 0.0, "lr_mult": 1.0,
         "is_expert_parallel": expert, "is_decoupled_lr": False}
        for (expert, decay), params in groups.items() if moe or not expert
    ]


def _implementation(params: list[dict[str, Any]]) -> dict[str, bool]:
    # The fused kernels exist for CPU and CUDA floating-point tensors (torch >= 2.4);
    # foreach is the fallback that still avoids a Python loop per parameter.
    tensors = [p for group in params for p in group["params"]]
    if tensors and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors):
        return {"fused": True}
    return {"foreach": True}


def build_adamw(options: AdamW, *, params: list[dict[str, Any]] | None = None, model_chunks: list[torch.nn.Module] | None = None) -> torch.optim.AdamW:
    """torch AdamW; `params` defaults to `param_groups(model_chunks, ...)` from the options."""
    if params is None:
        params = param_groups(model_chunks, options.weight_decay, options.decay_embeddings)
    return torch.optim.AdamW(params, lr=options.lr, betas=tuple(options.betas), eps=options.eps, weight_decay=options.weight_decay, **_implementation(params))


def build_sgd(options: SGD, *, params: list[dict[str, Any]] | None = None, model_chunks: list[torch.nn.Module] | None = None) -> torch.optim.SGD:
    """torch SGD (with momentum if set); norms and biases get no weight decay."""
    if params is None:
        params = param_groups(model_chunks, options.weight_decay)
    return torch.optim.SGD(params, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay, **_implementation(params))


def _grads_in_place(model_chunks: list[torch.nn.Module], distributed: bool) -> bool:
    """Whether autograd can accumulate straight into DDP's main grads (`cpu_compat.hookless_ddp`).

    On the CPU layer only (never run on a GPU yet), with no data parallelism to reduce over
    (dense or expert), no DistributedOptimizer, and fp32 trainable parameters: main grads
    are fp32 (`grad_reduce_in_fp32`), and a `.grad` must have its parameter's dtype.
    """
    from megatron.core import parallel_state

    from llmforge.models import cpu_compat

    return (cpu_compat.installed() and not distributed
            and parallel_state.get_data_parallel_world_size(with_context_parallel=True) == 1
            and parallel_state.get_expert_data_parallel_world_size() == 1
            and all(p.dtype == torch.float32 for chunk in model_chunks for p in chunk.parameters() if p.requires_grad))


def wrap_optimizer(torch_optimizer: torch.optim.Optimizer, model_chunks: list[torch.nn.Module], parallelism: ParallelismConfig):
    """The megatron optimizer for training `model_chunks` with `torch_optimizer`.

    Wraps the chunks in megatron's DistributedDataParallel *in place*: afterwards the list
    holds the DDP modules, which TrainStep and the checkpoint functions take.
    `use_distributed_optimizer` needs AdamW, the one optimizer megatron shards.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    from llmforge.models import cpu_compat

    distributed = parallelism.use_distributed_optimizer
    if distributed and not isinstance(torch_optimizer, torch.optim.AdamW):
        raise UserError(f"use_distributed_optimizer shards AdamW's state only, not {type(torch_optimizer).__name__}'s",
                        "set parallelism.use_distributed_optimizer: false, or use optimizer adamw")

    config = model_chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        # fp32 main grads: each micro batch's bf16 grads accumulate into them, and DP reduces them.
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=distributed,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        # TrainStep checks the grad norm itself and skips the step; no exception mid-run.
        check_for_nan_in_grad=False,
    )
    in_place = _grads_in_place(model_chunks, distributed)
    # Only the first chunk gets bucketed grad reduction; later VPP chunks reduce as one
    # bucket, as in Megatron-LM.
    with cpu_compat.hookless_ddp() if in_place else contextlib.nullcontext():
        ddp_chunks = [
            DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=index > 0)
            for index, chunk in enumerate(model_chunks)
        ]
    for chunk in ddp_chunks:
        chunk.grads_in_place = in_place  # TrainStep points param.grad at main_grad before each schedule
        if in_place:
            # The no-op hooks sit on the grad accumulators DDP keeps alive in `grad_accs` (its only
            # use); released, autograd makes fresh accumulators without hooks, and a backward no
            # longer calls into Python once per parameter (~0.4% of a shakespeare-char step).
            chunk.grad_accs.clear()
    model_chunks[:] = ddp_chunks
    optimizer_config = OptimizerConfig(
        optimizer="adam" if isinstance(torch_optimizer, torch.optim.AdamW) else "sgd",
        lr=torch_optimizer.defaults["lr"],
        weight_decay=torch_optimizer.defaults.get("weight_decay", 0.0),
        use_distributed_optimizer=distributed,
        bf16=config.bf16,
        fp16=False,
        params_dtype=config.params_dtype,
        clip_grad=0.0,  # TrainStep clips with the norm it already computed
    )
    if distributed:
        cpu_compat.fix_distributed_optimizer_checkpointing()
    expert_groups = [group for group in torch_optimizer.param_groups if group.get("is_expert_parallel")]
    if not any(group["params"] for group in expert_groups):  # a dense model, or frozen experts (LoRA)
        torch_optimizer.param_groups = [group for group in torch_optimizer.param_groups if not group.get("is_expert_parallel")]
        return _megatron_optimizer(torch_optimizer, ddp_chunks, optimizer_config, expert=False)
    # As megatron's get_megatron_optimizer: the routed experts' parameters live in their own DDP
    # buffers, reduced (and, distributed, sharded) over the expert-data-parallel group, so they
    # get an optimizer of their own; the two are chained. Both exist at every EP size (models.moe
    # tags experts at EP=1 too), so checkpoints have one layout.
    expert_optimizer = copy.copy(torch_optimizer)  # same class and hyperparameters, its own groups and state
    expert_optimizer.param_groups = expert_groups
    expert_optimizer.state = collections.defaultdict(dict)
    torch_optimizer.param_groups = [group for group in torch_optimizer.param_groups if not group.get("is_expert_parallel")]
    return ChainedOptimizer([
        _megatron_optimizer(torch_optimizer, ddp_chunks, optimizer_config, expert=False),
        _megatron_optimizer(expert_optimizer, ddp_chunks, optimizer_config, expert=True),
    ])


def _megatron_optimizer(torch_optimizer: torch.optim.Optimizer, ddp_chunks: list, optimizer_config: Any, *, expert: bool):
    """megatron's FP32Optimizer, Float16OptimizerWithFloat16Params or DistributedOptimizer over one set of buffers."""
    from megatron.core import parallel_state
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import FP32Optimizer, Float16OptimizerWithFloat16Params

    if optimizer_config.use_distributed_optimizer:
        if expert:
            group = parallel_state.get_expert_data_parallel_group(partial_expert_data_parallel=True)
            group_gloo = parallel_state.get_expert_data_parallel_group_gloo(partial_expert_data_parallel=True)
            index = parallel_state.get_expert_tensor_model_pipeline_parallel_group().rank()
        else:
            group = parallel_state.get_data_parallel_group(with_context_parallel=True, partial_data_parallel=True)
            group_gloo = parallel_state.get_data_parallel_group_gloo(with_context_parallel=True, partial_data_parallel=True)
            index = parallel_state.get_model_parallel_group().rank()
        optimizer = DistributedOptimizer(
            torch_optimizer,
            optimizer_config,
            None,  # no loss scaler: bf16 needs none
            _init_adam_state,
            model_chunks=ddp_chunks,
            per_model_buffers={i: chunk.expert_parallel_buffers if expert else chunk.buffers for i, chunk in enumerate(ddp_chunks)},
            data_parallel_group=group,
            data_parallel_group_gloo=group_gloo,
            data_parallel_group_idx=index,
            distributed_optimizer_instance_id=0,
        )
        optimizer.grad_stats_parallel_group = parallel_state.get_intra_distributed_optimizer_instance_group()
    elif optimizer_config.bf16:
        # It maps optimizer state to checkpoint entries through its bf16 parameters alone: an
        # fp32 one among them would shift every later entry.
        strays = [tuple(p.shape) for group in torch_optimizer.param_groups for p in group["params"] if p.dtype != torch.bfloat16]
        if strays:
            raise TypeError(f"precision bf16 trains bf16 parameters only; {len(strays)} are not (shapes {strays[:3]})")
        optimizer = Float16OptimizerWithFloat16Params(torch_optimizer, optimizer_config, None, _materialize_state)
        optimizer.grad_stats_parallel_group = parallel_state.get_model_parallel_group()
    else:
        optimizer = FP32Optimizer(torch_optimizer, optimizer_config, _materialize_state)
        optimizer.grad_stats_parallel_group = parallel_state.get_model_parallel_group()
    # Which ranks hold duplicates of a parameter that is not split: TrainStep counts each once.
    optimizer.tp_group = parallel_state.get_expert_tensor_parallel_group() if expert else parallel_state.get_tensor_model_parallel_group()
    optimizer.holds_experts = expert
    return optimizer


def sub_optimizers(optimizer) -> list:
    """The megatron optimizers inside `optimizer`: the dense one and, for an MoE model, the experts' one."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _init_adam_state(optimizer: torch.optim.Optimizer, config: Any = None) -> None:
    """Zero Adam moments for parameters without state (megatron's hook before a load)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if len(optimizer.state[param]) == 0:
                optimizer.state[param]["exp_avg"] = torch.zeros_like(param.data)
                optimizer.state[param]["exp_avg_sq"] = torch.zeros_like(param.data)


@torch.no_grad()
def _materialize_state(optimizer: torch.optim.Optimizer, config: Any = None) -> None:
    """Create any torch optimizer's state by one step at lr 0 (megatron's hook before a load).

    A fresh optimizer has no state, so a checkpoint load would not ask for its momenta and
    would silently start them at zero. The values are overwritten by the load.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if all(len(optimizer.state[p]) for p in params):
        return
    saved = [(group["lr"], group.get("weight_decay")) for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        if "weight_decay" in group:
            group["weight_decay"] = 0.0
    grads = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p, grad in zip(params, grads):
        p.grad = grad
    for group, (lr, weight_decay) in zip(optimizer.param_groups, saved):
        group["lr"] = lr
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
