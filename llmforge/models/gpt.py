"""The built-in `gpt` model: a megatron-core GPTModel built from the spec's `model` section.

`build_gpt` returns this rank's model chunks (one per virtual pipeline stage) after
`llmforge.runtime.distributed.init_distributed` has set up megatron's parallel state. The
layers come from a ModuleSpec: TransformerEngine's when it is importable on a GPU, else
megatron's local spec with SDPA attention and torch norms (`llmforge.models.layers`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    from megatron.core.transformer.transformer_config import TransformerConfig

    from llmforge.spec.components import GPTModel
    from llmforge.spec.schema import ParallelismConfig

PRECISIONS = ("fp32", "bf16", "bf16-autocast", "fp8")
MEGATRON_BF16 = ("bf16", "fp8")  # bf16 parameters in megatron's Float16Module; fp8 adds TE's FP8 matmuls


def params_dtype(precision: str) -> torch.dtype:
    """The dtype of the model's parameters: bf16 under megatron's mixed precision (`bf16`, and `fp8` on top of it)."""
    return torch.bfloat16 if precision in MEGATRON_BF16 else torch.float32


def _activation(options: GPTModel) -> tuple[object, bool]:
    """(activation function, gated) for the options' `activation`."""
    if options.activation == "swiglu":
        return F.silu, True
    if options.activation == "gelu_tanh":
        return functools.partial(F.gelu, approximate="tanh"), False
    return F.gelu, False


def _left_to_llmforge_init(weight: torch.Tensor) -> None:
    """megatron's init hook, a no-op: `llmforge.models.init` fills the weights afterwards."""


def check_layout(options: GPTModel, parallelism: ParallelismConfig) -> None:
    """Shape constraints of a TP/PP/VPP layout, as errors that say which key to change."""
    tp = parallelism.tensor_model_parallel_size
    stages = parallelism.pipeline_model_parallel_size * (parallelism.virtual_pipeline_model_parallel_size or 1)
    problems = []
    if options.num_layers % stages:
        problems.append(f"model.num_layers {options.num_layers} is not divisible by pipeline × virtual pipeline stages {stages}")
    for key, value in (
        ("num_attention_heads", options.num_attention_heads),
        ("num_query_groups", options.kv_groups),
        ("ffn_hidden_size", options.ffn),
        ("vocab_size", options.vocab_size),
    ):
        if value % tp:
            problems.append(f"model.{key} {value} is not divisible by tensor_model_parallel_size {tp}")
    problems += _expert_layout_problems(options, parallelism)
    if problems:
        raise UserError(
            "; ".join(problems),
            hint="pick a parallelism layout that divides the model (pad vocab_size to a multiple of 128, e.g. 50304 for GPT-2)",
        )


def _expert_layout_problems(options: GPTModel, parallelism: ParallelismConfig) -> list[str]:
    experts = getattr(options, "num_moe_experts", None)
    ep, etp = parallelism.expert_model_parallel_size, parallelism.expert_tensor_parallel
    if experts is None:
        return [f"parallelism.expert_model_parallel_size {ep} needs model.num_moe_experts"] if ep > 1 else []
    problems = []
    if experts % ep:
        problems.append(f"model.num_moe_experts {experts} is not divisible by expert_model_parallel_size {ep}")
    if options.moe_ffn % etp:
        problems.append(f"the experts' MLP width {options.moe_ffn} is not divisible by expert_tensor_parallel_size {etp}")
    if parallelism.tensor_model_parallel_size > 1 and not parallelism.sequence_parallel:
        problems.append("MoE layers with tensor_model_parallel_size > 1 need sequence_parallel (as in Megatron-LM)")
    return problems


def fp8_refusal(precision: str) -> str | None:
    """Why this process cannot train in `precision` fp8 (None when it can): FP8 is TE's, on CUDA."""
    if precision != "fp8":
        return None
    if not torch.cuda.is_available():
        return "precision fp8 runs on CUDA GPUs (TransformerEngine's FP8 matmuls); this process has no CUDA device"
    if not _use_transformer_engine():
        return "precision fp8 runs through TransformerEngine, which does not import here"
    return None


def transformer_config(options: GPTModel, parallelism: ParallelismConfig, *, precision: str,
                       fp8: dict[str, object] | None = None) -> TransformerConfig:
    """megatron's TransformerConfig for the options and layout (fusions off: see below).

    Args:
        fp8: megatron's fp8 fields (`TrainConfig.fp8_options()`), with precision "fp8" only.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    from llmforge.models import moe

    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not supported", hint=f"use one of {', '.join(PRECISIONS)}")
    if reason := fp8_refusal(precision):
        raise UserError(reason, 'train in precision fp8 on a CUDA machine with pip install -e ".[gpu]", or use precision: bf16 here')
    activation, gated = _activation(options)
    recompute = parallelism.recompute_granularity
    vpp = parallelism.virtual_pipeline_model_parallel_size
    return TransformerConfig(
        num_layers=options.num_layers,
        hidden_size=options.hidden_size,
        num_attention_heads=options.num_attention_heads,
        num_query_groups=options.kv_groups,
        kv_channels=options.kv_channels,
        ffn_hidden_size=options.ffn,
        normalization=options.normalization,
        layernorm_epsilon=options.norm_epsilon,
        activation_func=activation,
        gated_linear_unit=gated,
        add_bias_linear=options.add_bias_linear,
        add_qkv_bias=options.add_qkv_bias,
        # Also what makes finalize_model_grads sum the q/k norms' grads over TP: each rank
        # normalizes only its own heads with the one shared weight.
        qk_layernorm=options.qk_layernorm,
        hidden_dropout=options.hidden_dropout,
        attention_dropout=options.attention_dropout,
        init_method_std=options.init_method_std,
        # The layout must be in the config as well as in parallel_state: otherwise every
        # PP rank silently builds all layers.
        tensor_model_parallel_size=parallelism.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallelism.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=parallelism.sequence_parallel,
        # Batched p2p with VPP at PP=2 mixes up send_prev and send_next (prev and next are
        # the same rank; NVIDIA/Megatron-LM#750): wrong losses, no error.
        batch_p2p_comm=vpp is None,
        deallocate_pipeline_outputs=parallelism.pipeline_model_parallel_size > 1,
        recompute_granularity=None if recompute == "none" else recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        # `bf16` is megatron's mixed precision (Megatron-LM's --bf16): bf16 parameters and
        # activations, also between pipeline stages; the optimizer keeps fp32 master weights
        # (runtime.optim). `bf16-autocast` keeps fp32 parameters and computes under torch
        # autocast (TrainStep); its stages pass fp32.
        bf16=precision in MEGATRON_BF16,
        # FP8 (TE's recipe under megatron's names): TransformerBlock enters the fp8 context per forward.
        **(fp8 or {}),
        params_dtype=params_dtype(precision),
        pipeline_dtype=params_dtype(precision),
        autocast_dtype=torch.float32 if precision == "fp32" else torch.bfloat16,
        # Loss is summed over tokens and the grads divided by the global token count, so
        # micro batches with different numbers of target tokens weigh correctly.
        calculate_per_token_loss=True,
        # Initialization is ours (llmforge.models.init), layout-invariant. megatron's own
        # pass still runs, with a no-op method, because it is what tags each weight with
        # its TP partition dim and stride (perform_initialization=False leaves them
        # untagged: grad norms and DistOpt then treat TP shards as duplicates). Allocating
        # "on the GPU" keeps it from building a full master weight per rank on CPU; the
        # CUDA shims map that allocation to the CPU.
        perform_initialization=True,
        use_cpu_initialization=False,
        init_method=_left_to_llmforge_init,
        output_layer_init_method=_left_to_llmforge_init,
        embedding_init_method=_left_to_llmforge_init,
        # megatron's jit_fuser is torch.compile: the first CPU step took 17.5 s with
        # bias_activation_fusion, and the fused GELU is the tanh approximation.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **moe.config_options(options, parallelism),
    )


def _use_transformer_engine() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _one_layer_spec(config: TransformerConfig, num_experts: int | None):
    from megatron.core.models.gpt import gpt_layer_specs

    if _use_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=config.qk_layernorm)

    from llmforge.models.layers import SDPACoreAttention, TorchNorm

    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, normalization=config.normalization, qk_layernorm=config.qk_layernorm)
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = SDPACoreAttention
    if config.qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = TorchNorm
    spec.submodules.input_layernorm = TorchNorm
    spec.submodules.pre_mlp_layernorm = TorchNorm
    return spec


def layer_spec(config: TransformerConfig, num_layers: int, *, first_layer: int = 0, moe_layer: Callable[[int], bool] | None = None):
    """The decoder block spec of `num_layers` layers from global layer `first_layer`: TE layers on a
    GPU with TE, else local layers with SDPA; layers where `moe_layer` says so get megatron's MoE MLP."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    dense = _one_layer_spec(config, None)
    routed = _one_layer_spec(config, config.num_moe_experts) if config.num_moe_experts else dense
    specs = [routed if moe_layer is not None and moe_layer(first_layer + i) else dense for i in range(num_layers)]
    if _use_transformer_engine():
        return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(layer_specs=specs))

    from llmforge.models.layers import TorchNorm

    # A block spec, so that the final norm is ours too (megatron's default refuses SP).
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(layer_specs=specs, layer_norm=TorchNorm))


def build_gpt(options: GPTModel, parallelism: ParallelismConfig, *, precision: str, seed: int,
              fp8: dict[str, object] | None = None) -> list[torch.nn.Module]:
    """This rank's model chunks, initialized layout-invariantly from `seed`.

    Args:
        parallelism: the spec's layout; megatron's parallel_state must already match it
            (`init_distributed`).
        precision: "fp32"; "bf16" (bf16 parameters, each chunk inside megatron's
            `Float16Module`, which also hands the last stage's outputs back in fp32); or
            "bf16-autocast" (fp32 parameters, bf16 compute under TrainStep's autocast); or "fp8"
            ("bf16" with TE layers whose matmuls run in FP8; CUDA with TransformerEngine only).
        fp8: megatron's fp8 recipe fields, given with precision "fp8" (`TrainConfig.fp8_options()`).
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from llmforge.models import amp, cpu_compat, moe
    from llmforge.models.init import initialize
    from llmforge.models.layers import GPTModel  # megatron's, with RoPE that can follow restarted positions

    check_layout(options, parallelism)
    config = transformer_config(options, parallelism, precision=precision, fp8=fp8)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    amp.install(device.type)
    if config.num_moe_experts:
        cpu_compat.fix_moe_without_transformer_engine()
        moe.fix_router_losses_under_sequence_parallel()
    vpp = parallelism.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(config, get_num_layers_to_build(config, vp_stage=vp_stage),
                                              first_layer=get_transformer_layer_offset(config, vp_stage=vp_stage),
                                              moe_layer=getattr(options, "is_moe_layer", None)),
            vocab_size=options.vocab_size,
            max_sequence_length=options.max_positions,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=not options.untie_embeddings_and_output_weights,
            position_embedding_type=options.position_embedding_type,
            rotary_base=options.rotary_base,
            rope_scaling=options.rope_scaling_factor is not None,
            rope_scaling_factor=options.rope_scaling_factor or 1.0,  # read only with rope_scaling
            vp_stage=vp_stage,
        )
        model = model.to(device)
        if not _use_transformer_engine():
            from llmforge.models.lean import LeanTransformerBlock

            # megatron's GPTModel always builds a plain TransformerBlock; the lean one is that
            # class with another forward (no state of its own), batch-first where the layout allows.
            model.decoder.__class__ = LeanTransformerBlock
        moe.mark_expert_params(model)
        # Float16Module casts what megatron built in fp32 (torch norms, learned positions) to bf16.
        chunks.append(Float16Module(config, model) if config.bf16 else model)
    # Drawn in fp32 and rounded, so bf16 weights are the fp32 run's, rounded, in every layout.
    initialize(chunks, num_layers=options.num_layers, init_method_std=options.init_method_std, seed=seed)
    return chunks
