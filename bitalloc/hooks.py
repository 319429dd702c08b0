"""Forward hooks that never outlive the pass they observe."""
from __future__ import annotations

from typing import Callable

import torch


def run_hooked(handles: list, run: Callable[[], object]):
    """`run()` without gradients; the hook `handles` are removed afterwards even when it raises
    (a hook left behind would keep observing, or stopping, every later forward)."""
    try:
        with torch.no_grad():
            return run()
    finally:
        for handle in handles:
            handle.remove()
