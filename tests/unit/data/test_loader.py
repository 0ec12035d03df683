"""The loader: one global order from data + seed, exact resume across workers and DP sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmforge.data.loader import TokenLoader
from llmforge.spec.errors import UserError

from .conftest import make_spec, prepare, write_corpus

GLOBAL, MICRO = 8, 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A train split of a few hundred 17-token windows; its size is not a multiple of GLOBAL,
    so some global batch straddles the epoch boundary."""
    tmp = tmp_path_factory.mktemp("loader")
    write_corpus(tmp / "corpus", n_docs=12, words=(40, 120))
    m = prepare(make_spec(tmp), tmp / "run")
    assert m["splits"]["train"]["samples"] % GLOBAL != 0
    return tmp / "run" / "data"


def loader(data_dir, **kw) -> TokenLoader:
    args = {"global_batch_size": GLOBAL, "micro_batch_size": MICRO, "seed": 7} | kw
    return TokenLoader(data_dir, kw.pop("split", "train"), **{k: v for k, v in args.items() if k != "split"})


def run(ld: TokenLoader, steps: int) -> tuple[list[list[str]], list[torch.Tensor]]:
    keys, batches = [], []
    for _ in range(steps):
        micro = ld.next_global_batch()
        keys.append(ld.last_keys)
        batches.append(torch.cat(micro))
    return keys, batches


def cut_points(n: int) -> dict[str, int]:
    epoch_steps = n // GLOBAL  # the batch after this many steps straddles the epoch boundary
    return {"start": 0, "one": 1, "mid_epoch": epoch_steps // 2, "epoch_boundary": epoch_steps}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cut", ["start", "one", "mid_epoch", "epoch_boundary"])
def test_resume_continues_the_same_sample_keys(data_dir, workers, cut):
    reference = loader(data_dir)
    n = reference.samples_per_epoch
    at = cut_points(n)[cut]
    total = at + 3
    ref_keys, ref_batches = run(reference, total)
    if cut == "epoch_boundary":
        assert reference.epoch == 1  # the reference really crossed into the next epoch

    first = loader(data_dir, num_workers=workers)
    keys, batches = run(first, at)
    state = first.state_dict()
    assert state["position"] == at * GLOBAL
    first.close()
    resumed = loader(data_dir, num_workers=workers)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # it must survive a checkpoint's serialization
    more_keys, more_batches = run(resumed, total - at)
    resumed.close()
    assert keys + more_keys == ref_keys
    assert all(torch.equal(a, b) for a, b in zip(batches + more_batches, ref_batches))


def test_resume_with_another_worker_count_and_after_prefetch(data_dir):
    ref_keys, _ = run(loader(data_dir), 12)
    two = loader(data_dir, num_workers=2)
    head, _ = run(two, 5)  # its workers have prefetched steps 6 and 7 by now
    state = two.state_dict()
    two.load_state_dict({**state, "position": 2 * GLOBAL})  # rewinding drops the prefetched batches
    rewound, _ = run(two, 3)
    assert rewound == ref_keys[2:5]
    two.close()
    zero = loader(data_dir, num_workers=0)
    zero.load_state_dict(state)
    tail, _ = run(zero, 7)
    assert head + tail == ref_keys


@pytest.mark.parametrize("cut", ["start", "one", "mid_epoch", "epoch_boundary"])
def test_dp2_resume_from_dp1_state_covers_the_same_sequence(data_dir, cut):
    single = loader(data_dir)
    at = cut_points(single.samples_per_epoch)[cut]
    ref_keys, ref_batches = run(single, at + 3)
    first = loader(data_dir)
    run(first, at)
    state = first.state_dict()
    ranks = [loader(data_dir, dp_rank=r, dp_size=2) for r in range(2)]
    for ld in ranks:
        ld.load_state_dict(state)
    for step in range(at, at + 3):
        got = [run(ld, 1) for ld in ranks]
        keys = [k[0] for k, _ in got]
        # Rank r takes the r-th half of the global batch: together they are the DP=1 batch.
        assert keys[0] + keys[1] == ref_keys[step]
        assert set(keys[0]).isdisjoint(keys[1])
        assert torch.equal(torch.cat([got[0][1][0], got[1][1][0]]), ref_batches[step])
    assert ranks[0].state_dict() == ranks[1].state_dict()


def test_micro_batches_have_the_promised_shape(data_dir):
    ld = loader(data_dir, dp_size=2, dp_rank=1)
    micro = ld.next_global_batch()
    assert len(micro) == GLOBAL // (MICRO * 2)
    assert all(t.dtype == torch.int64 and t.shape == (MICRO, 17) for t in micro)
    assert ld.tokens_per_sample == 16 and ld.epoch == 0


def test_every_epoch_is_a_permutation_drawn_from_the_seed_alone(data_dir):
    ld = loader(data_dir)
    n = ld.samples_per_epoch
    np.random.seed(0)
    torch.manual_seed(0)
    rng_before = np.random.get_state()[1].copy()
    epoch0, epoch1 = ld.sample_indices(0, n), ld.sample_indices(n, n)
    assert sorted(epoch0) == sorted(epoch1) == list(range(n)) and epoch0 != epoch1
    assert np.array_equal(np.random.get_state()[1], rng_before)  # the global generator is untouched
    np.random.seed(99)
    torch.manual_seed(99)
    assert loader(data_dir).sample_indices(0, n) == epoch0
    assert loader(data_dir, seed=8).sample_indices(0, n) != epoch0


def test_unshuffled_reads_in_order_and_wraps_around(data_dir):
    val = loader(data_dir, split="val", shuffle=False, global_batch_size=4)
    n = val.samples_per_epoch
    keys = [k for batch in run(val, (n // 4) + 2)[0] for k in batch]
    assert keys[: n + 4] == [f"{i % n:010d}" for i in range(n + 4)]


def test_batches_are_read_whole_and_are_what_webdataset_reads(data_dir, monkeypatch):
    """A pretraining batch comes in one gather over the mapped shards (data.rows), never sample by
    sample, across shard and epoch boundaries; each row is the sample `wds.WebDataset` reads under its key."""
    import io

    import webdataset as wds

    from llmforge.data.shards import ShardReader

    records = json.loads((data_dir / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert len(records) > 1
    theirs = {sample["__key__"]: np.load(io.BytesIO(sample["tokens.npy"]))
              for record in records for sample in wds.WebDataset(str(data_dir / record["path"]), shardshuffle=False)}
    monkeypatch.setattr(ShardReader, "read", lambda self, index: pytest.fail(f"sample {index} was read one by one"))
    ld = loader(data_dir)
    steps = ld.samples_per_epoch // GLOBAL + 2  # into the second epoch
    spanned = 0
    for _ in range(steps):
        batch = torch.cat(ld.next_global_batch())
        assert batch.dtype == torch.int64
        assert np.array_equal(batch.numpy(), np.stack([theirs[key] for key in ld.last_keys]))
        starts = ld._fetch.reader.starts
        spanned += len(set(np.searchsorted(starts, [int(k) for k in ld.last_keys], side="right"))) > 1
    assert spanned and ld.epoch == 1


def test_budgets_in_steps_tokens_and_epochs(data_dir):
    from types import SimpleNamespace

    from llmforge.runtime.train import total_steps

    ld = loader(data_dir)
    n = ld.samples_per_epoch

    def budget(**kw):
        train = SimpleNamespace(**({"max_steps": None, "max_tokens": None, "max_epochs": None, "global_batch_size": GLOBAL} | kw))
        return total_steps(train, samples_per_epoch=n, tokens_per_sample=ld.tokens_per_sample, loader=ld)

    assert budget(max_steps=5) == 5
    assert budget(max_tokens=GLOBAL * 16 * 3 + 1) == 4
    assert budget(max_epochs=2) == -(-2 * n // GLOBAL)


@pytest.fixture(scope="module")
def documents_dir(tmp_path_factory):
    """Documents of 5-60 words packed one per sample (most shorter than a window, a few cut in pieces)."""
    tmp = tmp_path_factory.mktemp("documents")
    write_corpus(tmp / "corpus", n_docs=40, words=(1, 12))
    prepare(make_spec(tmp, packing="documents", seq_length=32), tmp / "run")
    return tmp / "run" / "data"


def test_documents_pad_without_loss(documents_dir):
    """Padding carries no loss: each row's mask covers exactly the targets of its real tokens."""
    from llmforge.data.shards import ShardReader

    ld = loader(documents_dir)
    manifest = json.loads((documents_dir / "manifest.json").read_text())
    reader = ShardReader(documents_dir, manifest["splits"]["train"]["shards"])
    seen_short = False
    for _ in range(3):
        batch = ld.next_global_batch()
        tokens, masks = torch.cat(batch.tokens), torch.cat(batch.masks)
        assert tokens.shape == (GLOBAL, 33) and masks.shape == (GLOBAL, 32)
        real = [reader.read(int(key)) for key in ld.last_keys]
        for row, sample in enumerate(real):
            length = sample.size
            seen_short |= length < 33
            assert tokens[row, :length].tolist() == sample.tolist()
            assert masks[row].tolist() == [1.0] * (length - 1) + [0.0] * (33 - length)
        assert ld.last_batch_tokens == sum(min(s.size, 32) for s in real)
    assert seen_short, "the corpus should give documents shorter than a window"


def test_token_budget_counts_real_tokens_along_the_order(documents_dir):
    """max_tokens with padded documents: the steps until that many real tokens are read, in the loader's own order."""
    ld = loader(documents_dir)
    budget = int(1.5 * ld._input_tokens.sum())  # half-way through the second epoch
    steps = ld.steps_for_tokens(budget)
    read, counts = 0, []
    while read < budget:
        ld.next_global_batch()
        read += ld.last_batch_tokens
        counts.append(ld.last_batch_tokens)
    assert steps == len(counts)
    assert sum(counts[:-1]) < budget <= sum(counts)
    # A full-window count would stop far too early.
    assert steps > -(-budget // (GLOBAL * ld.tokens_per_sample))


def test_state_is_versioned_and_tied_to_its_data(data_dir):
    ld = loader(data_dir)
    with pytest.raises(UserError, match="unknown data loader state version 2"):
        ld.load_state_dict({**ld.state_dict(), "version": 2})
    with pytest.raises(UserError, match="state is for other data: seed 3"):
        ld.load_state_dict({**ld.state_dict(), "seed": 3})
    with pytest.raises(UserError, match="state is for other data: data_id"):
        ld.load_state_dict({**ld.state_dict(), "data_id": "other:train"})


def test_bad_arguments_and_missing_data(tmp_path, data_dir):
    with pytest.raises(UserError, match="global_batch_size 8 is not divisible by micro_batch_size 3"):
        loader(data_dir, micro_batch_size=3)
    with pytest.raises(UserError, match="run the prepare stage first"):
        loader(tmp_path)


@pytest.fixture
def own_data(tmp_path):
    write_corpus(tmp_path / "corpus", n_docs=10, words=(40, 80))
    m = prepare(make_spec(tmp_path), tmp_path / "run")
    return tmp_path / "run" / "data", m


def test_corrupt_or_truncated_shard_is_named(own_data):
    data_dir, m = own_data
    shard = data_dir / m["splits"]["train"]["shards"][0]["path"]
    blob = bytearray(shard.read_bytes())
    blob[1000] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(UserError, match=rf"{shard} checksum mismatch against manifest.json"):
        run(loader(data_dir, shuffle=False), 1)
    shard.write_bytes(bytes(blob[:-2000]))
    with pytest.raises(UserError, match=rf"{shard} is truncated"):
        run(loader(data_dir, shuffle=False, num_workers=2), 1)


def test_skip_replaces_unreadable_samples_and_counts_them(own_data):
    data_dir, m = own_data
    first = m["splits"]["train"]["shards"][0]
    (data_dir / first["path"]).write_bytes(b"garbage")
    ld = loader(data_dir, shuffle=False, on_error="skip")
    keys, batches = run(ld, 1)
    after_shard = f"{first['samples']:010d}"
    assert keys[0] == [after_shard] * GLOBAL and ld.skipped == GLOBAL
    assert all(torch.equal(row, batches[0][0]) for row in batches[0])


def test_token_ids_must_fit_the_model_vocab(own_data):
    data_dir, m = own_data
    with pytest.raises(UserError, match=r"the train shards hold token id 257, but the model's vocab_size is 100"):
        loader(data_dir, vocab_size=100)
    # Even if the manifest under-reports, every sample is checked and named.
    path = data_dir / "manifest.json"
    path.write_text(path.read_text().replace('"max_token_id": 257', '"max_token_id": 0'))
    with pytest.raises(UserError, match=r"shard-000000.tar:0000000000: token id \d+ ≥ the model's vocab_size 100"):
        run(loader(data_dir, vocab_size=100, shuffle=False), 1)


def test_document_samples_are_padded(tmp_path):
    write_corpus(tmp_path / "corpus", n_docs=10, words=(1, 3))
    m = prepare(make_spec(tmp_path, seq_length=64, packing="documents"), tmp_path / "run")
    ld = loader(tmp_path / "run" / "data", shuffle=False, global_batch_size=2, micro_batch_size=2)
    batch = ld.next_global_batch()
    pad, bos = m["tokenizer"]["pad_id"], m["tokenizer"]["bos_id"]
    for row in batch.tokens[0]:
        end = int((row == 257).nonzero()[0])  # the EOS closing the document
        assert row[0] == bos  # pretraining starts a document as every prompt does
        assert (row[end + 1 :] == pad).all() and not (row[:end] == pad).any()
