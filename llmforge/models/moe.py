"""Mixture of experts: megatron-core's MoE layer, router and token dispatchers, as the spec sets them.

`config_options` turns the spec's `moe_*` keys into TransformerConfig fields; `gpt.layer_spec`
puts megatron's MoE MLP (a SequentialMLP of local experts: `moe_grouped_gemm` needs TE's or
the grouped_gemm package's kernels) on every `moe_layer_freq`-th layer. Expert parameters
are marked as megatron marks them under expert parallelism (`allreduce = False`) at every EP
size, EP=1 included, so that the DDP buffers, the chained optimizer and the checkpoints
have one structure whatever the layout (a checkpoint saved at EP=2 resumes at EP=1).

`ExpertLoad` counts the tokens each router sends to each expert, for the metrics: a
collapsing router shows as a max/min ratio that grows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from llmforge.spec.components import GPTModel
    from llmforge.spec.schema import ParallelismConfig

_EXPERTS = ".mlp.experts."


def config_options(options: GPTModel, parallelism: ParallelismConfig) -> dict[str, Any]:
    """TransformerConfig fields for the model's experts (none for a dense model)."""
    if getattr(options, "num_moe_experts", None) is None:
        return {}
    balancing = options.moe_router_load_balancing_type
    return {
        "num_moe_experts": options.num_moe_experts,
        "moe_router_topk": options.moe_router_topk,
        "moe_ffn_hidden_size": options.moe_ffn,
        "moe_shared_expert_intermediate_size": options.moe_shared_expert_intermediate_size,
        "moe_shared_expert_gate": options.moe_shared_expert_gate,
        "moe_router_load_balancing_type": balancing,
        # megatron adds the loss whenever the coefficient is positive, whatever the type says.
        "moe_aux_loss_coeff": 0.0 if balancing == "none" else options.moe_aux_loss_coeff,
        "moe_z_loss_coeff": options.moe_z_loss_coeff,
        "moe_router_pre_softmax": options.moe_router_pre_softmax,
        "moe_token_dispatcher_type": options.moe_token_dispatcher_type,
        "moe_expert_capacity_factor": options.moe_expert_capacity_factor,
        "moe_layer_freq": options.moe_layer_freq,
        "expert_model_parallel_size": parallelism.expert_model_parallel_size,
        "expert_tensor_parallel_size": parallelism.expert_tensor_parallel,
        # SequentialMLP: the grouped GEMM needs TE or the grouped_gemm package, and its
        # fused weights would change the checkpoint's layout between devices.
        "moe_grouped_gemm": False,
        "moe_permute_fusion": False,
        "moe_router_fusion": False,
    }


_fixed = False


def fix_router_losses_under_sequence_parallel() -> None:
    """Scale the router's losses per token over the whole sequence, not this rank's slice of it.

    With per-token loss (`calculate_per_token_loss`) megatron 0.16 multiplies the load-balancing
    and z losses by the tokens this rank routed, so that the grads' final division by the
    global token count leaves them at weight one. Under sequence parallelism a rank routes
    1/TP of the micro batch's tokens, and the losses' grads came out TP times too small
    (EP=2 × TP=2 was 1.7e-5 off one process by step 2; with the losses off, 1e-7): scale them
    by the tokens of the whole tensor-parallel group, which is what one process counts.
    """
    global _fixed
    if _fixed:
        return
    from megatron.core.transformer.moe.router import TopKRouter

    attach, z_loss = TopKRouter.attach_and_log_load_balancing_loss, TopKRouter.apply_z_loss

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
                                           reduce_group_has_dp=False, valid_token_count=None):
        if self.calculate_per_token_loss and reduce_group is self.tp_cp_group and valid_token_count is not None:
            valid_token_count = valid_token_count * reduce_group.size()
        return attach(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group, reduce_group_has_dp, valid_token_count)

    def apply_z_loss(self, logits, padding_mask=None):
        # megatron divides the coefficient by the TP × CP size, right for a mean loss; per token
        # it must not. The logged value divides by the same coefficient, so it is unchanged.
        coeff, size = self.config.moe_z_loss_coeff, self.tp_cp_group.size()
        if not self.calculate_per_token_loss or coeff is None or size == 1:
            return z_loss(self, logits, padding_mask)
        self.config.moe_z_loss_coeff = coeff * size
        try:
            return z_loss(self, logits, padding_mask)
        finally:
            self.config.moe_z_loss_coeff = coeff

    TopKRouter.attach_and_log_load_balancing_loss = attach_and_log_load_balancing_loss
    TopKRouter.apply_z_loss = apply_z_loss
    _fixed = True


def is_expert_param(name: str) -> bool:
    """A routed expert's parameter (not the router's, not a shared expert's)."""
    return _EXPERTS in f".{name}"


def mark_expert_params(model: torch.nn.Module) -> None:
    """Tag routed experts' parameters as megatron does under EP > 1, at EP=1 too.

    megatron's DDP puts `allreduce = False` parameters in their own buffer, reduced over the
    expert-data-parallel group (the data-parallel group when EP=1), and the optimizer keeps
    them in an optimizer of their own; tagging at every EP keeps that structure fixed.
    """
    for name, param in model.named_parameters():
        if is_expert_param(name):
            param.allreduce = False


class ExpertLoad:
    """Tokens routed to each expert of each MoE layer, counted by forward hooks on the routers.

    Counted only when the router trains with grad enabled, as megatron counts for its expert
    bias: full recompute runs forward twice, once without grad. Each layer's counts are a
    row of a [num_layers, experts] tensor on every rank; `fractions()` sums them over all
    ranks (a collective), which counts a token once per TP rank without sequence parallelism
    and once per stage's layers under PP: the fractions do not depend on either.
    """

    def __init__(self, chunks: list[torch.nn.Module], *, num_layers: int, num_experts: int, device: torch.device):
        from megatron.core.transformer.moe.router import TopKRouter

        from llmforge.models.init import unwrap

        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)
        self._handles = []
        for chunk in chunks:
            for layer in unwrap(chunk).decoder.layers:
                router = getattr(layer.mlp, "router", None)
                if isinstance(router, TopKRouter):
                    self._handles.append(router.register_forward_hook(self._hook(layer.layer_number - 1)))

    def _hook(self, layer: int):
        def count(module: torch.nn.Module, args, output) -> None:
            if module.training and torch.is_grad_enabled():
                self.counts[layer] += output[1].sum(dim=0).to(self.counts.dtype)

        return count

    @torch.no_grad()
    def fractions(self) -> dict[int, list[float]]:
        """{global layer: fraction of routed tokens per expert} since the last call, over all ranks; resets."""
        counts = self.counts.clone()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(counts)
        self.counts.zero_()
        totals = counts.sum(dim=1, keepdim=True)
        return {layer: (row / total).tolist() for layer, (row, total) in enumerate(zip(counts, totals)) if total.item() > 0}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def load_metrics(fractions: dict[int, list[float]]) -> dict[str, float]:
    """Flat metrics of the expert load: each layer's fractions and max/min ratio, and the worst ratio."""
    metrics: dict[str, float] = {}
    worst = 0.0
    for layer, row in sorted(fractions.items()):
        for expert, share in enumerate(row):
            metrics[f"moe/layer{layer}/expert{expert}_load"] = share
        ratio = max(row) / min(row) if min(row) > 0 else float("inf")
        metrics[f"moe/layer{layer}/load_max_min"] = ratio
        worst = max(worst, ratio)
    if fractions:
        metrics["moe/load_max_min"] = worst
    return metrics


class RouterMetrics:
    """What a train row says about an MoE model's routers since the previous row: `read()` (a collective).

    `steps` counts the train steps since then (the caller increments it): megatron's tracker
    sums the router losses over every micro batch of them.
    """

    def __init__(self, chunks: list[torch.nn.Module], options: GPTModel, *, micro_batches_per_step: int, device: torch.device):
        self.load = ExpertLoad(chunks, num_layers=options.num_layers, num_experts=options.num_moe_experts, device=device)
        self.moe_layers = sum(options.is_moe_layer(layer) for layer in range(options.num_layers))
        self.num_layers = options.num_layers
        # megatron's tracker names, and whether it sums them over TP × CP: what every rank must reduce,
        # also a pipeline stage without MoE layers (which never creates them).
        balancing = options.moe_router_load_balancing_type
        self.tracked = {name: reduced for name, reduced, on in (
            ("load_balancing_loss", True, balancing == "aux_loss" and options.moe_aux_loss_coeff > 0),
            ("seq_load_balancing_loss", True, balancing == "seq_aux_loss" and options.moe_aux_loss_coeff > 0),
            ("z_loss", False, bool(options.moe_z_loss_coeff)),
        ) if on}
        self.micro_batches_per_step = micro_batches_per_step
        self.steps = 0
        # megatron's tracker is global to the process: start from what this model routes.
        from megatron.core.transformer.moe import moe_utils

        moe_utils.clear_aux_losses_tracker()

    def read(self) -> dict[str, float]:
        metrics = aux_loss_metrics(self.tracked, num_layers=self.num_layers, moe_layers=self.moe_layers,
                                   num_micro_batches=self.micro_batches_per_step * max(self.steps, 1))
        metrics.update(load_metrics(self.load.fractions()))
        self.steps = 0
        return metrics


def aux_loss_metrics(tracked: dict[str, bool], *, num_layers: int, moe_layers: int, num_micro_batches: int) -> dict[str, float]:
    """The router losses megatron tracked since the last call, averaged per MoE layer and micro batch (a collective).

    megatron sums each layer's loss over micro batches into its tracker; its own reduction
    takes them over pipeline stages and data-parallel ranks. The tracker is cleared.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    for name, reduced in tracked.items():
        if name not in tracker:
            tracker[name] = {"values": torch.zeros(num_layers), "avg_group": None, "reduce_group_has_dp": False,
                             "reduce_group": parallel_state.get_tensor_and_context_parallel_group() if reduced else None}
    if "z_loss" in tracker:
        # megatron tracks each rank's own z-loss (a mean over its tokens) and averages it nowhere:
        # the mean over TP × DP ranks is the whole batch's, in any layout.
        tracker["z_loss"]["avg_group"] = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    names = sorted(tracked)
    moe_utils.reduce_aux_losses_tracker_across_ranks(names)
    shown = {"load_balancing_loss": "moe/aux_loss", "seq_load_balancing_loss": "moe/seq_aux_loss", "z_loss": "moe/z_loss"}
    metrics = {shown[name]: tracker[name]["values"].sum().item() / max(moe_layers, 1) / max(num_micro_batches, 1) for name in names}
    moe_utils.clear_aux_losses_tracker()
    return metrics
