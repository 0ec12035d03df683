"""`llmforge import hf HF_DIR OUT`: a local HF model directory of a supported family as an llmforge checkpoint.

OUT gets `checkpoints/import/step-0/` (the format training writes, with its COMPLETE marker,
so any stage can `init_from` it at any TP/PP layout; written a tensor at a time, `streaming`), `model.yaml` (the matching `model:` and
`tokenizer:` spec sections), `tokenizer/` (the HF tokenizer files as they are, plus llmforge's
`meta.json`, when the directory has a tokenizer.json) and `hf_source.json` (which family and HF
class the weights came from, and their config.json, for an export back). Nothing is
downloaded; OUT appears complete or not at all.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from llmforge.interop.families import family_of_config
from llmforge.interop.hf_config import validated_model
from llmforge.spec.errors import UserError

STAGE = "import"
MODEL_FRAGMENT = "model.yaml"
SOURCE_RECORD = "hf_source.json"
SOURCE_VERSION = 1


def read_tokenizer(hf_dir: Path, vocab_size: int):
    """The directory's tokenizer with its HF files (None if it has no tokenizer.json), which must fit the vocabulary."""
    from llmforge.data.pretrained import load_pretrained

    if not (hf_dir / "tokenizer.json").is_file():
        return None
    try:
        tokenizer = load_pretrained(hf_dir)  # tokenizer.json and the HF files beside it, as they are
    except UserError as e:
        message = e.args[0] if e.args[0].startswith(str(hf_dir)) else f"{hf_dir}: {e.args[0]}"
        raise UserError(message, e.hint) from None
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"{hf_dir / 'tokenizer.json'} has {tokenizer.vocab_size} tokens, but config.json vocab_size is {vocab_size}",
                        "token ids past vocab_size have no embedding row; the tokenizer and the weights come from different models")
    return tokenizer


def _fragment(hf_dir: Path, out: Path, options: dict[str, Any], has_tokenizer: bool) -> str:
    import yaml

    root = out.absolute()
    sections: dict[str, Any] = {"model": {k: v for k, v in options.items() if v is not None}}
    if has_tokenizer:
        sections["tokenizer"] = {"name": "pretrained", "path": str(root / "tokenizer")}
    header = (
        f"# Written by `llmforge import hf {hf_dir}`.\n"
        f"# Use it from a spec with `extends: {root / MODEL_FRAGMENT}`, and start a stage from the\n"
        f"# imported weights with `init_from: {root / 'checkpoints' / STAGE / 'step-0'}`.\n"
        "# seq_length is the model's longest context; a stage may train on shorter sequences.\n"
    )
    return header + yaml.safe_dump(sections, sort_keys=False)


def import_hf(hf_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Convert the HF model in `hf_dir` into the llmforge run-like directory `out`; returns a summary.

    Tensors stream: each megatron tensor is made from its HF tensors (read one at a time) when
    the checkpoint writer reaches it and freed once written, so the model is never whole in memory.
    """
    import math

    import torch

    from llmforge.interop.families.base import dims
    from llmforge.interop.hf_files import HFWeights, read_json, staged_output, write_json
    from llmforge.interop.hf_mapping import check_hf_shapes, hf_stored_names, link_from_hf
    from llmforge.interop.model_io import skeleton_model
    from llmforge.interop.streaming import save_streamed
    from llmforge.runtime.checkpoint import CheckpointManager

    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a directory", "point at a local Hugging Face model directory; nothing is downloaded")
    config_path = hf_dir / "config.json"
    config = read_json(config_path)
    family = family_of_config(config, str(config_path))
    options = {"name": "gpt", **family.from_config(config, str(config_path))}
    model = validated_model(options, str(config_path))
    tokenizer = read_tokenizer(hf_dir, model.vocab_size)
    weights = HFWeights(hf_dir)
    stored = hf_stored_names(list(weights.shapes), model, family)
    check_hf_shapes({name: weights.shapes[s] for name, s in stored.items()}, model, family, source=str(hf_dir))
    dtypes = sorted({str(weights.dtypes[s]).removeprefix("torch.") for s in stored.values()})
    table, d = {link.megatron: link for link in family.links(model)}, dims(model)

    def megatron(name: str) -> torch.Tensor:
        link = table[name]
        sources = tuple(weights.get(stored[n]) for n in link.hf)
        made = link_from_hf(link, sources, d).to(torch.float32)
        # A tensor of its own: the writer frees each once written, which must not touch the file's (mapped) tensors.
        shared = any(made.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in sources)
        return made.clone() if shared else made

    record = {"version": SOURCE_VERSION, "family": family.name, "architecture": family.hf_class, "model_type": config.get("model_type"),
              "imported_from": str(hf_dir.absolute()), "source_dtypes": dtypes, "config": config}
    trainer_state = {"version": 1, "stage": STAGE, "step": 0, "tokens": 0, "skipped": 0, "loader": None,
                     "extra": {k: record[k] for k in ("imported_from", "family", "architecture", "source_dtypes")}}
    with staged_output(out, overwrite=overwrite) as tmp:
        skeleton = skeleton_model(model)
        manager = CheckpointManager(tmp / "checkpoints" / STAGE, keep_last=1, log=lambda m: print(m, file=sys.stderr))

        def write(step_tmp: Path) -> None:
            (step_tmp / "model").mkdir()
            save_streamed(step_tmp / "model", skeleton, megatron, {})

        manager.save(0, write, trainer_state)
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        write_json(tmp / SOURCE_RECORD, record)
        (tmp / MODEL_FRAGMENT).write_text(_fragment(hf_dir, out, options, tokenizer is not None), encoding="utf-8")
    root = out.absolute()  # the paths a spec elsewhere will name
    return {
        "out": str(root),
        "family": family.name,
        "architecture": family.hf_class,
        "checkpoint": str(root / "checkpoints" / STAGE / "step-0"),
        "model_spec": str(root / MODEL_FRAGMENT),
        "parameters": sum(math.prod(link.megatron_shape) for link in table.values()),
        "source_dtypes": dtypes,
        "tokenizer": tokenizer is not None,
        "stop_ids": list(tokenizer.stop_ids) if tokenizer is not None else [],
    }
