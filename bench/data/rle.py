"""The run-length encoding of the SIIM-ACR Pneumothorax Kaggle challenge (``train-rle.csv``).

The string is a sequence of ``start length`` pairs. It is *relative* and *column-major*: keep a
running position starting at 0; for each pair advance it by ``start``, set the next ``length``
pixels, then advance it by ``length``. Positions address the flat H*W array that, reshaped to
(W, H) and transposed, gives the [H, W] mask (Fortran order). ``-1`` marks an image without
pneumothorax. Example, 4x4 (column-major positions 0..15 run down each column)::

    " 1 2 5 1"  ->  positions 1, 2 and 8  ->  mask[1, 0], mask[2, 0], mask[0, 2]

This is a different format from the COCO RLE of :mod:`bench.data.table` (absolute counts that
alternate 0/1 runs); the loaders convert decoded masks to COCO RLE.
"""
from __future__ import annotations

import numpy as np

NEGATIVE = "-1"


def _parse(text: str) -> np.ndarray:
    tokens = text.split()
    for tok in tokens:
        if not tok.isascii() or not tok.isdigit():
            what = "is negative" if tok[:1] == "-" and tok[1:].isdigit() else "is not an integer"
            raise ValueError(f"malformed SIIM RLE: value {tok[:20]!r} {what}")
    if len(tokens) % 2:
        raise ValueError(f"malformed SIIM RLE: odd number of values ({len(tokens)}); "
                         "expected 'start length' pairs")
    return np.array(tokens, dtype=np.int64)


def decode_siim_rle(text: str, height: int, width: int) -> np.ndarray:
    """Decode one RLE string to a uint8 [height, width] mask of 0/1.

    Leading and trailing whitespace is ignored; ``-1`` (or an empty string) gives an empty mask.
    Raises ValueError naming the problem for an odd number of values, a non-integer, a negative
    value or a run past the end of the image.
    """
    text = text.strip()
    n = int(height) * int(width)
    if text in (NEGATIVE, ""):
        return np.zeros((height, width), dtype=np.uint8)
    values = _parse(text)
    starts, lengths = values[0::2], values[1::2]
    ends_before = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    begin = np.cumsum(starts) + ends_before          # absolute start of each run
    end = begin + lengths
    if end[-1] > n:
        raise ValueError(f"malformed SIIM RLE: run ends at pixel {int(end[-1])}, past the end of "
                         f"a {height}x{width} image ({n} pixels)")
    flat = np.zeros(n, dtype=np.uint8)
    for b, e in zip(begin.tolist(), end.tolist()):
        flat[b:e] = 1
    return flat.reshape(width, height).T.copy()


def encode_siim_rle(mask: np.ndarray) -> str:
    """Encode a [H, W] mask (nonzero = foreground) as SIIM RLE; an empty mask gives ``-1``.

    The exact inverse of :func:`decode_siim_rle` (no leading space: the writer adds the one the
    Kaggle file has).
    """
    flat = np.asarray(mask).astype(bool).ravel(order="F")
    if not flat.any():
        return NEGATIVE
    padded = np.concatenate(([False], flat, [False])).astype(np.int8)
    change = np.flatnonzero(np.diff(padded))
    begin, end = change[0::2], change[1::2]
    prev_end = np.concatenate(([0], end[:-1]))
    pairs = np.stack([begin - prev_end, end - begin], axis=1).ravel()
    return " ".join(str(int(v)) for v in pairs)
