"""Swapping a model's layers for other layouts in place, and handing the memory they held back.

Shared by the code that lays weights out for a kernel (quantize.py: int8/int4; cpu_linear.py: oneDNN) and by the
model (MobileVLM.release_vision); it depends on nothing in this package, so none of them depends on another.
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable

from torch import nn


def replace_modules(module: nn.Module, match: Callable[[nn.Module], bool],
                    make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule that matches by make(it), in place, one at a time, dropping each old weight as soon
    as it is replaced rather than when the loop ends (where the new layout is a copy, the old one is freed then).
    Returns how many."""
    targets = [(name, m) for name, m in module.named_modules() if match(m)]
    for name, old in targets:
        parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        setattr(parent, name.rsplit(".", 1)[-1], make(old))
        old.weight = None
    if targets:
        return_freed_memory()
    return len(targets)


def return_freed_memory() -> None:
    """Hand the heap pages freed by replacing weights with new layouts (quantised ones, per-chunk temporaries,
    cpu_linear.py's reordered ones) or by releasing them back to the OS. glibc keeps them mapped otherwise, and
    the process stays about 0.2 GB (MobileVLM-1.7B, int4) above its model's size for good. No-op where glibc is
    absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
