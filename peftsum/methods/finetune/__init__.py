"""Traditional fine-tuning (LM head, last blocks, or all): its settings in config.py, its model code in method.py."""
