"""What the mixture-of-experts families (Mixtral, Qwen3-MoE, Qwen2-MoE) share: routed MLPs on the Llama layout.

On disk every expert is its own SwiGLU MLP. transformers 5 fuses a layer's experts into
`experts.gate_up_proj` / `experts.down_proj` in memory, but its `save_pretrained` (5.24, through
its conversion mapping; the version tested) writes them one expert at a time, under the names the
published checkpoints (written by 4.x) use: Mixtral's `block_sparse_moe.experts.{j}.w1/w3/w2` (gate, up,
down), the Qwens' `mlp.experts.{j}.gate_proj/up_proj/down_proj`. Those are the names read and
written here; megatron's SequentialMLP keeps the same per-expert tensors
(`mlp.experts.local_experts.{j}.linear_fc1` = `[gate; up]`, `linear_fc2`), and the router is one
[experts, hidden] matrix in both.

The router: HF takes a softmax over all experts, the top k, and (`norm_topk_prob`, always for
Mixtral) renormalises them; megatron's `moe_router_pre_softmax: false` takes the softmax over
the top k logits (the same numbers), `true` keeps the softmax over all unrenormalised. Every layer
must be sparse (megatron's `moe_layer_freq` counts layers from 0, HF's `decoder_sparse_step` from
1), and HF's experts keep every token (dropless). What else an HF config may say about routing
(another score function, grouped top-k, jitter) is refused by field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmforge.interop.families.base import Link, matrix
from llmforge.interop.families.llama import gated_mlp

if TYPE_CHECKING:
    from llmforge.spec.components import GPTModel

# Routing options of other MoE families' configs (DeepSeek, ...) that these routers do not compute.
_OTHER_ROUTING = {"scoring_func": "softmax", "topk_method": "greedy", "n_group": None, "topk_group": None, "routed_scaling_factor": 1.0}


def routing_problems(config: dict[str, Any], *, experts_key: str, renormalises: bool) -> list[str]:
    """The config's MoE settings llmforge cannot compute, each starting with its field."""
    out = []
    for key, plain in _OTHER_ROUTING.items():
        if key in config and config[key] != plain and config[key] is not None:
            out.append(f"{key} {config[key]!r} (llmforge's router takes a softmax of the router logits, top-k, as this family does)")
    experts, topk = config.get(experts_key), config.get("num_experts_per_tok")
    if not isinstance(experts, int) or experts < 2:
        out.append(f"{experts_key} {experts} (needs 2 or more experts)")
    if not isinstance(topk, int) or topk < 1 or (isinstance(experts, int) and topk > experts):
        out.append(f"num_experts_per_tok {topk} (needs 1 to {experts_key})")
    elif topk == 1 and renormalises:
        out.append("num_experts_per_tok 1 with renormalised top-k weights (each token's one expert weighs 1; megatron's "
                   "router refuses top-1 without moe_router_pre_softmax)")
    step = config.get("decoder_sparse_step", 1)
    if step != 1:
        out.append(f"decoder_sparse_step {step} (needs 1: every layer sparse, which is megatron's moe_layer_freq 1)")
    if config.get("mlp_only_layers"):
        out.append(f"mlp_only_layers {config['mlp_only_layers']} (needs []: every layer sparse)")
    jitter = config.get("router_jitter_noise", 0.0)
    if jitter:
        out.append(f"router_jitter_noise {jitter} (needs 0: megatron's router adds no jitter)")
    return out


def moe_options(config: dict[str, Any], *, experts_key: str, renormalises: bool) -> dict[str, Any]:
    """The `gpt` model's MoE options equal to the config's routing (after `routing_problems` found none)."""
    return {
        "num_moe_experts": config[experts_key],
        "moe_router_topk": config["num_experts_per_tok"],
        "moe_router_pre_softmax": not renormalises,
        "moe_router_load_balancing_type": "aux_loss",
        "moe_aux_loss_coeff": float(config.get("router_aux_loss_coef", 0.001)),
    }


def moe_misfits(model: GPTModel) -> list[str]:
    """What none of these families represents, whatever its switches."""
    out = []
    if model.num_moe_experts is None:
        out.append("num_moe_experts None (needs experts)")
        return out
    if model.moe_layer_freq != 1:
        out.append(f"moe_layer_freq {model.moe_layer_freq} (needs 1)")
    if model.moe_expert_capacity_factor is not None:
        out.append(f"moe_expert_capacity_factor {model.moe_expert_capacity_factor} (needs null: HF's experts drop no token)")
    return out


def routing_config(model: GPTModel) -> dict[str, Any]:
    """The routing keys every one of these families writes."""
    return {"num_experts_per_tok": model.moe_router_topk, "router_aux_loss_coef": model.moe_aux_loss_coeff,
            "output_router_logits": False}


def expert_links(model: GPTModel, layer: int, *, block: str, names: tuple[str, str, str]) -> list[Link]:
    """Layer `layer`'s router and routed experts, HF's under `model.layers.{layer}.{block}.` with (gate, up, down) `names`."""
    m, h = f"decoder.layers.{layer}.mlp.", f"model.layers.{layer}.{block}."
    out = [matrix(m + "router.weight", h + "gate.weight", model.num_moe_experts, model.hidden_size)]
    for j in range(model.num_moe_experts):
        out += gated_mlp(f"{m}experts.local_experts.{j}.", f"{h}experts.{j}.", names, model.hidden_size, model.moe_ffn)
    return out
