"""The adaptation methods: one package per method (its settings in `config.py`, its model code in `method.py`),
the protocol they follow in base.py, the list of them in registry.py, the target-module helpers LoRA and IA3 share
in targets.py and saving/loading method folders in adapters.py.

Nothing is imported here: the settings modules and the registry stay torch-free, so a config is checked before
torch loads.
"""
