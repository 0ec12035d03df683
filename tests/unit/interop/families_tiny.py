"""Tiny HF models of each family, made by transformers itself, with a small trained byte-level
BPE tokenizer, saved as `save_pretrained` writes them. Nothing is downloaded.

Each has its family's real switches: Llama 3.2's RoPE (llama3 scaling, factor 32, θ = 500000)
and tied embeddings with two eos ids in generation_config.json; Mistral v0.3's untied, bias-free
layout with `sliding_window: null` and θ = 1e6; Qwen2.5's QKV bias, tied embeddings and θ = 1e6;
Qwen3's q/k norms and heads twice hidden_size / num_attention_heads wide. Every 1-D weight
(norms, biases, q/k norms) is random, so a dropped or misplaced one shows in the logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .tiny import perturb_hf

VOCAB = 320  # tokenizer and embedding rows alike: transformers never masks ids past the tokenizer
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
PROMPT = "The quick brown fox"
# Enough text that the BPE learns merges; the reserved tokens fill the vocabulary up to VOCAB.
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Llamas and qwens generate text, token by token.",
         "1234 + 5678 = 6912; brown foxes are quick.", "Mistral winds blow over the lazy llama."] * 10
_SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
          "vocab_size": VOCAB, "initializer_range": 0.1}
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}

# family → (config class, config, tokenizer: specials, bos, eos, how BOS gets added, generation eos)
SPECS: dict[str, dict[str, Any]] = {
    "llama": {"config": ("LlamaConfig", {**_SHAPE, "max_position_embeddings": 131072, "rope_parameters": _LLAMA3_ROPE,
                                         "tie_word_embeddings": True, "rms_norm_eps": 1e-5}),
              "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], "bos": "<|begin_of_text|>", "eos": "<|eot_id|>",
              "bos_by": "post_processor", "stops": ["<|end_of_text|>", "<|eot_id|>"]},
    "mistral": {"config": ("MistralConfig", {**_SHAPE, "max_position_embeddings": 32768, "sliding_window": None,
                                             "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                                             "tie_word_embeddings": False, "rms_norm_eps": 1e-5}),
                "specials": ["<unk>", "<s>", "</s>"], "bos": "<s>", "eos": "</s>", "bos_by": "post_processor", "stops": ["</s>"],
                # As Mistral v0.3's tokenizer_config.json says it, agreeing with its post-processor.
                "tokenizer_config": {"add_bos_token": True, "add_eos_token": False}},
    "qwen2": {"config": ("Qwen2Config", {**_SHAPE, "max_position_embeddings": 32768, "use_sliding_window": False,
                                         "sliding_window": 32768, "max_window_layers": 2, "tie_word_embeddings": True,
                                         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "rms_norm_eps": 1e-6}),
              "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "bos": None, "eos": "<|endoftext|>", "bos_by": None,
              "stops": ["<|endoftext|>"]},
    "qwen3": {"config": ("Qwen3Config", {**_SHAPE, "head_dim": 32, "max_position_embeddings": 40960, "use_sliding_window": False,
                                         "max_window_layers": 2, "tie_word_embeddings": True, "attention_bias": False,
                                         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "rms_norm_eps": 1e-6}),
              "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "bos": None, "eos": "<|im_end|>", "bos_by": None,
              "stops": ["<|im_end|>"]},
}


def train_tokenizer(family: str):
    """A byte-level BPE trained on TEXTS, as a transformers tokenizer set up the family's way."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    spec = SPECS[family]
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=spec["specials"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(TEXTS, trainer)
    hf.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(VOCAB - hf.get_vocab_size())])
    assert hf.get_vocab_size() == VOCAB
    bos = spec["bos"]
    if spec["bos_by"] == "post_processor":  # Llama 3, Mistral: tokenizer.json's own template adds BOS
        hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, hf.token_to_id(bos))])
    else:  # Qwen's post-processor adds nothing
        hf.post_processor = processors.ByteLevel(trim_offsets=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token=bos, eos_token=spec["eos"])


def hf_family_model(family: str, tokenizer):
    """A random transformers model of `family` with random 1-D weights and its generation config."""
    import torch
    import transformers

    spec = SPECS[family]
    class_name, options = spec["config"]
    torch.manual_seed(7)
    stops = [tokenizer.convert_tokens_to_ids(t) for t in spec["stops"]]
    config = getattr(transformers, class_name)(**options, bos_token_id=tokenizer.bos_token_id, eos_token_id=stops[0])
    model = transformers.AutoModelForCausalLM.from_config(config)
    perturb_hf(model)
    model.generation_config = transformers.GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                                            eos_token_id=stops if len(stops) > 1 else stops[0])
    return model.eval()


def greedy(model, tokenizer, *, max_new_tokens: int = 32) -> list[int]:
    """transformers' own greedy continuation of PROMPT, tokenized as transformers does by default."""
    import torch

    encoded = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out[0, encoded["input_ids"].shape[1]:].tolist()


def make_token_appear(model, tokenizer, token: str) -> None:
    """Make the greedy continuation say `token` part-way, by a clear margin: its output row becomes a
    slightly scaled copy of the row of a token the model emits at some step k >= 8, scaled so that it
    wins at step k and loses at every step before (it is never an input, so nothing before changes)."""
    import torch

    ids = greedy(model, tokenizer)
    prompt = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1]  # the logits each step chose from
    best = logits.max(dim=-1).values
    for step in range(8, len(ids)):
        chosen = ids[step]
        for scale in (1.01, 1.03, 1.1):
            mine = scale * logits[:, chosen]
            if mine[step] > best[step] + 1e-3 and bool((mine[:step] < best[:step] - 1e-3).all()):
                head = model.get_output_embeddings().weight
                with torch.no_grad():
                    head[tokenizer.convert_tokens_to_ids(token)] = scale * head[chosen]
                return
    raise AssertionError("no step of the continuation lets the token win by a clear margin")


def save_family(family: str, path: Path) -> Path:
    """The family's tiny model and tokenizer, saved as transformers saves them."""
    tokenizer = train_tokenizer(family)
    model = hf_family_model(family, tokenizer)
    if family == "llama":  # the second eos id of generation_config.json must end a generation too
        make_token_appear(model, tokenizer, "<|eot_id|>")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    extra = SPECS[family].get("tokenizer_config")
    if extra:
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, **extra}, indent=2))
    return path


# family → its chat template fixture (tests/unit/data/chat_fixtures.py)
CHAT_TEMPLATES = {"llama": "llama3", "mistral": "mistral", "qwen2": "qwen2.5", "qwen3": "qwen3"}


def save_chat_family(family: str, root: Path) -> Path:
    """An Instruct-style model folder: the family's tiny model (as `hf_family_model` makes it) with the
    chat fixture's tokenizer, which carries the family's published chat template; returns the folder."""
    import torch
    import transformers

    from tests.unit.data.chat_fixtures import tokenizer_folder

    folder = tokenizer_folder(root, CHAT_TEMPLATES[family])
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    class_name, options = SPECS[family]["config"]
    torch.manual_seed(7)
    config = getattr(transformers, class_name)(**{**options, "vocab_size": len(tokenizer)}, bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id)
    model = transformers.AutoModelForCausalLM.from_config(config)
    perturb_hf(model)
    model.save_pretrained(folder)
    return folder
