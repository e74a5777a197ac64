"""Image-report pairs for pretraining, built from the MIMIC-CXR loader as MGCA builds them.

Caption (MGCA ``preprocess/pretrain.py`` + its dataset, ``mgca.md`` §3): impression, then findings,
joined by a space; split into sentences (on "N." list markers and full stops); each sentence
lower-cased, non-ASCII characters removed and tokenised with ``\\w+``; sentences with one token or
fewer dropped; a study whose caption keeps fewer than 3 tokens is dropped; the kept sentences are
joined with spaces (no sentence markers). One pair per frontal (PA/AP) image: a study's images share
its report.

The captions are :class:`Caption` strings: equal to the plain text above in every respect (so every
method tokenises exactly what it did before), and also carrying where each kept sentence ends, for a
method that needs sentence units (PLACE's textual pathology observations, DD-PLACE-2; the text tower
turns those character offsets into a per-token sentence index, :func:`methods.vlp.text.tokenize`).

Every image that does not become a pair is counted by reason (``non_frontal``, ``no_report_text``
(neither findings nor impression), ``caption_too_short``), and the counts travel with the
checkpoint's metadata.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

_LIST_MARKER = re.compile(r"\b\d+\.\s+")
_SENTENCE_END = re.compile(r"\.")
_WORD = re.compile(r"\w+")
MIN_SENTENCE_TOKENS = 2      # a sentence needs more than one token
MIN_CAPTION_TOKENS = 3


class Caption(str):
    """A caption that also knows where its sentences end.

    It *is* the caption text (a ``str``: equality, hashing, slicing, JSON and tokenisation see nothing
    else), with one extra attribute, ``sentence_ends``: for each kept sentence, the character offset
    just past its last word. A string operation returns a plain ``str`` without the attribute.
    """

    sentence_ends: tuple[int, ...]

    def __new__(cls, sentences: Sequence[Sequence[str]]) -> "Caption":
        words = [w for s in sentences for w in s]
        self = super().__new__(cls, " ".join(words))
        ends, pos = [], -1
        for s in sentences:
            if s:
                pos += sum(len(w) + 1 for w in s)
                ends.append(pos)
        self.sentence_ends = tuple(ends)
        return self

    def __reduce__(self):  # pickles (and copies) as a Caption with its sentence ends
        return (_caption_from, (str(self), self.sentence_ends))


def _caption_from(text: str, ends: Sequence[int]) -> Caption:
    c = str.__new__(Caption, text)
    c.sentence_ends = tuple(ends)
    return c


def mgca_sentences(findings: str | None, impression: str | None) -> list[list[str]]:
    """The kept sentences of one report, each a list of its lower-cased ``\\w+`` tokens (empty when
    the caption would be too short to keep)."""
    text = " ".join(t for t in ((impression or "").strip(), (findings or "").strip()) if t)
    if not text:
        return []
    text = _LIST_MARKER.sub(". ", text.replace("\n", " "))
    kept: list[list[str]] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.encode("ascii", "ignore").decode().lower()
        tokens = _WORD.findall(sentence)
        if len(tokens) >= MIN_SENTENCE_TOKENS:
            kept.append(tokens)
    return kept if sum(len(s) for s in kept) >= MIN_CAPTION_TOKENS else []


def mgca_caption(findings: str | None, impression: str | None) -> str:
    """The pretraining text of one report ("" when too short to keep)."""
    return " ".join(w for s in mgca_sentences(findings, impression) for w in s)


def mgca_caption_with_sentences(findings: str | None, impression: str | None) -> Caption:
    """:func:`mgca_caption` as a :class:`Caption` (the same text, plus its sentence ends)."""
    return Caption(mgca_sentences(findings, impression))


@dataclass
class PairSet:
    data: Any                                  # PreparedData of MIMIC-CXR
    rows: np.ndarray                           # table rows (images) with a caption
    captions: list[str]                        # one per row (Caption strings: text + sentence ends)
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
            cap = memo[(f, i)] = mgca_caption_with_sentences(f, i)
        if not cap:
            skipped["caption_too_short"] += 1
            continue
        keep.append(r)
        captions.append(cap)
    return PairSet(mimic, np.asarray(keep, dtype=np.int64), captions, skipped)
