"""`llmforge generate`: a checkpoint, read outside training, continuing prompts.

It sits above the runtime and the finetune code (it reads any checkpoint a stage wrote,
soft prompts and LoRA adapters included) and uses the runtime's KV-cache sampler.
"""

from __future__ import annotations

import torch

from llmforge.runtime.generate import generate
from llmforge.spec.errors import UserError


FINETUNE_TYPES = ("sft", "lora", "prompt_tuning", "dpo", "reward_model", "rl")


class TextGenerator:
    """A checkpoint ready to continue prompts (`llmforge generate`): the model in this process,
    the run's tokenizer, the stage's chat template and, for prompt tuning, its soft prompt.

    Args:
        source: a run dir (its last stage's newest checkpoint, or `stage`'s) or a step dir.
        template: "auto" (the checkpoint's stage template if it is a finetune stage, else raw
            text), "raw", a built-in template name, or a template string with {prompt} and {response}.
    """

    def __init__(self, source, *, stage: str | None = None, template: str = "auto"):
        import yaml

        from llmforge.data.sft import template_parts
        from llmforge.data.tokenizers import load_tokenizer
        from llmforge.finetune.checkpoints import PROMPT_META, attach_prompt_from
        from llmforge.interop.export import find_source, model_options
        from llmforge.interop.model_io import load_module_weights, single_process_model

        found = find_source(source, stage=stage)
        self.step_dir, run_root = found.step_dir, found.run_root
        if not (run_root / "tokenizer").is_dir():
            raise UserError(f"{run_root} has no tokenizer/ directory, so prompts cannot be encoded", "generate from a run dir that llmforge wrote")
        self.tokenizer = load_tokenizer(run_root / "tokenizer")
        self.model = single_process_model(model_options(run_root))
        self.prefix: list[int] = []
        if (self.step_dir / PROMPT_META).is_file():
            prompt, meta = attach_prompt_from(self.step_dir, [self.model])
            self.prefix = [meta["placeholder"]] * prompt.num_virtual_tokens
        else:
            load_module_weights(self.step_dir, self.model)
        self.model.eval()
        if template == "auto":
            spec = yaml.safe_load((run_root / "spec.resolved.yaml").read_text()) if (run_root / "spec.resolved.yaml").is_file() else {}
            stage_spec = next((s for s in spec.get("stages") or [] if s.get("name") == self.step_dir.parent.name), {})
            template = stage_spec.get("chat_template", "default") if stage_spec.get("type") in FINETUNE_TYPES else "raw"
        self.template = None if template == "raw" else template_parts(template)

    def prompt_ids(self, prompt: str) -> list[int]:
        from llmforge.data.sft import prompt_ids

        if self.template is None:
            return self.prefix + self.tokenizer.encode_sequence(prompt)
        return self.prefix + prompt_ids(self.tokenizer, self.template, prompt)

    def __call__(self, prompt: str, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> str:
        ids = self.prompt_ids(prompt)
        room = self.model.max_sequence_length - len(ids)
        if room <= 0:
            raise UserError(f"the prompt is {len(ids)} tokens; the model has {self.model.max_sequence_length} positions", "shorten the prompt")
        tok = self.tokenizer
        out = generate(self.model, [ids], max_new_tokens=min(max_new_tokens, room), temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_id=tok.eos_id, pad_id=tok.pad_id if tok.pad_id is not None else 0, vocab_size=tok.vocab_size,
                       generator=generator)[0]
        text = tok.decode([t for t in out if t != tok.eos_id])
        return text if self.template is not None else prompt + text
