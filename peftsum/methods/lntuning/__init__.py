"""LN-tuning (only the normalisation layers train): its settings in config.py, its model code in method.py."""
