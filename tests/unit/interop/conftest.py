"""Fixtures of the interop tests; the tiny models themselves are in `tiny.py`."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def hf_logits():
    """transformers' logits for a model directory (loaded in fp32) or a model object."""

    def compute(path_or_model, ids):
        import torch
        import transformers

        model = path_or_model
        if isinstance(path_or_model, Path):
            model = transformers.AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32)
        model.eval()
        with torch.no_grad():
            return model(ids).logits.float()

    return compute
