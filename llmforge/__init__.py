"""llmforge: one YAML spec in; a trained, evaluated and exportable LLM out."""

__version__ = "0.1.0"
