"""The one list of methods, and how to reach each one's settings and its `Method` object by name.

Torch-free, so that the config can check a method's settings before torch loads. Each method is a package beside
this file, `peftsum/methods/<name>/`, holding `config.py` (its settings dataclass as `SETTINGS`, torch-free) and
`method.py` (its `METHOD`, following base.Method); adding a method is that package and one entry in NAMES.
"""

from __future__ import annotations

import importlib

from ..errors import UserError

# Every method, in the order configs, reports and sweeps list them.
NAMES = ("lora", "prompt", "finetune", "ia3", "prefix", "ptuning", "lntuning")


def settings_class(name: str) -> type:
    """The dataclass of the method's settings section (e.g. `lora.*`), from its torch-free config module."""
    return importlib.import_module(f"{__package__}.{name}.config").SETTINGS


def method_named(name: str):
    """The method called `name` (a base.Method), its module imported on first use."""
    if name not in NAMES:
        raise UserError(f"unknown method {name!r}; choose from {', '.join(NAMES)}")
    return importlib.import_module(f"{__package__}.{name}.method").METHOD


def all_methods() -> dict:
    """Every method by name, in NAMES' order."""
    return {name: method_named(name) for name in NAMES}


def by_peft_type() -> dict:
    """The methods that have a peft form, by their adapter_config.json `peft_type`."""
    return {m.peft_type: m for m in all_methods().values() if m.peft_type}
