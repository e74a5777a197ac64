"""Progress bars for the loops a user waits for (tqdm), silent when stderr is not a terminal so
that logs and CI output stay clean."""
from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, *, total: int | None = None, unit: str = "it") -> Iterable[T]:
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, disable=None, dynamic_ncols=True)
