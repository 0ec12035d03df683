"""What megatron-core 0.16 needs to train on a machine without CUDA (gloo, CPU tensors).

Installed by `install()` only when CUDA is absent; on a GPU none of this runs. Each piece
names the megatron code that needs it (see ../shared/notes/megatron-on-cpu.md):

1. `torch.cuda` shims: p2p receive buffers, grad buffers, RoPE, SP mappings and tied
   embeddings under PP call `torch.cuda.current_device()`, `synchronize()`, `Tensor.cuda()`.
2. The pipeline schedules allocate a counter with `torch.zeros([], device="cuda")`: they
   get a `torch` whose `zeros` puts it on the CPU.
3. `CudaToCpuMode`, a TorchFunctionMode rewriting `device="cuda"` to CPU, wrapped around the
   megatron optimizer classes (`device='cuda'` literals, `param.type() == 'torch.cuda.FloatTensor'`).
4. A CPU RNG tracker: `model_parallel_cuda_manual_seed` calls `torch.cuda.manual_seed`, and
   activation recompute saves/restores the CUDA RNG state.
5. The DistributedOptimizer checkpoint fixes. These are megatron bugs with a plain torch Adam
   (no Apex/TE), so `fix_distributed_optimizer_checkpointing()` is also applied on a GPU.
6. MoE's alltoall token dispatcher copies its split sizes to the host on a side CUDA stream
   and hands gloo's `all_to_all_single` tensors where the binding wants int sequences: it
   gets no-op streams and numpy split sizes. With expert TP it gathers and reduce-scatters
   uneven splits over the expert-TP group, which gloo refuses (its all_gather needs equal
   sizes): padded gathers and an all-reduce stand in. `fix_moe_without_transformer_engine()` (any
   device) defines the `te_general_gemm` that megatron's router leaves undefined without TE.
7. Speed only, results unchanged (issue 31): the cross entropy's and `finalize_model_grads`'
   all-reduces over a group of one return at once, and the dense optimizers' per-step methods
   run outside CudaToCpuMode.

The SDPA core attention and the sequence-parallel torch norms (`llmforge.models.layers`) and
the autocast fixes (`llmforge.models.amp`) are not CPU-specific and live apart.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Callable

import torch
from torch.distributed import ReduceOp
from torch.overrides import TorchFunctionMode

from llmforge.runtime import host_collectives

_installed = False
_distopt_fixed = False
# Depth of nested CudaToCpuMode wrappers: entering the mode once is enough, and nesting
# would add a Python frame to every torch call.
_mode_depth = 0


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Maps `device="cuda"` (or an integer device) to CPU inside megatron code.

    It is not active inside autograd's backward, so code replayed there (recompute) must
    not depend on it; the RNG tracker below is patched directly for that reason.
    """

    def __torch_function__(self, func, arg_types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # The optimizer asserts `param.type() == 'torch.cuda.FloatTensor'`.
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def on_cpu(func: Callable) -> Callable:
    """Run `func` under CudaToCpuMode (once, however deeply such calls nest)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        global _mode_depth
        if _mode_depth:
            return func(*args, **kwargs)
        _mode_depth += 1
        try:
            with CudaToCpuMode():
                return func(*args, **kwargs)
        finally:
            _mode_depth -= 1

    return wrapper


def _install_cuda_shims() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    # LanguageModule.setup_embeddings_and_output_layer does `weight.data.cuda()` under PP.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


class _TorchForSchedules(types.ModuleType):
    """`torch` as megatron's pipeline schedules see it: `zeros(device="cuda")` lands on the CPU.

    Each schedule allocates its token counter with `torch.zeros([], device="cuda")`, even
    at PP=1. Rewriting that one call is enough; running the whole schedule under
    CudaToCpuMode would route every torch call of forward through Python (in one
    measurement a step of a 4-layer, hidden-128 model took 116 ms instead of 97 ms).
    """

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if _is_cuda_device(device) else device, **kwargs)


def _schedules_allocate_on_cpu() -> None:
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchForSchedules("torch")


class _HostStream:
    """A CUDA stream or event stand-in: CPU work is already in order, so there is nothing to wait for."""

    def __init__(self, *args, **kwargs):
        pass

    def synchronize(self) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def record_event(self, event=None) -> _HostStream:
        return _HostStream()

    def query(self) -> bool:
        return True


_HOST_STREAM = _HostStream()


class _CudaForMoE(types.ModuleType):
    """`torch.cuda` as the alltoall dispatcher sees it: streams and events that do nothing."""

    Stream = Event = _HostStream

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_stream(*args, **kwargs) -> _HostStream:
        return _HOST_STREAM

    @staticmethod
    def stream(stream) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class _TorchForMoE(types.ModuleType):
    cuda = _CudaForMoE("torch.cuda")

    def __getattr__(self, name: str):
        return getattr(torch, name)


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    # On the GPU megatron copies split sizes to the host as numpy arrays; on the CPU it leaves
    # them tensors, which gloo's all_to_all_single binding rejects as split sizes.
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def _moe_dispatch_on_cpu() -> None:
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.torch = _TorchForMoE("torch")
    token_dispatcher.maybe_move_tensor_to_cpu = _host_copy


def _uneven_collectives_on_gloo() -> None:
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        padded = input_.new_zeros([max(sizes), *input_.shape[1:]])
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        start = sum(sizes[: group.rank()])
        return total[start : start + sizes[group.rank()]].clone()

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


class _CachingTorch(types.ModuleType):
    """`torch` for one megatron module: each attribute is looked up once, and `distributed` is replaced."""

    def __init__(self, name: str, distributed: types.ModuleType) -> None:
        super().__init__(name)
        self.distributed = distributed

    def __getattr__(self, name: str):
        value = getattr(torch, name)
        setattr(self, name, value)
        return value


class _DistributedWithoutGroupsOfOne(types.ModuleType):
    """`torch.distributed` whose blocking all-reduce and broadcast over a group of one process return at once.

    A sum (or max) over one process is the tensor itself, and a broadcast from the only rank
    changes nothing, so nothing changes but the time: on gloo each such call goes through c10d,
    and at TP=1, DP=1 megatron makes six a step (its vocab-parallel cross entropy three,
    finalize_model_grads two all-reduces and a broadcast of the token count over the PP group).
    """

    def __getattr__(self, name: str):
        value = getattr(torch.distributed, name)
        setattr(self, name, value)
        return value

    @staticmethod
    def all_reduce(tensor, *args, group=None, async_op=False, **kwargs):
        if group is not None and not async_op and not args and group.size() == 1:
            return None
        # Ranks on one host: through shared memory (runtime.host_collectives), not loopback TCP.
        op = kwargs.get("op", ReduceOp.SUM)
        if not args and (host := host_collectives.takes(group, tensor, op, async_op)) is not None:
            host.all_reduce(tensor, op)
            return None
        return torch.distributed.all_reduce(tensor, *args, group=group, async_op=async_op, **kwargs)

    @staticmethod
    def broadcast(tensor, src=None, group=None, async_op=False, **kwargs):
        # Over a group of one the source is this rank: the tensor already holds what it would receive.
        # finalize_model_grads broadcasts the token count over the PP group every step (0.1-0.3 ms on gloo).
        if group is not None and not async_op and group.size() == 1:
            return None
        return torch.distributed.broadcast(tensor, src, group=group, async_op=async_op, **kwargs)


@contextlib.contextmanager
def _coalescing_unless_one(group=None, device=None, async_ops=False):
    """torch's `_coalescing_manager`, or nothing for a blocking one over a group of one process:
    what it would coalesce is a list of all-reduces that return at once (above)."""
    if group is not None and not async_ops and (group.size() == 1 or host_collectives.for_group(group) is not None):
        yield None  # each all-reduce inside returns at once, or goes through shared memory on its own
        return
    with torch.distributed._coalescing_manager(group, device, async_ops) as cm:
        yield cm


def _identity_unless_parallel(function: Callable) -> Callable:
    """A TP-region mapping (an autograd Function) that is the identity over a TP group of one.

    At TP=1 `copy_to_...` and `reduce_from_tensor_model_parallel_region` return their input
    forward and backward, but each costs a Python Function call both ways (~18 a step for a
    4-layer model); the tensor itself is what they would return.
    """

    @functools.wraps(function)
    def mapping(input_, group=None, *args, **kwargs):
        if group is not None and group.size() == 1:
            return input_
        return function(input_, group, *args, **kwargs)

    return mapping


def _skip_collectives_of_one() -> None:
    import importlib

    from megatron.core.tensor_parallel import layers

    distributed = _DistributedWithoutGroupsOfOne("torch.distributed")
    # By module path: the package re-exports a function under the module's name.
    modules = {name: importlib.import_module(f"megatron.core.{name}")
               for name in ("tensor_parallel.cross_entropy", "distributed.finalize_model_grads", "distributed.param_and_grad_buffer")}
    for module in modules.values():
        module.torch = _CachingTorch("torch", distributed)
    modules["distributed.param_and_grad_buffer"]._coalescing_manager = _coalescing_unless_one
    # The linear layers and the vocab-parallel embedding call these by the names imported into `layers`.
    for name in ("copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region"):
        setattr(layers, name, _identity_unless_parallel(getattr(layers, name)))


def _skip_router_resets_without_moe() -> None:
    """`finalize_model_grads` walks every module each step to reset MoE router state (expert-bias
    token counts, the global aux-loss tracker); a config that asks for neither has none to reset."""
    import importlib

    finalize_model_grads = importlib.import_module("megatron.core.distributed.finalize_model_grads")  # the module, not the function
    reset = finalize_model_grads.reset_model_temporary_tensors

    @functools.wraps(reset)
    def reset_if_routed(config, model):
        balancing = config.moe_router_load_balancing_type
        if config.moe_router_enable_expert_bias or balancing == "global_aux_loss" or "global_aux_loss" in balancing:
            reset(config, model)

    finalize_model_grads.reset_model_temporary_tensors = reset_if_routed


def _noop_grad_hook(*unused) -> None:
    """DDP's per-parameter hook where autograd accumulates into `main_grad` itself (`hookless_ddp`)."""


@contextlib.contextmanager
def hookless_ddp():
    """Build megatron DDP modules whose backward hooks do nothing (piece 8).

    Their hook moves each new grad into `param.main_grad` (an add_) and drops `param.grad`,
    so that DP can reduce the contiguous buffer. With no DP to reduce over and fp32
    parameters, `param.grad` can *be* `main_grad` (TrainStep sets it before each schedule):
    autograd's accumulator adds into it in place, the same sum with no Python per parameter.
    The hooks are registered in DDP's constructor and megatron keeps no handles to remove
    them, so the constructor is given this no-op instead.
    """
    from megatron.core.distributed import distributed_data_parallel

    klass = distributed_data_parallel.DistributedDataParallel
    original = klass._make_backward_post_hook
    klass._make_backward_post_hook = lambda self, param: _noop_grad_hook
    try:
        yield
    finally:
        klass._make_backward_post_hook = original


def installed() -> bool:
    """True once install() put the CPU layer in place (this machine has no CUDA)."""
    return _installed


def fix_moe_without_transformer_engine() -> None:
    """megatron 0.16's moe_utils imports `te_general_gemm` only when TE imports and never defines
    it otherwise, so the router's gating linear raises NameError; None selects its torch matmul."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# What a step calls on the dense optimizers (and nothing else needs): none of it names a CUDA
# device in megatron 0.16 (one that did would raise here, there is no CUDA), and outside the mode
# each of its torch calls skips a Python frame (~0.5 ms of a hidden-128 step).
_STEP_METHODS = frozenset({
    "zero_grad", "prepare_grads", "step_with_ready_grads", "get_main_grads_for_grad_norm", "get_parameters",
    "_copy_model_grads_to_main_grads", "_copy_main_params_to_model_params", "_unscale_main_grads_and_check_for_nan",
    "_collect_main_grad_data_for_unscaling", "_get_model_and_main_params_data_float16",
})


def _wrap_optimizers() -> None:
    from megatron.core.optimizer import distrib_optimizer, optimizer

    classes = (
        optimizer.MegatronOptimizer,
        optimizer.MixedPrecisionOptimizer,
        optimizer.FP32Optimizer,
        optimizer.Float16OptimizerWithFloat16Params,
        optimizer.ChainedOptimizer,
        distrib_optimizer.DistributedOptimizer,
    )
    distributed = distrib_optimizer.DistributedOptimizer
    for klass in classes:
        for name, attr in list(vars(klass).items()):
            if callable(attr) and not isinstance(attr, (type, staticmethod, classmethod)) and (
                name == "__init__" or not name.startswith("__")
            ) and (name not in _STEP_METHODS or klass is distributed):
                setattr(klass, name, on_cpu(attr))
    # The DistributedOptimizer keeps all of its methods in the mode, the inherited ones too.
    for name in _STEP_METHODS:
        if name not in vars(distributed) and hasattr(distributed, name):
            setattr(distributed, name, on_cpu(getattr(distributed, name)))


# --- RNG on the CPU default generator ---------------------------------------------------


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random

    class CPURNGStatesTracker(random.CudaRNGStatesTracker):
        """megatron's tracker on torch's CPU generator: `fork()` swaps named states in and out."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise ValueError(f"rng seed {seed} already exists")
            if name in self.states_:
                raise ValueError(f"rng state {name} already exists")
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name: str = random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise ValueError(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    return CPURNGStatesTracker


def _install_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random

    # CheckpointFunction (recompute) saves and restores the "CUDA" state through these.
    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state
    random._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker_class()()
    random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def seed_cpu_rng_tracker(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int | None = None) -> None:
    """CPU twin of megatron's `model_parallel_cuda_manual_seed`, with its seed offsets.

    Dropout inside TP regions forks `seed + 2718 + tp_rank` so that TP shards draw
    different masks; the default stream stays identical across TP ranks.
    """
    from megatron.core.tensor_parallel import random

    tracker = random._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    tracker.add(random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    # megatron's expert stream: `seed + 1024 + 100 * ep_rank + etp_rank` (expert TP defaults to TP).
    tracker.add(random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + (tp_rank if etp_rank is None else etp_rank))


def _eager(model: Any = None, **options: Any) -> Any:
    """`torch.compile`'s signature, compiling nothing: megatron's `@jit_fuser` keeps its function."""
    return model if model is not None else (lambda fn: fn)


def _import_megatron_with_eager_jit() -> None:
    """Import megatron-core with `jit_fuser` bound to `_eager` (piece 9).

    `megatron.core.jit` reads `torch.compile` once, when megatron-core's package import
    reaches it, and every fusion module decorates with it then; so `torch.compile` is
    swapped for exactly that import. If megatron is already imported (a plugin or a test got
    there first) its decorations stand; only later ones turn eager.
    """
    import sys

    jit = sys.modules.get("megatron.core.jit")
    if jit is not None:
        jit.jit_fuser = _eager
        return
    compile_ = torch.compile
    torch.compile = _eager
    try:
        import megatron.core.jit  # noqa: F401  (imports megatron-core)
    finally:
        torch.compile = compile_


def install() -> bool:
    """Install every CPU piece once; a no-op (returning False) when CUDA is available."""
    global _installed
    if torch.cuda.is_available():
        return False
    if not _installed:
        _import_megatron_with_eager_jit()
        _install_cuda_shims()
        _schedules_allocate_on_cpu()
        _wrap_optimizers()
        _install_cpu_rng_tracker()
        _moe_dispatch_on_cpu()
        _uneven_collectives_on_gloo()
        _skip_collectives_of_one()
        _skip_router_resets_without_moe()
        _installed = True
    return True


# --- DistributedOptimizer checkpointing with a plain torch Adam -------------------------


def fix_distributed_optimizer_checkpointing() -> None:
    """Patch two megatron 0.16 bugs hit when the DistributedOptimizer wraps torch's AdamW.

    - `_set_main_param_and_optimizer_states` copies every state key, but the fully
      reshardable load leaves out `step`: KeyError. Copy only the keys that were loaded.
    - `load_state_dict` puts one shared `step` tensor into every parameter's state, and
      torch Adam increments it in place once per parameter: the first resumed step uses a
      wrong bias correction (3e-2 off, silently). Give each parameter its own copy.
    """
    global _distopt_fixed
    if _distopt_fixed:
        return
    from megatron.core.optimizer import distrib_optimizer

    klass = distrib_optimizer.DistributedOptimizer
    original_set = klass._set_main_param_and_optimizer_states
    original_load = klass.load_state_dict

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original_set(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        targets = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            targets[key].copy_(value)

    @functools.wraps(original_load)
    def load_state_dict(self, state_dict):
        result = original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        return result

    klass._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    klass.load_state_dict = load_state_dict
    _distopt_fixed = True


def prepare_distributed_optimizer_for_load(optimizer) -> None:
    """A fresh DistributedOptimizer has no Adam state, and its `state_dict()` asserts one
    common `step`: materialize the state before asking for the sharded state dict to load."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(inner, "_init_optimizer_states_with_dummy_values") and len(inner.optimizer.state) == 0:
            inner._init_optimizer_states_with_dummy_values()
