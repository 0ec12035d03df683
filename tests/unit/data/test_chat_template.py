"""`chat_template: tokenizer`: the tokenizer's own Jinja template renders the ids transformers renders,
and the loss mask covers each assistant turn's content and its end-of-turn token, nothing else.

The ids are checked against transformers' `apply_chat_template(..., tokenize=True)`. The masks
are checked against one computed here another way: for the four families, from each family's
published assistant header and end-of-turn token found in transformers' rendering, mapped to
tokens through transformers' own offsets; for the `{% generation %}` template, transformers'
`return_assistant_tokens_mask`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmforge.data.pretrained import load_pretrained
from llmforge.data.sft import chat_format, marked_text
from llmforge.spec.errors import UserError

from .chat_fixtures import FAMILIES, tokenizer_folder

transformers = pytest.importorskip("transformers")

SYSTEM = "You are a terse assistant."
# The second user turn quotes the first answer: a search for the answer's text alone would find it there first.
CONVERSATION = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris is the capital of France."},
                {"role": "user", "content": "You said 'About two million.' How many people live there?"},
                {"role": "assistant", "content": "About two million."},
                {"role": "user", "content": "Thanks!"},
                {"role": "assistant", "content": "You are welcome."}]
# What the published templates write before each assistant content (the last turn's, when it differs) and after it.
HEADERS = {"llama3": ("<|start_header_id|>assistant<|end_header_id|>\n\n", None, "<|eot_id|>"),
           "mistral": ("[/INST] ", None, "</s>"),
           "qwen2.5": ("<|im_start|>assistant\n", None, "<|im_end|>"),
           "qwen3": ("<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n", "<|im_end|>")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {family: tokenizer_folder(root, family) for family in FAMILIES}


def _theirs(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def _expected_mask(theirs, family: str, messages: list[dict]) -> list[int]:
    """The mask from the family's own markers: each assistant content (after its header) and the end-of-turn token,
    located in transformers' rendering, to tokens through transformers' offsets."""
    text = theirs.apply_chat_template(messages, tokenize=False)
    encoded = theirs(text, add_special_tokens=False, return_offsets_mapping=True)
    header, last_header, eot = HEADERS[family]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    spans, pos = [], 0
    for n, answer in enumerate(answers):
        head = last_header if last_header and n == len(answers) - 1 else header
        pos = text.index(head + answer + eot, pos) + len(head)
        spans.append((pos, pos + len(answer) + len(eot)))
        pos = spans[-1][1]
    return [int(any(s < end and e > start for start, end in spans)) for s, e in encoded["offset_mapping"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_families_render_as_transformers_with_every_answer_and_its_end_of_turn_trained(folders, family):
    ours, theirs = load_pretrained(folders[family]), _theirs(folders[family])
    ids, mask = chat_format("tokenizer", ours).encode({"messages": CONVERSATION})
    assert ids == theirs.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]  # transformers 5: a dict by default
    if family == "generation":
        expected = theirs.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)["assistant_masks"]
    else:
        expected = _expected_mask(theirs, family, CONVERSATION)
    assert mask == expected
    trained = [run.strip("[]") for run in marked_text(ours, ids, mask).split("[[")[1:]]
    eot = "<|eot_id|>" if family == "llama3" else "</s>" if family == "mistral" else "<|im_end|>"
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [t.split("]]")[0].strip() for t in trained] == [a + eot for a in answers]  # and nothing of the think block or headers


@pytest.mark.parametrize("family", FAMILIES)
def test_no_second_bos_and_no_extra_eos(folders, family):
    """Llama's and Mistral's tokenizer.json add BOS themselves: the template's own BOS is the only one, and the
    sequence ends as the template ends it (Qwen: `<|im_end|>\\n`)."""
    ours = load_pretrained(folders[family])
    ids, _ = chat_format("tokenizer", ours).encode({"messages": CONVERSATION[:3]})
    if ours.bos_id is not None:
        assert ids.count(ours.bos_id) == (1 if family in ("llama3", "mistral") else 0)
    assert ids[-1] != ours.eos_id or family in ("llama3", "mistral")  # Qwen's turn ends `<|im_end|>\n`: no EOS after it


@pytest.mark.parametrize("family", FAMILIES)
def test_the_generation_prompt_is_transformers(folders, family):
    from llmforge.interop.generate import generation_template

    ours, theirs = load_pretrained(folders[family]), _theirs(folders[family])
    template = generation_template("tokenizer", ours, run_root=folders[family], stage="sft")
    want = theirs.apply_chat_template([{"role": "user", "content": "Where is Paris?"}], add_generation_prompt=True, tokenize=True)
    assert template.prompt_ids("Where is Paris?") == want["input_ids"]
    with_system = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where is Paris?"}]
    assert template.prompt_ids("Where is Paris?", SYSTEM) == theirs.apply_chat_template(with_system, add_generation_prompt=True,
                                                                                        tokenize=True)["input_ids"]


def test_generate_auto_uses_the_stage_s_tokenizer_template(folders, tmp_path):
    import yaml

    from llmforge.interop.generate import generation_template

    ours, theirs = load_pretrained(folders["qwen3"]), _theirs(folders["qwen3"])
    (tmp_path / "spec.resolved.yaml").write_text(yaml.safe_dump({"stages": [{"name": "chat", "type": "sft", "chat_template": "tokenizer"}]}))
    template = generation_template("auto", ours, run_root=tmp_path, stage="chat")
    want = theirs.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert template.prompt_ids("Hi") == want


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_train_on_turns_last_trains_the_last_answer_only(folders, family):
    ours = load_pretrained(folders[family])
    ids, every = chat_format("tokenizer", ours).encode({"messages": CONVERSATION})
    _, last = chat_format("tokenizer", ours, train_on_turns="last").encode({"messages": CONVERSATION})
    start = max(i for i in range(len(every)) if every[i] and not every[i - 1])
    assert last == [0] * start + every[start:] and sum(last) < sum(every)


def test_prompt_response_and_preference_records_are_a_user_and_an_assistant_turn(folders):
    from llmforge.finetune.common import preference_packer

    ours, theirs = load_pretrained(folders["llama3"]), _theirs(folders["llama3"])
    template = chat_format("tokenizer", ours)
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids, mask = template.encode({"prompt": "2+2?", "response": "4", "system": SYSTEM})
    assert ids == theirs.apply_chat_template(turns, tokenize=True)["input_ids"]
    assert mask == _expected_mask(theirs, "llama3", turns)
    stage = SimpleNamespace(chat_template="tokenizer", name="dpo")
    tokens, masks, _, _ = preference_packer(ours, stage, 96)([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    for side, answer in ((0, "4"), (1, "5")):
        row, row_mask = tokens[0, side * 97:(side + 1) * 97], masks[0, side * 96:(side + 1) * 96]
        trained = [int(t) for t, m in zip(row[1:], row_mask) if m]
        assert ours.decode(trained) == answer + "<|eot_id|>"


def test_a_tokenizer_without_a_template_is_refused(tmp_path, folders):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((folders["llama3"] / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    with pytest.raises(UserError, match="this tokenizer has none"):
        chat_format("tokenizer", load_pretrained(folder))


def _with_template(tmp_path: Path, folders, template: str) -> object:
    folder = tmp_path / "custom"
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_bytes((folders["qwen2.5"] / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": template}))
    return load_pretrained(folder)


@pytest.mark.parametrize(("template", "says"), [
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n{% endfor %}", "changes assistant turn 1's content"),
    ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}", "never learn to stop"),
    ("{% for m in messages if m.role != 'assistant' %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}", "does not render assistant turn"),
    ("{% for m in messages %}{{ m.content }}<|im_end|>{{ m.content }}{% endfor %}", "more than once"),
    ("{% for m in messages %}{{ raise_exception('roles must alternate') }}{% endfor %}", "roles must alternate"),
    ("{% for m in messages %}{{ m.content }", "not valid Jinja"),
    ("{% for m in messages %}<|im_start|>{% generation %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endgeneration %}"
     "<|im_end|>{% endfor %}{% set x = 1 %}", None),
])
def test_a_template_whose_answers_cannot_be_found_is_refused(tmp_path, folders, template, says):
    tok = _with_template(tmp_path, folders, template)
    messages = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    if says is None:  # {% generation %} blocks are trusted as they are: here they mark the user's turn, as transformers would
        ids, mask = chat_format("tokenizer", tok).encode(messages)
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == "hi"
        return
    with pytest.raises(UserError, match=says):
        chat_format("tokenizer", tok).encode(messages)


def test_qwen3_with_an_inline_think_block_is_refused_not_guessed(folders):
    tok = load_pretrained(folders["qwen3"])
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>hmm</think>hello"}]}
    with pytest.raises(UserError, match="depends on what the assistant says"):
        chat_format("tokenizer", tok).encode(record)


def test_the_globals_and_filters_are_transformers(tmp_path, folders):
    """tojson (no HTML escaping, non-ASCII kept, indent), strftime_now, namespace and dict render as in transformers."""
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                "{{ messages | tojson(indent=2) }}|{{ dict(a=1) | tojson }}|{{ ns.n }}|{{ strftime_now('%Y') }}|{{ bos_token }}|"
                "{{ eos_token }}{% if add_generation_prompt %}<|im_start|>{% endif %}")
    tok = _with_template(tmp_path, folders, template)
    from llmforge.data.chat_template import render, template_source, template_variables

    messages = [{"role": "user", "content": "<b>café</b> & 'quotes'"}]
    ours, _ = render(template_source(tok), messages, template_variables(tok), add_generation_prompt=True)
    theirs = _theirs(tmp_path / "custom").apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == theirs and "café" in ours and "<b>" in ours


def test_the_sandbox_refuses_underscore_attributes(tmp_path, folders):
    tok = _with_template(tmp_path, folders, "{% set ns = namespace() %}{% set ns._x = 1 %}{{ messages[0].content }}<|im_end|>")
    with pytest.raises(UserError, match="underscore"):
        chat_format("tokenizer", tok).prompt_ids("hi")


def test_the_preflight_logs_marked_examples_and_refuses_a_set_with_nothing_to_train(folders):
    from llmforge.data.sft import pack_examples
    from llmforge.stages.sft import preflight

    tok = load_pretrained(folders["qwen2.5"])
    lines: list[str] = []
    context = SimpleNamespace(tokenizer=lambda: tok, log=lines.append)
    stage = SimpleNamespace(name="chat")
    encoded = [chat_format("tokenizer", tok).encode({"messages": CONVERSATION[:3]})]
    preflight(context, stage, pack_examples(encoded, 128, tok.pad_id), what="response")
    assert lines == ["[chat] example 1 (response tokens in [[ ]]): <|im_start|>system\\nYou are a terse assistant.<|im_end|>\\n"
                     "<|im_start|>user\\nWhat is the capital of France?<|im_end|>\\n<|im_start|>assistant\\n"
                     "[[Paris is the capital of France.<|im_end|>]]\\n"]
    short = pack_examples(encoded, 20, tok.pad_id)  # the prompt fills the window: nothing trains
    with pytest.raises(UserError, match="no example has a token that trains"):
        preflight(context, stage, short, what="response")


def test_validate_probes_the_tokenizer_template(folders, tmp_path):
    from llmforge.data.chat_template import probe

    probe(load_pretrained(folders["mistral"]))
    with pytest.raises(UserError, match="never learn to stop"):
        probe(_with_template(tmp_path, folders, "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"))


def _validate(tmp_path: Path, tokenizer: Path, template: str = "tokenizer") -> dict[str, str]:
    from llmforge.spec.errors import SpecError, dotted
    from llmforge.spec.validate import load_and_validate

    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    spec = f"""\
name: t
tokenizer: {{name: pretrained, path: {tokenizer}}}
model: {{name: gpt, num_layers: 2, hidden_size: 64, num_attention_heads: 4, vocab_size: 512, seq_length: 256}}
stages:
  - name: chat
    type: sft
    chat_template: {template}
    data: {{sources: {{chat: {{name: instructions, format: messages, paths: [{tmp_path / 'chat.jsonl'}]}}}}, val_fraction: 0}}
    evaluators: []
    train: {{micro_batch_size: 1, global_batch_size: 1, max_steps: 1, optimizer: {{name: adamw, lr: 1.0e-3}}}}
"""
    (tmp_path / "spec.yaml").write_text(spec)
    try:
        load_and_validate(str(tmp_path / "spec.yaml"))
    except SpecError as e:
        return {dotted(i.path): i.message for i in e.issues}
    return {}


def test_validate_refuses_a_tokenizer_without_a_template_or_with_one_it_cannot_mask(folders, tmp_path):
    assert _validate(tmp_path, folders["qwen3"]) == {}
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "tokenizer.json").write_bytes((folders["qwen3"] / "tokenizer.json").read_bytes())
    (plain / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    found = _validate(tmp_path, plain)
    assert list(found) == ["stages[0].chat_template"] and "this tokenizer has none" in found["stages[0].chat_template"]
    assert _validate(tmp_path, plain, template="default") == {}
    _with_template(tmp_path, folders, "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    found = _validate(tmp_path, tmp_path / "custom")
    assert "never learn to stop" in found["stages[0].chat_template"]
