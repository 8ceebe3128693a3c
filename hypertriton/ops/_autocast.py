"""Autocast queries that also answer for device types autocast does not know, such as ``meta`` (shape-only
runs), where ``torch.is_autocast_enabled`` and ``torch.autocast`` raise."""

from __future__ import annotations

import contextlib

import torch


def autocast_known(device_type: str) -> bool:
    try:
        torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False
    return True


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``; False where autocast does not know the device type."""
    return autocast_known(device_type) and torch.is_autocast_enabled(device_type)


def autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)``; nothing where autocast does not know the device type."""
    return torch.autocast(device_type, enabled=False) if autocast_known(device_type) else contextlib.nullcontext()
