"""peftsum: compare LoRA, soft prompt tuning and last-layer fine-tuning for abstractive summarization."""

__version__ = "0.1.0"
