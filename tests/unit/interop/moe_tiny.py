"""Tiny HF mixture-of-experts models of each MoE family, made by transformers itself and saved as
`save_pretrained` writes them (one tensor per expert). Nothing is downloaded.

Each has its family's real switches: Mixtral's untied, bias-free Mistral attention with the top 2
of 4 experts renormalised; Qwen3-MoE's q/k norms, wide heads and `norm_topk_prob: true` (as
Qwen3-30B-A3B); Qwen2-MoE's QKV bias, the softmax over all experts kept (`norm_topk_prob: false`)
and a shared expert behind its sigmoid gate. Routers start at std 0.5 so that tokens spread over
the experts; every 1-D weight is random. The tokenizers are families_tiny's, trained the family's way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .families_tiny import VOCAB, train_tokenizer
from .tiny import perturb_hf

FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe")
_SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
          "initializer_range": 0.1, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02}
_QWEN_ROPE = {"rope_type": "default", "rope_theta": 1000000.0}

# family → (config class, config, the dense family whose tokenizer it shares, HF class)
SPECS: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "mixtral": ("MixtralConfig", {**_SHAPE, "intermediate_size": 96, "num_local_experts": 4, "max_position_embeddings": 32768,
                                  "sliding_window": None, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
                                  "rope_parameters": _QWEN_ROPE}, "mistral", "MixtralForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", {**_SHAPE, "head_dim": 32, "intermediate_size": 160, "moe_intermediate_size": 48, "num_experts": 4,
                                     "norm_topk_prob": True, "max_position_embeddings": 40960, "use_sliding_window": False,
                                     "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_parameters": _QWEN_ROPE},
                  "qwen3", "Qwen3MoeForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", {**_SHAPE, "intermediate_size": 160, "moe_intermediate_size": 48, "shared_expert_intermediate_size": 80,
                                     "num_experts": 4, "norm_topk_prob": False, "max_position_embeddings": 32768,
                                     "use_sliding_window": False, "max_window_layers": 2, "tie_word_embeddings": False,
                                     "rms_norm_eps": 1e-6, "rope_parameters": _QWEN_ROPE}, "qwen2", "Qwen2MoeForCausalLM"),
}


def spread_routers(model) -> None:
    """Routers with std 0.5, so that each token's top 2 are clear of the third and the experts all get tokens."""
    import torch

    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def hf_moe_model(family: str, tokenizer, *, vocab_size: int = VOCAB):
    """A random transformers model of the MoE `family`, with random 1-D weights and routers, in fp32."""
    import torch
    import transformers

    class_name, options, _, _ = SPECS[family]
    torch.manual_seed(7)
    eos = tokenizer.eos_token_id
    config = getattr(transformers, class_name)(**{**options, "vocab_size": vocab_size}, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    perturb_hf(model)
    spread_routers(model)
    model.generation_config = transformers.GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos)
    return model.eval()


def save_moe_family(family: str, path: Path) -> Path:
    """The MoE family's tiny model and tokenizer, saved as transformers saves them."""
    tokenizer = train_tokenizer(SPECS[family][2])
    model = hf_moe_model(family, tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# family → the chat template fixture of its Instruct models (tests/unit/data/chat_fixtures.py)
CHAT_TEMPLATES = {"mixtral": "mistral", "qwen3_moe": "qwen3", "qwen2_moe": "qwen2.5"}


def save_chat_moe_family(family: str, root: Path) -> Path:
    """An Instruct-style MoE folder: the family's tiny model with the chat fixture's tokenizer and template."""
    import transformers

    from tests.unit.data.chat_fixtures import tokenizer_folder

    folder = tokenizer_folder(root, CHAT_TEMPLATES[family])
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    hf_moe_model(family, tokenizer, vocab_size=len(tokenizer)).save_pretrained(folder)
    return folder
