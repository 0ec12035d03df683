"""Every cross-field check: one failing case each, located at the key to change."""

from __future__ import annotations

from typing import ClassVar

import pytest

from llmforge.registry import Component, hookimpl
from llmforge.spec.base import StrictModel
from llmforge.registry.manager import build_registry
from llmforge.spec.errors import SpecError
from llmforge.spec.stages import PIPELINE, StageBase
from llmforge.spec.validate import load_and_validate


def problems(path, *overrides: str, check_inputs: bool = True, registry=None) -> dict[str, tuple[str, str | None, str | None]]:
    """{dotted path: (message, hint, location)} of every issue `validate` reports."""
    from llmforge.spec.errors import dotted

    try:
        load_and_validate(str(path), list(overrides), check_inputs=check_inputs, registry=registry)
    except SpecError as e:
        return {dotted(i.path): (i.message, i.hint, i.location) for i in e.issues}
    return {}


@pytest.fixture(autouse=True)
def checkpoint(tmp_path):
    """The checkpoint directory the finetune cases start from (validate checks that it exists)."""
    (tmp_path / CHECKPOINT).mkdir(parents=True)


CHECKPOINT = "base/checkpoints/pretrain/step-10"


def finetune(stage_type: str, *fields: str, source: str = "{name: tasks}") -> str:
    """An override that makes stages[1] a finetune stage of `stage_type` on a tasks source, from CHECKPOINT."""
    more = "".join(f", {f}" for f in fields)
    return (f"stages.1={{name: ft, type: {stage_type}, init_from: {CHECKPOINT}, data: {{sources: {{add: {source}}}}}, "
            f"train: {{micro_batch_size: 2, global_batch_size: 4, max_steps: 1}}{more}}}")


RL = finetune("rl", "rewards: [{name: exact_match}]")


def test_the_base_spec_is_valid(write_spec):
    assert problems(write_spec()) == {}


def test_the_finetune_cases_start_valid(write_spec):
    assert problems(write_spec(), finetune("sft")) == {}
    assert problems(write_spec(), finetune("sft", "packing: true"), "data.reset_attention_mask=true", "data.reset_position_ids=true",
                    "data.eod_mask_loss=true") == {}
    # Each finetune evaluator in a stage that offers what it needs.
    assert problems(write_spec(), finetune("dpo", "evaluators: [{name: preference, tasks: {tasks: [add2]}}]",
                                          source="{name: tasks, format: preferences}")) == {}
    assert problems(write_spec(), finetune("rl", "rewards: [{name: exact_match}]",
                                          "evaluators: [{name: mean_reward, tasks: {tasks: [add2]}}, {name: preference, tasks: {tasks: [add2]}}]")) == {}
    assert problems(write_spec(), RL) == {}
    assert problems(write_spec(), finetune("dpo", source="{name: tasks, format: preferences}")) == {}
    assert problems(write_spec(), finetune("prompt_tuning", "max_seq_length: 24", "prompt_tuning: {init_text: 'Answer:'}")) == {}


CASES = [
    # (overrides, dotted path of the issue, words the message must contain)
    (["model.num_attention_heads=3"], "model.num_attention_heads", "hidden_size 64 is not divisible by num_attention_heads 3"),
    (["model.num_query_groups=3"], "model.num_query_groups", "not divisible by num_query_groups 3"),
    (["parallelism.tensor_model_parallel_size=3", "parallelism.nproc_per_node=3", "stages.1.train.global_batch_size=2"],
     "parallelism.tensor_model_parallel_size", "num_attention_heads 4 is not divisible by tensor_model_parallel_size 3"),
    (["model.num_query_groups=2", "parallelism.tensor_model_parallel_size=4", "parallelism.nproc_per_node=4"],
     "parallelism.tensor_model_parallel_size", "num_query_groups 2 is not divisible by tensor_model_parallel_size 4"),
    (["parallelism.sequence_parallel=true"], "parallelism.sequence_parallel", "needs tensor_model_parallel_size > 1"),
    # The MoE layout's own cases are in test_moe_spec.py.
    (["model.num_moe_experts=4", "model.add_bias_linear=false", "parallelism.expert_model_parallel_size=3", "parallelism.nproc_per_node=3",
      "stages.1.train.global_batch_size=6"], "parallelism.expert_model_parallel_size",
     "num_moe_experts 4 is not divisible by expert_model_parallel_size 3"),
    # kv_channels frees hidden_size from the heads, so the default MLP width (4 × 65) need not divide by TP 8.
    (["model.num_attention_heads=8", "model.hidden_size=65", "model.kv_channels=8", "parallelism.tensor_model_parallel_size=8",
      "parallelism.nproc_per_node=8"], "model.ffn_hidden_size", "ffn_hidden_size 260 is not divisible by tensor_model_parallel_size 8"),
    (["parallelism.virtual_pipeline_model_parallel_size=2"], "parallelism.virtual_pipeline_model_parallel_size", "needs pipeline_model_parallel_size > 1"),
    (["parallelism.pipeline_model_parallel_size=3", "parallelism.nproc_per_node=3", "stages.1.train.global_batch_size=2"],
     "parallelism.pipeline_model_parallel_size", "num_layers 4 is not divisible by pipeline_model_parallel_size 3"),
    (["parallelism.pipeline_model_parallel_size=2", "parallelism.virtual_pipeline_model_parallel_size=4", "parallelism.nproc_per_node=2"],
     "parallelism.pipeline_model_parallel_size", "= 8"),
    (["parallelism.tensor_model_parallel_size=2", "parallelism.nproc_per_node=3"], "parallelism.nproc_per_node", "world size nnodes × nproc_per_node = 3"),
    (["parallelism.data_parallel_size=2"], "parallelism.data_parallel_size", "but nnodes × nproc_per_node = 1"),
    (["stages.1.train.global_batch_size=5"], "stages[1].train.global_batch_size", "not divisible by micro_batch_size 2 × data-parallel size 1"),
    (["parallelism.nproc_per_node=4"], "stages[1].train.global_batch_size", "data-parallel size 4 = 8"),
    (["model.max_position_embeddings=16"], "model.seq_length", "seq_length 32 is longer than max_position_embeddings 16"),
    (["tokenizer={name: bpe, vocab_size: 1024}"], "model.vocab_size", "smaller than the tokenizer's vocabulary 1024"),
    (["model.vocab_size=260"], "model.vocab_size", "vocabulary 262"),
    (["stages.1.init_from=nothing"], "stages[1].init_from", "no stage has that name"),
    (["stages.0.init_from=pretrain"], "stages[0].init_from", "it comes later"),
    (["data.mix={add: 1.0, web: 1.0}"], "data.mix.web", "mix names 'web', which is not a source"),
    (["stages.1.train.max_epochs=1"], "stages[1].train", "give exactly one of max_steps, max_tokens, max_epochs (got max_steps, max_epochs)"),
    (["stages.1.name=prepare"], "stages[1].name", "stage name 'prepare' is used twice"),
    (["stages.1={name: sft, type: sft, data: {sources: {add: {name: tasks, tasks: [add2]}}, val_fraction: 0}, "
      "train: {micro_batch_size: 2, global_batch_size: 4, max_steps: 1}}"],
     "stages[1].data.val_fraction", "data.val_fraction is 0, so stage 'sft' has no val split, but it lists the val_loss evaluator"),
    (["data.split.val_fraction=0"], "data.split.val_fraction", "there is no val split, but stages[1] (pretrain) lists the val_loss"),
    ([finetune("sft", "evaluators: [{name: preference, tasks: {tasks: [add2]}}]")], "stages[1].evaluators[0].name",
     "the preference evaluator needs logprobs, which a sft stage does not offer"),
    ([finetune("dpo", "evaluators: [{name: pairwise_accuracy, tasks: {tasks: [add2]}}]", source="{name: tasks, format: preferences}")],
     "stages[1].evaluators[0].name", "the pairwise_accuracy evaluator needs reward_scores, which a dpo stage does not offer"),
    (["stages.1.evaluators=[{name: val_loss}, {name: val_loss}]"], "stages[1].evaluators[1].name",
     "the val_loss evaluator returns the metric 'val_loss', which stages[1].evaluators[0] (val_loss) returns too"),
    (["stages.1.evaluators=[{name: mean_reward, tasks: {tasks: [add2]}}]"], "stages[1].evaluators[0].name",
     "the mean_reward evaluator needs rewards, which a pretrain stage does not offer"),
    ([RL.replace("max_steps: 1", "max_tokens: 100")], "stages[1].train.max_tokens", "an rl stage cannot run to max_tokens"),
    (["tokenizer={name: char}", "stages.0.packing=documents"], "stages[0].packing", "char tokenizer without add_eos has no token to pad"),
    (["tokenizer={name: char}", "data.reset_attention_mask=true"], "data.reset_attention_mask",
     "splits packed windows at the end-of-document token, and the char tokenizer without add_eos adds none"),
    ([finetune("dpo", "packing: true", source="{name: tasks, format: preferences}")], "stages[1].packing",
     "packing: true is built for stage types sft, lora, not 'dpo'"),
    (["model.ffn_hidden_size=255", "parallelism.tensor_model_parallel_size=2", "parallelism.nproc_per_node=2"],
     "model.ffn_hidden_size", "ffn_hidden_size 255 is not divisible by tensor_model_parallel_size 2"),
    (["model.vocab_size=513", "parallelism.tensor_model_parallel_size=2", "parallelism.nproc_per_node=2"],
     "model.vocab_size", "vocab_size 513 is not divisible by tensor_model_parallel_size 2"),
    (["parallelism.tensor_model_parallel_size=2", "parallelism.nproc_per_node=2", "parallelism.sequence_parallel=true", "model.seq_length=31"],
     "model.seq_length", "stage 'pretrain' trains on 31-token sequences, which sequence_parallel splits over tensor_model_parallel_size 2"),
    ([finetune("sft", "max_seq_length: 40")], "stages[1].max_seq_length", "max_seq_length 40 exceeds the model's 32 positions"),
    ([finetune("prompt_tuning")], "stages[1].prompt_tuning.num_virtual_tokens", "max_seq_length 32 + 8 virtual tokens = 40 exceeds"),
    ([RL, "parallelism.nproc_per_node=2"], "stages[1].train.global_batch_size",
     "gives each of 2 data-parallel ranks 2 completions, not whole groups of group_size 4"),
    ([RL, "stages.1.max_new_tokens=32"], "stages[1].max_new_tokens", "max_new_tokens 32 leaves no room for a prompt"),
    ([finetune("prompt_tuning", "max_seq_length: 24", "prompt_tuning: {init: random, init_text: 'Answer:'}")],
     "stages[1].prompt_tuning.init_text", "init_text starts the soft prompt from its tokens' embeddings, but init: random"),
    (["parallelism.use_distributed_optimizer=true", "stages.1.train.optimizer={name: sgd}"], "stages[1].train.optimizer.name",
     "use_distributed_optimizer shards AdamW's state only (megatron's DistributedOptimizer), but stage 'pretrain' uses optimizer 'sgd'"),
    ([finetune("sft", "chat_template: 'Q: {question}'")], "stages[1].chat_template",
     "chat_template 'Q: {question}' is neither a built-in (default, plain), `tokenizer`, nor a string with {prompt} and {response}"),
    ([finetune("sft", "chat_template: tokenizer")], "stages[1].chat_template",
     "chat_template: tokenizer renders the tokenizer's own chat template, but the run's byte tokenizer is llmforge's own and has none"),
    ([finetune("dpo", "train_on_turns: last", source="{name: tasks, format: preferences}")], "stages[1].train_on_turns",
     "train_on_turns: last picks assistant turns of `messages` records, but a dpo stage reads single-turn records"),
    (["data.sources.add.format=instructions"], "data.sources.add", "data.sources.add (tasks) yields finetune records (prompt, response)"),
    ([finetune("sft", source="{name: tasks, format: text}")], "stages[1].data.sources.add",
     "source 'add' (tasks) yields plain documents, but a sft stage trains on records with {prompt, response} or {messages}"),
    ([finetune("dpo")], "stages[1].data.sources.add",
     "source 'add' (tasks) yields records with {prompt, response}, but a dpo stage reads records with {chosen, prompt, rejected}"),
    ([RL, "stages.1.rewards=[{name: exact_match, field: answer}]"], "stages[1].rewards[0].field",
     "the exact_match reward reads field 'answer', but source 'add' (tasks) yields records with {prompt, response}"),
    ([RL, "stages.1.reference=nothing"], "stages[1].reference", "reference 'nothing' must name an earlier stage, but no stage has that name"),
    (["stages.1.init_from=prepare"], "stages[1].init_from", "init_from 'prepare' is a prepare stage, which writes no checkpoint"),
    # precision fp8 (spec/checks_precision.py); whether TransformerEngine is installed is tests/unit/spec/test_fp8.py's.
    ([finetune("lora"), "stages.1.train.precision=fp8"], "stages[1].type", "precision fp8 is built for stage types pretrain, sft, not 'lora'"),
    ([finetune("sft", "packing: true"), "stages.1.train.precision=fp8"], "stages[1].packing",
     "packing: true masks attention per document with SDPA; precision fp8 uses TransformerEngine's attention"),
    (["data.reset_attention_mask=true", "stages.1.train.precision=fp8"], "data.reset_attention_mask",
     "stage 'pretrain' trains in precision fp8 through TransformerEngine, whose packed-sequence attention is not wired in"),
    (["model.hidden_size=72", "stages.1.train.precision=fp8"], "model.hidden_size",
     "precision fp8: hidden_size is 72, not a multiple of 16, which TransformerEngine's FP8 matmuls need"),
    (["model.seq_length=30", "stages.1.train.precision=fp8"], "stages[1].train.micro_batch_size",
     "precision fp8: a micro batch holds 60 tokens per rank"),
    # the lm_eval evaluator (spec/checks_lm_eval.py); its input checks are tests/unit/evaluation/test_validate.py's.
    ([finetune("prompt_tuning", "max_seq_length: 24", "evaluators: [{name: lm_eval, tasks: [hellaswag]}]")], "stages[1].evaluators[0].name",
     "does not apply a prompt_tuning stage's soft prompt"),
    (["model.num_moe_experts=4", "model.add_bias_linear=false", "parallelism.expert_model_parallel_size=2", "parallelism.nproc_per_node=2",
      "stages.1.evaluators=[{name: lm_eval, tasks: [hellaswag]}]"], "stages[1].evaluators[0].name", "experts split over 2 ranks"),
]


@pytest.mark.parametrize(("overrides", "where", "words"), CASES, ids=[c[1] + ":" + c[2][:30] for c in CASES])
def test_each_check_fails_at_the_key_to_change(write_spec, overrides, where, words):
    found = problems(write_spec(), *overrides)
    assert where in found, found
    message, hint, location = found[where]
    assert words in message
    assert location and (location.startswith("override ") or location.startswith("spec.yaml:")), location


def test_a_check_error_points_at_the_line_in_the_file(write_spec):
    text = write_spec().read_text().replace("tensor_model_parallel_size: 1", "tensor_model_parallel_size: 3\n  nproc_per_node: 3")
    found = problems(write_spec(text), "stages.1.train.global_batch_size=6")
    message, hint, location = found["parallelism.tensor_model_parallel_size"]
    assert location == "spec.yaml:11:3"
    assert hint == "use a tensor-parallel size that divides 4 (e.g. 2)"


def test_an_empty_val_split_is_fine_without_val_loss_and_padding_fine_with_eos(write_spec):
    assert problems(write_spec(), "data.split.val_fraction=0", "stages.1.evaluators=[]") == {}
    assert problems(write_spec(), "tokenizer={name: char, add_eos: true}", "stages.0.packing=documents") == {}


def test_init_from_may_name_a_checkpoint_path_that_exists(write_spec):
    assert problems(write_spec(), f"stages.1.init_from={CHECKPOINT}") == {}
    missing = "runs/other/checkpoints/pretrain/step-100"
    found = problems(write_spec(), f"stages.1.init_from={missing}")
    assert list(found) == ["stages[1].init_from"] and found["stages[1].init_from"][0] == f"checkpoint not found: {missing}"
    assert problems(write_spec(), f"stages.1.init_from={missing}", check_inputs=False) == {}


def test_a_reference_and_a_reward_model_checkpoint_path_must_exist_too(write_spec):
    found = problems(write_spec(), RL, "stages.1.reference=runs/x/step-1", "stages.1.rewards=[{name: reward_model, stage: runs/y/step-2}]")
    assert found["stages[1].reference"][0] == "checkpoint not found: runs/x/step-1"
    assert found["stages[1].rewards[0].stage"][0] == "checkpoint not found: runs/y/step-2"


def test_evaluator_paths_must_match_files(write_spec, tmp_path):
    (tmp_path / "mc.jsonl").write_text('{"prompt": "1+1=", "choices": ["2", "3"], "answer": 0}\n')
    assert problems(write_spec(), "stages.1.evaluators=[{name: multiple_choice, paths: [mc.jsonl]}]") == {}
    found = problems(write_spec(), "stages.1.evaluators=[{name: multiple_choice, paths: [mc.jsonl, heldout/*.jsonl]}]")
    assert list(found) == ["stages[1].evaluators[0].paths[1]"]
    assert found["stages[1].evaluators[0].paths[1]"][0] == "0 files match 'heldout/*.jsonl'"


def test_a_prepare_stage_needs_data_sources(write_spec):
    text = write_spec().read_text()
    found = problems(write_spec(text.replace("data: {sources: {add: {name: tasks, format: text}}}\n", "")))
    message, hint, location = found["data.sources"]
    assert message == "data.sources is empty, so stages[0] (prepare) has nothing to tokenize"
    assert location == "spec.yaml:13:5"  # the prepare stage, as the spec has no data section
    assert problems(write_spec(text.replace("  - name: prepare\n    type: prepare\n", "").replace("data: {sources: {add: {name: tasks, format: text}}}\n", "")),
                    f"stages.0.init_from={CHECKPOINT}") == {}


class SequenceFreeModel(StrictModel):
    """A plugin model without a sequence length (a prepare stage cannot pack samples for it)."""

    width: int = 8


class SequenceFreePlugin:
    @hookimpl
    def register_models(self) -> list[Component]:
        return [Component("sequence_free", SequenceFreeModel)]


def test_a_prepare_stage_needs_a_model_with_a_seq_length(write_spec):
    registry = build_registry([(SequenceFreePlugin(), "test-models", "0")])
    found = problems(write_spec(), "model={name: sequence_free}", registry=registry)
    assert found == {"model": ("model 'sequence_free' has no seq_length, which the prepare stage packs samples by",
                               "use a model with a seq_length, or remove the prepare stage", "override 'model={name: sequence_free}'")}


REFERENCES = """\
  - name: tuned
    type: prompt_tuning
    init_from: pretrain
    max_seq_length: 16
    data: {sources: {add: {name: tasks}}}
    train: {micro_batch_size: 2, global_batch_size: 4, max_steps: 1}
  - name: rl
    type: rl
    init_from: tuned
    data: {sources: {add: {name: tasks}}}
    train: {micro_batch_size: 2, global_batch_size: 4, max_steps: 1}
    rewards: [{name: reward_model, stage: pretrain}]
"""


def test_references_must_hold_what_the_stage_reads(write_spec):
    found = problems(write_spec(write_spec().read_text() + REFERENCES))
    assert found["stages[3].init_from"][:2] == (
        "init_from 'tuned' is a prompt_tuning stage, whose checkpoints hold a soft prompt for a frozen model, not model weights",
        "name a stage that trains the model (for a prompt_tuning stage: its own init_from), or a checkpoint path")
    assert found["stages[3].rewards[0].stage"][0] == "rewards[0].stage 'pretrain' is a pretrain stage, whose checkpoints hold model weights, not a reward head"
    assert found["stages[3].init_from"][2] == "spec.yaml:31:5"


def test_the_built_in_chat_templates_are_the_ones_validate_knows():
    from llmforge.data.sft import TEMPLATES
    from llmforge.spec.stages import CHAT_TEMPLATES

    assert tuple(TEMPLATES) == CHAT_TEMPLATES


def test_input_paths_must_match_files_unless_skipped(write_spec, tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello")
    spec = write_spec()
    ok = ["data={sources: {web: {name: text, paths: ['corpus/*.txt', 'corpus/a.txt']}}}"]
    assert problems(spec, *ok) == {}
    bad = ["data={sources: {web: {name: text, paths: ['corpus/*.txt', 'corpus/*.jsonl']}}}"]
    found = problems(spec, *bad)
    assert list(found) == ["data.sources.web.paths[1]"]
    assert "0 files match 'corpus/*.jsonl'" in found["data.sources.web.paths[1]"][0]
    assert problems(spec, *bad, check_inputs=False) == {}


def test_finetune_inputs_are_checked_too(write_spec):
    spec = write_spec(write_spec().read_text() + """\
  - name: sft
    type: sft
    init_from: pretrain
    data:
      sources:
        chat: {name: instructions, paths: [missing/*.jsonl]}
    train: {micro_batch_size: 2, global_batch_size: 4, max_epochs: 1}
""")
    found = problems(spec)
    assert found["stages[2].data.sources.chat.paths[0]"][2] == "spec.yaml:28:44"


def test_a_finetune_stage_without_a_val_split_may_not_list_val_loss(write_spec, cli):
    spec = write_spec(write_spec().read_text() + """\
  - name: sft
    type: sft
    init_from: pretrain
    data:
      sources:
        add: {name: tasks, tasks: [add2]}
      val_fraction: 0
    train: {micro_batch_size: 2, global_batch_size: 4, max_steps: 1}
""")
    code, out, err = cli("validate", spec)
    assert code == 2 and out == ""
    assert "spec.yaml:29:7 stages[2].data.val_fraction: data.val_fraction is 0, so stage 'sft' has no val split" in err
    assert "val_loss" in err and "Traceback" not in err
    assert problems(spec, "stages.2.evaluators=[]") == {}


def test_a_missing_pretrained_tokenizer_file(write_spec):
    found = problems(write_spec(), "tokenizer={name: pretrained, path: nowhere/tokenizer.json}")
    assert "tokenizer file not found: nowhere/tokenizer.json" in found["tokenizer.path"][0]


def test_checks_still_run_on_the_sections_that_parsed(write_spec):
    found = problems(write_spec(), "seed=minus-one", "stages.1.train.global_batch_size=5")
    assert set(found) == {"seed", "stages[1].train.global_batch_size"}


def test_a_broken_stage_does_not_hide_the_checks_of_the_others(write_spec):
    found = problems(write_spec(), "stages.0.packing=sideways", "stages.1.train.global_batch_size=5")
    assert "stages[0].packing" in found and "stages[1].train.global_batch_size" in found


class PipelineFreeStage(StageBase):
    """A stage type whose step cannot run under pipeline parallelism (as a plugin's might be)."""

    parallelism_limits: ClassVar[tuple[str, ...]] = (PIPELINE,)


class PipelineFreePlugin:
    @hookimpl
    def register_stage_types(self) -> list[Component]:
        return [Component("pipeline_free", PipelineFreeStage)]


def layout_case(write_spec) -> dict:
    registry = build_registry([(PipelineFreePlugin(), "test-stages", "0")])
    spec = write_spec(write_spec().read_text() + "  - name: extra\n    type: pipeline_free\n")
    return problems(spec, "parallelism.pipeline_model_parallel_size=2", "parallelism.nproc_per_node=2", registry=registry)


def test_a_stage_type_that_cannot_run_under_the_layout(write_spec):
    message, hint, location = layout_case(write_spec)["stages[2].type"]
    assert message.startswith("stage type 'pipeline_free' does not support pipeline_model_parallel_size > 1 yet (got 2)")
    assert location == "spec.yaml:24:5"


def test_every_registered_check_has_a_failing_case_here(write_spec, tmp_path, monkeypatch):
    """A check added to checks.py without a failing case above fails this test."""
    from llmforge.spec import checks

    fired: set[str] = set()
    registered = {fn.__name__ for _, fn in checks.CHECKS}

    def recording(fn):
        def wrapper(sections, loaded):
            issues = list(fn(sections, loaded))
            if issues:
                fired.add(fn.__name__)
            return iter(issues)

        return wrapper

    monkeypatch.setattr(checks, "CHECKS", [(needs, recording(fn)) for needs, fn in checks.CHECKS])
    spec = write_spec()
    for overrides, _, _ in CASES:
        problems(spec, *overrides)
    layout_case(write_spec)
    assert fired == registered
