"""Evaluators: what they can ask of a stage (EvalContext), and the built-in ones.

Every evaluator returns a dict of numbers; the loop writes it as a `kind: eval` row in
metrics.jsonl and as TensorBoard scalars under the stage's name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from llmforge.spec.errors import UserError


class ValBatch(NamedTuple):
    """One global batch of the stage's val split, whole on every rank.

    Args:
        tokens: [global_batch_size, L + 1] token ids (LongTensor): position j predicts j + 1.
        loss_mask: [global_batch_size, L] float, 1 where token j + 1 is a trained target (0 on
            padding and, in finetune stages, on prompt tokens).
    """

    tokens: Any
    loss_mask: Any


@dataclass
class EvalContext:
    """The contract every evaluator factory receives as `context` (see hookspecs)."""

    stage: Any
    tokenizer: Any
    val_loss: Callable[[int], tuple[float, int]]  # iters -> (mean loss per token, tokens)
    generate: Callable[[list[int], int], list[int]]  # greedy continuation ids of one prompt (ends at EOS, kept)
    log: Callable[[str], None]
    eval_iters: int
    score: Callable[..., tuple[float, int]] | None = None  # (micro batches, masks) -> (summed loss, tokens)
    text: Callable[[str, str, int], None] | None = None  # (tag, text, step) -> TensorBoard text
    micro_batch_size: int = 1
    seq_length: int = 0
    max_positions: int = 0  # the model's positions; 0 = unknown
    # What finetune stages offer besides (None elsewhere; an evaluator needing one returns {}):
    logprobs: Callable[[list[tuple[list[int], list[int]]]], list[float]] | None = None  # (ids, mask) → summed log-prob of masked ids
    reference_logprobs: Callable[[list[tuple[list[int], list[int]]]], list[float]] | None = None  # the same, frozen reference model
    reward_scores: Callable[[list[list[int]]], list[float]] | None = None  # a reward model's score of whole sequences
    rewards: Callable[[list[Any]], tuple[list[float], dict[str, float]]] | None = None  # RL: samples → (rewards, mean per component)
    # Many prompts at once (batched decoding); the same answers as `generate` one by one.
    generate_batch: Callable[[list[list[int]], int], list[list[int]]] | None = None
    server: Any = None  # the stage's runtime.serve.ModelServer: log-probs and sampling at the run's layout
    # The val split as whole global batches (None without a val split); for any [n, L + 1] rows,
    # the log-prob of each next token and the most likely next token ([n, L]): the same on every
    # rank and at every layout.
    val_batches: Callable[[int], list[ValBatch]] | None = None
    token_logprobs: Callable[[Any], Any] | None = None
    predictions: Callable[[Any], Any] | None = None
    rank: int = 0  # this process's rank: every rank evaluates, rank 0's result is written

    def generate_many(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        if self.generate_batch is not None:
            return self.generate_batch(prompts, max_new_tokens)
        return [self.generate(p, max_new_tokens) for p in prompts]

    def sample(self, prompt: str | None, n: int, val_loader_fn: Callable[[], Any] | None) -> str | None:
        """A short greedy sample: from `prompt`, or from the start of a val sequence (None without either)."""
        if n <= 0:
            return None
        if prompt is not None:
            ids = self.tokenizer.encode_sequence(prompt)
        elif val_loader_fn is None:
            return None
        else:
            batch = val_loader_fn().next_global_batch()
            tokens = batch.tokens[0][0] if hasattr(batch, "masks") else batch[0][0]
            trained = batch.masks[0][0].nonzero() if hasattr(batch, "masks") else []
            if len(trained) and int(trained[0]) > 0:
                # A finetune example: its prompt alone (up to the first response token), so the
                # preview shows the model's own answer rather than continuing past the given one.
                ids = tokens[: int(trained[0]) + 1].tolist()
            else:  # a pretraining sample (every token trained on): its first tokens
                ids = tokens[:16].tolist()
        if self.max_positions:
            # A preview must fit the model: keep the prompt's tail and shorten the sample.
            ids = ids[-max(1, self.max_positions // 2):]
            n = min(n, self.max_positions - len(ids))
        out = list(self.generate(ids, n))
        end = _first_stop(out, self.tokenizer)
        if end is not None:
            out = out[: end + 1]
        return self.tokenizer.decode(ids + out)

    def complete(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations, each cut before its first stop id (EOS, or an imported model's eos list)."""
        out = []
        for ids in self.generate_many(prompts, max_new_tokens):
            end = _first_stop(ids, self.tokenizer)
            out.append(ids if end is None else ids[:end])
        return out


def _first_stop(ids: list[int], tokenizer) -> int | None:
    """Index of the first id in `ids` that ends a generation, or None."""
    from llmforge.runtime.serve import stop_ids_of

    stops = set(stop_ids_of(tokenizer))
    return next((i for i, t in enumerate(ids) if t in stops), None)


class ValLoss:
    def __init__(self, options, *, context: EvalContext):
        self.context = context

    def evaluate(self, step: int) -> dict[str, float]:
        loss, _ = self.context.val_loss(self.context.eval_iters)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def _read_jsonl(paths: list[str], fields: tuple[str, ...]) -> list[dict[str, Any]]:
    import glob

    records = []
    for pattern in paths:
        files = sorted(glob.glob(pattern, recursive=True)) or [pattern]
        for file in files:
            if not Path(file).exists():
                raise UserError(f"evaluator data not found: {file}", "fix the evaluator's `paths`")
            for n, line in enumerate(Path(file).read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{file}:{n}: not JSON ({e})", "each line must be one JSON object") from e
                missing = [f for f in fields if f not in rec]
                if missing:
                    raise UserError(f"{file}:{n}: missing field(s) {', '.join(missing)}", f"each record needs {', '.join(fields)}")
                records.append(rec)
    return records


class ExactMatch:
    """Greedy answers compared, stripped, with the reference response."""

    def __init__(self, options, *, context: EvalContext):
        from llmforge.data import tasks
        from llmforge.data.sft import chat_format

        self.options, self.context = options, context
        if options.tasks is not None:
            t = options.tasks
            self.records = tasks.instructions(list(t.tasks), t.num_examples, t.seed, t.split)
        else:
            self.records = _read_jsonl(options.paths, ("prompt", "response"))
        self.records = self.records[: options.max_examples]
        self.template = chat_format(getattr(context.stage, "chat_template", "default"), context.tokenizer)

    def _prompt_ids(self, record: dict) -> list[int]:
        """The record's prompt as the stage's template renders it for generation (its user turn, and system turn if any)."""
        return self.template.prompt_ids(record["prompt"], record.get("system"))

    def evaluate(self, step: int) -> dict[str, float]:
        tok = self.context.tokenizer
        right, by_task = 0, {}
        answers = self.context.complete([self._prompt_ids(rec) for rec in self.records], self.options.max_new_tokens)
        for rec, out in zip(self.records, answers):
            ok = tok.decode(out).strip() == rec["response"].strip()
            right += ok
            task = rec.get("task")
            if task:
                hit, n = by_task.get(task, (0, 0))
                by_task[task] = (hit + ok, n + 1)
        result = {"exact_match": right / len(self.records)}
        if len(by_task) > 1:
            result.update({f"exact_match/{t}": hit / n for t, (hit, n) in by_task.items()})
        return result


class MultipleChoice:
    """Accuracy of the choice with the highest (length-normalized) log-likelihood."""

    def __init__(self, options, *, context: EvalContext):
        self.options, self.context = options, context
        self.items = _read_jsonl(options.paths, ("prompt", "choices", "answer"))[: options.max_examples]

    def _loglik(self, prompt: list[int], choice: list[int]) -> tuple[float, int]:
        import torch

        ctx = self.context
        length = ctx.seq_length
        ids = (prompt + choice)[-(length + 1):]
        n_choice = min(len(choice), len(ids) - 1)
        tokens = torch.zeros(ctx.micro_batch_size, length + 1, dtype=torch.long)
        masks = torch.zeros(ctx.micro_batch_size, length)
        tokens[0, : len(ids)] = torch.tensor(ids)
        masks[0, len(ids) - 1 - n_choice: len(ids) - 1] = 1.0
        loss_sum, count = ctx.score([tokens], [masks])
        return -loss_sum, count

    def evaluate(self, step: int) -> dict[str, float]:
        if self.context.score is None:
            return {}
        tok, right = self.context.tokenizer, 0
        for item in self.items:
            prompt = tok.encode_sequence(item["prompt"])
            scores = []
            for choice in item["choices"]:
                ll, n = self._loglik(prompt, tok.encode(choice))
                scores.append(ll / max(n, 1) if self.options.normalize else ll)
            right += int(max(range(len(scores)), key=scores.__getitem__) == int(item["answer"]))
        return {"mc_accuracy": right / max(len(self.items), 1)}


class SamplePreview:
    """Greedy continuations of fixed prompts, to the log and TensorBoard text."""

    def __init__(self, options, *, context: EvalContext):
        self.options, self.context = options, context

    def evaluate(self, step: int) -> dict[str, float]:
        tok = self.context.tokenizer
        prompts = [tok.encode_sequence(prompt) for prompt in self.options.prompts]
        for i, (ids, out) in enumerate(zip(prompts, self.context.generate_many(prompts, self.options.max_new_tokens))):
            text = tok.decode(ids + out)
            self.context.log(f"sample {i} @ {step}: {text!r}")
            if self.context.text is not None:
                self.context.text(f"preview/{i}", f"```\n{text}\n```", step)
        return {}


def build_evaluators(registry, options_list, context: EvalContext) -> list[Any]:
    return [registry.build("evaluator", opts, context=context) for opts in options_list]


def val_batches_of(val_loader_fn: Callable[[], Any], server) -> Callable[[int], list[ValBatch]]:
    """EvalContext's `val_batches`: the first `iters` global batches of a fresh val loader, in
    order, each gathered whole from the DP ranks' slices (so the same rows at any DP size)."""

    def val_batches(iters: int) -> list[ValBatch]:
        import torch

        loader, out = val_loader_fn(), []
        for _ in range(iters):
            batch = loader.next_global_batch()
            if hasattr(batch, "masks"):
                tokens, mask = torch.cat(list(batch.tokens)), torch.cat(list(batch.masks)).float()
            else:
                tokens = torch.cat(list(batch))
                mask = torch.ones(tokens.shape[0], tokens.shape[1] - 1)
            layout = server.layout
            if layout.dp_size > 1:  # each DP rank holds a contiguous slice of the global batch
                import torch.distributed as dist

                parts: list = [None] * layout.dp_size
                dist.all_gather_object(parts, (tokens, mask), group=layout.dp_group)
                tokens, mask = torch.cat([t for t, _ in parts]), torch.cat([m for _, m in parts])
            out.append(ValBatch(tokens.long(), mask))
        return out

    return val_batches


class MetricKeys:
    """Which value an eval row keeps for each key.

    A key the row reserves (`RESERVED_METRIC_KEYS`) is dropped; so is a key another evaluator
    of the stage declares (`Component.metrics`); of two evaluators returning the same
    undeclared key, the first one's value is kept. Each case warns once per stage, naming the
    evaluators: an evaluation never costs training.
    """

    def __init__(self, stage, registry, log: Callable[[str], None]):
        from llmforge.registry.components import RESERVED_METRIC_KEYS

        self.reserved = RESERVED_METRIC_KEYS
        self.stage, self.log = stage.name, log
        self.labels = [f"{ev.name!r} ({registry.get('evaluator', ev.name).provider} {registry.get('evaluator', ev.name).version})"
                       for ev in stage.evaluators]
        self.owner = {key: i for i, ev in enumerate(stage.evaluators) for key in getattr(ev, "metric_keys", ())}
        self.set_by: dict[str, int] = {}
        self.warned: set[tuple[str, int, str]] = set()

    def _warn(self, case: str, i: int, key: str, message: str) -> None:
        if (case, i, key) not in self.warned:
            self.warned.add((case, i, key))
            self.log(f"[{self.stage}] warning: {message}")

    def add(self, row: dict[str, Any], i: int, metrics: dict[str, Any]) -> None:
        if not row:
            self.set_by = {}
        for key, value in metrics.items():
            owner = self.owner.get(key, i)
            if key in self.reserved:
                self._warn("reserved", i, key, f"evaluator {self.labels[i]} returned {key!r}, a key every metrics row "
                           "reserves; dropped (rename it in the plugin)")
            elif owner != i:
                self._warn("declared", i, key, f"evaluator {self.labels[i]} returned {key!r}, which evaluator "
                           f"{self.labels[owner]} declares; {self.labels[i]}'s value dropped")
            elif key in self.set_by and self.set_by[key] != i:
                first = self.set_by[key]
                self._warn("clash", i, key, f"evaluators {self.labels[first]} and {self.labels[i]} both returned {key!r}; "
                           f"the row keeps {self.labels[first]}'s")
            else:
                row[key] = value
                self.set_by[key] = i
