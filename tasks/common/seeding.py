"""Independent random streams per purpose, all derived from one run seed.

Every random draw of a task (head init, shuffling, augmentation, bootstrap) takes its own
generator, so adding a draw to one purpose never shifts the numbers of another, and the global
RNG is never consulted.
"""
from __future__ import annotations

import hashlib

import torch


def derived_seed(seed: int, purpose: str) -> int:
    """An independent seed per purpose ("init", "shuffle", "augment", "bootstrap") of one run seed."""
    digest = hashlib.sha256(f"{int(seed)}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator for ``purpose`` (CPU, so the same seed draws the same numbers on any device)."""
    return torch.Generator().manual_seed(derived_seed(seed, purpose))
