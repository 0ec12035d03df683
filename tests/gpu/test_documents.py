"""Packed documents on CUDA: SDPA with the block-causal mask (memory-efficient kernel) trains like the documents one by one."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SEQ, MICRO, VOCAB, EOD, PAD = 128, 2, 512, 0, 3
LAYOUTS = [(40, 50, 38), (64, 20, 44)]  # three documents per row, each ending with EOD
SMALL = dict(num_layers=2, hidden_size=128, num_attention_heads=2, ffn_hidden_size=352, vocab_size=VOCAB, seq_length=SEQ,
             position_embedding_type="rope", normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
             untie_embeddings_and_output_weights=True)


def _loss_and_grads(ctx, precision: str, batches, masks=None, documents=None):
    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.optim import build_sgd, wrap_optimizer
    from llmforge.runtime.step import TrainStep
    from llmforge.spec.components import SGD, GPTModel
    from llmforge.spec.schema import ParallelismConfig

    parallelism = ParallelismConfig()
    chunks = build_gpt(GPTModel(**SMALL), parallelism, precision=precision, seed=1234)
    optimizer = wrap_optimizer(build_sgd(SGD(lr=0.1), model_chunks=chunks), chunks, parallelism)
    step = TrainStep(chunks, optimizer, parallelism_ctx=ctx, seq_length=SEQ, micro_batch_size=MICRO, precision=precision,
                     clip_grad=None, documents=documents)
    result = step(batches, 0.0, masks)
    return result.loss, torch.cat([p.main_grad.flatten().float() for chunk in chunks for p in chunk.parameters()])


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_a_packed_row_trains_like_its_documents_one_by_one_on_cuda(parallel_ctx, precision, tolerance):
    from llmforge.runtime.documents import Documents

    generator = torch.Generator().manual_seed(3)
    rows, documents = [], []
    for lengths in LAYOUTS:
        docs = [torch.cat([torch.randint(4, VOCAB, (n - 1,), generator=generator), torch.tensor([EOD])]) for n in lengths]
        rows.append(torch.cat([*docs, torch.randint(4, VOCAB, (1,), generator=generator)]))
        documents += docs
    alone = torch.full((len(documents), SEQ + 1), PAD)
    masks = torch.zeros(len(documents), SEQ)
    for r, doc in enumerate(documents):
        alone[r, : len(doc)] = doc
        masks[r, : len(doc) - 1] = 1.0
    full = Documents(EOD, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    loss, grads = _loss_and_grads(parallel_ctx, precision, [torch.stack(rows)], documents=full)
    want_loss, want_grads = _loss_and_grads(parallel_ctx, precision, list(alone.split(MICRO)), list(masks.split(MICRO)))
    assert loss == pytest.approx(want_loss, abs=tolerance)
    assert float((grads - want_grads).abs().max()) <= tolerance * max(1.0, float(want_grads.abs().max()))
