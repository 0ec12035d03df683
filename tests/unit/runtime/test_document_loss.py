"""`packing: documents`: padding carries no loss and no gradient, whatever its token id.

The megatron work runs in one child process (`python test_document_loss.py --out facts.json`):
it prepares short documents packed one per sample, takes a global batch from the real
loader, scores it with TrainStep, and scores every document again on its own, unpadded,
with the model called directly. The tests judge the numbers it writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tests.child import worker_facts

SEQ, MICRO, GLOBAL = 32, 4, 8


def _facts(tmp: Path) -> dict:
    import torch

    from llmforge.data.loader import TokenLoader
    from llmforge.models.gpt import build_gpt
    from llmforge.models.init import unwrap
    from llmforge.runtime.distributed import init_distributed
    from llmforge.runtime.optim import build_sgd, wrap_optimizer
    from llmforge.runtime.step import TrainStep
    from llmforge.spec.components import SGD
    from llmforge.spec.schema import ParallelismConfig
    from tests.unit.data.conftest import make_spec, prepare, write_corpus

    write_corpus(tmp / "corpus", n_docs=24, words=(1, 6))
    spec = make_spec(tmp, packing="documents", seq_length=SEQ, vocab_size=512)
    prepare(spec, tmp / "run")
    loader = TokenLoader(tmp / "run" / "data", "train", global_batch_size=GLOBAL, micro_batch_size=MICRO, seed=3)
    batch = loader.next_global_batch()

    parallelism = ParallelismConfig()
    ctx = init_distributed(parallelism, seed=11)
    chunks = build_gpt(spec.model, parallelism, precision="fp32", seed=11)
    optimizer = wrap_optimizer(build_sgd(SGD(lr=0.1), model_chunks=chunks), chunks, parallelism)
    step = TrainStep(chunks, optimizer, parallelism_ctx=ctx, seq_length=SEQ, micro_batch_size=MICRO, precision="fp32", clip_grad=None)

    loss_sum, count = step.eval_loss(batch.tokens, batch.masks)
    model = unwrap(chunks[0])
    model.eval()
    per_doc_sum, per_doc_count, lengths = 0.0, 0, []
    with torch.no_grad():
        for row, mask in zip(torch.cat(batch.tokens), torch.cat(batch.masks)):
            length = int(mask.sum()) + 1  # the real tokens: the masked targets plus the first token
            lengths.append(length)
            doc = row[:length].unsqueeze(0)
            logits = model(doc[:, :-1], torch.arange(length - 1).unsqueeze(0), None, runtime_gather_output=True).float()
            per_doc_sum += float(torch.nn.functional.cross_entropy(logits[0], doc[0, 1:], reduction="sum"))
            per_doc_count += length - 1
    # Padding's token id must not matter: the same batch with other pad ids scores the same.
    repadded = [t.clone() for t in batch.tokens]
    for t, m in zip(repadded, batch.masks):
        for r in range(t.shape[0]):
            t[r, int(m[r].sum()) + 1:] = 7
    other_sum, _ = step.eval_loss(repadded, batch.masks)
    unmasked_sum, unmasked_count = step.eval_loss(batch.tokens)  # what pretraining computed before masks
    return {"unmasked_loss": unmasked_sum / unmasked_count, "loss": loss_sum / count, "count": count, "reference": per_doc_sum / per_doc_count, "reference_count": per_doc_count,
            "repadded_loss": other_sum / count, "lengths": lengths, "real_tokens": loader.last_batch_tokens}


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("document_loss")
    return worker_facts(__file__, tmp / "facts.json", "--tmp", str(tmp))


def test_a_documents_packed_batch_scores_its_real_tokens_only(facts):
    assert any(length < SEQ + 1 for length in facts["lengths"]), "the batch should hold padded documents"
    assert facts["count"] == facts["reference_count"]
    assert facts["loss"] == pytest.approx(facts["reference"], abs=1e-5)
    assert facts["repadded_loss"] == pytest.approx(facts["loss"], abs=1e-6)
    assert abs(facts["unmasked_loss"] - facts["reference"]) > 1e-3  # without the masks, padding was scored


def test_the_token_count_is_real_input_tokens(facts):
    assert facts["real_tokens"] == sum(min(length, SEQ) for length in facts["lengths"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tmp", type=Path, required=True)
    args = parser.parse_args()
    args.out.write_text(json.dumps(_facts(args.tmp)))
