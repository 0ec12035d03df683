"""A run's life across attempts: budgets that change, stages that go stale, the lr a resume meets, how attempts end."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from llmforge.runtime import lifecycle
from llmforge.runtime.rundir import RunDir
from llmforge.runtime.schedules import build_constant, build_cosine, build_wsd
from llmforge.runtime.train import Loop, Preempted, TrainingStopped
from llmforge.spec.errors import UserError


def _stage(name: str, *, max_steps=None, max_tokens=None, max_epochs=None, **refs):
    train = SimpleNamespace(max_steps=max_steps, max_tokens=max_tokens, max_epochs=max_epochs)
    return SimpleNamespace(name=name, train=train, init_from=refs.get("init_from"), reference=refs.get("reference"),
                           rewards=refs.get("rewards", []))


def test_a_finished_stage_whose_budget_changed_says_how():
    done = {"status": "done", "budget": {"max_steps": 60, "max_tokens": None, "max_epochs": None}, "summary": {"steps": 60}}
    assert lifecycle.budget_change(_stage("p", max_steps=60), done) is None
    assert lifecycle.budget_change(_stage("p", max_steps=70), done) == "max_steps 60 -> max_steps 70"
    assert lifecycle.budget_change(_stage("p", max_tokens=25_600), done) == "max_steps 60 -> max_tokens 25600"
    assert lifecycle.budget_change(_stage("p", max_epochs=1.5), done) == "max_steps 60 -> max_epochs 1.5"
    # A stage recorded before budgets were: judged by the steps it trained.
    legacy = {"status": "done", "summary": {"steps": 60}}
    assert lifecycle.budget_change(_stage("p", max_steps=60), legacy) is None
    assert lifecycle.budget_change(_stage("p", max_steps=70), legacy) == "max_steps 60 -> max_steps 70"
    assert lifecycle.budget_change(SimpleNamespace(name="prepare"), {"status": "done"}) is None  # no train section


def test_readers_are_the_later_stages_that_read_the_checkpoint_directly_or_through_another():
    spec = SimpleNamespace(stages=[
        SimpleNamespace(name="prepare"),
        _stage("pretrain", max_steps=1),
        _stage("sft", max_steps=1, init_from="pretrain"),
        _stage("other", max_steps=1, init_from="runs/x/checkpoints/a/step-1"),  # a path: not a reader
        _stage("rm", max_steps=1, init_from="sft"),
        _stage("rl", max_steps=1, init_from="other", reference="pretrain",
               rewards=[SimpleNamespace(name="reward_model", stage="rm")]),
    ])
    readers = [(stage.name, source) for stage, source in lifecycle.readers_of(spec, "pretrain")]
    assert readers == [("sft", "pretrain"), ("rm", "sft"), ("rl", "pretrain")]
    assert [(s.name, src) for s, src in lifecycle.readers_of(spec, "sft")] == [("rm", "sft"), ("rl", "rm")]
    assert lifecycle.readers_of(spec, "rl") == []


def _loop(schedule, total: int, name: str) -> Loop:
    return Loop(stage="pretrain", train=SimpleNamespace(lr_schedule=SimpleNamespace(name=name)), total=total, step_fn=None,
                loader=None, schedule=schedule, evaluate=None, metrics=None, log=None, ckpt=None, checkpoint_interval=None,
                save_model=None, load_model=None, rng=None, tokens_per_step=1, flops_per_token=0.0, peak_flops=0.0, rank=0,
                memory_fn=None, log_interval=1)


def _cosine(step: int, total: int, *, peak=1e-3, warmup=4, floor=1e-5) -> float:
    """Cosine with linear warmup, written out here (not llmforge's): what the line must report."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def test_a_longer_cosine_says_the_lr_jumps_back_up_with_both_values():
    options = SimpleNamespace(warmup_steps=4, decay_steps=None, min_lr=1e-5)
    saved = {"step": 60, "total": 60, "next_lr": build_cosine(options, peak_lr=1e-3, total_steps=60)(60)}
    loop = _loop(build_cosine(options, peak_lr=1e-3, total_steps=70), 70, "cosine")
    before, now = _cosine(60, 60), _cosine(60, 70)
    assert before == pytest.approx(1e-5) and now > 5 * before
    assert loop._schedule_change(saved) == (f"[pretrain] 60 -> 70 steps: lr of step 61, the next: {before:.2e} before, {now:.2e} now "
                                            "(cosine over 70 steps: a jump back up)")
    # The same total and schedule: nothing to say; a checkpoint from before the record: nothing either.
    same = _loop(build_cosine(options, peak_lr=1e-3, total_steps=60), 60, "cosine")
    assert same._schedule_change(saved) is None
    assert loop._schedule_change({"step": 60}) is None


@pytest.mark.parametrize("name, build", [("constant", build_constant), ("wsd", build_wsd)])
def test_a_longer_constant_or_wsd_before_its_decay_changes_nothing(name, build):
    options = SimpleNamespace(warmup_steps=2, decay_fraction=0.1, decay_style="linear", min_lr=0.0)
    saved = {"step": 30, "total": 60, "next_lr": build(options, peak_lr=1e-3, total_steps=60)(30)}
    line = _loop(build(options, peak_lr=1e-3, total_steps=70), 70, name)._schedule_change(saved)
    assert line == f"[pretrain] 60 -> 70 steps: lr of step 31, the next: 1.00e-03 before, 1.00e-03 now ({name} over 70 steps: unchanged)"


@pytest.mark.parametrize("error, reason, code, words", [
    (None, "finished", 0, ""),
    (Preempted("[p] SIGTERM: checkpoint written"), "preempted", 75, "SIGTERM"),
    (TrainingStopped("[p] non-finite loss or gradient at step 5 (loss nan); ..."), "stopped", 1, "non-finite loss"),
    (UserError("stage 'p': max_steps 5 is below", "hint"), "refused", 2, "max_steps 5"),
    (RuntimeError("a collective timed out\nmore"), "failed", 1, "RuntimeError: a collective timed out"),
    (KeyboardInterrupt(), "interrupted", 130, "Ctrl-C"),
])
def test_each_way_an_attempt_ends_is_recorded(tmp_path, error, reason, code, words):
    run = RunDir(tmp_path)
    run.mark_stage("p", "running")
    lifecycle.record_attempt(run, ["run", "/abs/spec.yaml", "k=v"])
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["attempt"]["command"] == ["run", "/abs/spec.yaml", "k=v"] and "exit" not in state
    lifecycle.record_exit(run, error, "p")
    state = json.loads((tmp_path / "state.json").read_text())
    assert (state["exit"]["reason"], state["exit"]["code"], state["exit"]["stage"]) == (reason, code, "p")
    assert words in state["exit"]["message"] and "\n" not in state["exit"]["message"]
    assert state["stages"] == {"p": {"status": "running"}}  # the stages are left as they were


def test_a_stale_stage_loses_its_checkpoints_in_one_rename(tmp_path):
    run = RunDir(tmp_path)
    for step in (4, 8):
        (run.checkpoints("sft") / f"step-{step}").mkdir(parents=True)
    (run.checkpoints("pretrain") / "step-6").mkdir(parents=True)
    lines: list[str] = []
    lifecycle.clear_stale(run, "sft", lines.append)
    assert not run.checkpoints("sft").exists() and (run.checkpoints("pretrain") / "step-6").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["pretrain"]
    assert lines == ["[sft] stale: its 2 earlier checkpoint(s) deleted; it starts afresh"]


def test_a_max_steps_below_the_newest_checkpoint_is_refused_with_both_numbers(tmp_path):
    run = RunDir(tmp_path)
    step_dir = run.checkpoints("pretrain") / "step-60"
    step_dir.mkdir(parents=True)
    (step_dir / "COMPLETE").write_text("{}")
    (run.checkpoints("pretrain") / "step-70").mkdir()  # incomplete: not trusted, not counted
    spec = SimpleNamespace(stages=[SimpleNamespace(name="prepare"), _stage("pretrain", max_steps=50)])
    with pytest.raises(UserError) as refused:
        lifecycle.refuse_shrunk_steps(spec, run)
    assert "max_steps 50 is below the 60 steps" in str(refused.value) and "stages.1.train.max_steps=60" in refused.value.hint
    lifecycle.refuse_shrunk_steps(SimpleNamespace(stages=[_stage("pretrain", max_steps=60)]), run)
    run.mark_stage("pretrain", "stale")  # its checkpoints go when it reruns
    lifecycle.refuse_shrunk_steps(spec, run)
