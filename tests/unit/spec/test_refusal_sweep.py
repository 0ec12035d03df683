"""Every refusal of the runtime that the spec alone decides is a refusal of `validate` too.

The sweep finds every `raise UserError` under llmforge/{models,runtime,stages,finetune,data}
by AST. Each one has a row in REFUSALS, keyed by (module, enclosing function, a fragment of the
raise's source) so that the table survives moved lines: either the specs that make the runtime
refuse (overrides on the small base spec of these tests), which `llmforge validate` must reject
with exit 2 and words of the same refusal, or the reason validate cannot see it. A raise without
a row fails the sweep, so a refusal added to the runtime cannot skip validate; a row without its
raise fails too, so the table stays true.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import BASE_SPEC

PACKAGE = Path(__file__).resolve().parents[3] / "llmforge"
SWEPT = ("models", "runtime", "stages", "finetune", "data")
CHECKPOINT = "base/checkpoints/pretrain/step-10"  # created for every case: a finetune stage starts from it
DATA_LINE = "data: {sources: {add: {name: tasks, format: text}}}\n"
assert DATA_LINE in BASE_SPEC


@dataclass(frozen=True)
class Spec:
    """A spec the runtime refuses: these overrides on the base spec; validate's error must contain `says`."""

    says: str
    overrides: tuple[str, ...]
    without_data: bool = False  # the base spec without its `data` section (an override cannot remove a source)


def spec(says: str, *overrides: str, without_data: bool = False) -> Spec:
    return Spec(says, overrides, without_data)


def stage(stage_type: str, *fields: str, index: int = 1, name: str = "ft", source: str = "{name: tasks}", data: str = "",
          train: str = "{micro_batch_size: 2, global_batch_size: 4, max_steps: 1}") -> str:
    """An override replacing stages[index] with a stage of `stage_type` on a tasks source, started from CHECKPOINT."""
    more = "".join(f", {f}" for f in fields)
    return (f"stages.{index}={{name: {name}, type: {stage_type}, init_from: {CHECKPOINT}, "
            f"data: {{sources: {{add: {source}}}{', ' + data if data else ''}}}, train: {train}{more}}}")


RL = stage("rl", "rewards: [{name: exact_match}]")
TP2 = ("parallelism.tensor_model_parallel_size=2", "parallelism.nproc_per_node=2")
MOE = ("model.num_moe_experts=4", "model.add_bias_linear=false")
DIST_OPT_SGD = ("parallelism.use_distributed_optimizer=true", "stages.1.train.optimizer={name: sgd}")
PRECISION = spec("Input should be 'fp32', 'bf16', 'bf16-autocast' or 'fp8'", "stages.1.train.precision=fp16")
SP_SEQUENCE = spec("trains on 31-token sequences, which sequence_parallel splits", *TP2, "parallelism.sequence_parallel=true",
                   "model.seq_length=31")
NOT_AN_EARLIER_STAGE = [
    spec("init_from 'nothing' must name an earlier stage, but no stage has that name", "stages.1.init_from=nothing"),
    spec("checkpoint not found: runs/gone/step-1", "stages.1.init_from=runs/gone/step-1"),
    spec("reference 'nothing' must name an earlier stage", RL, "stages.1.reference=nothing"),
    spec("rewards[0].stage 'nothing' must name an earlier stage", RL, "stages.1.rewards=[{name: reward_model, stage: nothing}]"),
    spec("init_from 'prepare' is a prepare stage, which writes no checkpoint", "stages.1.init_from=prepare"),
]
VOCAB = spec("smaller than the tokenizer's vocabulary 262", "model.vocab_size=260")

CHECKPOINT_VERSION = "depends on which llmforge wrote the checkpoint"
RUN_DIR = "depends on what the run dir holds, not on the spec"
DATA_AMOUNT = "depends on how much data the input files hold, which validate does not read"
DATA_CONTENTS = "depends on the contents of the input files, which validate does not read"
DAMAGED = "a damaged or changed file; validate does not read the files"
RESUME = "compares the spec or data with what a checkpoint recorded when resuming"
LAUNCH = "depends on how the job is launched (command line, launcher environment, machine)"
INSTALLED = "depends on the packages and programs installed on the machine, not on the spec"
TEMPLATE_FILE = ("depends on the chat template in the tokenizer's files; validate renders a probe conversation with it "
                 "(spec/checks.py _tokenizer_template_problems) and refuses the same way")

# (module under llmforge/, enclosing function, fragment of the raise's source) → Spec(s) or a reason.
REFUSALS: dict[tuple[str, str, str], list[Spec] | Spec | str] = {
    ("models/gpt.py", "check_layout", "join(problems)"): [
        spec("vocab_size 513 is not divisible by tensor_model_parallel_size 2", *TP2, "model.vocab_size=513"),
        spec("ffn_hidden_size 255 is not divisible by tensor_model_parallel_size 2", *TP2, "model.ffn_hidden_size=255"),
        spec("num_query_groups 1 is not divisible by tensor_model_parallel_size 2", *TP2, "model.num_query_groups=1"),
        spec("num_layers 4 is not divisible by pipeline_model_parallel_size 3", "parallelism.pipeline_model_parallel_size=3",
             "parallelism.nproc_per_node=3"),
        spec("num_moe_experts 4 is not divisible by expert_model_parallel_size 3", *MOE, "parallelism.expert_model_parallel_size=3",
             "parallelism.nproc_per_node=3"),
        spec("parallelism.expert_model_parallel_size 2 splits experts, but model.num_moe_experts is null",
             "parallelism.expert_model_parallel_size=2", "parallelism.nproc_per_node=2"),
        spec("the experts' MLP width 255 is not divisible by expert_tensor_parallel_size 2", *MOE, *TP2, "parallelism.sequence_parallel=true",
             "model.moe_ffn_hidden_size=255"),
        spec("MoE layers with tensor_model_parallel_size > 1 need sequence_parallel", *MOE, *TP2),
    ],
    ("models/gpt.py", "transformer_config", "is not supported"): PRECISION,
    ("models/gpt.py", "transformer_config", "train in precision fp8 on a CUDA"): (
        "depends on the machine: a CUDA device (known only to run) and TransformerEngine, which validate looks up with "
        "find_spec and refuses the same way (spec/checks_precision.py machine_issues; tests/unit/spec/test_fp8.py)"),
    ("runtime/checkpoint.py", "CheckpointManager._corrupt", "corrupt checkpoint"): DAMAGED,
    ("runtime/checkpoint.py", "read_trainer_state", "trainer_state.json has version"): CHECKPOINT_VERSION,
    ("runtime/context.py", "RunContext.final_checkpoint", "has no complete checkpoint"): NOT_AN_EARLIER_STAGE,
    ("runtime/context.py", "RunContext.tokenizer", "no tokenizer in"): RUN_DIR + " (a spec without a prepare stage uses the tokenizer an earlier run prepared there)",
    ("runtime/distributed.py", "_first_slurm_host", "SLURM_JOB_NODELIST"): LAUNCH,
    ("runtime/distributed.py", "read_launch_env", "cannot read the launcher's environment"): LAUNCH,
    ("runtime/distributed.py", "check_world_size", "but the spec's layout is"): LAUNCH + " (validate checks the spec's own nnodes × nproc_per_node)",
    ("runtime/distributed.py", "resolve_layout", "is not divisible by tensor_model_parallel_size"):
        spec("world size nnodes × nproc_per_node = 3 is not divisible by tensor × pipeline = 2", "parallelism.tensor_model_parallel_size=2",
             "parallelism.nproc_per_node=3"),
    ("runtime/distributed.py", "resolve_layout", "parallelism.data_parallel_size is"):
        spec("data_parallel_size 2 × tensor × pipeline (1) = 2, but nnodes × nproc_per_node = 1", "parallelism.data_parallel_size=2"),
    ("runtime/distributed.py", "resolve_layout", "expert tensor × expert × pipeline parallel"):
        spec("is not divisible by expert tensor × expert × pipeline parallel = 1 × 2 × 1 = 2", *MOE,
             "parallelism.expert_model_parallel_size=2"),
    ("runtime/distributed.py", "resolve_layout", "virtual_pipeline_model_parallel_size needs"):
        spec("virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1", "parallelism.virtual_pipeline_model_parallel_size=2"),
    ("runtime/distributed.py", "resolve_layout", "sequence_parallel needs"):
        spec("sequence_parallel needs tensor_model_parallel_size > 1", "parallelism.sequence_parallel=true"),
    ("runtime/evaluate.py", "_read_jsonl", "evaluator data not found"):
        spec("0 files match 'heldout/*.jsonl'", "stages.1.evaluators=[{name: multiple_choice, paths: [heldout/*.jsonl]}]"),
    ("runtime/evaluate.py", "_read_jsonl", "not JSON"): DATA_CONTENTS,
    ("runtime/evaluate.py", "_read_jsonl", "missing field(s)"): DATA_CONTENTS,
    ("runtime/serve.py", "ModelServer.generate", "positions, the model has"):
        "depends on the prompts' lengths (the data, or `llmforge generate`'s arguments)",
    ("runtime/launch.py", "check_devices", "this is one machine"): LAUNCH,
    ("runtime/launch.py", "check_devices", "processes per node"): LAUNCH + " (`llmforge plan` shows what the layout needs)",
    ("runtime/launch.py", "torchrun_argv", "--rdzv-endpoint"): LAUNCH,
    ("runtime/context.py", "RunContext.run_loop", "has already trained"): RESUME + " (a budget below the step its checkpoint reached)",
    ("runtime/lifecycle.py", "refuse_shrunk_steps", "it has already trained"): RESUME + " (a max_steps below its stage's newest checkpoint)",
    ("runtime/slurm.py", "parse_time", "is not a Slurm time limit"): LAUNCH + " (`llmforge launch slurm --time`)",
    ("runtime/slurm.py", "parse_time", "is no time at all"): LAUNCH + " (`llmforge launch slurm --time`)",
    ("runtime/slurm.py", "write_slurm_script", "leaves the final checkpoint less than"):
        LAUNCH + " (`llmforge launch slurm --signal-margin` against checkpoint.preempt_timeout)",
    ("runtime/slurm.py", "write_slurm_script", "does not fit the time limit"): LAUNCH + " (`--signal-margin` against `--time`)",
    ("runtime/status.py", "run_status", "holds no llmforge run"): RUN_DIR + " (`llmforge status RUN_DIR`)",
    ("runtime/status.py", "field_text", "has no field"): "a command-line flag of `llmforge status` (--field)",
    ("runtime/optim.py", "wrap_optimizer", "shards AdamW's state only"):
        spec("use_distributed_optimizer shards AdamW's state only (megatron's DistributedOptimizer), but stage 'pretrain' uses optimizer 'sgd'",
             *DIST_OPT_SGD),
    ("runtime/sharded_io.py", "_check_same_precision", "but this stage trains"): CHECKPOINT_VERSION + " (the precision it was written at)",
    ("runtime/rng.py", "RngState.load", "the checkpoint was saved by"): DAMAGED + " (a checkpoint's RNG file is missing)",
    ("runtime/rng.py", "_saved_world_size", "every checkpoint holds rank 0's RNG state"): DAMAGED + " (a checkpoint's RNG file is missing)",
    ("runtime/rundir.py", "RunDir.prepare", "--resume and --overwrite"): "command-line flags of `llmforge run`",
    ("runtime/rundir.py", "RunDir.prepare", "holds no llmforge run"): RUN_DIR,
    ("runtime/rundir.py", "RunDir.prepare", "is already used by an earlier run"): RUN_DIR,
    ("runtime/rundir.py", "RunDir.prepare", "the spec changed since this run started"): RUN_DIR + " (the spec it recorded)",
    ("runtime/rundir.py", "RunDir.prepare", "nothing to resume"): RUN_DIR,
    ("runtime/rundir.py", "RunDir.lock", "is in use by a live run"): "another live process holds the run dir's lock",
    ("runtime/rundir.py", "RunDir.read_state", "has state version"): RUN_DIR + " (which llmforge wrote it)",
    ("runtime/step.py", "TrainStep.__init__", "is not supported"): PRECISION,
    ("runtime/step.py", "TrainStep.__init__", "which sequence parallelism needs"): SP_SEQUENCE,
    ("runtime/step.py", "TrainStep.__init__", "packed-sequence path is not wired in yet"): INSTALLED + " (TransformerEngine on a GPU)",
    ("runtime/documents.py", "pretraining_documents", "adds none"): [
        spec(f"data.{key} splits packed windows at the end-of-document token, and the char tokenizer without add_eos adds none",
             "tokenizer={name: char}", f"data.{key}=true")
        for key in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")
    ],
    ("runtime/train.py", "Loop.restore", "was trained with seed"): RESUME,
    ("runtime/training.py", "StageHooks.init_weights", "holds no full model checkpoint"): "depends on what the checkpoint directory holds",
    ("runtime/training.py", "build_training", "has no val split"):
        spec("data.val_fraction is 0, so stage 'ft' has no val split, but it lists the val_loss evaluator", stage("sft", data="val_fraction: 0")),
    ("stages/pretrain.py", "run", "needs prepared shards"): RUN_DIR + " (a spec without a prepare stage reads the shards an earlier run prepared there)",
    ("finetune/rollout.py", "RolloutSource.steps_for_tokens", "cannot run to max_tokens"):
        spec("an rl stage cannot run to max_tokens", stage("rl", "rewards: [{name: exact_match}]", train="{micro_batch_size: 2, global_batch_size: 4, max_tokens: 100}")),
    ("stages/rl.py", "run", "its records have no `prompt` field"):
        spec("source 'add' (instructions) yields records with {messages}, but a rl stage reads records with {prompt}",
             stage("rl", "rewards: [{name: exact_match}]", source="{name: instructions, format: messages, paths: [chat.jsonl]}")),
    ("stages/sft.py", "load_records", "is empty after filtering"): DATA_AMOUNT + " (and the filters keep)",
    ("stages/sft.py", "_records_only", "yields plain documents"):
        spec("source 'add' (tasks) yields plain documents, but a sft stage trains on records", stage("sft", source="{name: tasks, format: text}")),
    ("stages/sft.py", "train_val_split", "its val split is empty"): DATA_AMOUNT + " (val_fraction 0 under val_loss is refused)",
    ("stages/sft.py", "sequence_length", "exceeds the model's"): [
        spec("max_seq_length 40 exceeds the model's 32 positions", stage("sft", "max_seq_length: 40")),
        spec("max_seq_length 32 + 8 virtual tokens = 40 exceeds the model's 32 positions", stage("prompt_tuning")),
    ],
    ("stages/sft.py", "finetune_loaders.encode", "is ≥ model.vocab_size"): spec(VOCAB.says, stage("sft"), *VOCAB.overrides),
    ("finetune/checkpoints.py", "read_meta", "this llmforge reads"): CHECKPOINT_VERSION,
    ("finetune/checkpoints.py", "load_weights", "is a prompt_tuning checkpoint"):
        spec("init_from 'tuned' is a prompt_tuning stage, whose checkpoints hold a soft prompt for a frozen model, not model weights",
             stage("prompt_tuning", "max_seq_length: 16", index=0, name="tuned"), "stages.1.init_from=tuned"),
    ("finetune/checkpoints.py", "load_weights", "holds no model weights"): "depends on what the checkpoint directory holds",
    ("finetune/common.py", "check_layout", "stage {stage.name!r}: "):
        # No built-in stage declares parallelism_limits (a plugin stage that does: tests/unit/spec/test_checks.py, the
        # pipeline_free stage); LoRA on an MoE model's expert linears needs whole experts.
        spec("LoRA on the experts' linear_fc1/linear_fc2 needs parallelism.expert_tensor_parallel_size 1 (got 2)", *MOE, *TP2,
             "parallelism.sequence_parallel=true", stage("lora")),
    ("finetune/common.py", "preference_packer.pack", "trains on preference pairs"):
        spec("source 'add' (tasks) yields records with {prompt, response}, but a dpo stage reads records with {chosen, prompt, rejected}",
             stage("dpo")),
    ("finetune/rewards.py", "ExactMatchReward.__call__", "needs a"):
        spec("the exact_match reward reads field 'answer', but source 'add' (tasks) yields records with {prompt, response}",
             RL, "stages.1.rewards=[{name: exact_match, field: answer}]"),
    ("finetune/rewards.py", "RewardModelReward.__init__", "is not a reward model's checkpoint"):
        spec("rewards[0].stage 'base' is a sft stage, whose checkpoints hold model weights, not a reward head",
             stage("sft", index=0, name="base"), stage("rl", "rewards: [{name: reward_model, stage: base}]")),
    ("finetune/rollout.py", "RolloutSource.__init__", "whole groups"):
        spec("gives each of 2 data-parallel ranks 2 completions, not whole groups of group_size 4", RL, "parallelism.nproc_per_node=2"),
    ("finetune/rollout.py", "RolloutSource.__init__", "exceeds max_seq_length"):
        spec("max_new_tokens 32 leaves no room for a prompt", RL, "stages.1.max_new_tokens=32"),
    ("finetune/rollout.py", "RolloutSource.load_state_dict", "rollout state version"): CHECKPOINT_VERSION,
    ("data/errors.py", "ErrorPolicy.bad", "SKIP_HINT"): DATA_CONTENTS + " (data.on_error: raise)",
    ("data/containers.py", "optional", "which is not installed"): INSTALLED + " (pyarrow, datasets, zstandard: the data extras)",
    ("data/containers.py", "hf_rows", "dataset folder not found"):
        spec("dataset folder not found: 'nowhere'", "data.sources.add={name: hf_dataset, path: nowhere}"),
    ("data/containers.py", "hf_rows", "has no split"): DATA_CONTENTS + " (the splits a saved dataset holds)",
    ("data/containers.py", "hf_rows", "holds no dataset"): DATA_CONTENTS + " (the files in the dataset folder)",
    ("data/wds.py", "_check_curl", "which is not on PATH"): INSTALLED + " (curl, which webdataset opens URLs with)",
    ("data/loader.py", "TokenLoader.__init__", "split holds no samples"): DATA_AMOUNT + " (val_fraction 0 under val_loss is refused)",
    ("data/loader.py", "TokenLoader.__init__", "is not divisible by micro_batch_size"):
        spec("not divisible by micro_batch_size 2 × data-parallel size 1", "stages.1.train.global_batch_size=5"),
    ("data/loader.py", "TokenLoader.__init__", "shards hold token id"): RUN_DIR + " (prepare refuses a tokenizer larger than model.vocab_size first)",
    ("data/loader.py", "TokenLoader._replacement", "problem"): DAMAGED,
    ("data/loader.py", "TokenLoader._replacement", "no readable sample"): DAMAGED,
    ("data/loader.py", "TokenLoader.load_state_dict", "unknown data loader state version"): CHECKPOINT_VERSION,
    ("data/loader.py", "TokenLoader.load_state_dict", "is for other data"): RESUME,
    ("data/manifest.py", "read_manifest", "holds no complete prepared data"): RUN_DIR,
    ("data/manifest.py", "read_manifest", "unreadable"): DAMAGED,
    ("data/manifest.py", "read_manifest", "unknown manifest version"): RUN_DIR + " (which llmforge prepared it)",
    ("data/units.py", "document_check", "yields finetune records"):
        spec("data.sources.add (tasks) yields finetune records (prompt, response)", "data.sources.add.format=instructions"),
    ("data/prepare.py", "_raise", 'raise UserError(error["message"]'): "re-raises, on every process of a multi-process prepare, a refusal one of them met (each has its own row)",
    ("data/prepare.py", "_plan", "data.sources is empty"):
        spec("data.sources is empty, so stages[0] (prepare) has nothing to tokenize", without_data=True),
    ("data/prepare.py", "_plan", "has no seq_length"): spec("model.seq_length: Input should be a valid integer", "model.seq_length=null"),
    ("data/prepare.py", "_plan", "changed: {changes}"): RESUME + " (the sources of shards prepared before, data.on_change: refuse)",
    ("data/prepare.py", "_plan", "tokens but model.vocab_size is"): VOCAB,
    ("data/prepare.py", "_build", "is empty after filtering"): DATA_AMOUNT + " (and the filters keep)",
    ("data/prepare.py", "_build", "has no train tokens to mix"): DATA_AMOUNT,
    ("data/prepare.py", "_check_splits", "fewer than one sample"): DATA_AMOUNT,
    ("data/pretrained.py", "_hf_specials", "invalid JSON"): DATA_CONTENTS,
    ("data/pretrained.py", "_load_json_tokenizer", "not a loadable tokenizer.json"): DATA_CONTENTS,
    ("data/pretrained.py", "_load_json_tokenizer", "cannot tell which token ends a document"): DATA_CONTENTS,
    ("data/pretrained.py", "tiktoken_to_hf", "lacks"): DATA_CONTENTS,
    ("data/pretrained.py", "tiktoken_to_hf", "the ranks are not"): DATA_CONTENTS,
    ("data/pretrained.py", "tiktoken_to_hf", "cannot be built by merging"): DATA_CONTENTS,
    ("data/pretrained.py", "load_pretrained", "no tokenizer.json, meta.json or *.tiktoken file"): DATA_CONTENTS + " (the folder's files)",
    ("data/pretrained.py", "load_pretrained", "tokenizer file not found"):
        spec("tokenizer file not found: nowhere/tokenizer.json", "tokenizer={name: pretrained, path: nowhere/tokenizer.json}"),
    ("data/pretrained.py", "load_pretrained", "neither a tokenizer.json nor a tiktoken"): DATA_CONTENTS,
    ("data/sft.py", "template_parts", "is neither a built-in"):
        spec("chat_template 'Q: {question}' is neither a built-in (default, plain), `tokenizer`", stage("sft", "chat_template: 'Q: {question}'")),
    ("data/sft.py", "check_data_files", "the stage's data changed since its checkpoint"): RESUME,
    ("data/sft.py", "_turn_pairs", "does not fit a"): DATA_CONTENTS + " (the turns of a `messages` record)",
    ("stages/sft.py", "preflight", "no example has a token that trains"): DATA_CONTENTS + " (every example, cut to max_seq_length)",
    ("data/chat_template.py", "template_source", "but none named 'default'"): TEMPLATE_FILE,
    ("data/chat_template.py", "compile_template", "not valid Jinja"): TEMPLATE_FILE,
    ("data/chat_template.py", "render", "refused a conversation"): DATA_CONTENTS + " (the template's own checks of each record)",
    ("data/chat_template.py", "locate_contents", "cannot find where the assistant turns lie"): TEMPLATE_FILE,
    ("data/chat_template.py", "locate_contents", "changes assistant turn"): TEMPLATE_FILE + " (or on a record's contents)",
    ("data/chat_template.py", "TokenizerTemplate.__init__", "this tokenizer has none"):
        spec("has none", stage("sft", "chat_template: tokenizer")),
    ("data/chat_template.py", "TokenizerTemplate.encode", "none rendered for this conversation"): TEMPLATE_FILE,
    ("data/chat_template.py", "TokenizerTemplate._closed", "never learn to stop"): TEMPLATE_FILE,
    ("data/chat_template.py", "probe", "marks nothing to train"): "validate's own probe of the tokenizer's template (spec/checks.py), not a runtime refusal",
    ("data/sft.py", "SFTLoader.__init__", "the finetune set is empty"): DATA_AMOUNT,
    ("data/sft.py", "SFTLoader.__init__", "is not divisible by micro"):
        spec("global_batch_size 5 is not divisible by micro_batch_size 2 × data-parallel size 1",
             stage("sft", train="{micro_batch_size: 2, global_batch_size: 5, max_steps: 1}")),
    ("data/sft.py", "SFTLoader.load_state_dict", "finetune loader state version"): CHECKPOINT_VERSION,
    ("data/tokenizers.py", "HFTokenizer.__init__", "has no token"): DATA_CONTENTS + " (a pretrained tokenizer's vocabulary; llmforge's own add every special token)",
    ("data/tokenizers.py", "load_tokenizer", "holds no complete tokenizer"): RUN_DIR,
    ("data/tokenizers.py", "load_tokenizer", "unknown tokenizer meta version"): RUN_DIR + " (which llmforge wrote it)",
    ("data/tokenizers.py", "load_tokenizer", "does not match the sha256"): DAMAGED,
    ("data/tokenizers.py", "load_tokenizer", "is missing, but"): DAMAGED + " (a tokenizer directory missing a file its meta.json lists)",
    ("data/tokenizers.py", "load_tokenizer", "sha256 differs"): DAMAGED + " (an imported tokenizer's HF files)",
    ("data/tokenizers.py", "HFTokenizer.file_json", "is not valid JSON"): DATA_CONTENTS + " (an imported tokenizer's HF files)",
    ("data/tokenizers.py", "HFTokenizer._stops", "names ids outside"): DATA_CONTENTS
    + " (an imported tokenizer's generation_config.json; import refuses it first)",
    ("data/tokenizers.py", "build_bpe", "found no text to train on"): DATA_AMOUNT + " (empty data.sources are refused)",
    ("data/tokenizers.py", "build_char", "found no text to build its vocabulary from"): DATA_AMOUNT + " (empty data.sources are refused)",
}


# --- finding the raises ------------------------------------------------------------------------


@dataclass(frozen=True)
class Raise:
    module: str  # path under llmforge/
    function: str  # enclosing qualified name, e.g. "RunDir.prepare" or "build_training.val_loss"
    source: str  # the raise statement's source text
    line: int


def _user_error_names(tree: ast.Module) -> set[str]:
    """Names this module binds to llmforge.spec.errors.UserError (an import may rename it)."""
    return {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.module == "llmforge.spec.errors" for alias in node.names if alias.name == "UserError"}


def runtime_refusals() -> list[Raise]:
    found = []
    for package in SWEPT:
        for path in sorted((PACKAGE / package).rglob("*.py")):
            text = path.read_text()
            tree = ast.parse(text)
            names = _user_error_names(tree)
            module = path.relative_to(PACKAGE).as_posix()

            def visit(node: ast.AST, scope: tuple[str, ...]) -> None:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        visit(child, (*scope, child.name))
                        continue
                    if isinstance(child, ast.Raise) and child.exc is not None:
                        exc = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                        if isinstance(exc, ast.Name) and exc.id in names:
                            found.append(Raise(module, ".".join(scope), ast.get_source_segment(text, child), child.lineno))
                    visit(child, scope)

            visit(tree, ())
    return found


def _rows_of(refusal: Raise) -> list[tuple[str, str, str]]:
    return [key for key in REFUSALS if key[:2] == (refusal.module, refusal.function) and key[2] in refusal.source]


def test_the_sweep_finds_the_raises():
    refusals = runtime_refusals()
    assert len(refusals) > 80
    assert any(r.module == "runtime/context.py" and "UserError_" in r.source for r in refusals)  # a renamed import


def test_every_runtime_refusal_has_exactly_one_row():
    unlisted = [f"llmforge/{r.module}:{r.line} in {r.function}: {r.source.splitlines()[0].strip()}"
                for r in runtime_refusals() if len(_rows_of(r)) != 1]
    assert not unlisted, ("runtime refusals without exactly one row in REFUSALS (add one: the overrides that trigger it, "
                          "with a validate check that refuses them, or why validate cannot see it):\n  " + "\n  ".join(unlisted))


def test_every_row_names_one_runtime_refusal():
    refusals = runtime_refusals()
    stale = [key for key in REFUSALS
             if sum(key[:2] == (r.module, r.function) and key[2] in r.source for r in refusals) != 1]
    assert not stale, f"rows that match no raise, or several (make the fragment distinctive): {stale}"


def test_each_reason_says_why():
    for key, row in REFUSALS.items():
        assert isinstance(row, (Spec, list)) or (isinstance(row, str) and len(row) > 20), key


CASES = [(key, case) for key, row in REFUSALS.items() if not isinstance(row, str) for case in (row if isinstance(row, list) else [row])]


@pytest.fixture
def inputs(tmp_path):
    """What the cases' specs read besides their overrides: a checkpoint directory and a chat file."""
    (tmp_path / CHECKPOINT).mkdir(parents=True)
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')


def test_the_base_spec_and_the_stages_the_cases_use_are_valid(write_spec, cli, inputs):
    for overrides in ([], [RL], [stage("sft")], [stage("dpo", source="{name: tasks, format: preferences}")],
                      [stage("prompt_tuning", "max_seq_length: 16")], [stage("lora")],
                      [stage("rl", "rewards: [{name: exact_match}]", source="{name: instructions, paths: [chat.jsonl]}")],
                      [stage("sft", index=0, name="base"), stage("rl", "rewards: [{name: exact_match}]")]):
        code, out, err = cli("validate", write_spec(), *overrides)
        assert (code, err) == (0, ""), overrides


@pytest.mark.parametrize(("key", "case"), CASES, ids=[f"{k[0]}:{k[1]}:{c.says[:40]}" for k, c in CASES])
def test_validate_refuses_what_the_runtime_refuses(write_spec, cli, inputs, key, case):
    text = BASE_SPEC.replace(DATA_LINE, "") if case.without_data else BASE_SPEC
    code, out, err = cli("validate", write_spec(text), *case.overrides)
    assert code == 2 and out == "", (key, out)
    assert case.says in err, (key, err)
    assert "Traceback" not in err
