"""Evaluation with EleutherAI's lm-evaluation-harness, on llmforge checkpoints at any layout.

It sits above `interop` (it loads any checkpoint a stage wrote, as `llmforge generate` does) and
serves the harness through the runtime's `ModelServer`:

- `adapter.py`: `LlmforgeLM`, the harness's `LM` (log-likelihood, rolling log-likelihood,
  generation; the tokenizer's chat template), sharded over data-parallel replicas.
- `harness.py`: tasks (a `TaskManager` over only the given folders, local `data_files` resolved
  against each task YAML), one run of the harness, its metrics as eval-row keys, the table.
- `command.py`: `llmforge eval` (a run dir or a checkpoint, its layout, results.json).
- `evaluator.py`: the `lm_eval` evaluator of a training stage.

Nothing here is imported by `validate`, `plan` or `schema`; lm_eval itself is imported only
when a task runs (the `eval` extra).
"""
