"""The example third-party plugin, plugins/llmforge-lion, installed with pip as a user would."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmforge.registry.manager import AUTOLOAD_ENV, build_registry
from llmforge.spec.errors import SpecError
from llmforge.spec.load import load_spec
from llmforge.spec.validate import validate_loaded

ROOT = Path(__file__).resolve().parents[3]
PLUGIN_DIR = ROOT / "plugins" / "llmforge-lion"
TINY = ROOT / "specs" / "tiny.yaml"
LLMFORGE_CLI = [sys.executable, "-c", "import sys; from llmforge.cli import main; sys.exit(main())"]


def _installed_from_here() -> bool:
    try:
        dist = importlib.metadata.distribution("llmforge-lion")
    except importlib.metadata.PackageNotFoundError:
        return False
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    return direct_url.get("url", "").rstrip("/").endswith("plugins/llmforge-lion")


@pytest.fixture(scope="session")
def lion_installed() -> None:
    """`pip install -e plugins/llmforge-lion`, unless this checkout's copy is installed already."""
    if not _installed_from_here():
        # --no-deps: llmforge is installed already, and pip must never fetch a PyPI namesake.
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(PLUGIN_DIR)]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
        importlib.invalidate_caches()
    if importlib.util.find_spec("llmforge_lion") is None:
        # An editable install made during this session is on sys.path only for new interpreters.
        sys.path.insert(0, str(PLUGIN_DIR / "src"))


@pytest.fixture
def registry(lion_installed, monkeypatch):
    import llmforge_lion

    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    return build_registry([(llmforge_lion, "llmforge-lion", llmforge_lion.__version__)])


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != AUTOLOAD_ENV} | env
    return subprocess.run([*LLMFORGE_CLI, *args], capture_output=True, text=True, env=environ, timeout=120)


PLUGIN_SPEC = """\
extends: {tiny}
logging:
  callbacks:
    - {{name: csv_logger, filename: metrics.csv}}
stages:
  - name: prepare
    type: prepare
  - name: pretrain
    type: pretrain
    train:
      micro_batch_size: 8
      global_batch_size: 16
      max_steps: 100
      optimizer: {{name: lion, lr: {lr}, betas: [0.9, 0.99], weight_decay: 1.0}}
    evaluators:
      - {{name: val_loss}}
      - {{name: sample_diversity, prompts: ["def ", "class "], max_new_tokens: 32, ngram_orders: [1, 2]}}
"""


def test_plugins_lists_it_by_its_entry_point(lion_installed, monkeypatch, capsys):
    from llmforge.cli import main
    from llmforge.registry.manager import reset_registry

    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    reset_registry()
    try:
        assert main(["plugins"]) == 0
    finally:
        reset_registry()
    lines = [line.split()[:4] for line in capsys.readouterr().out.splitlines()]
    assert ["optimizer", "lion", "llmforge-lion", "0.1.0"] in lines
    assert ["evaluator", "sample_diversity", "llmforge-lion", "0.1.0"] in lines
    assert ["callback", "csv_logger", "llmforge-lion", "0.1.0"] in lines


@pytest.mark.slow
def test_the_installed_plugin_is_listed_and_a_spec_naming_it_validates(lion_installed, tmp_path):
    listed = cli("plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    for kind, name in [("optimizer", "lion"), ("evaluator", "sample_diversity"), ("callback", "csv_logger")]:
        assert {"kind": kind, "name": name, "provider": "llmforge-lion", "version": "0.1.0"}.items() <= next(
            r for r in rows if (r["kind"], r["name"]) == (kind, name)).items()

    spec = tmp_path / "lion.yaml"
    spec.write_text(PLUGIN_SPEC.format(tiny=TINY, lr="3.0e-5"))
    ok = cli("validate", str(spec))
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr

    spec.write_text(PLUGIN_SPEC.format(tiny=TINY, lr="fast"))
    bad = cli("validate", str(spec))
    assert bad.returncode == 2
    line, text = next((n, s) for n, s in enumerate(spec.read_text().splitlines(), 1) if "name: lion" in s)
    assert f"lion.yaml:{line}:{text.index('lr:') + 1} stages[1].train.optimizer.lr: Input should be a valid number" in bad.stderr

    off = cli("validate", str(spec), **{AUTOLOAD_ENV: "1"})
    assert off.returncode == 2 and "unknown optimizer 'lion'" in off.stderr


@pytest.mark.parametrize(
    ("options", "path", "words"),
    [
        ("{name: lion, lr: -1}", "lr", "greater than 0"),
        ("{name: lion, betas: [0.9, 1.5]}", "betas", "each beta must be in [0, 1)"),
        ("{name: lion, weight_decay: 0.1, eps: 1.0e-8}", "eps", "unknown key 'eps'"),
    ],
)
def test_lion_options_are_checked(registry, options, path, words):
    with pytest.raises(SpecError) as e:
        validate_loaded(load_spec(TINY, [f"stages.1.train.optimizer={options}"]), registry)
    [issue] = e.value.issues
    assert issue.path == ("stages", 1, "train", "optimizer", path) and words in issue.message


def test_evaluator_and_callback_options_are_checked(registry):
    with pytest.raises(SpecError) as e:
        validate_loaded(load_spec(TINY, ["stages.1.evaluators=[{name: sample_diversity, unit: sentence}]",
                                         "logging.callbacks=[{name: csv_logger, colums: [step]}]"]), registry)
    assert {i.path for i in e.value.issues} == {("stages", 1, "evaluators", 0, "unit"), ("logging", "callbacks", 0, "colums")}
    assert any(i.hint == "did you mean 'columns'?" for i in e.value.issues)


def quadratic(x):
    # An ill-conditioned bowl, minimum at 1: what any optimizer must get down.
    import torch

    scales = torch.logspace(-1, 1, x.numel())
    return ((x - 1.0) ** 2 * scales).sum()


def test_lion_built_through_the_registry_reduces_a_quadratic(registry):
    import torch
    from llmforge_lion.optimizer import Lion

    spec = validate_loaded(load_spec(TINY, ["stages.1.train.optimizer={name: lion, lr: 0.01, weight_decay: 0.0}"]), registry)
    torch.manual_seed(0)
    x = torch.nn.Parameter(torch.randn(16) * 3)
    optimizer = registry.build("optimizer", spec.stages[1].train.optimizer, params=[x])
    assert isinstance(optimizer, Lion)
    start = quadratic(x).item()
    steps = 500
    for step in range(steps):
        # Lion moves every coordinate by lr per step, so it needs a decaying lr to settle.
        optimizer.param_groups[0]["lr"] = 0.1 * (1 - step / steps)
        optimizer.zero_grad()
        loss = quadratic(x)
        loss.backward()
        optimizer.step()
    assert quadratic(x).item() < start * 1e-3, (start, quadratic(x).item())
    assert torch.allclose(x.detach(), torch.ones(16), atol=0.05)


def test_lion_step_is_the_published_update(lion_installed):
    import torch
    from llmforge_lion.optimizer import Lion

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    grads = [torch.tensor([0.5, -1.0, 0.0]), torch.tensor([-2.0, 0.1, 0.3])]
    expected, m = p.detach().clone(), torch.zeros(3)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        update = torch.sign(0.9 * m + 0.1 * g)
        expected = expected * (1 - 0.1 * 0.5) - 0.1 * update
        m = 0.99 * m + 0.01 * g
        assert torch.equal(p.detach(), expected)
    assert torch.equal(opt.state[p]["exp_avg"], m)


def test_lion_resumes_from_its_state_dict(lion_installed):
    import torch
    from llmforge_lion.optimizer import Lion

    def run(steps: int, state: dict | None = None, start: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        x = torch.nn.Parameter(torch.full((4,), 3.0) if start is None else start.clone())
        opt = Lion([x], lr=0.05, weight_decay=0.1)
        if state is not None:
            opt.load_state_dict(state)
        for _ in range(steps):
            opt.zero_grad()
            quadratic(x).backward()
            opt.step()
        return x.detach(), opt.state_dict()

    straight, _ = run(10)
    half, state = run(5)
    resumed, _ = run(5, state, half)
    assert torch.equal(straight, resumed)


class FakeContext:
    """What the run gives an evaluator: a tokenizer, greedy generation and a log."""

    def __init__(self, continuation: list[int]):
        self.continuation = continuation
        self.lines: list[str] = []
        self.tokenizer = self

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        assert prompt_ids and max_new_tokens == 8
        return self.continuation[:max_new_tokens]

    def log(self, msg: str) -> None:
        self.lines.append(msg)


def test_sample_diversity_scores_loops_low_and_varied_text_high(lion_installed):
    from llmforge_lion.evaluator import build_sample_diversity
    from llmforge_lion.options import SampleDiversityOptions

    options = SampleDiversityOptions(prompts=["a", "b"], max_new_tokens=8, ngram_orders=[2, 1])
    looping = build_sample_diversity(options, context=FakeContext([7, 7, 7, 7, 7, 7, 7, 7])).evaluate(step=100)
    assert looping == {"distinct_1": 1 / 16, "distinct_2": 1 / 14, "sample_length": 8.0}
    varied_context = FakeContext(list(range(8)))
    varied = build_sample_diversity(options, context=varied_context).evaluate(step=200)
    # Both prompts get the same continuation, so every n-gram appears exactly twice.
    assert varied["distinct_1"] == 0.5 and varied["distinct_2"] == 0.5
    assert varied_context.lines == ["step 200: sample diversity distinct_1 0.500, distinct_2 0.500, sample_length 8.000"]
    words = build_sample_diversity(options.model_copy(update={"unit": "word"}), context=FakeContext([1, 2, 1, 2])).evaluate(step=1)
    assert words["distinct_1"] == 2 / 8


def test_csv_logger_grows_its_header_and_continues_after_resume(lion_installed, tmp_path):
    import csv

    from llmforge_lion.callback import build_csv_logger
    from llmforge_lion.options import CSVLoggerOptions

    logger = build_csv_logger(CSVLoggerOptions(), run_dir=tmp_path, spec=None, stage=None)
    logger.on_log({"step": 10, "loss": 2.5, "lr": 1e-4})
    logger.on_log({"step": 20, "loss": 2.25, "lr": 2e-4})
    logger.on_log({"step": 20, "eval": {"val_loss": 2.4, "distinct_1": 0.7}})
    logger.on_stage_end("pretrain", {"steps": 20, "tokens": 81920})
    # A resumed run appends to the same files with the same header.
    resumed = build_csv_logger(CSVLoggerOptions(), run_dir=tmp_path)
    resumed.on_log({"step": 30, "loss": 2.0, "lr": 3e-4})

    with (tmp_path / "metrics.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["step", "loss", "lr", "eval/val_loss", "eval/distinct_1"],
        ["10", "2.5", "0.0001", "", ""],
        ["20", "2.25", "0.0002", "", ""],
        ["20", "", "", "2.4", "0.7"],
        ["30", "2.0", "0.0003", "", ""],
    ]
    assert (tmp_path / "stages.csv").read_text().splitlines() == ["stage,steps,tokens", "pretrain,20,81920"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_csv_logger_with_fixed_columns_writes_only_those(lion_installed, tmp_path):
    from llmforge_lion.callback import build_csv_logger
    from llmforge_lion.options import CSVLoggerOptions

    logger = build_csv_logger(CSVLoggerOptions(filename="loss.csv", columns=["step", "loss"], summary_filename=None), run_dir=tmp_path)
    logger.on_log({"step": 1, "loss": 3.0, "lr": 0.1})
    logger.on_log({"step": 2, "eval": {"val_loss": 2.9}})
    logger.on_stage_end("pretrain", {"steps": 2})
    assert (tmp_path / "loss.csv").read_text().splitlines() == ["step,loss", "1,3.0", "2,"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.csv"]
