"""(IA)^3: its settings in config.py, its model code in method.py."""
