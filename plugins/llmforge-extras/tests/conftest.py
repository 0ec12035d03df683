from llmforge.testing import run_dir  # noqa: F401  (the fixture)
