"""What a stage tells validate its evaluators may ask for (`offers`) is what its StageHooks give them."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from llmforge.spec import stages as spec_stages


def _context():
    tokenizer = SimpleNamespace(pad_id=0, eos_id=1, vocab_size=8)
    return SimpleNamespace(tokenizer=lambda: tokenizer, parallel=lambda: SimpleNamespace(rank=0, device=torch.device("cpu")),
                           spec=SimpleNamespace(seed=1), log=lambda m: None)


def _given(hooks) -> set[str]:
    server = SimpleNamespace(max_positions=16)  # a ModelServer's face: the hooks only wrap it
    return {k for k, v in hooks.evaluation([torch.nn.Linear(2, 2)], SimpleNamespace(), server).items() if v is not None}


def test_each_finetune_stage_offers_what_it_declares():
    from llmforge.stages.dpo import DPOHooks
    from llmforge.stages.prompt_tuning import PromptTuningHooks
    from llmforge.stages.reward_model import RewardModelHooks
    from llmforge.stages.rl import RLHooks

    train = SimpleNamespace(micro_batch_size=2, precision="fp32")
    stage = SimpleNamespace(train=train, name="ft", prompt_tuning=SimpleNamespace(init="random"))
    reference = SimpleNamespace(max_positions=16)
    built = {
        spec_stages.DPOStage: DPOHooks(stage, reference=reference, pad_id=0),
        spec_stages.RewardModelStage: RewardModelHooks(stage, _context(), length=8),
        spec_stages.RLStage: RLHooks(stage, _context(), reward=lambda samples: ([], {}), reference=reference, pad_id=0),
        spec_stages.PromptTuningStage: PromptTuningHooks(stage, _context(), meta={"num_virtual_tokens": 2, "placeholder": 0}, init_ids=[]),
    }
    for model, hooks in built.items():
        assert model.offers and model.offers <= _given(hooks), (model.__name__, model.offers, _given(hooks))
    # The stages that set no evaluation fields declare nothing either.
    assert spec_stages.SFTStage.offers == spec_stages.PretrainStage.offers == spec_stages.LoRAStage.offers == frozenset()
