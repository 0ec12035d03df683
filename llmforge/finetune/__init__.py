"""Finetuning beyond SFT: LoRA adapters, soft prompts, preference and RL losses, rewards."""
