"""Model builders (megatron-core GPT), their size arithmetic, and conversions."""
