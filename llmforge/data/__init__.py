"""Raw text → tokenizer → packed WebDataset token shards + manifest → a resumable loader.

`prepare.run_prepare` writes `<run_dir>/tokenizer/` and `<run_dir>/data/`; `loader.TokenLoader`
streams the shards to every rank in an order that depends only on the data and the seed.
Nothing here imports torch at module level, so `validate` and `plan` stay light.
"""
