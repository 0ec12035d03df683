"""A packed row of documents that do not see each other trains like its documents run one by one.

`data.reset_position_ids` + `reset_attention_mask` + `eod_mask_loss` (pretraining windows split
at EOD) and finetune `packing: true` (rows of examples with their segments and loss masks): the
loss and every gradient of a packed micro batch equal those of its documents, each padded
into a row of its own and scored with the plain causal path over its own targets, at TP=1,
TP=2 and PP=2, for Llama's shape (RoPE) and GPT-2's (learned positions). ModelServer's scores of
the packed rows equal each document's own too (what evaluators read), and the plan's count of
what the mask and the per-token rotations keep equals what autograd keeps. Controls show the check can
fail: without the mask, with GPT-2's positions not reset, and with RoPE positions swapped
between rows (which a RoPE that ignored position ids would not notice).

One 2-process launch (`torchrun ... test_packed_documents.py --out DIR`) does all the work,
TP=1 (DP=2 on the same rows), TP=2 and PP=2 on the same processes; the tests judge what it wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SEQ, VOCAB, EOD, PAD, MICRO, NUM_LAYERS = 32, 256, 0, 3, 2, 2
TOLERANCE = 1e-5
SHAPES = {
    "llama": ("llama2-7b", {"num_query_groups": 2}),
    "gpt": ("gpt2-124m", {}),
}
# Three documents per row, each ending with EOD; the rows differ, so positions differ per row.
PRETRAIN_LAYOUTS = [(9, 13, 10), (14, 7, 11)]
# Finetune examples (prompt then response), three to a row of SEQ + 1 tokens once packed.
EXAMPLES = [(4, 6), (5, 7), (3, 8), (2, 7), (6, 7), (5, 6)]


# --- the worker ----------------------------------------------------------------------------


def _model(shape: str):
    from llmforge.models.presets import shrink
    from llmforge.spec.components import GPTModel

    preset, extra = SHAPES[shape]
    return GPTModel(**shrink(preset, num_layers=NUM_LAYERS, vocab_size=VOCAB, seq_length=SEQ, hidden_dropout=0.0, attention_dropout=0.0, **extra))


def _pretrain_rows(generator):
    """([1 micro batch of packed rows [MICRO, SEQ + 1]], the documents of every row)."""
    import torch

    rows, documents = [], []
    for lengths in PRETRAIN_LAYOUTS:
        docs = [torch.cat([torch.randint(4, VOCAB, (n - 1,), generator=generator), torch.tensor([EOD])]) for n in lengths]
        rows.append(torch.cat([*docs, torch.randint(4, VOCAB, (1,), generator=generator)]))
        documents += docs
    return [torch.stack(rows)], documents


def _one_per_row(documents: list, targets: list[int]):
    """Each document alone at the start of a padded row, its loss mask on its first `targets` targets."""
    import torch

    rows = torch.full((len(documents), SEQ + 1), PAD)
    masks = torch.zeros(len(documents), SEQ)
    for r, (doc, n) in enumerate(zip(documents, targets)):
        rows[r, : len(doc)] = doc
        masks[r, :n] = 1.0
    return list(rows.split(MICRO)), list(masks.split(MICRO))


def _examples(generator):
    """(ids, mask per id) of prompt/response examples; the first token never trains."""
    import torch

    encoded = []
    for prompt, response in EXAMPLES:
        ids = torch.randint(4, VOCAB, (prompt + response,), generator=generator).tolist()
        encoded.append((ids, [0] * prompt + [1] * response))
    return encoded


PARALLEL = {"tp1": {}, "tp2": {"tensor_model_parallel_size": 2}, "pp2": {"pipeline_model_parallel_size": 2}}


class _Job:
    def __init__(self, shape: str, layout: str):
        from llmforge.models.gpt import build_gpt
        from llmforge.runtime.distributed import init_distributed
        from llmforge.runtime.optim import build_sgd, wrap_optimizer
        from llmforge.spec.components import SGD
        from llmforge.spec.schema import ParallelismConfig

        self.parallelism = ParallelismConfig(**PARALLEL[layout], nproc_per_node=2)
        self.ctx = init_distributed(self.parallelism, seed=5)
        self.chunks = build_gpt(_model(shape), self.parallelism, precision="fp32", seed=5)
        self.optimizer = wrap_optimizer(build_sgd(SGD(lr=0.1), model_chunks=self.chunks), self.chunks, self.parallelism)

    def step(self, documents=None, step_class=None):
        from llmforge.runtime.step import TrainStep

        return (step_class or TrainStep)(self.chunks, self.optimizer, parallelism_ctx=self.ctx, seq_length=SEQ, micro_batch_size=MICRO,
                                         precision="fp32", clip_grad=None, documents=documents)

    def loss_and_grads(self, step, batches, masks=None, segments=None):
        """The step's mean loss and every local gradient (lr 0: the weights stay)."""
        result = step(batches, 0.0, masks, **({"segments": segments} if segments is not None else {}))
        grads = [p.main_grad.detach().clone() for chunk in self.chunks for p in chunk.parameters() if p.requires_grad]
        return result, grads


def _gap(job, a, b) -> dict:
    """|loss gap| and the largest |grad gap| over every rank's shards."""
    import torch
    import torch.distributed as dist

    (ra, ga), (rb, gb) = a, b
    worst = torch.tensor(max(float((x - y).abs().max()) for x, y in zip(ga, gb)), dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    scale = max(float(g.abs().max()) for g in gb)
    return {"loss": ra.loss, "reference": rb.loss, "loss_gap": abs(ra.loss - rb.loss), "grad_gap": float(worst),
            "grad_scale": scale, "tokens": ra.num_tokens, "reference_tokens": rb.num_tokens}


def _serve_gap(job, documents, packed, alone: list) -> float:
    """ModelServer.logprobs of the packed rows (split at EOD as training splits them) against each document's own, at its targets."""
    import torch

    from llmforge.runtime.serve import ModelServer

    got = ModelServer(job.chunks, documents=documents).logprobs(packed, micro_batch_size=MICRO)
    rows, _ = _one_per_row(alone, [len(d) - 1 for d in alone])
    want = ModelServer(job.chunks).logprobs(torch.cat(rows), micro_batch_size=MICRO)
    gaps, k = [], 0
    for r, lengths in enumerate(PRETRAIN_LAYOUTS):
        at = 0
        for n in lengths:
            gaps.append(float((got[r, at:at + n - 1] - want[k, : n - 1]).abs().max()))
            at, k = at + n, k + 1
    return max(gaps)


def _swapped_positions_step():
    """A TrainStep that hands each row the other row's positions: a wrong RoPE position."""
    from llmforge.runtime import documents as docs
    from llmforge.runtime.step import TrainStep

    class Swapped(TrainStep):
        def _forward_step(self, data_iterator, model):
            real = docs.prepare

            def swapped(*args):
                positions, mask, loss = real(*args)
                return positions.flip(0), mask, loss

            docs.prepare = swapped
            try:
                return super()._forward_step(data_iterator, model)
            finally:
                docs.prepare = real

    return Swapped


def _saved_bytes(shape: str, precision: str, documents: bool) -> int:
    """Bytes autograd keeps for backward after one forward of the packed rows (reality_worker's count), one process's model."""
    import torch

    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.documents import Documents, prepare
    from llmforge.spec.schema import ParallelismConfig
    from tests.unit.plan.reality_worker import saved_activation_bytes

    model = build_gpt(_model(shape), ParallelismConfig(nproc_per_node=2), precision=precision, seed=5)[0]
    (batch,), _ = _pretrain_rows(torch.Generator().manual_seed(0))
    tokens, labels = batch[:, :-1], batch[:, 1:]
    if not documents:
        return saved_activation_bytes(model, tokens, labels, torch.arange(SEQ).expand(MICRO, SEQ), precision)
    positions, mask, _ = prepare(Documents(EOD, True, True, True), tokens, None, None)
    original = model.forward
    model.forward = lambda *args, **kwargs: original(*args[:2], mask, **kwargs, document_positions=True)
    # The bool mask lives through the step (the schedule's closure); autograd keeps only its additive copy.
    return saved_activation_bytes(model, tokens, labels, positions, precision) + mask.numel()


def _memory(results: dict) -> None:
    """What packed documents add to saved activations, measured and planned, per shape and precision (TP=1)."""
    from llmforge.plan.memory import Layout, document_bytes
    from llmforge.runtime.distributed import init_distributed
    from llmforge.spec.schema import ParallelismConfig

    init_distributed(ParallelismConfig(nproc_per_node=2), seed=5)
    layout = Layout.from_spec(ParallelismConfig(nproc_per_node=2), type("Train", (), {"micro_batch_size": MICRO, "global_batch_size": 2 * MICRO})())
    for shape in SHAPES:
        for precision in ("fp32", "bf16-autocast"):
            measured = _saved_bytes(shape, precision, True) - _saved_bytes(shape, precision, False)
            planned = document_bytes(_model(shape), layout, SEQ, precision, NUM_LAYERS, (True, True))
            results[f"memory_{shape}_{precision}"] = {"measured": measured, "planned": planned}


def job(out: Path) -> dict:
    import torch

    from llmforge.data.sft import pack_documents, pack_examples
    from llmforge.runtime.documents import PACKED_EXAMPLES, Documents

    results = {}
    full = Documents(EOD, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    _memory(results)
    for layout in PARALLEL:
        for shape in SHAPES:
            job_ = _Job(shape, layout)
            generator = torch.Generator().manual_seed(17)
            packed, documents = _pretrain_rows(generator)
            rows, masks = _one_per_row(documents, [len(d) - 1 for d in documents])
            reference = job_.loss_and_grads(job_.step(), rows, masks)
            key = f"{shape}_{layout}"
            results[f"{key}_pretrain"] = _gap(job_, job_.loss_and_grads(job_.step(full), packed), reference)
            no_mask = Documents(EOD, reset_position_ids=True, reset_attention_mask=False, eod_mask_loss=True)
            results[f"{key}_no_mask"] = _gap(job_, job_.loss_and_grads(job_.step(no_mask), packed), reference)
            no_reset = Documents(EOD, reset_position_ids=False, reset_attention_mask=True, eod_mask_loss=True)
            results[f"{key}_no_position_reset"] = _gap(job_, job_.loss_and_grads(job_.step(no_reset), packed), reference)
            swapped = job_.step(full, _swapped_positions_step())
            results[f"{key}_swapped_positions"] = _gap(job_, job_.loss_and_grads(swapped, packed), reference)
            results[f"{key}_serve"] = _serve_gap(job_, full, packed[0], documents)
            results[f"{key}_serve_causal"] = _serve_gap(job_, None, packed[0], documents)  # the control: one causal sequence

            encoded = _examples(generator)
            rows_ = pack_documents(encoded, SEQ, PAD)
            alone = pack_examples(encoded, SEQ, PAD)
            as_list = lambda array, dtype: list(torch.from_numpy(array).to(dtype).split(MICRO))  # noqa: E731
            got = job_.loss_and_grads(job_.step(PACKED_EXAMPLES), as_list(rows_.tokens, torch.long), as_list(rows_.masks, torch.float32),
                                      as_list(rows_.segments, torch.long))
            want = job_.loss_and_grads(job_.step(), as_list(alone.tokens, torch.long), as_list(alone.masks, torch.float32))
            results[f"{key}_sft"] = {**_gap(job_, got, want), "rows": len(rows_.tokens), "examples": len(encoded),
                                     "input_tokens": rows_.input_tokens.tolist(), "alone_input_tokens": alone.input_tokens.tolist()}
    return results


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # `tests.unit.plan.reality_worker`
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = job(args.out)
    rank = int(os.environ.get("RANK", 0))
    (args.out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))

    from llmforge.runtime.distributed import shutdown

    shutdown()


# --- the tests -------------------------------------------------------------------------------

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("packed_documents")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          # The plan's document bytes model megatron's layers (per-layer RoPE tables); CPU's lean
                          # layers build the tables once (models/lean.py).
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "LLMFORGE_LEAN_LAYERS": "0"})
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)}


LAYOUTS = [f"{shape}_{layout}" for layout in PARALLEL for shape in SHAPES]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_a_packed_row_trains_like_its_documents_one_by_one(runs, layout, kind):
    for rank in (0, 1):
        got = runs[rank][f"{layout}_{kind}"]
        assert got["tokens"] == got["reference_tokens"] > 0
        assert got["loss_gap"] <= TOLERANCE, got
        assert got["grad_gap"] <= TOLERANCE, got


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_controls_fail_where_they_should(runs, layout):
    got = runs[0]
    assert got[f"{layout}_no_mask"]["loss_gap"] > 1e-3  # documents reading the one before them
    if layout.startswith("gpt"):  # learned positions see the absolute position
        assert got[f"{layout}_no_position_reset"]["loss_gap"] > 1e-3
    else:  # RoPE is relative: within a masked document a shift of every position changes nothing
        assert got[f"{layout}_no_position_reset"]["loss_gap"] <= TOLERANCE
        # RoPE reads each row's own positions: another row's break a document's rotations apart.
        swapped = got[f"{layout}_swapped_positions"]
        assert swapped["loss_gap"] > TOLERANCE and swapped["grad_gap"] > 10 * TOLERANCE


@pytest.mark.parametrize("case", [f"memory_{shape}_{precision}" for shape in SHAPES for precision in ("fp32", "bf16-autocast")])
def test_the_plan_counts_what_the_mask_and_positions_keep(runs, case):
    got = runs[0][case]
    assert got["planned"] == pytest.approx(got["measured"], rel=0.05)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_serving_scores_packed_windows_as_training_reads_them(runs, layout):
    for rank in (0, 1):
        assert runs[rank][f"{layout}_serve"] <= TOLERANCE
        assert runs[rank][f"{layout}_serve_causal"] > 1e-3


def test_packing_fits_the_examples_in_fewer_rows(runs):
    got = runs[0]["llama_tp1_sft"]
    assert got["rows"] == 2 < got["examples"]
    # Each row holds SEQ + 1 tokens of examples; the model reads SEQ of them (the last is only a target).
    assert sum(a + b for a, b in EXAMPLES) == 2 * (SEQ + 1)
    assert got["input_tokens"] == [SEQ, SEQ]


if __name__ == "__main__":
    main()
