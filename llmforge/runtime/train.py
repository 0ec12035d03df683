"""The training loop shared by the training stages: step, log, evaluate, checkpoint, resume.

It reads top to bottom like nanoGPT's: everything specific to a stage (the data, the
loss) arrives as objects; the loop owns only order, counters and persistence.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmforge.plan.cost import model_flops_utilization
from llmforge.runtime.checkpoint import CheckpointManager, read_trainer_state
from llmforge.runtime.faults import fault_point
from llmforge.spec.errors import UserError

TRAINER_STATE_VERSION = 1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: resumable with --resume


class TrainingStopped(Exception):
    """The run stopped on purpose (non-finite loss with on_nonfinite: stop, a loss spike with on_spike: stop): exit 1."""


class Preempted(Exception):
    """SIGTERM: a final checkpoint was written; exit EXIT_PREEMPTED and resume later."""


@dataclass
class Counters:
    step: int = 0
    tokens: int = 0
    skipped: int = 0  # updates dropped: non-finite, or a spike under on_spike: skip
    spikes: int = 0  # loss spikes seen, whatever the policy did with them
    extra: dict[str, Any] = field(default_factory=dict)


def total_steps(train, *, samples_per_epoch: int, tokens_per_sample: int, loader=None) -> int:
    """Optimizer steps for the stage's budget (max_steps | max_tokens | max_epochs).

    A token budget counts real tokens: a loader with padded samples answers it from its own
    order (`steps_for_tokens`); otherwise every sample holds `tokens_per_sample`.
    """
    if train.max_steps is not None:
        return train.max_steps
    if train.max_tokens is not None:
        if loader is not None and hasattr(loader, "steps_for_tokens"):
            return loader.steps_for_tokens(train.max_tokens)
        return math.ceil(train.max_tokens / (train.global_batch_size * tokens_per_sample))
    return max(1, math.ceil(train.max_epochs * samples_per_epoch / train.global_batch_size))


class SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between steps (preemption).

    From the signal on, a watchdog gives the final checkpoint `timeout` seconds: a process
    still alive then (a save or a collective stuck) exits with EXIT_PREEMPTED on its own,
    with a message, before the scheduler's SIGKILL. The newest complete checkpoint stands.
    """

    def __init__(self, timeout: float) -> None:
        self.set = False
        self.timeout = timeout
        self.received_at: float | None = None
        self._old = None
        self._watchdog: threading.Timer | None = None

    def __enter__(self) -> SigtermFlag:
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, *_: Any) -> None:
        if self.set:
            return
        self.set = True
        self.received_at = time.monotonic()
        self._watchdog = threading.Timer(self.timeout, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self) -> None:
        print(f"error: the final checkpoint after SIGTERM did not complete within checkpoint.preempt_timeout = {self.timeout:g} s; "
              "exiting now. --resume continues from the newest complete checkpoint", file=sys.stderr, flush=True)
        os._exit(EXIT_PREEMPTED)

    def elapsed(self) -> float:
        return 0.0 if self.received_at is None else time.monotonic() - self.received_at

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        if self._watchdog is not None:
            self._watchdog.cancel()


# What the console shows of an MoE model's train metrics: a collapsing router shows as load_max_min growing.
SHOWN_MOE = ("moe/aux_loss", "moe/z_loss", "moe/load_max_min")


class Loop:
    """One training stage's loop.

    Args:
        step_fn: callable(micro_batches, lr) -> result with loss, grad_norm, nonfinite, num_tokens.
        loader: next_global_batch(), state_dict(), load_state_dict().
        evaluate: callable(step) -> dict of eval metrics (or None to skip evals).
        save_model: callable(tmp_dir) writing model and optimizer shards (collective).
        load_model: callable(step_dir) restoring them (collective).
        rng: object with a `seed` and save()/load() of this rank's RNG streams (runtime/rng.py RngState).
        tokens_per_step: tokens of a step whose loader does not count them (`last_batch_tokens`).
        peak_flops: one device's peak FLOP/s; with `world_size` it gives MFU (`model_flops_utilization`).
        peak_source: where that peak comes from, in words, for the warning an MFU above 100% gets.
        guard: the SpikeGuard the step function consults before each update, or None.
        any_rank: callable(flag) -> whether any rank's flag is set (a collective; identity on one process).
        preempt_timeout: seconds after SIGTERM for the final checkpoint.
        train_metrics: callable() -> extra metrics for each train row (an MoE model's router
            losses and expert load); called on every rank at each log step (it may be a collective).
        stage_model: callable(tmp_dir) -> the model and optimizer shards staged for a write in the
            background (`CheckpointManager.save_async`); with it, interval checkpoints are written
            in the background (`checkpoint.async_save`).
    """

    def __init__(self, *, stage: str, train, total: int, step_fn, loader, schedule, evaluate, metrics, log,
                 ckpt: CheckpointManager, checkpoint_interval: int | None, save_model, load_model, rng,
                 tokens_per_step: int, flops_per_token: float, peak_flops: float, rank: int, memory_fn,
                 log_interval: int, guard=None, any_rank: Callable[[bool], bool] = bool, preempt_timeout: float = 120.0,
                 world_size: int = 1, train_metrics: Callable[[], dict[str, float]] | None = None,
                 stage_model: Callable[[Path], Any] | None = None, peak_source: str = ""):
        self.stage, self.train, self.total = stage, train, total
        self.step_fn, self.loader, self.schedule, self.evaluate = step_fn, loader, schedule, evaluate
        self.metrics, self.log, self.ckpt, self.interval = metrics, log, ckpt, checkpoint_interval
        self.save_model, self.load_model, self.rng = save_model, load_model, rng
        self.stage_model = stage_model
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self.rank, self.world_size, self.memory_fn, self.log_interval = rank, world_size, memory_fn, log_interval
        self.guard, self.any_rank, self.preempt_timeout = guard, any_rank, preempt_timeout
        self.train_metrics = train_metrics
        self.peak_source, self._peak_warned = peak_source, False
        self.counters = Counters()
        self.last_eval: dict[str, Any] = {}  # the latest evaluation (an owed one made up on resume), for the summary
        self.resume_notes: list[str] = []  # what the checkpoint restored says, logged by announce_resume

    # --- persistence -------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        c = self.counters
        state = {"version": TRAINER_STATE_VERSION, "stage": self.stage, "seed": self.rng.seed, "step": c.step, "tokens": c.tokens,
                 "skipped": c.skipped, "spikes": c.spikes, "skipped_samples": getattr(self.loader, "skipped", 0), "extra": c.extra,
                 "loader": self.loader.state_dict(),
                 # What the schedule was: a resume under another budget says what its change does to the lr.
                 "total": self.total, "next_lr": self.schedule(c.step)}
        if self.guard is not None:
            state["spike_guard"] = self.guard.state_dict()
        return state

    def save(self, *, background: bool = False) -> Path:
        """Checkpoint this step; with `background`, snapshot it now and write it while training goes on."""
        if background:
            def stage(tmp: Path):
                staged = self.stage_model(tmp)
                self.rng.save(tmp, self.rank)  # small: written now, it is the step's own state
                return staged

            return self.ckpt.save_async(self.counters.step, stage, self.trainer_state(),
                                        saved=lambda path: self.log(f"[{self.stage}] checkpoint saved: {path} (written in the background)"))

        def write(tmp: Path) -> None:
            self.save_model(tmp)
            self.rng.save(tmp, self.rank)

        path = self.ckpt.save(self.counters.step, write, self.trainer_state())
        self.log(f"[{self.stage}] checkpoint saved: {path}")
        return path

    def restore(self, step_dir: Path) -> None:
        """Load a checkpoint; what it has to say waits for `announce_resume` (a corrupt one's load is discarded)."""
        self.resume_notes = []
        state = read_trainer_state(step_dir)
        if state.get("seed", self.rng.seed) != self.rng.seed:
            raise UserError(f"{step_dir} was trained with seed {state['seed']}, but the spec says seed {self.rng.seed}",
                            f"resume with seed: {state['seed']}, or start the stage afresh in a new run dir")
        self.load_model(step_dir)
        if note := self.rng.load(step_dir, self.rank, step=state["step"]):
            self.resume_notes.append(f"[{self.stage}] {note}")
        self.loader.load_state_dict(state["loader"])
        if hasattr(self.loader, "skipped"):
            self.loader.skipped = state.get("skipped_samples", 0)
        if self.guard is not None and "spike_guard" in state:
            self.guard.load_state_dict(state["spike_guard"])
        self.counters = Counters(state["step"], state["tokens"], state["skipped"], state.get("spikes", 0), state.get("extra", {}))
        if (note := self._schedule_change(state)) is not None:
            self.resume_notes.append(note)

    def _schedule_change(self, state: dict[str, Any]) -> str | None:
        """What resuming under another budget does to the lr at the resume step (None: the schedule is the saved one)."""
        step, before = state["step"], state.get("next_lr")
        if before is None or state.get("total") == self.total and math.isclose(before, self.schedule(step), rel_tol=1e-9):
            return None  # the checkpoint predates the record, or nothing changed
        now = self.schedule(step)
        effect = ("a jump back up" if now > before * (1 + 1e-9) else "lower" if now < before * (1 - 1e-9) else "unchanged")
        return (f"[{self.stage}] {state['total']} -> {self.total} steps: lr of step {step + 1}, the next: {before:.2e} before, "
                f"{now:.2e} now ({self.train.lr_schedule.name} over {self.total} steps: {effect})")

    def announce_resume(self, step_dir: Path) -> None:
        """Say which checkpoint the stage resumed from, once it is the one used (after its checksums passed)."""
        self.log(f"[{self.stage}] resumed from {step_dir} at step {self.counters.step}")
        for note in self.resume_notes:
            self.log(note)

    def _on_spike(self, spike) -> None:
        c, policy = self.counters, self.train.on_spike
        c.spikes += 1
        what = f"[{self.stage}] step {c.step}: loss spike, {spike.describe()}"
        if policy == "stop":
            raise TrainingStopped(f"{what}; parameters were not updated and no checkpoint is written from after it. "
                                  "Lower the lr, or set on_spike: skip to drop such steps")
        if policy == "ignore":
            self.log(f"warning: {what}; update applied (on_spike: ignore)")
            return
        c.skipped += 1
        if self.guard.consecutive >= self.train.spike.max_consecutive:
            raise TrainingStopped(f"{what}; {self.guard.consecutive} spikes in a row (spike.max_consecutive): the loss has moved "
                                  "rather than spiked, and skipping would only burn steps. Lower the lr, or raise spike.min_ratio")
        self.log(f"{what}; update skipped ({c.spikes} spike(s) so far)")

    def is_eval_step(self, step: int) -> bool:
        """Whether the loop evaluates after `step` (a step > 0)."""
        interval = self.train.eval_interval
        return self.evaluate is not None and step > 0 and (bool(interval and step % interval == 0) or step == self.total)

    # --- the loop ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from llmforge.runtime.gc_policy import frozen_setup

        try:
            with frozen_setup():
                return self._steps()
        except BaseException:
            # A run that fails still lets a checkpoint being written in the background complete (a
            # bounded wait, no collective: the other ranks may be gone), but never waits on it for good.
            self.ckpt.settle(timeout=self.preempt_timeout)
            raise

    def _steps(self) -> dict[str, Any]:
        c, train = self.counters, self.train
        last_log_time, last_log_tokens = time.perf_counter(), c.tokens
        last_eval: dict[str, Any] = dict(self.last_eval)
        loss = float("nan")
        with SigtermFlag(self.preempt_timeout) as sigterm:
            while c.step < self.total:
                lr = self.schedule(c.step)
                batches = self.loader.next_global_batch()
                result = self.step_fn(batches, lr)
                loss = result.loss
                c.step += 1
                # Real input tokens where the loader counts them (padded documents, finetune examples, rollouts).
                c.tokens += getattr(self.loader, "last_batch_tokens", 0) or self.tokens_per_step
                fault_point("train_step")
                if result.nonfinite:
                    if train.on_nonfinite == "stop":
                        raise TrainingStopped(
                            f"[{self.stage}] non-finite loss or gradient at step {c.step} (loss {loss}); parameters were not updated "
                            "and no checkpoint is written from after it. Lower the lr, enable clip_grad, or set on_nonfinite: skip"
                        )
                    c.skipped += 1
                    self.log(f"[{self.stage}] step {c.step}: non-finite loss or gradient, step skipped ({c.skipped} so far)")
                elif self.guard is not None and (spike := self.guard.take()) is not None:
                    self._on_spike(spike)

                last = c.step == self.total
                if c.step % self.log_interval == 0 or last:
                    now = time.perf_counter()
                    tps = (c.tokens - last_log_tokens) / max(now - last_log_time, 1e-9)
                    last_log_time, last_log_tokens = now, c.tokens
                    mfu = (model_flops_utilization(tps, self.flops_per_token, world_size=self.world_size, peak_flops=self.peak_flops)
                           if self.peak_flops else None)
                    row = {"kind": "train", "stage": self.stage, "step": c.step, "tokens": c.tokens, "loss": loss, "lr": lr,
                           "grad_norm": result.grad_norm, "tokens_per_s": tps, "mfu": mfu, "skipped_steps": c.skipped,
                           "spikes": c.spikes, "skipped_samples": getattr(self.loader, "skipped", 0), "memory_mb": self.memory_fn()}
                    if mfu is not None and mfu > 1.0 and not self._peak_warned:
                        # More model FLOP/s than the peak: the peak is wrong, not the run (a CPU peak measured
                        # while something else loaded the core reads low).
                        self._peak_warned = True
                        self.log(f"warning: [{self.stage}] mfu {mfu:.0%} is above 100%: the peak it divides by "
                                 f"({self.peak_source or f'{self.peak_flops:.4g} FLOP/s a rank'}) is below what this run reaches; "
                                 "set LLMFORGE_PEAK_FLOPS to the device's peak, or on a CPU delete the cached peak to measure it again")
                    extra = self.train_metrics() if self.train_metrics is not None else {}
                    row.update(extra)
                    self.metrics.write(row)
                    self.log(f"[{self.stage}] step {c.step}/{self.total} loss {loss:.4f} lr {lr:.3e} "
                             f"grad_norm {result.grad_norm:.3f} {tps:,.0f} tok/s" + (f" mfu {mfu:.1%}" if mfu else "")
                             + "".join(f" {key.removeprefix('moe/')} {extra[key]:.4g}" for key in SHOWN_MOE if key in extra))
                # Ranks may see SIGTERM at different steps; the final save is a collective, so they agree first.
                preempted = not last and self.any_rank(sigterm.set)
                # The checkpoint comes before the evaluation: an evaluation that fails (or is
                # killed) never costs the step's checkpoint. The final one (the stage's last, or
                # SIGTERM's) is written at once, after any still in the background.
                saving = (self.interval and c.step % self.interval == 0) or last or preempted
                evaluating = self.is_eval_step(c.step)
                if not (saving or evaluating):
                    continue
                paused = time.perf_counter()
                if saving:
                    path = self.save(background=self.stage_model is not None and not (last or preempted))
                if evaluating:
                    if preempted:  # the resumed run makes it up (RunContext.run_loop: an owed evaluation)
                        self.log(f"[{self.stage}] step {c.step}: evaluation skipped, SIGTERM received")
                    else:
                        if saving:
                            self.ckpt.settle()  # this step's checkpoint, written in the background, is complete first
                        fault_point("evaluate")
                        last_eval = self.evaluate(c.step)
                        if last_eval:
                            self.metrics.write({"kind": "eval", "stage": self.stage, "step": c.step, "tokens": c.tokens, **last_eval})
                # tokens_per_s (and mfu) measure training: the time of evaluations and checkpoint saves
                # (a background save's snapshot) is left out, as Megatron-LM's interval timer leaves it out.
                last_log_time += time.perf_counter() - paused
                if preempted:
                    raise Preempted(f"[{self.stage}] SIGTERM: checkpoint {path} written {sigterm.elapsed():.1f} s after the signal "
                                    f"(checkpoint.preempt_timeout {self.preempt_timeout:g} s); continue with --resume")
        return {"steps": c.step, "tokens": c.tokens, "skipped": c.skipped, "final_loss": loss, **last_eval}
