"""What a stage runner receives: the spec, the registry, the run dir, logging, and the
distributed layout, which is initialized once, on first use."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmforge.registry.components import Registry
from llmforge.runtime.metrics import Log
from llmforge.runtime.rundir import RunDir
from llmforge.spec.errors import UserError as UserError_
from llmforge.spec.schema import Spec


@dataclass
class RunContext:
    spec: Spec
    registry: Registry
    run: RunDir
    log: Log
    resuming: bool
    plan: dict[str, Any]
    _parallel: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)
    _callbacks: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    def parallel(self):
        """The ParallelContext (torch.distributed + megatron parallel_state), initialized once."""
        if self._parallel is None:
            from llmforge.runtime.distributed import init_distributed

            self._parallel = init_distributed(self.spec.parallelism, seed=self.spec.seed,
                                              timeout_s=self.spec.parallelism.collective_timeout_s)
        return self._parallel

    @property
    def rank(self) -> int:
        if self._parallel is not None:
            return self._parallel.rank
        import os

        return int(os.environ.get("RANK", 0))

    @property
    def world_size(self) -> int:
        if self._parallel is not None:
            return self._parallel.world_size
        import os

        return int(os.environ.get("WORLD_SIZE", 1))

    def barrier(self) -> None:
        if self._parallel is not None and self._parallel.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def final_checkpoint(self, stage_name: str) -> Path:
        """The newest complete checkpoint of an earlier stage (for `init_from`)."""
        from llmforge.runtime.checkpoint import CheckpointManager
        from llmforge.spec.errors import UserError

        ref = Path(stage_name)
        if ref.is_dir() and ("/" in stage_name):
            return ref
        mgr = CheckpointManager(self.run.checkpoints(stage_name), keep_last=1, on_corrupt=self.spec.checkpoint.on_corrupt)
        latest = mgr.latest()
        if latest is None:
            raise UserError(f"init_from {stage_name!r}: that stage has no complete checkpoint in {self.run.path}",
                            f"run stage {stage_name!r} first (llmforge run --resume continues the run)")
        return latest

    def tokenizer(self):
        if self._tokenizer is None:
            from llmforge.data.tokenizers import load_tokenizer

            missing = not (self.run.tokenizer / "tokenizer.json").exists() and not any(self.run.tokenizer.glob("*"))
            if missing and self.spec.tokenizer.name == "pretrained":
                # Finetuning a published model needs no prepare stage: a local tokenizer needs no
                # texts, so every rank reads it from the spec's path and rank 0 keeps a copy in the run.
                self._tokenizer = self.registry.build("tokenizer", self.spec.tokenizer, run_dir=self.run.path, texts=())
                if self.rank == 0:
                    self._tokenizer.save(self.run.tokenizer)
                return self._tokenizer
            if missing:
                raise UserError_(f"no tokenizer in {self.run.tokenizer}", "put a `prepare` stage first in `stages`")
            self._tokenizer = load_tokenizer(self.run.tokenizer)
        return self._tokenizer

    def callbacks(self, stage_name: str) -> list[Any]:
        """The `logging.callbacks` of one stage, built once (rank 0; the others have none).

        Each gets copies of the resolved spec and of its stage's options: what a callback
        changes in them changes nothing in the run.
        """
        if self.rank != 0:
            return []
        if stage_name not in self._callbacks:
            stage = next(s for s in self.spec.stages if s.name == stage_name)
            self._callbacks[stage_name] = [
                self.registry.build("callback", cb, run_dir=self.run.path, spec=self.spec.model_copy(deep=True),
                                    stage=stage.model_copy(deep=True))
                for cb in self.spec.logging.callbacks
            ]
        return self._callbacks[stage_name]

    def stage_end(self, stage_name: str, summary: dict[str, Any]) -> None:
        """Every stage's end, prepare's too: each callback's optional `on_stage_end`."""
        for cb in self.callbacks(stage_name):
            if hasattr(cb, "on_stage_end"):
                cb.on_stage_end(stage_name, summary)

    def metrics(self, stage_name: str):
        """This stage's metrics writer (rank 0 writes; others hold a disabled one)."""
        from llmforge.runtime.metrics import Metrics

        return Metrics(self.run.metrics, self.run.tb if self.spec.logging.tensorboard else None,
                       enabled=self.rank == 0, callbacks=self.callbacks(stage_name))

    def run_loop(self, stage, parts: dict[str, Any], *, evaluate_start: bool = False) -> dict[str, Any]:
        """Resume the stage from its newest complete checkpoint if there is one, then train.

        Args:
            evaluate_start: on a fresh start, first evaluate the starting checkpoint as step 0
                (finetune stages: the row their later evaluations are read against).
        """
        from llmforge.runtime.metrics import read_rows, truncate_rows

        loop, ckpt, metrics = parts["loop"], parts["ckpt"], parts["metrics"]
        ckpt.cleanup_temp()
        self.barrier()
        found = ckpt.load_latest(loop.restore, overlap=self.world_size == 1)
        latest = None if found is None else found[0]
        resumed_step = 0 if found is None else loop.counters.step
        if resumed_step > loop.total:
            from llmforge.runtime.lifecycle import budget, describe_budget

            index = self.spec.stages.index(stage)
            raise UserError_(f"stage {stage.name!r}: {describe_budget(budget(stage))} gives {loop.total} steps, but the stage "
                             f"has already trained {resumed_step} ({latest})",
                             f"a budget can grow, not shrink below where the stage is: give at least {resumed_step} steps "
                             f"(e.g. stages.{index}.train.max_steps={resumed_step}), or train the stage afresh in a new run dir")
        if latest is not None:
            # Only now, with its checksums verified (a corrupt newer one was discarded), is it the checkpoint resumed from.
            loop.announce_resume(latest)
        baseline = evaluate_start and latest is None and loop.evaluate is not None
        if self.rank == 0:
            # A fresh start that evaluates step 0 drops the step-0 row of an attempt that died early.
            truncate_rows(self.run.metrics, stage.name, -1 if baseline else resumed_step)
        if latest is not None:
            metrics.purge_step = resumed_step + 1
        # The checkpoint of an eval step is written before its evaluation; a run killed between
        # the two evaluates that step on resume, so no asked-for row goes missing.
        owed = False
        if latest is not None and loop.is_eval_step(resumed_step):
            # Rank 0 reads the rows; every rank evaluates (a collective) on its word.
            missing = self.rank == 0 and not any(r.get("kind") == "eval" and r.get("stage") == stage.name
                                                 and r.get("step") == resumed_step for r in read_rows(self.run.metrics))
            owed = loop.any_rank(missing)
        if baseline or owed:
            row = loop.evaluate(resumed_step)
            if row:
                metrics.write({"kind": "eval", "stage": stage.name, "step": resumed_step, "tokens": loop.counters.tokens, **row})
            if owed:
                loop.last_eval = row
        try:
            summary = loop.run()
        finally:
            metrics.close()
        return summary
