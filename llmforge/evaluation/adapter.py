"""`LlmforgeLM`: lm-evaluation-harness's `LM`, served by llmforge's `ModelServer` at any layout.

The harness hands each process the requests of its `rank` out of `world_size` and gathers the
answers with `all_gather`, `gather_object` and `barrier`: here those are the data-parallel rank
and group, so the TP and PP ranks of one model replica get the same requests and serve them
together (replica-local `ModelServer` calls).

Requests are batched, tokenized and post-processed as the harness's own `hf` backend does
(`lm_eval.models.huggingface.HFLM`, whose `Collator`, generation-argument and stop-sequence
helpers are reused), so that the same checkpoint exported with `llmforge export hf` gives the same
answers there: a continuation scored from `(context + continuation)[-(max_length + 1):]`, one
forward for requests that differ only in their last token, rolling windows for perplexity,
left-truncated contexts and stop strings for generation. Tokens start with BOS by llmforge's one
rule (`Tokenizer.add_bos`), which is what the `hf` backend does with `add_bos_token=True` (an
exported llmforge tokenizer adds no BOS by itself), or by itself for an imported tokenizer whose
encoding adds one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from llmforge.spec.errors import UserError

SAMPLING = frozenset({"do_sample", "temperature", "top_k", "top_p"})  # what llmforge's sampler takes
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message
SEED = 1234  # sampled generations draw from (seed, row): the same answers at any layout


def bos_text(tokenizer) -> str | None:
    """The BOS token as text (what a prompt that already starts with it starts with), or None."""
    return None if tokenizer.bos_id is None else tokenizer.hf.decode([tokenizer.bos_id], skip_special_tokens=False)


def encode(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """`text`'s ids as the hf backend's `tok_encode` gives them: after BOS when the tokenizer starts sequences with
    one (`Tokenizer.add_bos`), unless `add_special_tokens` is False or, left to the tokenizer, the text starts with BOS."""
    ids = tokenizer.encode(text)
    wanted = add_special_tokens if add_special_tokens is not None else not has_bos_prefix(text, bos_text(tokenizer))
    return [tokenizer.bos_id, *ids] if tokenizer.add_bos and wanted else ids


def render_chat(tokenizer, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
    """The conversation as the tokenizer's own template renders it: transformers' `apply_chat_template(tokenize=False,
    add_generation_prompt=..., continue_final_message=not add_generation_prompt)`, the hf backend's call, retried
    without system turns when the template refuses them (as the hf backend retries)."""
    from llmforge.data.chat_template import render, template_source, template_variables

    source = template_source(tokenizer)
    if source is None:
        raise UserError("the harness asked for a chat template, and this tokenizer has none", "evaluate without --apply-chat-template")
    variables = template_variables(tokenizer)

    def rendered(turns: list[dict[str, Any]]) -> str:
        if add_generation_prompt:
            return render(source, turns, variables, add_generation_prompt=True)[0]
        # transformers' continue_final_message: render with a marker after the last content, cut there.
        text = render(source, [*turns[:-1], {**turns[-1], "content": turns[-1]["content"] + CONTINUE_TAG}], variables)[0]
        at = text.rindex(CONTINUE_TAG.strip())
        # A template that trims the content trims the marker's space too: then the content's trailing space goes as well.
        return text[:at] if text[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG else text[:at].rstrip()

    try:
        return rendered(messages)
    except UserError:
        return rendered([m for m in messages if m["role"] != "system"])


class Progress(Protocol):
    """Where the adapter reports requests served (the CLI's progress bar)."""

    def begin(self, description: str, total: int) -> None: ...
    def advance(self, count: int) -> None: ...


class LlmforgeLM(TemplateLM):
    """The harness's model: log-likelihoods, rolling log-likelihoods and generations from an llmforge model.

    Args:
        server: this rank's `runtime.serve.ModelServer` (any TP/PP/DP layout; not EP > 1).
        tokenizer: the run's llmforge tokenizer.
        batch_size: requests per forward (per decode batch for generation), per replica.
        prefix: ids before every request (a prompt-tuning checkpoint's virtual tokens).
        progress: where rank 0 reports served requests.
    """

    backend = "causal"

    def __init__(self, server, tokenizer, *, batch_size: int = 8, prefix: Sequence[int] = (), progress: Progress | None = None,
                 max_gen_toks: int = 256):
        super().__init__()
        layout = server.layout
        if layout.ep_size > 1:
            raise UserError(f"lm-evaluation-harness cannot run with experts split over {layout.ep_size} ranks (EP > 1): each "
                            "replica serves its own requests, and an EP group must run every forward together",
                            "evaluate at parallelism.expert_model_parallel_size=1")
        self.server, self.tokenizer = server, tokenizer
        self._rank, self._world_size = layout.dp_rank, layout.dp_size
        self._device = server.device
        self.batch_size = batch_size
        self.prefix = list(prefix)
        self.max_length = server.max_positions - len(self.prefix)
        self.max_gen_toks = max_gen_toks
        self.progress = progress if self._rank == 0 else None
        self.bos_text = bos_text(tokenizer)

    # --- distribution over data-parallel replicas -------------------------------------------

    def _group(self):
        return self.server.layout.dp_group if self._world_size > 1 else None

    def all_gather(self, tensor):
        """Every replica's `tensor`, concatenated (a 0-d tensor becomes one element per replica)."""
        if self._world_size == 1:
            return tensor
        import torch
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self._group())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        """Every replica's `obj` in a list on replica `dst`, None elsewhere."""
        if self._world_size == 1:
            return [obj]
        import torch.distributed as dist

        group = self._group()
        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dist.get_global_rank(group, dst), group=group)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self._group())

    # --- tokens --------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context starts from: BOS, else EOS (as the hf backend).
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return f"llmforge-{self.tokenizer.hash[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs) -> list[int]:
        ids = encode(self.tokenizer, string, add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # --- requests ------------------------------------------------------------------------

    def _begin(self, description: str, total: int) -> None:
        if self.progress is not None:
            self.progress.begin(description, total)

    def _advance(self, count: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(count)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._begin("log-likelihood requests", len(requests))
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, report: bool = True, **kwargs) -> list[tuple[float, bool]]:
        """Each (context, continuation) pair's summed log-prob and whether greedy decoding gives it, batched as the hf backend batches."""
        import torch

        def by_length(request):
            tokens = request[1] + request[2]
            return -len(tokens), tuple(tokens)

        # Requests that differ only in their last token share one forward (the hf backend's logits cache).
        collator = Collator(requests, sort_fn=by_length, group_by="contexts", group_fn=lambda r: r[-2] + r[-1][:-1])
        answers = []
        for chunk in collator.get_batched(n=self.batch_size):
            rows = [[*self.prefix, *(context + continuation)[-(self.max_length + 1):]] for _, context, continuation in chunk]
            counts = [min(len(continuation), len(row) - 1) for row, (_, _, continuation) in zip(rows, chunk, strict=True)]
            scored = self.server.continuation_scores(rows, counts, micro_batch_size=len(rows), shared=False)
            for (strings, context, continuation), (per_token, last) in zip(chunk, scored, strict=True):
                placeholder = torch.zeros(1, 1, 1)  # the collator only expands it, once per request sharing this forward
                for sharer, tokens, _ in collator.get_cache(req_str=strings, cxt_toks=context, cont_toks=continuation, logits=placeholder):
                    # A sharer's earlier tokens are this row's; only its last one may differ: read off the last distribution.
                    before = per_token[:, per_token.shape[1] - len(tokens):-1]
                    final = tokens[-1]
                    logprob = float(before[0].sum() + last[final])
                    greedy = bool(before[1].all()) and int(last.argmax()) == final
                    answers.append((logprob, greedy))
                    if sharer is not None:
                        self.cache_hook.add_partial("loglikelihood", sharer, (logprob, greedy))
                    if report:
                        self._advance()
        return collator.get_original(answers)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's whole log-prob, in the harness's rolling windows of the model's length (as the hf backend)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        self._begin("rolling log-likelihood requests", len(requests))
        windows, counts = [], []
        for (string,) in [r.args for r in requests]:
            found = [(None, *make_disjoint_window(w)) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)]
            windows += found
            counts.append(len(found))
        scores = []
        for start in range(0, len(windows), self.batch_size):
            scores += [s for s, _ in self._loglikelihood_tokens(windows[start:start + self.batch_size], report=False)]
        out, at = [], 0
        for (string,), count in zip([r.args for r in requests], counts, strict=True):
            out.append(sum(scores[at:at + count]))
            at += count
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), out[-1])
            self._advance()
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation up to a stop string, EOS or the token budget (greedy unless the task samples)."""
        from llmforge.runtime.serve import stop_ids_of

        self._begin("generation requests", len(requests))
        collator = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]), group_by="gen_kwargs",
                            group_fn=lambda r: r[1])
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        tok = self.tokenizer
        answers = []
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, options = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(options[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            budget = kwargs.pop("max_gen_toks")
            unknown = sorted(set(kwargs) - SAMPLING)
            if unknown:
                raise UserError(f"generation option(s) {', '.join(unknown)} of a task are not supported by llmforge's sampler",
                                f"it takes {', '.join(sorted(SAMPLING))}, max_gen_toks and until")
            room = self.max_length - budget
            if room <= 0:
                raise UserError(f"a task asks for {budget} new tokens, but the model has {self.max_length} positions",
                                "lower the task's max_gen_toks")
            # As the hf backend's batch encoding: the first context decides whether BOS is added.
            special = False if has_bos_prefix(contexts[0], self.bos_text) else None
            prompts = [[*self.prefix, *self.tok_encode(c, add_special_tokens=special, left_truncate_len=room)] for c in contexts]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0

            def stopped(i: int, ids: list[int]) -> bool:
                text = self.tok_decode(ids)
                return any(s and s in text for s in until)

            out = self.server.generate(prompts, max_new_tokens=budget, temperature=temperature, top_k=kwargs.get("top_k"),
                                       top_p=float(kwargs.get("top_p", 1.0)), stop_ids=stop_ids_of(tok),
                                       pad_id=tok.pad_id if tok.pad_id is not None else 0, vocab_size=tok.vocab_size, seed=SEED,
                                       shared=False, batch_size=len(prompts), stop=stopped)
            for context, ids, option in zip(contexts, out, options, strict=True):
                text = postprocess_generated_text(self.tok_decode(ids), until, None)
                answers.append(text)
                self.cache_hook.add_partial("generate_until", (context, option), text)
                self._advance()
        return collator.get_original(answers)

    # --- chat template -------------------------------------------------------------------

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        from llmforge.data.chat_template import template_source

        return template_source(self.tokenizer) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return render_chat(self.tokenizer, chat_history, add_generation_prompt=add_generation_prompt)
