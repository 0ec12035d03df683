"""`llmforge plan` counts what packed documents add: the pretraining mask (`data.reset_*`) and finetune `packing`.

What `memory.document_bytes` counts is checked against autograd's saved bytes in
tests/unit/runtime/test_packed_documents.py; here, that the plan adds it where the runtime does.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmforge.cli import main
from llmforge.plan.memory import Layout, document_bytes
from llmforge.registry.manager import reset_registry
from llmforge.spec.validate import load_and_validate

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "specs" / "tiny.yaml")


def _stages(capsys, *overrides: str) -> dict[str, dict]:
    reset_registry()
    assert main(["plan", TINY, "--json", *overrides]) == 0
    return {s["name"]: s for s in json.loads(capsys.readouterr().out)["stages"]}


def test_the_mask_and_restarted_positions_are_counted_per_micro_batch_in_flight(capsys):
    plain = _stages(capsys)
    options = ("data.reset_attention_mask=true", "data.reset_position_ids=true", "data.eod_mask_loss=true", "stages.2.packing=true")
    packed = _stages(capsys, *options)
    spec, _ = load_and_validate(TINY, list(options), check_inputs=False)
    for index, name, seq in ((1, "pretrain", spec.model.seq_length), (2, "sft", spec.stages[2].max_seq_length)):
        train = spec.stages[index].train
        added = document_bytes(spec.model, Layout.from_spec(spec.parallelism, train), seq, train.precision, spec.model.num_layers,
                               (True, True))
        (before,), (after,) = plain[name]["memory_per_rank"], packed[name]["memory_per_rank"]
        assert added > 0 and after["activations"] - before["activations"] == round(added), name
