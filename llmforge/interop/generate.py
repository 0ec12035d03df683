"""`llmforge generate`: a checkpoint, read outside training, continuing prompts.

It sits above the runtime and the finetune code (it reads any checkpoint a stage wrote,
soft prompts and LoRA adapters included) and decodes with the runtime's `ModelServer`, so it
runs at any TP/PP/VPP/DP layout: by default one process (TP=1, PP=1); with layout overrides
(`parallelism.KEY=VALUE`) and `--nproc-per-node`, each rank of a torchrun job builds its shard
of the model and megatron's dist_checkpointing reshards the saved checkpoint, whatever layout
wrote it, on load.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    from llmforge.spec.schema import ParallelismConfig

FINETUNE_TYPES = ("sft", "lora", "prompt_tuning", "dpo", "reward_model", "rl")
LAYOUT_PREFIX = "parallelism."
# An interactive job's ranks wait in a collective while the user types: a day, unless the
# user sets parallelism.collective_timeout_s.
INTERACTIVE_TIMEOUT_S = 24 * 3600.0


def generation_layout(overrides: list[str] | tuple[str, ...] = (), *, nproc_per_node: int | None = None,
                      interactive: bool = False) -> ParallelismConfig:
    """The layout `llmforge generate` runs at: TP=1, PP=1 in one process, unless overridden.

    Args:
        overrides: `parallelism.KEY=VALUE` words (the model's shape is the checkpoint's, so no
            other key may change).
        nproc_per_node: `--nproc-per-node`; default: TP × PP (× data_parallel_size if given).
        interactive: ranks may wait for the user's next prompt: a long collective timeout.
    """
    import yaml
    from pydantic import ValidationError

    from llmforge.runtime.distributed import resolve_layout
    from llmforge.spec.errors import did_you_mean
    from llmforge.spec.schema import ParallelismConfig

    fields = list(ParallelismConfig.model_fields)
    keys = ", ".join(LAYOUT_PREFIX + f for f in fields)
    values: dict = {}
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"override {text!r} is not KEY=VALUE", "write layout overrides like parallelism.pipeline_model_parallel_size=2")
        if not key.startswith(LAYOUT_PREFIX):
            raise UserError(f"override {text!r}: `llmforge generate` takes only layout overrides (parallelism.KEY=VALUE); "
                            "the model's shape and weights are the checkpoint's", f"drop it; the layout keys are {keys}")
        name = key[len(LAYOUT_PREFIX):]
        if name not in fields:
            guess = did_you_mean(name, fields)
            raise UserError(f"override {text!r}: parallelism has no key {name!r}",
                            f"did you mean {LAYOUT_PREFIX}{guess}?" if guess else f"the layout keys are {keys}")
        try:
            values[name] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            values[name] = raw
    if nproc_per_node is not None:
        if "nproc_per_node" in values and values["nproc_per_node"] != nproc_per_node:
            raise UserError(f"--nproc-per-node {nproc_per_node} and parallelism.nproc_per_node={values['nproc_per_node']} disagree",
                            "give one of them")
        values["nproc_per_node"] = nproc_per_node
    if interactive:
        values.setdefault("collective_timeout_s", INTERACTIVE_TIMEOUT_S)
    try:
        layout = ParallelismConfig.model_validate(values)
    except ValidationError as e:
        error = e.errors()[0]
        field = LAYOUT_PREFIX + ".".join(str(p) for p in error["loc"])
        shown = "--nproc-per-node" if field == LAYOUT_PREFIX + "nproc_per_node" and nproc_per_node is not None else field
        raise UserError(f"{shown} {error.get('input')!r}: {error['msg']}", f"give {field} a valid value, or drop the override") from None
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    if "nproc_per_node" not in values:
        import math

        dp = layout.data_parallel_size if isinstance(layout.data_parallel_size, int) else 1
        # Experts split over EP ranks come from the data-parallel replicas: enough processes for both.
        experts = layout.expert_tensor_parallel * layout.expert_model_parallel_size * pp
        layout = layout.model_copy(update={"nproc_per_node": math.lcm(tp * pp * dp, experts)})
    if layout.nnodes != 1:
        raise UserError(f"`llmforge generate` runs on one machine, but parallelism.nnodes is {layout.nnodes}",
                        "drop the parallelism.nnodes override; --nproc-per-node sets the processes")
    if layout.nproc_per_node % (tp * pp):
        raise UserError(
            f"--nproc-per-node {layout.nproc_per_node} is not a multiple of parallelism.tensor_model_parallel_size {tp} × "
            f"parallelism.pipeline_model_parallel_size {pp} = {tp * pp}: every process holds one shard of one model replica",
            f"pass --nproc-per-node {tp * pp} (or a multiple: the replicas share the prompts), or change the layout overrides")
    resolve_layout(layout, layout.world_size)  # virtual pipeline, sequence parallelism and data_parallel_size against it
    return layout


def _weights_dir(step_dir: Path) -> Path | None:
    """The `model/` directory a checkpoint's weights start from (a LoRA or prompt checkpoint's base)."""
    from llmforge.finetune.checkpoints import LORA_META, PROMPT_META, base_of, read_meta

    seen: set[Path] = set()
    while not (step_dir / "model").is_dir():
        meta = next((step_dir / m for m in (LORA_META, PROMPT_META) if (step_dir / m).is_file()), None)
        if meta is None or step_dir in seen:
            return None
        seen.add(step_dir)
        step_dir = base_of(step_dir, read_meta(meta))
    return step_dir / "model"


def _misfits(model_dir: Path, chunks: list) -> list[str]:
    """This rank's tensors the checkpoint lacks or holds in another global shape."""
    from megatron.core import dist_checkpointing

    from llmforge.interop.model_io import global_shapes

    saved = {key: tuple(t.global_shape) for key, t in dist_checkpointing.load_tensors_metadata(str(model_dir)).items()}
    problems = []
    for chunk in chunks:
        for key, shape in global_shapes(chunk).items():
            if key not in saved:
                problems.append(f"missing tensor {key}")
            elif saved[key] != shape:
                problems.append(f"{key} has shape {saved[key]}, the model spec implies {shape}")
    return problems


def generation_template(template: str, tokenizer, *, run_root: Path, stage: str):
    """The `ChatFormat` prompts are rendered with (None for raw text).

    Args:
        template: "auto" (the stage's own `chat_template` if it is a finetune stage, else raw text),
            "raw", "tokenizer" (the tokenizer's Jinja template), a built-in name, or a {prompt}/{response} string.
    """
    import yaml

    from llmforge.data.sft import chat_format

    if template == "auto":
        spec = yaml.safe_load((run_root / "spec.resolved.yaml").read_text()) if (run_root / "spec.resolved.yaml").is_file() else {}
        stage_spec = next((s for s in spec.get("stages") or [] if s.get("name") == stage), {})
        template = stage_spec.get("chat_template", "default") if stage_spec.get("type") in FINETUNE_TYPES else "raw"
    return None if template == "raw" else chat_format(template, tokenizer)


class TextGenerator:
    """A checkpoint ready to continue prompts (`llmforge generate`): this rank's shard of the model,
    the run's tokenizer, the stage's chat template and, for prompt tuning, its soft prompt.

    A collective when the layout has more than one process: every rank calls it with the same
    prompt, and every rank gets the whole answer.

    Args:
        source: a run dir (its last stage's newest checkpoint, or `stage`'s) or a step dir.
        template: "auto" (the checkpoint's stage template if it is a finetune stage, else raw
            text), "raw", "tokenizer" (the tokenizer's own chat template), a built-in template name,
            or a template string with {prompt} and {response}.
        parallelism: the layout (`generation_layout`); default one process.
        load: build the model and load the checkpoint; False only checks the source, the
            tokenizer, the template and that the layout divides the model (before a relaunch).
    """

    def __init__(self, source, *, stage: str | None = None, template: str = "auto", parallelism: ParallelismConfig | None = None,
                 load: bool = True):
        from llmforge.data.tokenizers import load_tokenizer
        from llmforge.finetune.checkpoints import PROMPT_META, read_meta
        from llmforge.interop.export import find_source, model_options
        from llmforge.models.gpt import check_layout

        found = find_source(source, stage=stage)
        self.step_dir, run_root = found.step_dir, found.run_root
        if not (run_root / "tokenizer").is_dir():
            raise UserError(f"{run_root} has no tokenizer/ directory, so prompts cannot be encoded", "generate from a run dir that llmforge wrote")
        self.tokenizer = load_tokenizer(run_root / "tokenizer")
        self.options = model_options(run_root)
        self.parallelism = parallelism if parallelism is not None else generation_layout()
        check_layout(self.options, self.parallelism)
        self.max_positions = self.options.max_positions
        self.prefix: list[int] = []
        if (self.step_dir / PROMPT_META).is_file():
            meta = read_meta(self.step_dir / PROMPT_META)
            self.prefix = [meta["placeholder"]] * meta["num_virtual_tokens"]
        self.template = generation_template(template, self.tokenizer, run_root=run_root, stage=self.step_dir.parent.name)
        self.rank, self.world_size = 0, 1
        self.server = None
        if load:
            self._load()

    def _load(self) -> None:
        import torch.distributed as dist

        from llmforge.finetune.checkpoints import PROMPT_META, attach_prompt_from, load_weights
        from llmforge.models.gpt import build_gpt
        from llmforge.runtime.distributed import check_world_size, init_distributed, read_launch_env
        from llmforge.runtime.serve import ModelServer

        check_world_size(self.parallelism, read_launch_env())
        context = init_distributed(self.parallelism, seed=0)
        self.rank, self.world_size = context.rank, context.world_size
        chunks = build_gpt(self.options, self.parallelism, precision="fp32", seed=0)
        model_dir = _weights_dir(self.step_dir)
        problems = _misfits(model_dir, chunks) if model_dir is not None else []
        if self.world_size > 1:  # every rank refuses alike, or none does (a lone refusal would hang the load)
            parts: list = [None] * self.world_size
            dist.all_gather_object(parts, problems)
            problems = list(dict.fromkeys(p for part in parts for p in part))
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise UserError(f"{model_dir}: the checkpoint does not fit the run's model spec: {'; '.join(problems[:3])}{more}",
                            "generate with the spec of the run that wrote the checkpoint (its spec.resolved.yaml)")
        if (self.step_dir / PROMPT_META).is_file():
            attach_prompt_from(self.step_dir, chunks)
        else:
            load_weights(self.step_dir, chunks)  # a LoRA checkpoint without model/ is merged on load
        self.server = ModelServer(chunks, autocast=contextlib.nullcontext)  # fp32, as the chunks are built

    def describe_layout(self) -> str:
        """How the loaded model is split: "TP 1 × PP 2 × DP 1 over 2 processes" (megatron's own groups)."""
        from megatron.core import parallel_state as ps

        layout = self.server.layout
        tp = ps.get_tensor_model_parallel_world_size() if layout.distributed else 1
        vpp = self.parallelism.virtual_pipeline_model_parallel_size
        stages = f"PP {layout.pp_size}" + (f" (× {vpp} virtual)" if vpp else "")
        experts = f" (experts: EP {layout.ep_size})" if layout.ep_size > 1 else ""
        return f"TP {tp} × {stages} × DP {layout.dp_size}{experts} over {self.world_size} process{'es' if self.world_size != 1 else ''}"

    def share(self, value):
        """Rank 0's `value` on every rank (the next interactive prompt)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Tear down the process group and megatron's groups this generator set up."""
        import sys

        if self.server is not None and "torch.distributed" in sys.modules:
            from llmforge.runtime.distributed import shutdown

            shutdown()
        self.server = None

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.template is None:
            return self.prefix + self.tokenizer.encode_sequence(prompt)
        return self.prefix + self.template.prompt_ids(prompt)

    def checked_ids(self, prompt: str) -> list[int]:
        """The prompt's ids, refused (the same way on every rank) if they leave no room to generate."""
        ids = self.prompt_ids(prompt)
        if not ids:
            raise UserError("the prompt encodes to no tokens", "give a non-empty prompt")
        if len(ids) >= self.max_positions:
            raise UserError(f"the prompt is {len(ids)} tokens; the model has {self.max_positions} positions", "shorten the prompt")
        return ids

    def continuation_ids(self, prompt: str, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                         top_p: float = 1.0, seed: int = 0) -> list[int]:
        """The ids that continue `prompt`, ending with a stop id (`Tokenizer.stop_ids`: for an imported
        model, every id of its `generation_config.json` `eos_token_id`) or after `max_new_tokens`.

        Args:
            seed: the sampler's seed (the row seed of `ModelServer.generate`): the same seed gives
                the same ids at every layout.
        """
        ids = self.checked_ids(prompt)
        tok = self.tokenizer
        return self.server.generate([ids], max_new_tokens=min(max_new_tokens, self.max_positions - len(ids)), temperature=temperature,
                                    top_k=top_k, top_p=top_p, stop_ids=tok.stop_ids, pad_id=tok.pad_id if tok.pad_id is not None else 0,
                                    vocab_size=tok.vocab_size, seed=seed, shared=True)[0]

    def __call__(self, prompt: str, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
                 seed: int = 0) -> str:
        """The continuation of `prompt` as text (after the prompt itself for raw text), without its stop token."""
        out = self.continuation_ids(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if out and out[-1] in self.tokenizer.stop_ids:
            out = out[:-1]
        text = self.tokenizer.decode(out)
        return text if self.template is not None else prompt + text
