"""Method ``sista``: SISTA (Bui et al., "Representation Learning with Semantic-aware Instance and Sparse
Token Alignments", arXiv 2601.08165), re-implemented from its abstract: no code, formulas or
hyper-parameters are published (``seed_methods.md`` §4), so every structural choice is a design
decision with an ID and a ``--set sista.<key>`` option.

``L = λ_sia L_SIA + λ_sta L_STA (+ λ_sparsity L_sparsity)`` (DD-SISTA-3), on MGCA's pipeline
(DD-COMMON-1, :mod:`methods.vlp.seed`; recipe DD-SISTA-4):

* **SIA** (semantics-aware instance alignment, DD-SISTA-1): MGCA's instance InfoNCE between the
  global embeddings (τ 0.07), except that report pairs which are semantically the same are not
  treated as negatives. Inter-report similarity (``sia_similarity``): TF-IDF vectors of the reports'
  tokens (``tfidf``, the default: fixed, like FaNe's frozen Bio_ClinicalBERT) or the model's own
  global text embeddings without gradient (``own_text_stopgrad``). The default is the fixed one
  because a similarity the model learns has a zero-loss minimum: if the text embeddings collapse,
  every pair crosses the threshold, every negative leaves the contrast and SIA is exactly 0, and
  the closer the embeddings get the fewer negatives push them apart. Two reports with identical tokens always count as similarity 1 (a
  duplicated report is never a negative, dropout or not). With ``sia_rescale`` the similarity is
  rescaled as FaNe does, ``S' = (S - o*) / (1 - o*)`` with ``o*`` an EMA (``sia_offset_momentum``) of
  the mean cosine between each report and the batch's mean report (kept in the ``sia_offset``
  buffer; updated in training only). ``sia_mode = threshold``: pairs with ``S' > sia_threshold`` are
  false negatives, removed from the contrast (``sia_false_negatives = remove``) or made extra
  positives (``positive``); with no pair above the threshold SIA *is* MGCA's InfoNCE.
  ``sia_mode = soft``: soft targets ``(1 - α) I + α softmax(S' / τ_s)`` (``sia_soft_alpha``,
  ``sia_soft_temperature``). DD-SISTA-1's third similarity source, a frozen external encoder
  (Bio_ClinicalBERT's pooler), is not offered: the tiny preset has no such model.
* **STA** (sparse token-level alignment, DD-SISTA-2), after SPARC: within each sample, per word the
  patch similarities are min-max normalised and sparsified (``sta_sparsifier``: ``threshold`` keeps
  patches at or above 1/P, SPARC's rule; ``topk`` keeps ``sta_topk``; ``sparsemax``; ``learned_gate``
  multiplies by a learned sigmoid gate on (word, patch) pairs, FaNe-like, with an L1 sparsity term
  weighted ``lambda_sparsity``), renormalised, and the word is contrasted with its sparse grouping of
  patches against the sample's other words (``sta_temperature``). ``sta_direction``:
  ``word_to_patch`` (SPARC's), ``patch_to_word`` (per patch, a sparse set of words), or ``both``.

Every module can be switched off: ``--set sista.lambda_sta=0`` (no local heads, no STA; SIA alone),
``--set sista.semantic_negatives=false`` (SIA becomes MGCA's plain instance InfoNCE: the SIA
ablation), ``--set sista.lambda_sia=0``. A switched-off module is not built and its term is absent.
The options are part of the run's identity (results, leaderboard rows and the cached pretraining).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from bench.api import METHODS, MethodEntry, MethodOption
from methods.vlp import seed
from methods.vlp import seed_objectives as SO
from methods.vlp import text as T
from methods.vlp.method import CAPABILITIES, VLPMethod, VLPRecipe, make_factory, make_pretrain
from methods.vlp.model import l2

NAME = "sista"
SIA_MODES = ("threshold", "soft")
SIA_SIMILARITIES = ("own_text_stopgrad", "tfidf")
FALSE_NEGATIVES = ("remove", "positive")
STA_DIRECTIONS = ("word_to_patch", "patch_to_word", "both")
STA_SPARSIFIERS = ("threshold", "topk", "sparsemax", "learned_gate")

OPTIONS = {
    "global_head": seed.GLOBAL_HEAD_OPTION,
    "semantic_negatives": MethodOption(True, "DD-SISTA-1: SIA's false-negative handling (false: plain InfoNCE, "
                                             "every other report is a negative: the SIA ablation)"),
    "sia_mode": MethodOption("threshold", "DD-SISTA-1: threshold (FaNe-like positive mining) or soft "
                                          "(MedCLIP-like soft targets)"),
    "sia_similarity": MethodOption("tfidf", "DD-SISTA-1: inter-report similarity: tfidf (fixed, the default) or "
                                            "own_text_stopgrad (own global text embeddings, no gradient; has a "
                                            "zero-loss collapse: identical text embeddings remove every negative)"),
    "sia_threshold": MethodOption(0.95, "DD-SISTA-1: rescaled similarity above which a pair is a false negative"),
    "sia_rescale": MethodOption(True, "DD-SISTA-1: FaNe's rescaling S' = (S - o*) / (1 - o*)"),
    "sia_offset_momentum": MethodOption(0.05, "DD-SISTA-1: EMA momentum of the offset o* (FaNe: 0.05)"),
    "sia_false_negatives": MethodOption("remove", "DD-SISTA-1: false negatives leave the contrast (remove) or "
                                                  "become extra positives (positive)"),
    "sia_soft_alpha": MethodOption(0.2, "DD-SISTA-1: weight of the similarity targets (sia_mode=soft)"),
    "sia_soft_temperature": MethodOption(0.1, "DD-SISTA-1: temperature of the similarity targets (sia_mode=soft)"),
    "temperature": MethodOption(0.07, "DD-SISTA-4: temperature of the instance contrast (MGCA's)"),
    "sta_direction": MethodOption("word_to_patch", "DD-SISTA-2: word_to_patch (SPARC), patch_to_word or both"),
    "sta_sparsifier": MethodOption("threshold", "DD-SISTA-2: threshold (SPARC's 1/P), topk, sparsemax or "
                                                "learned_gate (experimental: the weights are renormalised, so the "
                                                "gate's overall level is free and its L1 term lowers that level "
                                                "without making the alignment sparser; FaNe's unnormalised sigmoid "
                                                "attention is not reproduced yet)"),
    "sta_topk": MethodOption(4, "DD-SISTA-2: tokens kept by sta_sparsifier=topk"),
    "sta_temperature": MethodOption(0.1, "DD-SISTA-2: temperature of the within-sample token contrast"),
    "gate_hidden": MethodOption(64, "DD-SISTA-2: hidden width of the learned gate (sta_sparsifier=learned_gate)"),
    "lambda_sia": MethodOption(1.0, "DD-SISTA-3: weight of SIA (0 turns it off)"),
    "lambda_sta": MethodOption(1.0, "DD-SISTA-3: weight of STA (0 turns off the token alignment)"),
    "lambda_sparsity": MethodOption(1.0, "DD-SISTA-3: weight of the gate's L1 sparsity (learned_gate only; FaNe: 1)"),
}


class TokenGate(nn.Module):
    """FaNe-like learned gate on (word, patch) pairs (DD-SISTA-2, ``learned_gate``):
    ``σ(w₃ᵀ ReLU(W₁ w_t + W₂ v_p + b) + b₃)``, i.e. an MLP on ``[w_t; v_p]`` whose first layer is split
    per input, so it costs O(W·P·hidden) and not O(W·P·E·hidden)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.word = nn.Linear(dim, hidden)
        self.patch = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)

    def forward(self, words: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.word(words).unsqueeze(2) + self.patch(patches).unsqueeze(1))   # [B, W, P, hidden]
        return torch.sigmoid(self.out(h).squeeze(-1))


class SISTAModel(seed.SeedModel):
    def __init__(self, image, text, recipe: VLPRecipe, options: Mapping[str, Any]) -> None:
        o = options
        weights = seed.loss_weights(NAME, o, ("lambda_sia", "lambda_sta"))
        weights["lambda_sparsity"] = seed.positive(NAME, o, "lambda_sparsity", allow_zero=True)
        sparsifier = seed.choice(NAME, o, "sta_sparsifier", STA_SPARSIFIERS)
        extra = {}
        if weights["lambda_sta"] and sparsifier == "learned_gate":
            extra["gate"] = TokenGate(recipe.embed_dim, seed.positive(NAME, o, "gate_hidden", int))
        local = bool(weights["lambda_sta"])
        super().__init__(image, text, recipe, options, local_image=local, local_text=local, extra=extra)
        self.weights = weights
        self.sparsifier = sparsifier
        self.semantic_negatives = bool(o["semantic_negatives"])
        self.sia_mode = seed.choice(NAME, o, "sia_mode", SIA_MODES)
        self.similarity = seed.choice(NAME, o, "sia_similarity", SIA_SIMILARITIES)
        self.false_negatives = seed.choice(NAME, o, "sia_false_negatives", FALSE_NEGATIVES)
        self.direction = seed.choice(NAME, o, "sta_direction", STA_DIRECTIONS)
        self.rescale = bool(o["sia_rescale"])
        self.momentum = seed.positive(NAME, o, "sia_offset_momentum", allow_zero=True)
        self.topk = seed.positive(NAME, o, "sta_topk", int)
        self.values = {k: seed.positive(NAME, o, k) for k in ("sia_threshold", "sia_soft_alpha", "sia_soft_temperature",
                                                               "temperature", "sta_temperature")}
        # FaNe's offset o* (EMA of the batch's mean report-to-prototype cosine); NaN until the first batch
        self.register_buffer("sia_offset", torch.tensor(float("nan")))
        special = getattr(text.tokenizer, "all_special_ids", None) if text.tokenizer is not None else None
        self._special_ids = torch.tensor(sorted(set(special or [])), dtype=torch.long)

    def report_similarity(self, tokens: T.TokenBatch, g_t: torch.Tensor) -> torch.Tensor:
        """Inter-report similarity ``[B, B]`` (no gradient); identical token rows score 1."""
        with torch.no_grad():
            if self.similarity == "tfidf":
                sim = SO.tfidf_similarity(tokens.input_ids, tokens.attention_mask, self._special_ids)
            else:
                r = l2(g_t.detach())
                sim = r @ r.t()
            ids = tokens.input_ids
            same = (ids.unsqueeze(0) == ids.unsqueeze(1)).all(-1)
            return torch.where(same, torch.ones_like(sim), sim.to(torch.float32))

    def offset(self, sim: torch.Tensor) -> float:
        """The current ``o*`` (in training first updated from this batch's similarities: the first batch
        sets it, later ones move it by the EMA momentum)."""
        if not (self.rescale and self.semantic_negatives):
            return 0.0
        if self.training:
            m = SO.batch_prototype_similarity(sim).to(self.sia_offset)
            with torch.no_grad():
                if torch.isnan(self.sia_offset):
                    self.sia_offset.copy_(m)
                else:
                    self.sia_offset.mul_(1.0 - self.momentum).add_(self.momentum * m)
        o = float(self.sia_offset) if not torch.isnan(self.sia_offset) else 0.0
        return min(o, 0.99)

    def losses(self, images, tokens):
        img = self.image(images)
        txt = self.text(tokens)
        g_v, g_t = self.global_embeddings(img, txt)
        if self.semantic_negatives:
            sim = self.report_similarity(tokens, g_t)
            offset = self.offset(sim)
        else:          # plain InfoNCE: no report is similar enough to matter
            sim = torch.zeros(g_v.shape[0], g_v.shape[0], device=g_v.device)
            offset = 0.0
        patches = words = mask = gate = gate_mask = None
        if self.weights["lambda_sta"]:
            patches = l2(self.local_patches(img))
            words, mask = self.local_words(txt)
            words = l2(words) * mask.unsqueeze(-1)
            if self.sparsifier == "learned_gate":
                gate = self.heads["gate"](words, patches)
                gate_mask = mask.unsqueeze(-1)
        v = self.values
        return SO.sista_objective(
            g_v, g_t, sim, patches, words, mask, gate, gate_mask, temperature=v["temperature"], sia_mode=self.sia_mode,
            threshold=v["sia_threshold"] if self.semantic_negatives else float("inf"), offset=offset,
            false_negatives=self.false_negatives, soft_alpha=v["sia_soft_alpha"] if self.semantic_negatives else 0.0,
            soft_temperature=v["sia_soft_temperature"], sta_direction=self.direction, sparsifier=self.sparsifier,
            topk=self.topk, sta_temperature=v["sta_temperature"], **self.weights)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "loss_weights": dict(self.weights)}


objective = SO.sista_objective

DEFINITION = VLPMethod(name=NAME, reference="SISTA (Bui et al., arXiv 2601.08165), re-implemented from the abstract "
                                            "by medvlp-bench (design decisions DD-SISTA-1..4)",
                       recipe_version=2, options=OPTIONS, recipe=seed.recipe, text_spec=seed.text_spec,
                       build=SISTAModel)

METHODS.add(NAME, MethodEntry(
    name=NAME, factory=make_factory(DEFINITION), capabilities=CAPABILITIES, pretrain=make_pretrain(DEFINITION),
    options=DEFINITION.all_options(), objective=objective,
    description="SISTA: instance contrast without false negatives (inter-report similarity) + sparse "
                "word-patch alignment; MGCA's pipeline; pretrained on first use on the synthetic corpus and "
                "cached; no released weights"))
