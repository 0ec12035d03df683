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
        Component("bpe", c.BPETokenizer, "llmforge.data.tokenizers:build_bpe", "byte-level BPE trained on the spec's sources"),
        Component("char", c.CharTokenizer, "llmforge.data.tokenizers:build_char", "character level"),
        Component("byte", c.ByteTokenizer, "llmforge.data.tokenizers:build_byte", "raw bytes"),
        Component("pretrained", c.PretrainedTokenizer, "llmforge.data.tokenizers:build_pretrained", "a local tokenizer file"),
    ]


@hookimpl
def register_sources() -> list[Component]:
    return [
        Component("text", c.TextSource, "llmforge.data.sources:text_source", "plain text files (.gz, .zst too)"),
        Component("jsonl", c.JsonlSource, "llmforge.data.sources:jsonl_source", "JSON Lines fields (.gz, .zst too)"),
        Component("parquet", c.ParquetSource, "llmforge.data.sources:parquet_source", "Parquet columns"),
        Component("hf_dataset", c.HFDatasetSource, "llmforge.data.sources:hf_dataset_source", "a local HF dataset, streamed offline"),
        Component("webdataset", c.WebDatasetSource, "llmforge.data.wds:webdataset_source", "WebDataset shards: files, URLs, pipe: commands"),
        Component("instructions", c.InstructionSource, "llmforge.data.sources:instruction_source", "instruction or chat records (JSONL, Parquet)"),
        Component("preferences", c.PreferenceSource, "llmforge.data.sources:preference_source", "preference pairs (JSONL, Parquet)"),
        Component("tasks", c.TaskSource, "llmforge.data.tasks:task_source", "synthetic addition and reversal tasks"),
    ]


@hookimpl
def register_models() -> list[Component]:
    return [Component("gpt", c.GPTModel, "llmforge.models.gpt:build_gpt", "megatron-core GPTModel")]


@hookimpl
def register_optimizers() -> list[Component]:
    return [
        Component("adamw", c.AdamW, "llmforge.runtime.optim:build_adamw", "torch AdamW"),
        Component("sgd", c.SGD, "llmforge.runtime.optim:build_sgd", "torch SGD"),
    ]


@hookimpl
def register_lr_schedules() -> list[Component]:
    return [
        Component("constant", c.ConstantSchedule, "llmforge.runtime.schedules:build_constant", "warmup then constant"),
        Component("cosine", c.CosineSchedule, "llmforge.runtime.schedules:build_cosine", "warmup then cosine decay"),
        Component("linear", c.LinearSchedule, "llmforge.runtime.schedules:build_linear", "warmup then linear decay"),
        Component("wsd", c.WSDSchedule, "llmforge.runtime.schedules:build_wsd", "warmup-stable-decay"),
    ]


@hookimpl
def register_stage_types() -> list[Component]:
    return [
        Component("prepare", s.PrepareStage, "llmforge.stages.prepare:run", "tokenize and shard"),
        Component("pretrain", s.PretrainStage, "llmforge.stages.pretrain:run", "next-token pretraining"),
        Component("sft", s.SFTStage, "llmforge.stages.sft:run", "supervised finetuning"),
        Component("lora", s.LoRAStage, "llmforge.stages.lora:run", "LoRA adapters on a frozen model"),
        Component("prompt_tuning", s.PromptTuningStage, "llmforge.stages.prompt_tuning:run", "a soft prompt for a frozen model"),
        Component("dpo", s.DPOStage, "llmforge.stages.dpo:run", "direct preference optimization"),
        Component("reward_model", s.RewardModelStage, "llmforge.stages.reward_model:run", "a Bradley-Terry reward model"),
        Component("rl", s.RLStage, "llmforge.stages.rl:run", "GRPO-style RL from reward components"),
    ]


@hookimpl
def register_evaluators() -> list[Component]:
    return [
        Component("val_loss", c.ValLoss, "llmforge.runtime.evaluate:ValLoss", "validation loss and perplexity",
                  needs=frozenset({"val_split"}), metrics=("val_loss", "val_ppl")),
        Component("exact_match", c.ExactMatch, "llmforge.runtime.evaluate:ExactMatch", "exact match of greedy answers"),
        Component("multiple_choice", c.MultipleChoice, "llmforge.runtime.evaluate:MultipleChoice", "log-likelihood multiple choice"),
        Component("sample_preview", c.SamplePreview, "llmforge.runtime.evaluate:SamplePreview", "greedy samples to TensorBoard"),
        Component("preference", c.Preference, "llmforge.finetune.evaluators:Preference", "chosen-over-rejected margin and win rate"),
        Component("pairwise_accuracy", c.PairwiseAccuracy, "llmforge.finetune.evaluators:PairwiseAccuracy", "reward-model pairwise accuracy"),
        Component("mean_reward", c.MeanReward, "llmforge.finetune.evaluators:MeanReward", "mean reward of greedy completions"),
        Component("lm_eval", c.LMEval, "llmforge.evaluation.evaluator:LMEvalEvaluator", "lm-evaluation-harness tasks at the run's layout"),
    ]


@hookimpl
def register_rewards() -> list[Component]:
    return [
        Component("exact_match", c.ExactMatchReward, "llmforge.finetune.rewards:ExactMatchReward", "1 if the answer matches the reference"),
        Component("digit_match", c.DigitMatchReward, "llmforge.finetune.rewards:DigitMatchReward", "fraction of answer characters right in place"),
        Component("reward_model", c.RewardModelReward, "llmforge.finetune.rewards:RewardModelReward", "a reward_model stage's score"),
    ]
