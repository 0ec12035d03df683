"""megatron-core under torch autocast with fp32 parameters (`precision: bf16-autocast`).

megatron's own mixed precision (`precision: bf16`) keeps bf16 parameters and needs none of
this; these pieces of megatron assume it, and are fixed here for autocast:

- Its linear autograd functions replay the *CUDA* autocast state in backward
  (`custom_bwd(device_type="cuda")`). Under CPU autocast the backward then multiplies a
  bf16 gradient by an fp32 weight and fails; on CPU they must follow CPU autocast.
- With sequence parallelism their backward reduce-scatters the bf16 input gradient into a
  buffer of the (fp32) input's dtype, which gloo and NCCL refuse. The gradient is cast to
  the buffer's dtype first; autograd would cast it to fp32 anyway.
- They save the uncast fp32 input and weight and cast both again in backward. Where the
  function has no communication to overlap (no TP all-reduce or SP gather inside it:
  TP=1, and every row-parallel layer), `F.linear` computes the same thing and autograd
  keeps autocast's bf16 copies for backward (a bf16 step of a 4-layer model: 258 copies
  instead of 312, and as fast as a plain PyTorch GPT).
- Full recompute (`CheckpointFunction`) replays each layer's forward in backward, where
  autocast is off (torch's own checkpoint restores it; megatron's does not need to, its
  parameters being bf16). The replay then multiplies the saved bf16 activations by fp32
  weights and fails, and would compute other numbers than the forward did; it replays
  under the forward's autocast state instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

_layers_patched = False
_autocast_devices: set[str] = set()


def _linear_functions_follow_autocast_of(device_type: str) -> None:
    from megatron.core.tensor_parallel import layers

    for klass in (layers.LinearWithGradAccumulationAndAsyncCommunication, layers.LinearWithFrozenWeight):
        forward = vars(klass)["forward"].__func__.__wrapped__
        backward = vars(klass)["backward"].__func__.__wrapped__
        klass.forward = staticmethod(torch.amp.custom_fwd(forward, device_type=device_type))
        klass.backward = staticmethod(torch.amp.custom_bwd(backward, device_type=device_type))


def _reduce_scatter_casts_to_output_dtype() -> None:
    from megatron.core.tensor_parallel import layers

    reduce_scatter = layers.dist_reduce_scatter_func

    def reduce_scatter_in_output_dtype(output, input, *args, **kwargs):
        return reduce_scatter(output, input.to(output.dtype), *args, **kwargs)

    layers.dist_reduce_scatter_func = reduce_scatter_in_output_dtype


def _communication_free_layers_use_f_linear() -> None:
    from megatron.core.tensor_parallel import layers

    for klass in (layers.ColumnParallelLinear, layers.RowParallelLinear):
        megatron_impl = klass._forward_impl

        def _forward_impl(self, input, weight, *args, _megatron_impl=megatron_impl, **kwargs):
            if kwargs.get("allreduce_dgrad") or kwargs.get("sequence_parallel") or kwargs.get("gradient_accumulation_fusion") or kwargs.get("grad_output_buffer") is not None:
                return _megatron_impl(self, input, weight, *args, **kwargs)
            return F.linear(input, weight, kwargs.get("bias"))

        klass._forward_impl = _forward_impl


def _autocast_as_now() -> Callable[[], contextlib.ExitStack]:
    """A context that brings back this moment's autocast state (of each device type whose state differs by then)."""
    now = {device: (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")}

    def restore() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for device, (enabled, dtype) in now.items():
            if (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) != (enabled, dtype):
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        return stack

    return restore


def _recompute_replays_under_forward_autocast() -> None:
    from megatron.core.tensor_parallel import random

    forward = random.CheckpointFunction.forward

    def forward_recording_autocast(ctx, run_function, distribute_saved_activations, *args):
        autocast = _autocast_as_now()

        def replay(*inputs):
            with autocast():
                return run_function(*inputs)

        return forward(ctx, replay, distribute_saved_activations, *args)

    random.CheckpointFunction.forward = staticmethod(forward_recording_autocast)


def install(device_type: str) -> None:
    """Make megatron's linear layers train under `device_type` autocast over fp32 weights (idempotent)."""
    global _layers_patched
    if not _layers_patched:
        _reduce_scatter_casts_to_output_dtype()
        _communication_free_layers_use_f_linear()
        _recompute_replays_under_forward_autocast()
        _layers_patched = True
    if device_type != "cuda" and device_type not in _autocast_devices:
        _linear_functions_follow_autocast_of(device_type)
        _autocast_devices.add(device_type)
