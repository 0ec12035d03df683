"""The spec language: YAML → located, validated pydantic models. Never imports torch."""
