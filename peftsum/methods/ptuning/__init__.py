"""P-tuning: its settings in config.py, its model code in method.py."""
