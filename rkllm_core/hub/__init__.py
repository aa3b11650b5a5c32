"""Model downloads from the Hugging Face Hub (``rkllm pull``), through ``huggingface_hub``."""
