"""The built-in components, registered through the same hooks a third-party plugin uses.

Factories are "module:function" strings so that nothing here imports torch; a factory of
None marks a component whose options are declared but whose implementation has not landed
yet: `validate` accepts it and `run` refuses it by name.
"""

from __future__ import annotations

from llmforge.registry.components import Component
from llmforge.registry.manager import hookimpl
from llmforge.spec import components as c
from llmforge.spec import stages as s


@hookimpl
def register_tokenizers() -> list[Component]:
    return [
        Component("bpe", c.BPETokenizer, None, "byte-level BPE trained on the spec's sources"),
        Component("char", c.CharTokenizer, None, "character level"),
        Component("byte", c.ByteTokenizer, None, "raw bytes"),
        Component("pretrained", c.PretrainedTokenizer, None, "a local tokenizer file"),
    ]


@hookimpl
def register_sources() -> list[Component]:
    return [
        Component("text", c.TextSource, None, "plain text files"),
        Component("jsonl", c.JsonlSource, None, "JSON Lines fields"),
        Component("webdataset", c.WebDatasetSource, None, "existing token shards"),
        Component("instructions", c.InstructionSource, None, "instruction or chat JSONL"),
        Component("preferences", c.PreferenceSource, None, "preference pairs JSONL"),
    ]


@hookimpl
def register_models() -> list[Component]:
    return [Component("gpt", c.GPTModel, None, "megatron-core GPTModel")]


@hookimpl
def register_optimizers() -> list[Component]:
    return [
        Component("adamw", c.AdamW, None, "torch AdamW"),
        Component("sgd", c.SGD, None, "torch SGD"),
    ]


@hookimpl
def register_lr_schedules() -> list[Component]:
    return [
        Component("constant", c.ConstantSchedule, None, "warmup then constant"),
        Component("cosine", c.CosineSchedule, None, "warmup then cosine decay"),
        Component("linear", c.LinearSchedule, None, "warmup then linear decay"),
        Component("wsd", c.WSDSchedule, None, "warmup-stable-decay"),
    ]


@hookimpl
def register_stage_types() -> list[Component]:
    return [
        Component("prepare", s.PrepareStage, None, "tokenize and shard"),
        Component("pretrain", s.PretrainStage, None, "next-token pretraining"),
        Component("sft", s.SFTStage, None, "supervised finetuning"),
    ]


@hookimpl
def register_evaluators() -> list[Component]:
    return [Component("val_loss", c.ValLoss, None, "validation loss and perplexity")]
