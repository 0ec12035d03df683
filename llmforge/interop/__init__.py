"""Hugging Face interop: `llmforge export hf` and `llmforge import hf`.

`hf_config` maps the `gpt` model options to and from `config.json` (torch-free),
`hf_mapping` maps tensors between megatron's names and layouts and HF's, `hf_files`
reads and writes safetensors, tokenizer files and output directories atomically, and
`export` / `import_` are the two verbs.
"""
