"""One way to use a model outside its train step, at any layout: per-token log-probabilities
and generation with a KV cache (`ModelServer`).

Every user of scoring or sampling goes through it: the evaluators and the text preview, RL
rollouts and their old/reference log-probs, DPO's reference and evaluation log-probs,
`llmforge generate`, lm-evaluation-harness's requests (`llmforge eval`, the `lm_eval`
evaluator). It runs this rank's model chunks with their own modules (so TP-sharded
linears, LoRA adapters and soft prompts apply as in training); only the attention over the
cache is ours (`runtime/generate.py`).

Layouts:
- TP: every TP rank of a stage runs the same tokens; megatron's linears do the collectives.
- SP: sequence parallelism splits the sequence of a forward over TP ranks, which a decode step
  of one token cannot be; inference runs with it switched off (the same math: the linears
  all-reduce instead of gather/reduce-scatter), and restores it after.
- PP (and virtual PP): the stages run one after another, hidden states passed with send/recv
  in fp32 (exact for bf16 ones, cast back to the parameters' dtype on arrival); the last stage's
  results (sampled ids, log-probs) are broadcast over the pipeline group, so every rank of a
  replica returns the same answer.

Precision: the chunks compute in their parameters' dtype (bf16 under megatron's `bf16`) or
under the stage's autocast; logits, log-probabilities and scores come out in fp32 either way.
- DP: *shared* calls (every DP rank passes the same inputs: evaluators, the preview) split the
  inputs over the DP replicas and all-gather the results, so every rank of the job returns the
  whole answer; *replica-local* calls (`shared=False`: RL rollouts, scoring a replica's own
  batch) keep each replica's inputs to itself.
- EP: experts split over the DP replicas exchange tokens in every MoE layer, so each forward
  needs every rank of the expert group: shared calls run all their rows on every replica, and
  decoding stops when every rank of the group is done (replica-local calls must give each
  replica the same number of batches).

Sampling draws each row from its own generator, seeded by (seed, the row's index in the call),
so the same call samples the same tokens at any DP size and however the rows are batched.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from llmforge.runtime.generate import StageDecoder, sample_next, score_logits
from llmforge.runtime.step import eval_mode
from llmforge.spec.errors import UserError


def row_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


def sequence_parallel_flags(chunks: Sequence[torch.nn.Module]) -> list[tuple[object, str]]:
    """Where the chunks keep sequence parallelism switched on: their configs (the embedding's
    scatter reads it) and flags set at build time (linears and LoRA adapters:
    `sequence_parallel`; the vocab embedding: `reduce_scatter_embeddings`)."""
    found: list[tuple[object, str]] = []
    for chunk in chunks:
        for module in chunk.modules():
            for owner, name in ((getattr(module, "config", None), "sequence_parallel"), (module, "sequence_parallel"),
                                (module, "reduce_scatter_embeddings")):
                if owner is not None and getattr(owner, name, None) is True and (owner, name) not in found:
                    found.append((owner, name))
    return found


@contextlib.contextmanager
def sequence_parallel_off(flags: list[tuple[object, str]]):
    """Every flag of `sequence_parallel_flags` off for the duration, then on again."""
    for owner, name in flags:
        setattr(owner, name, False)
    try:
        yield
    finally:
        for owner, name in flags:
            setattr(owner, name, True)


class _Layout:
    """This rank's place: TP/PP/DP sizes and groups, read once from megatron's parallel state."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.distributed = dist.is_available() and dist.is_initialized() and ps.model_parallel_is_initialized()
        if not self.distributed:
            self.pp_size = self.dp_size = self.ep_size = 1
            self.pp_rank = self.dp_rank = 0
            return
        # Experts split over data-parallel ranks: every rank of the expert group must run each forward.
        self.ep_size = ps.get_expert_model_parallel_world_size()
        self.ep_group = ps.get_expert_model_parallel_group()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        if self.pp_size > 1:
            self.next_rank = ps.get_pipeline_model_parallel_next_rank()
            self.prev_rank = ps.get_pipeline_model_parallel_prev_rank()
            self.last_rank = ps.get_pipeline_model_parallel_last_rank()


class ModelServer:
    """Log-probabilities and generation from this rank's model chunks, a collective over the job.

    Args:
        chunks: this rank's model chunks (DDP-wrapped or not), in virtual-stage order.
        autocast: the stage's autocast factory (`runtime.step.autocast`), so inference computes
            as training does.

        documents: the stage's packed pretraining documents (`runtime.documents.Documents`): rows
            scored by `logprobs` and `predictions` split at EOD as training splits them, so a
            score of a val window means what its training loss means. Generation is unchanged
            (a prompt is one document).

    `max_positions` is the model's position limit: a prompt plus its new tokens must fit.
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], *, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 documents=None):
        from llmforge.models.init import unwrap

        self.chunks = [unwrap(c) for c in chunks]
        self.autocast = autocast
        self.layout = _Layout()
        first = self.chunks[0]
        self.max_positions = first.max_sequence_length
        self.device = next(first.parameters()).device
        self.hidden_size = first.config.hidden_size
        self.dtype = first.config.params_dtype  # what a later stage's layers take (fp32 on the wire)
        self._sp_flags = sequence_parallel_flags(self.chunks)
        self.documents = documents if documents is not None and documents.eod_id is not None else None

    # --- public ---------------------------------------------------------------------

    @torch.no_grad()
    def logprobs(self, rows: torch.Tensor, *, micro_batch_size: int, temperature: float = 1.0, shared: bool = True,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
        """log softmax(logits / temperature) at each next token: rows [n, L + 1] → [n, L] (CPU, fp32).

        Args:
            valid: optional [n, L + 1] bool, False for padding no real token may attend to
                (right padding never needs it: it is causally unseen).
        """
        rows = rows.cpu()
        valid = valid.cpu() if valid is not None else None
        mine = self._share(rows.shape[0], shared)
        pieces: list[torch.Tensor] = []
        with self._eval_mode():
            for start in range(0, len(mine), micro_batch_size):
                index = mine[start:start + micro_batch_size]
                batch = rows[index]
                tokens, labels = batch[:, :-1], batch[:, 1:]
                ok = None if valid is None else valid[index][:, :-1]
                positions, segments = self._positions(tokens)
                pieces.append(self._forward(tokens, positions, ok, labels=labels, temperature=temperature, decoder=None, segments=segments))
        local = torch.cat(pieces) if pieces else torch.zeros(0, rows.shape[1] - 1)
        return self._gather(local, mine, rows.shape[0], shared)

    @torch.no_grad()
    def predictions(self, rows: torch.Tensor, *, micro_batch_size: int, shared: bool = True) -> torch.Tensor:
        """The most likely next token at each position (argmax of the logits): rows [n, L + 1] → [n, L] ids (CPU)."""
        rows = rows.cpu()
        mine = self._share(rows.shape[0], shared)
        pieces: list[torch.Tensor] = []
        with self._eval_mode():
            for start in range(0, len(mine), micro_batch_size):
                tokens = rows[mine[start:start + micro_batch_size]][:, :-1]
                positions, segments = self._positions(tokens)
                pieces.append(self._forward(tokens, positions, None, decoder=None, segments=segments).argmax(dim=-1).cpu())
        local = torch.cat(pieces) if pieces else torch.zeros(0, rows.shape[1] - 1, dtype=torch.long)
        return self._gather(local, mine, rows.shape[0], shared).long()

    @torch.no_grad()
    def continuation_scores(self, rows: list[list[int]], scored: list[int], *, micro_batch_size: int,
                            shared: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What lm-evaluation-harness's log-likelihood requests read of each row (token ids; position j
        predicts j + 1): for each of its last `scored[i]` tokens, its log-prob and whether it is the most
        likely next token ([2, scored[i]]: log-probs, then 1.0 where greedy), and the log-softmax over the
        vocabulary at the row's last position ([vocab]: what any other last token would score). fp32, CPU.
        Rows are scored whole, as one document each (no packed-document split); only the positions
        some row scores go through the output layer."""
        if any(len(r) < 2 or not 1 <= k < len(r) for r, k in zip(rows, scored, strict=True)):
            raise ValueError("every row needs at least two tokens, and scores between one and all but its first")
        mine = self._share(len(rows), shared)
        out: list = []
        with self._eval_mode():
            for start in range(0, len(mine), micro_batch_size):
                index = mine[start:start + micro_batch_size]
                batch = [rows[i] for i in index]
                width = max(len(r) for r in batch) - 1
                tokens = torch.zeros(len(batch), width, dtype=torch.long)
                labels = torch.zeros(len(batch), width, dtype=torch.long)
                for i, row in enumerate(batch):  # right padding: causally unseen by every real position
                    tokens[i, : len(row) - 1] = torch.tensor(row[:-1])
                    labels[i, : len(row) - 1] = torch.tensor(row[1:])
                ends = torch.tensor([len(r) - 1 for r in batch])
                first = min(len(r) - 1 - scored[i] for r, i in zip(batch, index))  # the earliest position any row scores
                kept = width - first
                vocab = self.chunks[-1].vocab_size
                packed = self._forward(tokens, torch.arange(width).expand(len(batch), -1), None, decoder=None,
                                       read=lambda model, hidden: score_logits(model, hidden[first:], labels[:, first:], ends - first),
                                       read_shape=(len(batch), 2 * kept + vocab))
                for row, i in enumerate(index):
                    stop = int(ends[row]) - first
                    span = slice(stop - scored[i], stop)
                    greedy = (packed[row, kept:][span] == labels[row, first:][span]).float()
                    out.append((torch.stack([packed[row, span], greedy]), packed[row, 2 * kept:].clone()))
        return self._gather(out, mine, len(rows), shared)

    @torch.no_grad()
    def scores(self, sequences: list[list[int]], *, micro_batch_size: int, pad_id: int, head: str, shared: bool = True) -> list[float]:
        """A scalar head's reading of each sequence at its last token: `head` names a [hidden → 1]
        module on the GPTModel (a reward model's), applied to the final-norm hidden state."""
        mine = self._share(len(sequences), shared)
        out: list[float] = []
        with self._eval_mode():
            for start in range(0, len(mine), micro_batch_size):
                rows = [sequences[i] for i in mine[start:start + micro_batch_size]]
                width = max(len(r) for r in rows)
                tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
                for i, row in enumerate(rows):
                    tokens[i, : len(row)] = torch.tensor(row)
                last = torch.tensor([len(r) - 1 for r in rows], device=self.device)
                arange = torch.arange(len(rows), device=self.device)

                def read(model, hidden, last=last, arange=arange):
                    return getattr(model, head)(hidden[last, arange].float()).squeeze(-1).float()

                positions = torch.arange(width).expand(len(rows), -1)
                out += self._forward(tokens, positions, None, decoder=None, read=read).tolist()
        return self._gather(out, mine, len(sequences), shared)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float = 1.0, stop_ids: Sequence[int] = (), pad_id: int = 0, vocab_size: int | None = None,
                 seed: int = 0, shared: bool = True, batch_size: int | None = None, first_row: int = 0,
                 stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
        """Continue each prompt by up to `max_new_tokens` ids; a row ends after any of `stop_ids` (kept).

        Args:
            vocab_size: the tokenizer's vocabulary; ids past it (the model's padded rows) are never drawn.
            seed: row i of this call samples from a generator seeded by (seed, first_row + i).
            first_row: where a replica-local call's rows sit in a larger batch (RL: the DP rank's
                offset), so each row draws alike at any DP size.
            batch_size: decode at most this many rows together (default: all of this replica's).
            stop: `stop(i, new ids of prompt i)` true ends row i too (lm-eval's stop strings); it must
                answer alike on every rank, as it does from the ids alone.
        """
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_positions:
            raise UserError(f"prompt plus new tokens need {longest + max_new_tokens} positions, the model has {self.max_positions}",
                            "shorten the prompt or lower max_new_tokens")
        mine = self._share(len(prompts), shared)
        out: list[list[int]] = []
        rows = [first_row + i for i in mine]
        step = batch_size or max(len(mine), 1)
        with self._eval_mode():
            for start in range(0, len(mine), step):
                index = mine[start:start + step]
                ends = None if stop is None else (lambda row, ids, index=index: stop(index[row], ids))
                out += self._generate([prompts[i] for i in index], rows[start:start + step], max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=set(stop_ids), pad_id=pad_id,
                                      vocab_size=vocab_size, seed=seed, stop=ends)
        return self._gather(out, mine, len(prompts), shared)

    # --- one forward over the pipeline ---------------------------------------------------

    def _positions(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(position ids, segments or None) of scored rows: with the stage's documents, as TrainStep reads them."""
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        if self.documents is None:
            return positions, None
        from llmforge.runtime.documents import positions_of, segments_of

        segments = segments_of(tokens, self.documents.eod_id)
        return (positions_of(segments) if self.documents.reset_position_ids else positions,
                segments if self.documents.reset_attention_mask else None)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None, *, decoder: StageDecoder | None,
                 labels: torch.Tensor | None = None, temperature: float = 1.0, read: Callable | None = None,
                 last_only: bool = False, segments: torch.Tensor | None = None, read_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Through every stage: gathered logits [b, new, vocab] (fp32), with `labels` the tempered
        log-probs [b, new], or with `read(model, hidden)` what it reads of the last stage's final
        hidden states [new, b, h] (fp32 of `read_shape`, default [b]); on every rank of the pipeline.
        `last_only`: logits of the last position alone ([b, 1, vocab]: what sampling reads)."""
        batch, new = tokens.shape
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        valid = valid.to(self.device) if valid is not None else None
        own = decoder or StageDecoder(self.chunks, batch_size=batch, max_length=new, cache=False)
        own.begin(new, valid, None if segments is None else segments.to(self.device))
        hidden = None
        result = None
        layout = self.layout
        with self.autocast(), sequence_parallel_off(self._sp_flags):
            for index, chunk in enumerate(self.chunks):
                if not chunk.pre_process:
                    hidden = torch.empty(new, batch, self.hidden_size, dtype=torch.float32, device=self.device)
                    dist.recv(hidden, src=layout.prev_rank)
                    hidden = hidden.to(self.dtype)
                hidden = own.run_chunk(index, tokens if chunk.pre_process else hidden, positions)
                if chunk.post_process:
                    if read is not None:
                        result = read(chunk, hidden)
                    else:
                        result = own.head(index, hidden[-1:] if last_only else hidden, labels=labels, temperature=temperature)
                else:
                    dist.send(hidden.float().contiguous(), dst=layout.next_rank)
        own.end(new)
        if layout.pp_size > 1:
            shape = ((read_shape or (batch,)) if read is not None else (batch, new) if labels is not None
                     else (batch, 1 if last_only else new, own.vocab_size))
            # Contiguous: gloo sends a tensor's storage as it lies in memory.
            result = torch.empty(shape, dtype=torch.float32, device=self.device) if result is None else result.contiguous()
            dist.broadcast(result, src=layout.last_rank, group=layout.pp_group)
        return result.cpu() if labels is not None or read is not None else result

    def _generate(self, prompts: list[list[int]], rows: list[int], *, max_new_tokens: int, temperature: float, top_k, top_p,
                  stop_ids: set[int], pad_id: int, vocab_size: int | None, seed: int,
                  stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        decoder = StageDecoder(self.chunks, batch_size=len(prompts), max_length=width + max_new_tokens)
        tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        valid = torch.zeros(len(prompts), width, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            tokens[row, width - len(prompt):] = torch.tensor(prompt)
            valid[row, width - len(prompt):] = True
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        generators = [torch.Generator().manual_seed(row_seed(seed, r)) for r in rows] if temperature > 0 else None
        logits = self._forward(tokens, positions, valid, decoder=decoder, last_only=True)[:, -1]
        next_position = positions[:, -1] + 1
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for step in range(max_new_tokens):
            if vocab_size is not None and vocab_size < logits.shape[-1]:
                logits[:, vocab_size:] = float("-inf")
            chosen = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generators=generators)
            for row, token in enumerate(chosen.tolist()):
                if not done[row]:
                    out[row].append(token)
                    done[row] = token in stop_ids or (stop is not None and stop(row, out[row]))
            if self._all_done(done) or step == max_new_tokens - 1:
                break
            logits = self._forward(chosen[:, None], next_position[:, None], None, decoder=decoder, last_only=True)[:, -1]
            next_position = next_position + 1
        return out

    def _all_done(self, done: list[bool]) -> bool:
        """Whether decoding stops: every row ended, on every rank of the expert group when experts are split (EP > 1),
        so that replica-local calls keep the group's forwards in step."""
        if self.layout.ep_size == 1:
            return all(done)
        flag = torch.tensor([float(all(done))], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.layout.ep_group)
        return bool(flag.item())

    def _eval_mode(self) -> contextlib.AbstractContextManager:
        return eval_mode(self.chunks)

    # --- data parallelism ----------------------------------------------------------------

    def _splits(self, shared: bool) -> bool:
        """Whether a call's rows are split over the DP replicas: shared calls are, unless experts are
        split over those replicas (EP > 1), whose token exchange needs every one of them in each forward."""
        return shared and self.layout.dp_size > 1 and self.layout.ep_size == 1

    def _share(self, n: int, shared: bool) -> list[int]:
        """The indices this replica works on: all of them, or every dp_size-th from its DP rank."""
        if not self._splits(shared):
            return list(range(n))
        return list(range(self.layout.dp_rank, n, self.layout.dp_size))

    def _gather(self, local, mine: list[int], n: int, shared: bool):
        if not self._splits(shared):
            return local
        parts: list = [None] * self.layout.dp_size
        dist.all_gather_object(parts, (mine, local.tolist() if isinstance(local, torch.Tensor) else local), group=self.layout.dp_group)
        out: list = [None] * n
        for index, values in parts:
            for i, value in zip(index, values):
                out[i] = value
        return torch.tensor(out, dtype=torch.float32).reshape(n, -1) if isinstance(local, torch.Tensor) else out


GENERATION_BATCH = 64  # rows decoded together per replica by evaluators


def stop_ids_of(tokenizer) -> list[int]:
    """Where generation ends: an imported tokenizer's `generation_config` eos ids (Llama 3 Instruct
    lists several), else its EOS."""
    stops = getattr(tokenizer, "stop_ids", None)
    if stops:
        return list(stops)
    return [tokenizer.eos_id] if tokenizer.eos_id is not None else []


def greedy_functions(server: ModelServer, tokenizer, *, prefix: Sequence[int] = ()) -> dict[str, Callable]:
    """EvalContext's `generate` (one prompt) and `generate_batch` (many, split over DP replicas):
    greedy ids after each prompt, stopping after a stop id (`stop_ids_of`, kept). `prefix` goes before every prompt
    (a soft prompt's virtual tokens). A prompt too long for the positions keeps its tail; a
    request for more new tokens than the positions hold gets as many as fit after one prompt token."""
    stops = stop_ids_of(tokenizer)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def generate_batch(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        max_new_tokens = min(max_new_tokens, server.max_positions - len(prefix) - 1)
        room = server.max_positions - len(prefix) - max_new_tokens
        rows = [[*prefix, *p[-room:]] for p in prompts]
        return server.generate(rows, max_new_tokens=max_new_tokens, stop_ids=stops, pad_id=pad, vocab_size=tokenizer.vocab_size,
                               batch_size=GENERATION_BATCH)

    return {"generate": lambda ids, n: generate_batch([ids], n)[0], "generate_batch": generate_batch}


def summed_logprobs(server: ModelServer, *, micro_batch_size: int, pad_id: int, prefix: Sequence[int] = ()) -> Callable:
    """EvalContext's `logprobs`: examples [(ids, mask)] → the summed log-probability of each
    example's masked ids (mask[j] marks ids[j]), behind `prefix` (untrained). Shared over DP."""

    def logprobs(examples: list[tuple[list[int], list[int]]]) -> list[float]:
        from llmforge.data.sft import pack_examples

        examples = [([*prefix, *ids], [0] * len(prefix) + list(mask)) for ids, mask in examples]
        packed = pack_examples(examples, max(len(ids) for ids, _ in examples) - 1, pad_id)
        per_token = server.logprobs(torch.from_numpy(packed.tokens), micro_batch_size=micro_batch_size)
        return (per_token * torch.from_numpy(packed.masks)).sum(dim=1).tolist()

    return logprobs
