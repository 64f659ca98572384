"""LoRA and its variants: its settings in config.py, its model code in method.py."""
