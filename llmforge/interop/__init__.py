"""Hugging Face interop: `llmforge export hf` and `llmforge import hf`.

`families/` holds one module per HF model family (what identifies it, its `config.json`
mapping both ways, its tensor table; torch-free), `hf_config` and `hf_mapping` walk them for
config.json and for the tensors, `hf_files` reads and writes safetensors a tensor at a time,
tokenizer files and output directories atomically, `streaming` writes, reads and runs megatron
checkpoints a tensor or a layer at a time, `verify` is the export's self-check against
transformers, and `export` / `import_` are the two verbs.
"""
