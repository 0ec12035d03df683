"""`llmforge export hf SOURCE OUT_DIR --peft`: a LoRA checkpoint as a PEFT adapter directory.

OUT_DIR holds what `PeftModel.from_pretrained(base, OUT_DIR)` reads (`adapter_config.json`,
`adapter_model.safetensors`) plus the tokenizer files, and OUT_DIR/base holds the frozen base
model — the lora stage's init checkpoint, unmerged — as a normal HF model directory, which
`adapter_config.json` names as `base_model_name_or_path` so that
`AutoPeftModelForCausalLM.from_pretrained(OUT_DIR)` finds it. Both appear in one atomic rename.

megatron fuses linears that HF keeps apart (`linear_qkv` → q/k/v_proj, swiglu `linear_fc1`
→ gate/up_proj). y = W x + s B A x splits exactly: every HF module gets the same A and the
rows of B that its rows of W get, by the very permutation the weight export applies
(`hf_mapping`). PEFT's `lora_B` is [out, r] even on GPT-2's Conv1D (whose weight is stored
[in, out]), so the Conv1D transpose of the weight mapping is not applied to B. The scale
matches: llmforge's alpha / rank is PEFT's lora_alpha / r without rslora. Before anything is
published, PEFT itself, with the adapters on the written base, must compute what llmforge's
adapted model computes, unmerged (`verify`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    import torch

    from llmforge.interop.export import Source, Target
    from llmforge.spec.components import GPTModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_DIR = "base"
# PeftModel wraps the HF model twice (PeftModel.base_model → LoraModel.model); saved keys keep both.
PEFT_PREFIX = "base_model.model."
# Links whose HF weight is a Conv1D, stored [in, out]: the weight mapping transposes, lora_B does not.
_CONV1D = ("c_attn", "transpose")


def lora_meta(step_dir: Path) -> dict[str, Any]:
    """The checkpoint's `lora.json`; a UserError when it is not a `lora` stage's checkpoint."""
    from llmforge.finetune.checkpoints import LORA_META, read_meta

    if not (step_dir / LORA_META).is_file() or not (step_dir / "adapters").is_dir():
        raise UserError(f"{step_dir} is not a LoRA checkpoint (it lacks {LORA_META} or adapters/): --peft exports the adapters of a "
                        "`lora` stage's checkpoint",
                        "drop --peft to export this checkpoint as a full model, or pass the lora stage's checkpoint "
                        "(or `--stage <lora stage>` with the run dir)")
    return read_meta(step_dir / LORA_META)


def _stage_dropout(run_root: Path, stage: str) -> float:
    """The stage's `lora.dropout` from spec.resolved.yaml (lora.json does not record it), else the default."""
    import yaml

    from llmforge.spec.stages import LoRAConfig

    spec_path = run_root / "spec.resolved.yaml"
    spec = (yaml.safe_load(spec_path.read_text()) or {}) if spec_path.is_file() else {}
    for entry in spec.get("stages") or []:
        if isinstance(entry, dict) and entry.get("name") == stage and isinstance(entry.get("lora"), dict):
            return float(entry["lora"].get("dropout", LoRAConfig().dropout))
    return LoRAConfig().dropout


def adapter_tensors(module: torch.nn.Module, model: GPTModel, targets: list[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PEFT's adapter tensors (names as `save_pretrained` writes them) from a TP=1 adapted module.

    Returns:
        the tensors, and the HF module paths that carry an adapter.
    """
    from llmforge.finetune.lora import PREFIX, TARGETS
    from llmforge.interop.hf_mapping import dims, link_to_hf, links

    shape, table = dims(model), {link.megatron: link for link in links(model)}
    tensors: dict[str, torch.Tensor] = {}
    adapted: list[str] = []
    for index, layer in enumerate(module.decoder.layers):
        for target in targets:
            holder = TARGETS[target][0]
            adapter = getattr(getattr(layer, holder), PREFIX + target)
            link = table[f"decoder.layers.{index}.{holder}.{target}.weight"]
            rows = link_to_hf(link, adapter.B.detach(), shape)  # B has W's output rows: the same split and permutation
            if link.kind in _CONV1D:
                rows = tuple(t.t() for t in rows)
            for hf_weight, lora_b in zip(link.hf, rows, strict=True):
                path = hf_weight.removesuffix(".weight")
                tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = adapter.A.detach()
                tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = lora_b
                adapted.append(path)
    return tensors, adapted


def target_modules(adapted: list[str], model: GPTModel) -> list[str]:
    """The shortest names PEFT matches to exactly the adapted modules.

    PEFT adapts a module whose path ends with `.<target>`. Leaf names suffice for Llama; on
    GPT-2 `c_proj` is both the attention output and the MLP down projection, so when only one
    of them has an adapter it is named `attn.c_proj` or `mlp.c_proj`.
    """
    from llmforge.finetune.lora import TARGETS
    from llmforge.interop.hf_mapping import links

    linears = [name.removesuffix(".weight") for link in links(model) for name in link.hf
               if link.megatron.endswith(tuple(f".{target}.weight" for target in TARGETS))]
    chosen = set(adapted)
    names: set[str] = set()
    for path in adapted:
        parts = path.split(".")
        for length in range(1, len(parts) + 1):
            suffix = ".".join(parts[-length:])
            if all(p in chosen for p in linears if p == suffix or p.endswith("." + suffix)):
                names.add(suffix)
                break
    return sorted(names)


def adapter_config(model: GPTModel, meta: dict[str, Any], *, targets: list[str], dropout: float, base: str) -> dict[str, Any]:
    """`adapter_config.json`: the fields PEFT reads to rebuild the adapters (the rest take PEFT's defaults)."""
    from llmforge.interop.hf_config import architecture_of

    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "inference_mode": True,
        "r": meta["rank"],
        "lora_alpha": meta["alpha"],
        "lora_dropout": dropout,
        "use_rslora": False,  # llmforge scales by alpha / r, not alpha / sqrt(r)
        "target_modules": targets,
        # GPT-2's Conv1D stores its weight [in, out]; PEFT transposes B A when it merges.
        "fan_in_fan_out": architecture_of(model) == "gpt2",
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def export_peft(src: Source, target: Target, tokenizer, out_dir: Path, *, dtype: str, max_bytes: int, overwrite: bool,
                verify: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Write the LoRA checkpoint `src` as a PEFT adapter directory with its base in `out_dir/base`; returns a summary.

    With `verify`, PEFT's model (the adapters on the written base) must compute llmforge's
    unmerged LoRA logits before anything is published (`export.self_check`).
    """
    import torch
    from safetensors.torch import save_file

    from llmforge.finetune.checkpoints import attach_lora_from, base_of
    from llmforge.finetune.lora import is_adapter_key
    from llmforge.interop.export import forward_logits, self_check, write_model_dir, write_tokenizer
    from llmforge.interop.hf_files import staged_output, write_json
    from llmforge.interop.hf_mapping import canonical_megatron
    from llmforge.interop.model_io import load_module_weights, single_process_model, state_of
    from llmforge.interop.verify import compare, peft_logits, round_weights
    from llmforge.runtime.sharded_io import load_sharded

    model = target.model
    meta = lora_meta(src.step_dir)
    on_experts = sorted({"linear_fc1", "linear_fc2"} & set(meta["target_modules"]))
    if model.num_moe_experts is not None and on_experts:
        raise UserError(f"{src.step_dir}: --peft cannot write adapters on the experts' {' and '.join(on_experts)} (lora.target_modules): "
                        "transformers 5 keeps each layer's experts as one fused tensor, which PEFT's LoRA does not adapt",
                        "drop --peft to export the merged model, or train adapters on linear_qkv and linear_proj only")
    base = base_of(src.step_dir, meta)
    if not base.is_dir():
        raise UserError(f"{src.step_dir / 'lora.json'} names the base checkpoint {base}, which does not exist",
                        "--peft writes the base model too: restore the lora stage's init_from checkpoint, or drop --peft "
                        "if the checkpoint has a merged model/")
    dropout = _stage_dropout(src.run_root, src.step_dir.parent.name)
    with staged_output(out_dir, overwrite=overwrite) as tmp:
        module = single_process_model(model)
        load_module_weights(base, module)  # a base that is itself a LoRA checkpoint is merged: it is what stayed frozen
        base_weights = canonical_megatron(state_of(module))
        base_written = write_model_dir(tmp / BASE_DIR, base_weights.__getitem__, target, run_root=src.run_root, tokenizer=tokenizer,
                                       dtype=dtype, max_bytes=max_bytes)
        del base_weights
        attach_lora_from(meta, [module])
        # dist_checkpointing reassembles adapters saved at any TP layout: B by rows, A by columns.
        load_sharded(src.step_dir / "adapters", [module], None, select=is_adapter_key)
        tensors, adapted = adapter_tensors(module, model, meta["target_modules"])
        torch_dtype = getattr(torch, dtype)
        # Each entry its own storage: the split Bs are views of one tensor, and safetensors refuses shared storage.
        owned = {name: t.to(device="cpu", dtype=torch_dtype).contiguous().clone() for name, t in tensors.items()}
        save_file(owned, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        targets = target_modules(adapted, model)
        config = adapter_config(model, meta, targets=targets, dropout=dropout, base=str(out_dir.absolute() / BASE_DIR))
        write_json(tmp / ADAPTER_CONFIG, config)
        if tokenizer is not None:
            write_tokenizer(tmp, tokenizer, run_root=src.run_root, model=model)

        def check(ids):
            round_weights(module, dtype)  # base and adapters as the export holds them
            ours = forward_logits(module, ids)  # the adapted model, unmerged: W x + (alpha / r) B A x
            return compare(ours, peft_logits(tmp / BASE_DIR, tmp, ids), what=f"peft LoRA on transformers {target.family.hf_class}")

        verdict = self_check(check, model, needs=("transformers", "peft"), log=log) if verify else None
    return {
        **base_written,
        "weight_files": [ADAPTER_CONFIG, ADAPTER_WEIGHTS],
        "base_checkpoint": str(base),
        "base_dir": str(out_dir / BASE_DIR),
        "adapted_modules": len(adapted),
        "adapter_parameters": sum(t.numel() for t in tensors.values()),
        "peft": {k: config[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules")},
        "check": verdict,
    }
