"""Image-report pairs for pretraining, built from the MIMIC-CXR loader as MGCA builds them.

Caption (MGCA ``preprocess/pretrain.py`` + its dataset, ``mgca.md`` §3): impression, then findings,
joined by a space; split into sentences (on "N." list markers and full stops); each sentence
lower-cased, non-ASCII characters removed and tokenised with ``\\w+``; sentences with one token or
fewer dropped; a study whose caption keeps fewer than 3 tokens is dropped; the kept sentences are
joined with spaces (no sentence markers). One pair per frontal (PA/AP) image: a study's images share
its report.

Every image that does not become a pair is counted by reason (``non_frontal``, ``no_report_text``
(neither findings nor impression), ``caption_too_short``), and the counts travel with the
checkpoint's metadata.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_LIST_MARKER = re.compile(r"\b\d+\.\s+")
_SENTENCE_END = re.compile(r"\.")
_WORD = re.compile(r"\w+")
MIN_SENTENCE_TOKENS = 2      # a sentence needs more than one token
MIN_CAPTION_TOKENS = 3


def mgca_caption(findings: str | None, impression: str | None) -> str:
    """The pretraining text of one report ("" when too short to keep)."""
    text = " ".join(t for t in ((impression or "").strip(), (findings or "").strip()) if t)
    if not text:
        return ""
    text = _LIST_MARKER.sub(". ", text.replace("\n", " "))
    kept: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.encode("ascii", "ignore").decode().lower()
        tokens = _WORD.findall(sentence)
        if len(tokens) >= MIN_SENTENCE_TOKENS:
            kept.extend(tokens)
    return " ".join(kept) if len(kept) >= MIN_CAPTION_TOKENS else ""


@dataclass
class PairSet:
    data: Any                                  # PreparedData of MIMIC-CXR
    rows: np.ndarray                           # table rows (images) with a caption
    captions: list[str]                        # one per row
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.rows))

    def summary(self) -> dict[str, Any]:
        return {"pairs": len(self), "studies": int(len({self.data.table.frame["study_id"].iat[r] for r in self.rows}))
                if "study_id" in self.data.table.frame else None, "skipped": dict(self.skipped)}


def pretraining_pairs(mimic: Any, split: str) -> PairSet:
    """Pairs of one split (``train`` / ``val``) of a prepared MIMIC-CXR dataset."""
    frame = mimic.table.frame
    rows = np.sort(np.asarray(mimic.manifest.rows(split, 1.0), dtype=np.int64))
    view = frame["view"].to_numpy(dtype=object)
    findings = frame["findings"].fillna("").to_numpy(dtype=object)
    impression = frame["impression"].fillna("").to_numpy(dtype=object)
    skipped = {"non_frontal": 0, "no_report_text": 0, "caption_too_short": 0}
    keep, captions = [], []
    memo: dict[tuple[str, str], str] = {}
    for r in rows:
        if view[r] not in ("PA", "AP"):
            skipped["non_frontal"] += 1
            continue
        f, i = str(findings[r]), str(impression[r])
        if not f.strip() and not i.strip():
            skipped["no_report_text"] += 1
            continue
        cap = memo.get((f, i))
        if cap is None:
            cap = memo[(f, i)] = mgca_caption(f, i)
        if not cap:
            skipped["caption_too_short"] += 1
            continue
        keep.append(r)
        captions.append(cap)
    return PairSet(mimic, np.asarray(keep, dtype=np.int64), captions, skipped)
