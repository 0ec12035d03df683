"""Hugging Face interop: `llmforge export hf` and `llmforge import hf`.

`families/` holds one module per HF model family (what identifies it, its `config.json`
mapping both ways, its tensor table; torch-free), `hf_config` and `hf_mapping` walk them for
config.json and for the tensors, `hf_files` reads and writes safetensors, tokenizer files and
output directories atomically, and `export` / `import_` are the two verbs.
"""
