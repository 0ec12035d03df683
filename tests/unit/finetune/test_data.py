"""Finetune data: response-only masks, pair rows, soft-prompt shifts, and the loader's order and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llmforge.data.sft import SFTLoader, chat_format, marked_text, pack_examples
from llmforge.finetune.common import preference_packer
from llmforge.finetune.prompt import shift_batch, with_virtual_tokens
from llmforge.finetune.steps import pair_rows
from llmforge.spec.errors import UserError


@pytest.fixture(scope="module")
def tokenizer():
    from llmforge.data.tokenizers import build_byte
    from llmforge.spec.components import ByteTokenizer

    return build_byte(ByteTokenizer.model_validate({}), run_dir=Path("."), texts=[])


class _Stage:
    chat_template = "default"


def test_response_mask_covers_the_answer_and_eos_only(tokenizer):
    template = chat_format("default", tokenizer)
    ids, mask = template.encode({"prompt": "12+30=", "response": "42"})
    prompt = [tokenizer.bos_id, *tokenizer.encode("<|user|>12+30=<|assistant|>")]
    assert ids == prompt + tokenizer.encode("42") + [tokenizer.eos_id]
    assert mask == [0] * len(prompt) + [1, 1, 1]


CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                     {"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]}


def test_a_conversation_renders_each_turn_pair_and_trains_every_answer(tokenizer):
    """A {prompt}/{response} template on `messages`: the system turn first, then each user/assistant pair as a
    prompt/response example, each answer closed by EOS and trained with it (`train_on_turns: last`: the last only)."""
    ids, mask = chat_format("default", tokenizer).encode(CHAT)
    eos = tokenizer.decode([tokenizer.eos_id])
    assert marked_text(tokenizer, ids, mask) == f"<|bos|><|system|>be brief<|user|>hi<|assistant|>[[yo{eos}]]<|user|>2+2=<|assistant|>[[4{eos}]]"
    _, last = chat_format("default", tokenizer, train_on_turns="last").encode(CHAT)
    assert marked_text(tokenizer, ids, last) == f"<|bos|><|system|>be brief<|user|>hi<|assistant|>yo{eos}<|user|>2+2=<|assistant|>[[4{eos}]]"
    ids, mask = chat_format("default", tokenizer).encode({"system": "be brief", "prompt": "hi", "response": "yo"})
    assert marked_text(tokenizer, ids, mask) == f"<|bos|><|system|>be brief<|user|>hi<|assistant|>[[yo{eos}]]"
    plain_ids, _ = chat_format("Q: {prompt}\nA: {response}\n", tokenizer).encode(CHAT)
    assert tokenizer.decode(plain_ids) == f"<|bos|>be brief\n\nQ: hi\nA: yo\n{eos}Q: 2+2=\nA: 4\n{eos}"


@pytest.mark.parametrize("roles", [("user", "user", "assistant"), ("assistant", "user", "assistant"), ("user", "assistant", "user"),
                                   ("user", "system", "assistant")])
def test_a_conversation_a_prompt_response_template_cannot_render_is_refused(tokenizer, roles):
    record = {"messages": [{"role": r, "content": "x"} for r in roles]}
    with pytest.raises(UserError, match="does not fit a {prompt}/{response} chat template"):
        chat_format("default", tokenizer).encode(record)


def test_packed_masks_align_with_targets(tokenizer):
    example = chat_format("plain", tokenizer).encode({"prompt": "ab", "response": "c"})  # bos a b | c eos
    tokens, masks, truncated, inputs = pack_examples([example], 6, tokenizer.pad_id)
    assert tokens.shape == (1, 7) and masks.shape == (1, 6) and truncated == 0
    assert inputs.tolist() == [len(example[0])]  # every real token is an input: the window holds 6
    targets = tokens[0, 1:]
    trained = [int(t) for t, m in zip(targets, masks[0]) if m]
    assert trained == [*tokenizer.encode("c"), tokenizer.eos_id]  # the answer and EOS, nothing else
    assert masks[0].tolist() == [0, 0, 1, 1, 0, 0]  # padding never trains
    _, _, cut, inputs = pack_examples([example], 3, tokenizer.pad_id)
    assert cut == 1 and inputs.tolist() == [3]  # cut to 4 tokens, of which the model reads 3


def test_preference_rows_put_chosen_beside_rejected(tokenizer):
    records = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": "4", "rejected": "44"}]
    tokens, masks, truncated, _ = preference_packer(tokenizer, _Stage(), 12)(records)
    assert tokens.shape == (2, 26) and masks.shape == (2, 24) and truncated == 0
    rows, row_masks = pair_rows(torch.from_numpy(tokens), torch.from_numpy(masks))
    assert rows.shape == (4, 13)
    decoded = [tokenizer.decode([int(t) for t, m in zip(r[1:], rm) if m]) for r, rm in zip(rows, row_masks)]
    assert decoded == ["2<|eos|>", "4<|eos|>", "3<|eos|>", "44<|eos|>"]  # chosen rows first, then rejected


def test_reward_model_masks_mark_the_last_token(tokenizer):
    records = [{"prompt": "1+1=", "chosen": "2", "rejected": "33"}]
    tokens, masks, *_ = preference_packer(tokenizer, _Stage(), 12, score_last=True)(records)
    rows, row_masks = pair_rows(torch.from_numpy(tokens), torch.from_numpy(masks))
    assert row_masks.sum(dim=1).tolist() == [1.0, 1.0]
    for row, mask in zip(rows, row_masks):
        assert int(row[int(mask.argmax()) + 1]) == tokenizer.eos_id  # target coordinates: mask[j] marks token j + 1
    # A sequence of max_seq_length + 1 tokens still has its EOS marked (the whole row is the input).
    long = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}]
    length = len(chat_format("default", tokenizer).encode({"prompt": "1+1=", "response": "2"})[0]) - 1
    tokens, masks, truncated, _ = preference_packer(tokenizer, _Stage(), length, score_last=True)(long)
    assert truncated == 0 and masks[0, length - 1] == 1.0 and masks[0, 2 * length - 1] == 1.0


def test_virtual_tokens_lead_every_sequence():
    assert with_virtual_tokens([7, 8], 3, 0) == [0, 0, 0, 7, 8]
    assert with_virtual_tokens([0, 0, 0, 7, 8], 3, 0) == [0, 0, 0, 7, 8]  # already there: unchanged
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    masks = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    shifted, shifted_masks = shift_batch(tokens, masks, 2, 0)
    assert shifted.tolist() == [[0, 0, 5, 6, 7]] and shifted_masks.tolist() == [[0.0, 0.0, 0.0, 1.0]]


def _order(loader: SFTLoader, steps: int) -> list[list[int]]:
    out = []
    for _ in range(steps):
        batch = loader.next_global_batch()
        out.append([int(t[0]) for micro in batch.tokens for t in micro])
    return out


def test_loader_order_is_the_same_for_every_data_parallel_size():
    tokens = np.arange(40, dtype=np.int64).reshape(20, 2)  # row i starts with 2i
    masks = np.ones((20, 1), dtype=np.float32)
    one = _order(SFTLoader(tokens, masks, global_batch_size=8, micro_batch_size=2, seed=3), 5)
    ranks = [_order(SFTLoader(tokens, masks, global_batch_size=8, micro_batch_size=2, dp_rank=r, dp_size=2, seed=3), 5) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == one
    flat = [x for step in one for x in step]
    assert sorted(flat[:20]) == list(range(0, 40, 2))  # one epoch: every example once
    assert flat[:20] != flat[20:40] and sorted(flat[20:40]) == sorted(flat[:20])  # reshuffled per epoch
    assert _order(SFTLoader(tokens, masks, global_batch_size=8, micro_batch_size=2, seed=4), 1) != one[:1]


def test_loader_resumes_exactly_from_its_state():
    tokens = np.arange(60, dtype=np.int64).reshape(30, 2)
    masks = np.ones((30, 1), dtype=np.float32)
    make = lambda: SFTLoader(tokens, masks, global_batch_size=4, micro_batch_size=2, seed=9)  # noqa: E731
    uninterrupted = _order(make(), 12)
    first = make()
    _order(first, 5)
    state = first.state_dict()
    assert state == {"version": 2, "position": 20, "seed": 9, "data_files": {}}
    resumed = make()
    resumed.load_state_dict(state)
    assert _order(resumed, 7) == uninterrupted[5:]
    with pytest.raises(Exception, match="version"):
        resumed.load_state_dict({"version": 99, "position": 0})


def test_rollout_resume_refuses_changed_prompt_files():

    from llmforge.finetune.rollout import RolloutSource
    from llmforge.spec.errors import UserError

    def source(data_files):
        return RolloutSource([({"prompt": "1+1="}, [1, 2])], tokenizer=None, reward=None, group_size=2, global_batch_size=2,
                             micro_batch_size=2, dp_rank=0, dp_size=1, seed=0, length=8, sampling={"max_new_tokens": 2},
                             scale_rewards=True, need_old_logprobs=False, reference=None,
                             data_files=data_files)

    saved = source({"add": {"/data/add.jsonl": "aa"}})
    saved.position = 6
    state = saved.state_dict()
    resumed = source({"add": {"/data/add.jsonl": "aa"}})
    resumed.load_state_dict(state)
    assert resumed.position == 6
    with pytest.raises(UserError, match="/data/add.jsonl changed") as info:
        source({"add": {"/data/add.jsonl": "bb"}}).load_state_dict(state)
    assert info.value.hint == "restore the file, or start the stage afresh in a new run dir"
    with pytest.raises(UserError, match="/data/more.jsonl is new"):
        source({"add": {"/data/add.jsonl": "aa", "/data/more.jsonl": "cc"}}).load_state_dict(state)
