"""One way to use a model outside its train step, at any layout: per-token log-probabilities
and generation with a KV cache (`ModelServer`).

Every user of scoring or sampling goes through it: the evaluators and the text preview, RL
rollouts and their old/reference log-probs, DPO's reference and evaluation log-probs,
`llmforge generate`. It runs this rank's model chunks with their own modules (so TP-sharded
linears, LoRA adapters and soft prompts apply as in training); only the attention over the
cache is ours (`runtime/generate.py`).

Layouts:
- TP: every TP rank of a stage runs the same tokens; megatron's linears do the collectives.
- SP: sequence parallelism splits the sequence of a forward over TP ranks, which a decode step
  of one token cannot be; inference runs with it switched off (the same math: the linears
  all-reduce instead of gather/reduce-scatter), and restores it after.
- PP (and virtual PP): the stages run one after another, hidden states passed with send/recv
  (fp32, as the training schedule does); the last stage's results (sampled ids, log-probs) are
  broadcast over the pipeline group, so every rank of a replica returns the same answer.
- DP: *shared* calls (every DP rank passes the same inputs: evaluators, the preview) split the
  inputs over the DP replicas and all-gather the results, so every rank of the job returns the
  whole answer; *replica-local* calls (`shared=False`: RL rollouts, scoring a replica's own
  batch) keep each replica's inputs to itself.

Sampling draws each row from its own generator, seeded by (seed, the row's index in the call),
so the same call samples the same tokens at any DP size and however the rows are batched.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from llmforge.runtime.generate import StageDecoder, sample_next
from llmforge.spec.errors import UserError


def row_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


@contextlib.contextmanager
def sequence_parallel_off(chunks: Sequence[torch.nn.Module]):
    """Megatron modules read sequence parallelism from their config (the embedding's scatter) or
    from flags set at build time (linears and LoRA adapters: `sequence_parallel`; the vocab
    embedding: `reduce_scatter_embeddings`); all are switched off for the duration."""
    changed: list[tuple[object, str]] = []
    for chunk in chunks:
        for module in chunk.modules():
            owners = [(getattr(module, "config", None), "sequence_parallel"), (module, "sequence_parallel"),
                      (module, "reduce_scatter_embeddings")]
            for owner, name in owners:
                if owner is not None and getattr(owner, name, None) is True:
                    setattr(owner, name, False)
                    changed.append((owner, name))
    try:
        yield
    finally:
        for owner, name in changed:
            setattr(owner, name, True)


class _Layout:
    """This rank's place: TP/PP/DP sizes and groups, read once from megatron's parallel state."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.distributed = dist.is_available() and dist.is_initialized() and ps.model_parallel_is_initialized()
        if not self.distributed:
            self.pp_size = self.dp_size = 1
            self.pp_rank = self.dp_rank = 0
            return
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
        max_positions: the model's position limit (prompt + new tokens must fit).
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], *, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        from llmforge.models.init import unwrap

        self.chunks = [unwrap(c) for c in chunks]
        self.autocast = autocast
        self.layout = _Layout()
        first = self.chunks[0]
        self.max_positions = first.max_sequence_length
        self.device = next(first.parameters()).device
        self.hidden_size = first.config.hidden_size

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
                positions = torch.arange(tokens.shape[1]).expand_as(tokens)
                pieces.append(self._forward(tokens, positions, ok, labels=labels, temperature=temperature, decoder=None))
        local = torch.cat(pieces) if pieces else torch.zeros(0, rows.shape[1] - 1)
        return self._gather(local, mine, rows.shape[0], shared)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float = 1.0, stop_ids: Sequence[int] = (), pad_id: int = 0, vocab_size: int | None = None,
                 seed: int = 0, shared: bool = True, batch_size: int | None = None) -> list[list[int]]:
        """Continue each prompt by up to `max_new_tokens` ids; a row ends after any of `stop_ids` (kept).

        Args:
            vocab_size: the tokenizer's vocabulary; ids past it (the model's padded rows) are never drawn.
            seed: row i of this call samples from a generator seeded by (seed, i).
            batch_size: decode at most this many rows together (default: all of this replica's).
        """
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_positions:
            raise UserError(f"prompt plus new tokens need {longest + max_new_tokens} positions, the model has {self.max_positions}",
                            "shorten the prompt or lower max_new_tokens")
        mine = self._share(len(prompts), shared)
        out: list[list[int]] = []
        step = batch_size or max(len(mine), 1)
        with self._eval_mode():
            for start in range(0, len(mine), step):
                index = mine[start:start + step]
                out += self._generate([prompts[i] for i in index], index, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, stop_ids=set(stop_ids), pad_id=pad_id, vocab_size=vocab_size, seed=seed)
        return self._gather(out, mine, len(prompts), shared)

    # --- one forward over the pipeline ---------------------------------------------------

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None, *, decoder: StageDecoder | None,
                 labels: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Through every stage: gathered logits [b, new, vocab] (fp32), or with `labels` the
        tempered log-probs [b, new]; on every rank of the pipeline."""
        batch, new = tokens.shape
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        valid = valid.to(self.device) if valid is not None else None
        own = decoder or StageDecoder(self.chunks, batch_size=batch, max_length=new, cache=False)
        own.begin(new, valid)
        hidden = None
        result = None
        layout = self.layout
        with self.autocast(), sequence_parallel_off(self.chunks):
            for index, chunk in enumerate(self.chunks):
                if not chunk.pre_process:
                    hidden = torch.empty(new, batch, self.hidden_size, dtype=torch.float32, device=self.device)
                    dist.recv(hidden, src=layout.prev_rank)
                hidden = own.run_chunk(index, tokens if chunk.pre_process else hidden, positions)
                if chunk.post_process:
                    result = own.head(index, hidden, labels=labels, temperature=temperature)
                else:
                    dist.send(hidden.float().contiguous(), dst=layout.next_rank)
        own.end(new)
        if layout.pp_size > 1:
            shape = (batch, new) if labels is not None else (batch, new, own.vocab_size)
            # Contiguous: gloo sends a tensor's storage as it lies in memory.
            result = torch.empty(shape, dtype=torch.float32, device=self.device) if result is None else result.contiguous()
            dist.broadcast(result, src=layout.last_rank, group=layout.pp_group)
        return result.cpu() if labels is not None else result

    def _generate(self, prompts: list[list[int]], rows: list[int], *, max_new_tokens: int, temperature: float, top_k, top_p,
                  stop_ids: set[int], pad_id: int, vocab_size: int | None, seed: int) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        decoder = StageDecoder(self.chunks, batch_size=len(prompts), max_length=width + max_new_tokens)
        tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        valid = torch.zeros(len(prompts), width, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            tokens[row, width - len(prompt):] = torch.tensor(prompt)
            valid[row, width - len(prompt):] = True
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        generators = [torch.Generator().manual_seed(row_seed(seed, r)) for r in rows] if temperature > 0 else None
        logits = self._forward(tokens, positions, valid, decoder=decoder)[:, -1]
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
                    done[row] = token in stop_ids
            if all(done) or step == max_new_tokens - 1:
                break
            logits = self._forward(chosen[:, None], next_position[:, None], None, decoder=decoder)[:, -1]
            next_position = next_position + 1
        return out

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = [c.training for c in self.chunks]
        for c in self.chunks:
            c.eval()
        try:
            yield
        finally:
            for c, mode in zip(self.chunks, was_training):
                c.train(mode)

    # --- data parallelism ----------------------------------------------------------------

    def _share(self, n: int, shared: bool) -> list[int]:
        """The indices this replica works on: all of them, or every dp_size-th from its DP rank."""
        if not shared or self.layout.dp_size == 1:
            return list(range(n))
        return list(range(self.layout.dp_rank, n, self.layout.dp_size))

    def _gather(self, local, mine: list[int], n: int, shared: bool):
        if not shared or self.layout.dp_size == 1:
            return local
        parts: list = [None] * self.layout.dp_size
        dist.all_gather_object(parts, (mine, local.tolist() if isinstance(local, torch.Tensor) else local), group=self.layout.dp_group)
        out: list = [None] * n
        for index, values in parts:
            for i, value in zip(index, values):
                out[i] = value
        return torch.tensor(out, dtype=torch.float32).reshape(n, -1) if isinstance(local, torch.Tensor) else out
