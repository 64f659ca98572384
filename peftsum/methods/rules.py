"""Torch-free helpers for the settings rules in each method's config.py (checked before torch loads)."""

from __future__ import annotations

from ..errors import UserError


def require(ok: bool, message: str) -> None:
    """Refuse a setting: raise UserError(message) unless `ok`."""
    if not ok:
        raise UserError(message)


def check_virtual_tokens(section: str, count: int, data) -> None:
    """A method that adds `count` virtual tokens must add at least one and leave the document room within
    data.max_length (beside the summary and its two separator tokens)."""
    require(count >= 1, f"{section}.num_virtual_tokens must be >= 1, got {count}")
    require(count + data.max_summary_tokens + 2 <= data.max_length,
            f"{section}.num_virtual_tokens ({count}) leaves no room for the document within data.max_length "
            f"({data.max_length})")
