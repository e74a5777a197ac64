"""The text tower of the vision-language methods: a Hugging Face BERT and its tokenizer.

Presets
-------
* ``tiny``: a small :class:`transformers.BertConfig` (4 layers of width 128 by default) trained from
  scratch, with a WordPiece vocabulary learned by ``tokenizers`` from the pretraining captions. The
  tokenizer is saved beside the weights (``tokenizer.json``), so a checkpoint is self-contained.
* ``paper``: any BERT in a local directory (``Bio_ClinicalBERT`` for MGCA and GLoRIA), truncated to
  the method's number of layers (MGCA keeps the first 6). Nothing is ever downloaded: the directory
  comes from the method option ``<method>.text_model_dir`` or ``$MEDVLP_BERT_DIR``; a missing one is
  an error that names where it looked.

Words
-----
MGCA and GLoRIA contrast *words*, not sub-word pieces: the hidden states of a word's pieces are
summed (both official codes do so). :class:`TokenBatch` carries, for every token, the index of the
word it belongs to (-1 for ``[CLS]``, ``[SEP]`` and padding), read off the fast tokenizer's
``word_ids``; :func:`aggregate_words` does the sum with one ``scatter_add``.

Sentences
---------
A method that needs sentence units (PLACE, DD-PLACE-2) sets ``TextTower.sentences = True``; its
token batches then also carry ``sentence_index`` (the sentence of every token, -1 for specials and
padding). The pretraining captions join their sentences without markers (MGCA's pipeline), so the
boundaries travel beside the text: a :class:`methods.vlp.pairs.Caption` records the character
offset where each sentence ends, and the fast tokenizer's offset mapping places every token (any
tokenizer: the tiny WordPiece or a local BERT's). Any other string (a prompt, a report with its
punctuation) ends a sentence at each ``.``, ``!`` or ``?``; a string without one is one sentence.
"""
from __future__ import annotations

import bisect
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from bench.errors import CheckpointError

#: Environment variable naming a local BERT directory for the ``paper`` preset.
BERT_DIR_ENV = "MEDVLP_BERT_DIR"
TOKENIZER_FILE = "tokenizer.json"
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class TextSpec:
    """What a method's text tower is; recorded on the card and in the checkpoint."""

    kind: str                        # "tiny-wordpiece" (trained here) or "local-bert" (a directory)
    max_length: int                  # tokens per report, [CLS] and [SEP] included (MGCA: 112)
    num_layers: int                  # transformer layers kept
    hidden: int = 128                # tiny only (a local BERT brings its own)
    heads: int = 2
    intermediate: int = 512
    vocab_size: int = 2000           # tiny WordPiece vocabulary size
    model_dir: str | None = None     # local-bert only
    #: tiny only: "mlm" (masked-language-model pretraining on the train captions first,
    #: :mod:`methods.vlp.mlm`; the tiny stand-in for Bio_ClinicalBERT) or "random"
    init: str = "random"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tiny_text_spec(max_length: int = 96, num_layers: int = 4, init: str = "mlm") -> TextSpec:
    return TextSpec(kind="tiny-wordpiece", max_length=max_length, num_layers=num_layers, init=init)


def paper_text_spec(model_dir: str | None, *, max_length: int = 112, num_layers: int = 6) -> TextSpec:
    return TextSpec(kind="local-bert", max_length=max_length, num_layers=num_layers, hidden=768, heads=12,
                    intermediate=3072, vocab_size=0, model_dir=model_dir)


def resolve_bert_dir(option: str | None, method: str) -> Path:
    """The local BERT directory for the paper preset; never a download."""
    looked = []
    for source, value in ((f"--set {method}.text_model_dir", option), (f"${BERT_DIR_ENV}", os.environ.get(BERT_DIR_ENV))):
        if value:
            p = Path(value).expanduser()
            looked.append(f"{source} = {p}")
            if (p / "config.json").is_file():
                return p
    where = "; ".join(looked) if looked else f"neither --set {method}.text_model_dir nor ${BERT_DIR_ENV} is set"
    raise CheckpointError(
        f"{method} (preset paper) needs a local BERT directory (config.json, vocab, weights; e.g. "
        f"emilyalsentzer/Bio_ClinicalBERT downloaded beforehand); nothing is downloaded here. Looked at: {where}")


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

def train_wordpiece(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Any:
    """A lower-casing BERT WordPiece tokenizer whose vocabulary is learned from ``texts``.

    The vocabulary is built here, not by ``tokenizers``' trainer, because that trainer breaks ties
    in an order that changes from run to run (measured: three trainings on the same captions gave
    three different vocabularies), and a pretraining must be a pure function of its data and seed.
    It holds the special tokens, every character seen (alone and as a ``##`` continuation, so any
    word can be spelled) and then the most frequent whole words (at least ``min_frequency``
    occurrences; ties broken alphabetically) up to ``vocab_size``. Rare words split into pieces,
    which the word-level methods sum back into words.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in counts for c in w})
    vocab = list(SPECIALS) + chars + ["##" + c for c in chars]
    seen = set(vocab)
    for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size or n < min_frequency:
            break
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def fast_tokenizer(tokenizer_json: str | Path | Any) -> Any:
    """A ``PreTrainedTokenizerFast`` over a ``tokenizers`` object or a saved ``tokenizer.json``."""
    from transformers import PreTrainedTokenizerFast

    kw = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    if isinstance(tokenizer_json, (str, Path)):
        return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), **kw)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_json, **kw)


def local_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, use_fast=True)
    if not getattr(tok, "is_fast", False):
        raise CheckpointError(f"{model_dir}: a fast tokenizer is needed (word ids for word-level alignment)")
    return tok


@dataclass
class TokenBatch:
    input_ids: torch.Tensor          # long [B, T]
    attention_mask: torch.Tensor     # long [B, T]
    word_index: torch.Tensor         # long [B, T]: word of each token, -1 for specials and padding
    n_words: int                     # word slots (T - 2: every token but [CLS] and [SEP] could be a word)
    #: long [B, T]: sentence of each token (0, 1, ... in order), -1 for specials and padding; only when
    #: the tower was asked for sentences (``TextTower.sentences``), else None
    sentence_index: torch.Tensor | None = None

    def to(self, device: torch.device) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.word_index.to(device),
                          self.n_words, None if self.sentence_index is None else self.sentence_index.to(device))

    def __getitem__(self, rows: Any) -> "TokenBatch":
        return TokenBatch(self.input_ids[rows], self.attention_mask[rows], self.word_index[rows], self.n_words,
                          None if self.sentence_index is None else self.sentence_index[rows])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


_SENTENCE_STOP = re.compile(r"[.!?]")


def sentence_ends(text: str) -> tuple[int, ...]:
    """Character offsets where the sentences of ``text`` end (exclusive): a
    :class:`~methods.vlp.pairs.Caption`'s recorded ends, else just past each ``.``/``!``/``?``, and the
    end of the text."""
    recorded = getattr(text, "sentence_ends", None)
    if recorded is not None:
        return tuple(recorded)
    return tuple(m.end() for m in _SENTENCE_STOP.finditer(text)) + (len(text),)


def _sentence_row(ends: Sequence[int], offsets: Sequence[tuple[int, int]], word_ids: Sequence[int | None]) -> list[int]:
    """Sentence of each token: the number of sentence ends at or before the token's first character,
    renumbered 0, 1, ... in order of appearance (a sentence cut by truncation simply ends early)."""
    raw = [-1 if w is None else bisect.bisect_right(ends, start) for (start, _), w in zip(offsets, word_ids)]
    order: dict[int, int] = {}
    return [-1 if r < 0 else order.setdefault(r, len(order)) for r in raw]


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, *, sentences: bool = False) -> TokenBatch:
    """Tokenise ``texts`` to ``max_length`` (padded, truncated) with the word of every token and, with
    ``sentences=True``, its sentence (see the module docstring)."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt", return_token_type_ids=False, return_offsets_mapping=sentences)
    word_index = torch.full_like(enc["input_ids"], -1)
    sentence_index = torch.full_like(enc["input_ids"], -1) if sentences else None
    for i in range(len(texts)):
        ids = enc.word_ids(i)
        word_index[i] = torch.tensor([-1 if w is None else w for w in ids], dtype=torch.long)
        if sentence_index is not None:
            row = _sentence_row(sentence_ends(texts[i]), enc["offset_mapping"][i].tolist(), ids)
            sentence_index[i] = torch.tensor(row, dtype=torch.long)
    # word_ids count from 0 per text; a truncated text keeps only its first words
    return TokenBatch(enc["input_ids"].long(), enc["attention_mask"].long(), word_index, max_length - 2,
                      sentence_index)


def aggregate_words(hidden: torch.Tensor, word_index: torch.Tensor, n_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum sub-word states into words: ``[B,T,H] -> ([B,W,H], mask [B,W] bool)``."""
    b, t, h = hidden.shape
    idx = word_index.clamp(min=0).clamp(max=n_words - 1)
    keep = (word_index >= 0) & (word_index < n_words)
    out = hidden.new_zeros(b, n_words, h)
    out.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, h), hidden * keep.unsqueeze(-1).to(hidden.dtype))
    count = torch.zeros(b, n_words, device=hidden.device, dtype=torch.long)
    count.scatter_add_(1, idx, keep.long())
    return out, count > 0


# ---------------------------------------------------------------------------------------------
# The tower
# ---------------------------------------------------------------------------------------------

@dataclass
class TextOutput:
    cls: torch.Tensor                # [B, H] last layer [CLS]
    tokens: torch.Tensor             # [B, T, H] last layer
    hidden_states: tuple[torch.Tensor, ...]  # every layer's output (embeddings first)
    cls_attention: torch.Tensor | None  # [B, T] last layer's [CLS] -> token attention, heads averaged
    attention_mask: torch.Tensor     # [B, T]
    word_index: torch.Tensor         # [B, T]
    n_words: int

    def words(self, states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Word vectors (sub-word sum) of ``states`` (default: the last layer) and their mask."""
        return aggregate_words(self.tokens if states is None else states, self.word_index, self.n_words)


def build_bert(spec: TextSpec, *, vocab_size: int, seed: int) -> nn.Module:
    """A randomly initialised BERT for the tiny preset (initialisation a pure function of ``seed``)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab_size, hidden_size=spec.hidden, num_hidden_layers=spec.num_layers,
                        num_attention_heads=spec.heads, intermediate_size=spec.intermediate,
                        max_position_embeddings=max(128, spec.max_length), attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return BertModel(config, add_pooling_layer=False)


def load_local_bert(model_dir: Path, num_layers: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(str(model_dir), local_files_only=True)
    config.num_hidden_layers = num_layers
    config._attn_implementation = "eager"
    try:
        return BertModel.from_pretrained(str(model_dir), config=config, local_files_only=True, add_pooling_layer=False)
    except OSError as e:
        raise CheckpointError(f"{model_dir}: cannot load BERT weights ({e})") from e


class TextTower(nn.Module):
    """BERT plus its tokenizer. ``bert`` is the only module with weights (state-dict prefix ``bert.``)."""

    def __init__(self, bert: nn.Module, tokenizer: Any, spec: TextSpec) -> None:
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        self.spec = spec
        #: MGCA's released code passes its token-type ids (all zero) where med.py expects position ids,
        #: so every token sees position 0; True reproduces that (``mgca.zero_text_positions``).
        self.zero_positions = False
        #: True: token batches also carry each token's sentence (``TokenBatch.sentence_index``; PLACE)
        self.sentences = False

    @property
    def hidden_size(self) -> int:
        return int(self.bert.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        return tokenize(self.tokenizer, texts, self.spec.max_length, sentences=self.sentences)

    def forward(self, tokens: TokenBatch, *, attention: bool = False) -> TextOutput:
        out = self.bert(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                        token_type_ids=torch.zeros_like(tokens.input_ids),
                        position_ids=torch.zeros_like(tokens.input_ids) if self.zero_positions else None,
                        output_hidden_states=True, output_attentions=attention, return_dict=True)
        cls_attn = out.attentions[-1][:, :, 0, :].mean(dim=1) if attention else None
        return TextOutput(cls=out.last_hidden_state[:, 0], tokens=out.last_hidden_state,
                          hidden_states=tuple(out.hidden_states), cls_attention=cls_attn,
                          attention_mask=tokens.attention_mask, word_index=tokens.word_index, n_words=tokens.n_words)


def save_tokenizer(tokenizer: Any, folder: Path) -> Path:
    """Write the tokenizer beside a checkpoint (``tokenizer.json``)."""
    path = Path(folder) / TOKENIZER_FILE
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    path.write_text(backend.to_str())
    return path


def tokenizer_vocab_size(tokenizer: Any) -> int:
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return int(backend.get_vocab_size())


def describe_tokenizer(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    import hashlib

    return {"vocab_size": tokenizer_vocab_size(tokenizer),
            "sha256": hashlib.sha256(backend.to_str().encode()).hexdigest()[:16],
            "model": json.loads(backend.to_str())["model"]["type"]}
