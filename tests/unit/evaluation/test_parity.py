"""lm-evaluation-harness on llmforge checkpoints gives what the harness's own `hf` backend gives on their
`llmforge export hf`: the same accuracies and exact matches, every log-likelihood within 1e-4 (fp32) with the
same greedy flags, the same greedy generations. Three models: GPT-2-shaped (trained by llmforge: its byte
tokenizer; the hf backend with add_bos_token=True, as llmforge's sequences start with BOS), Llama-shaped and
Qwen-shaped (made by transformers with their families' tokenizers and imported: the hf backend with its
defaults; the Qwen one with its chat template, --apply-chat-template on both sides). At TP=1, TP=2 and PP=2,
through the `llmforge eval` CLI, two-shot, the shipped tasks (multiple choice, generation, rolling perplexity).

Each layout is one launch (1 or 2 processes, all three at once) evaluating the three models; the hf backend
runs in this process meanwhile, from the task folder (the harness alone resolves data files there).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from tests.unit.interop.test_finetune_families import finish, free_ports  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
TASKS_DIR = ROOT / "examples" / "eval_tasks"
WORKER = Path(__file__).with_name("parity_worker.py")
TASKS = ["llmforge_add2_mc", "llmforge_add2_gen", "llmforge_add2_ppl"]
LIMIT, FEWSHOT, BATCH = 12, 2, 4
ATOL = 1e-4
LAYOUTS = {"tp1": [], "tp2": ["parallelism.tensor_model_parallel_size=2"], "pp2": ["parallelism.pipeline_model_parallel_size=2"]}
MODELS = ("gpt2", "llama", "qwen2")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}


@dataclass(frozen=True)
class Model:
    source: Path  # what `llmforge eval` reads: a run dir, or an import's
    hf_dir: Path  # its `llmforge export hf`
    hf_args: dict
    chat: bool


def _models(root: Path) -> dict[str, Model]:
    from llmforge.interop.export import export_hf
    from llmforge.interop.import_ import import_hf
    from llmforge.models.presets import shrink
    from tests.unit.interop.families_tiny import save_chat_family, save_family
    from tests.unit.interop.tiny import build, write_run

    quiet = {"log": lambda m: None}
    gpt2 = shrink("gpt2-124m", vocab_size=262, seq_length=64)  # the byte tokenizer's 262 tokens: no row it cannot decode
    run = root / "gpt2-run"
    write_run(run, gpt2, build(gpt2))
    export_hf(run, root / "gpt2-hf", **quiet)
    out = {"gpt2": Model(run, root / "gpt2-hf", {"add_bos_token": True}, False)}
    for family, make, chat in (("llama", lambda p: save_family("llama", p), False), ("qwen2", lambda p: save_chat_family("qwen2", p), True)):
        original = make(root / f"{family}-original")
        import_hf(original, root / f"{family}-import")
        export_hf(root / f"{family}-import", root / f"{family}-hf", **quiet)
        out[family] = Model(root / f"{family}-import", root / f"{family}-hf", {}, chat)
    return out


def _hf_results(model: Model) -> dict:
    """The harness on its own: its hf backend over the export, its TaskManager, data files read from the task folder."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model.hf_dir), batch_size=BATCH, device="cpu", dtype="float32", **model.hf_args)
    here = os.getcwd()
    os.chdir(TASKS_DIR)
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=TASKS, num_fewshot=FEWSHOT, limit=LIMIT, log_samples=True,
                                       apply_chat_template=model.chat,
                                       task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    finally:
        os.chdir(here)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """{layout: {model: llmforge's results}}, and {model: the hf backend's}."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("lm-eval-parity")
    models = _models(root)
    common = ["--tasks", ",".join(TASKS), "--include-path", str(TASKS_DIR), "--limit", str(LIMIT), "--num-fewshot", str(FEWSHOT),
              "--batch-size", str(BATCH), "--log-samples"]
    procs = []
    for (layout, overrides), port in zip(LAYOUTS.items(), free_ports(len(LAYOUTS)), strict=True):
        ranks = 1 if not overrides else 2
        args = {"overrides": overrides, "common": common,
                "cases": [{"source": str(m.source), "output": str(root / layout / name / "results.json"), "chat": m.chat}
                          for name, m in models.items()]}
        for rank in range(ranks):
            env = {**os.environ, **OFFLINE, "RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                   "HF_DATASETS_CACHE": str(root / "datasets")}
            procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(args)], stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, env=env, cwd=root))
    try:
        os.environ.update(OFFLINE)
        theirs = {name: _hf_results(m) for name, m in models.items()}
    finally:
        finish(procs)
    ours = {layout: {name: {"results": json.loads((root / layout / name / "results.json").read_text()),
                            "samples": {task: [json.loads(line) for line in (root / layout / name / f"samples_{task}.jsonl").read_text().splitlines()]
                                        for task in TASKS}}
                     for name in models}
            for layout in LAYOUTS}
    return ours, theirs


def _answers(samples: list[dict]) -> dict[int, list]:
    return {s["doc_id"]: [r[0] for r in s["resps"]] for s in samples}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model", MODELS)
def test_llmforge_eval_answers_as_the_hf_backend_on_the_export(evaluated, layout, model):
    ours, theirs = evaluated
    mine, hf = ours[layout][model], theirs[model]
    worst, flags, generations = 0.0, 0, 0
    for task in TASKS:
        a, b = _answers(mine["samples"][task]), _answers(hf["samples"][task])
        assert a.keys() == b.keys() and len(a) == LIMIT
        for doc in b:
            for x, y in zip(a[doc], b[doc], strict=True):
                if isinstance(y, str):
                    assert x == y, f"{task} document {doc}: llmforge generated {x!r}, the hf backend {y!r}"
                    generations += 1
                elif isinstance(y, (list, tuple)):
                    assert bool(x[1]) == bool(y[1]), f"{task} document {doc}: greedy flags differ"
                    worst = max(worst, abs(x[0] - y[0]))
                    flags += 1
                else:
                    worst = max(worst, abs(x - y))
        for key, value in hf["results"][task].items():
            metric = key.partition(",")[0]
            if metric in ("acc", "acc_norm", "exact_match"):
                assert mine["results"]["results"][task][key] == value, f"{task} {key}"
    assert worst <= ATOL, f"largest log-likelihood difference {worst:.3g}"
    assert flags == 2 * LIMIT and generations == LIMIT  # two choices per question, one answer per generation
    print(f"{model} {layout}: largest log-likelihood difference {worst:.3g}")


def test_each_layout_ran_as_asked(evaluated):
    ours, _ = evaluated
    for layout, overrides in LAYOUTS.items():
        described = ours[layout]["gpt2"]["results"]["config"]["model_args"]["layout"]
        expected = {"tp1": "TP 1 × PP 1 × DP 1 over 1 process", "tp2": "TP 2 × PP 1 × DP 1 over 2 processes",
                    "pp2": "TP 1 × PP 2 × DP 1 over 2 processes"}[layout]
        assert described == expected
    assert ours["tp1"]["qwen2"]["results"]["config"]["apply_chat_template"] is True
    prompt = ours["tp1"]["qwen2"]["samples"]["llmforge_add2_gen"][0]["arguments"][0][0]
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")  # the template applied
