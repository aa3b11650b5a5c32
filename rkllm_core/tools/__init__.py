"""Command-line tools: ``rkllm`` (models, info, chat, bench, doctor)."""
