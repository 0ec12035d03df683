"""The pieces of `llmforge eval` that need no model: the shipped tasks and their data, local data files
resolved against each task YAML, a TaskManager over only the include paths, task names refused with a
guess, results as eval-row keys, and the adapter's tokens and chat rendering against transformers' own."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from llmforge.evaluation import harness  # noqa: E402
from llmforge.spec.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
TASKS_DIR = ROOT / "examples" / "eval_tasks"
SHIPPED = {"llmforge_add2_mc", "llmforge_add2_gen", "llmforge_add2_ppl"}


def test_shipped_task_data_is_what_make_data_writes():
    spec = importlib.util.spec_from_file_location("make_data", TASKS_DIR / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, text in module.texts().items():
        assert (TASKS_DIR / "data" / name).read_text() == text, f"data/{name} is stale: run examples/eval_tasks/make_data.py"
    test = [json.loads(line) for line in (TASKS_DIR / "data" / "add2_test.jsonl").read_text().splitlines()]
    assert all(r["choices"][r["label"]] == r["answer"] and len(set(r["choices"])) == 2 for r in test)
    from llmforge.data.tasks import is_heldout

    assert all(is_heldout("add2", r["prompt"]) for r in test)


def test_relative_data_files_resolve_against_the_task_yaml(tmp_path):
    folder = tmp_path / "tasks"
    config = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "data/t.jsonl", "train": ["a.jsonl", "/abs/b.jsonl"]},
                                                         "data_dir": "d"}}
    out = harness.local_files(config, folder)
    assert out["dataset_kwargs"] == {"data_files": {"test": str(folder / "data/t.jsonl"), "train": [str(folder / "a.jsonl"), "/abs/b.jsonl"]},
                                     "data_dir": str(folder / "d")}
    assert harness.local_files({"dataset_path": "json", "dataset_kwargs": {"data_files": "hf://x/y.json"}}, folder)["dataset_kwargs"] == \
        {"data_files": "hf://x/y.json"}
    hub = {"dataset_path": "allenai/ai2_arc", "dataset_kwargs": {"data_files": "ARC-Easy/test.parquet"}}  # a path inside a Hub repo
    assert harness.local_files(hub, folder) == hub


def test_shipped_tasks_load_from_any_directory_with_only_the_include_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # datasets alone would look for data/add2_test.jsonl here
    manager = harness.task_manager([str(TASKS_DIR)])
    assert set(manager.all_tasks) == SHIPPED | {"llmforge_add2"}  # the harness's own ~15,000 are not indexed
    tasks = manager.load(["llmforge_add2"])["tasks"]
    assert set(tasks) == SHIPPED
    assert len(tasks["llmforge_add2_mc"].test_docs()) == 200 and len(tasks["llmforge_add2_mc"].training_docs()) == 20
    from lm_eval.tasks import TaskManager

    with pytest.raises(Exception, match="add2_test.jsonl|FileNotFound|Unable to find"):
        TaskManager(include_path=[str(TASKS_DIR)], include_defaults=False).load(["llmforge_add2_mc"])


def test_unknown_task_and_missing_include_path_are_refused(tmp_path):
    manager = harness.task_manager([str(TASKS_DIR)])
    with pytest.raises(UserError, match="no task, group or tag 'llmforge_add2_mcq'") as e:
        harness.check_tasks(manager, ["llmforge_add2_gen", "llmforge_add2_mcq"], [str(TASKS_DIR)])
    assert e.value.hint == "did you mean 'llmforge_add2_mc'?"
    harness.check_tasks(manager, [str(TASKS_DIR / "llmforge_add2_gen.yaml")], [str(TASKS_DIR)])  # a YAML path is a task too
    with pytest.raises(UserError, match="include path .*nowhere is not a directory"):
        harness.task_manager([str(tmp_path / "nowhere")])


def test_results_become_task_keys_without_stderrs():
    results = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.625},
                           "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05,
                                     "exact_match,flexible-extract": 0.5, "sample_len": 8},
                           "wikitext": {"word_perplexity,none": 31.5, "word_perplexity_stderr,none": "N/A"}},
               "groups": {"mmlu": {"alias": "mmlu", "acc,none": 0.3, "acc_stderr,none": 0.01}}}
    assert harness.metrics(results) == {"arc_easy/acc": 0.5, "arc_easy/acc_norm": 0.625, "gsm8k/exact_match/strict-match": 0.25,
                                        "gsm8k/exact_match/flexible-extract": 0.5, "wikitext/word_perplexity": 31.5, "mmlu/acc": 0.3}


@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory):
    """Tokenizer folders with the published chat templates (tests/unit/data/chat_fixtures.py), as llmforge and transformers load them."""
    transformers = pytest.importorskip("transformers")
    from llmforge.data.pretrained import load_pretrained
    from tests.unit.data.chat_fixtures import tokenizer_folder

    root = tmp_path_factory.mktemp("chat")
    out = {}
    for family in ("llama3", "mistral", "qwen2.5", "qwen3"):
        folder = tokenizer_folder(root, family)
        out[family] = (load_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder))
    return out


FEWSHOT_CHAT = [{"role": "system", "content": "Answer with the sum."}, {"role": "user", "content": "12+30="},
                {"role": "assistant", "content": "42"}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2.5", "qwen3"])
def test_chat_rendering_and_tokens_are_transformers(family_tokenizers, family):
    """What the hf backend does with transformers: apply_chat_template(tokenize=False, continue_final_message=not
    add_generation_prompt) (Mistral's template refuses the system turn: both retry without it), then encode."""
    from llmforge.evaluation.adapter import encode, render_chat

    ours, theirs = family_tokenizers[family]
    for add_generation_prompt, chat in ((True, FEWSHOT_CHAT), (False, [*FEWSHOT_CHAT, {"role": "assistant", "content": "Paris is "}])):
        try:
            expected = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)
        except Exception:  # the hf backend's retry on a template error
            chat = [m for m in chat if m["role"] != "system"]
            expected = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)
        text = render_chat(ours, chat, add_generation_prompt=add_generation_prompt)
        assert text == expected
        # The hf backend's tok_encode: no added specials when the text starts with BOS already (a template rendered it).
        rendered_bos = theirs.bos_token is not None and text.startswith(theirs.bos_token)
        assert encode(ours, text) == theirs.encode(text, add_special_tokens=not rendered_bos)
    assert encode(ours, "12+30=") == theirs.encode("12+30=")  # Llama's and Mistral's post-processor BOS, none for Qwen
    assert encode(ours, "12+30=", add_special_tokens=False) == theirs.encode("12+30=", add_special_tokens=False)


def test_llmforge_tokens_start_with_bos_as_the_hf_backend_with_add_bos_token(tmp_path):
    """An exported llmforge tokenizer adds no BOS itself; llmforge's sequences start with one, as the hf backend's do
    with add_bos_token=True (the parity tests run it so)."""
    transformers = pytest.importorskip("transformers")
    from llmforge.evaluation.adapter import encode
    from llmforge.interop.hf_files import write_tokenizer_files
    from tests.unit.interop.tiny import byte_tokenizer

    ours = byte_tokenizer()
    write_tokenizer_files(tmp_path, ours, model_max_length=64)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, add_bos_token=True)
    for text in ("23+58=81", "<|bos|>23+58=", ""):
        assert encode(ours, text) == theirs.encode(text, add_special_tokens=not text.startswith("<|bos|>"))
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).encode("23+58=") == ours.encode("23+58=")


def test_llmforge_eval_refuses_bad_input_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from llmforge.cli import main

    assert main(["eval", str(tmp_path / "nowhere"), "--tasks", "llmforge_add2"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--tasks", "llmforge_add2", "--batch-size", "0"]) == 2
    assert "--batch-size 0 is below 1" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--tasks", " , "]) == 2
    assert "--tasks names no task" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["eval", str(tmp_path), "--tasks", "llmforge_add2"]) == 2
    assert 'lm-evaluation-harness is not installed\n  hint: pip install -e ".[eval]"' in capsys.readouterr().err
