"""Pretraining objectives of the seed methods PLACE, RECLF and SISTA, as pure functions on plain tensors.

None of the three papers has published code or formulas beyond its abstract
(``shared/reference/seed_methods.md`` §0), so every formula here is a design decision with an ID
(``DD-PLACE-3``, ``DD-RECLF-4``, ``DD-SISTA-1`` ...) that the docstrings cite; every choice is a keyword
argument, which the method modules expose as ``--set <method>.<key>`` options. Nothing here holds
state or owns parameters: the learned modules (PLACE's query extractor and correlation head, RECLF's
relation reasoner, SISTA's learned gate) live in the method modules and hand their outputs in.
Public analogues read for the designs (no code copied): GLoRIA's word->region attention
(marshuang80/gloria), SGRAF's similarity-graph reasoning and attention filtration (Paranioar/SGRAF),
SPARC's sparse token grouping (Bica et al., ICML 2024), FaNe's false-negative mining
(Aventador8/FaNe), MedCLIP's soft semantic targets.

Layouts (B = batch, E = embedding dim), images are rows and reports columns in every ``[B, B]``
matrix (so "rows" is image->text):

* global embeddings ``[B, E]``, L2-normalised;
* PLACE: V-PORs ``[B, Q, E]``, T-PORs ``[B, S, E]`` with ``sentence_mask [B, S]`` (True = real), both
  L2-normalised; patch correlation matrices ``[B, N, N]``;
* RECLF: regions ``[B, R, E]``, words ``[B, W, E]`` with ``word_mask [B, W]`` (normalised or not:
  see :func:`matching_context`); relation-enhanced scores in candidate form ``[B, C]``;
* SISTA: patches ``[B, P, E]``, words ``[B, W, E]`` with ``word_mask``, L2-normalised; report
  similarities ``[B, B]``.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from methods.vlp import objectives as O

__all__ = [
    # shared
    "soft_cross_entropy",
    # PLACE
    "pathology_similarity",
    "pcma_loss",
    "patch_correlation",
    "pixel_patches",
    "cce_loss",
    "place_objective",
    # RECLF
    "matching_context",
    "matching_vectors",
    "hardest_candidates",
    "candidates_from_matrix",
    "hinge_hardest",
    "reclf_objective",
    # SISTA
    "tfidf_similarity",
    "batch_prototype_similarity",
    "sia_loss",
    "minmax",
    "sparsemax",
    "sparse_weights",
    "sta_loss",
    "sista_objective",
]

_NEG_INF = float("-inf")


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``mean_i -sum_k targets[i, k] log softmax(logits[i])[k]``; ``targets`` rows sum to 1. Entries
    whose logit is ``-inf`` must have target 0 (they are skipped, not multiplied)."""
    logp = F.log_softmax(logits, dim=-1)
    return -(torch.where(targets > 0, targets * logp, torch.zeros_like(logp))).sum(-1).mean()


# ============================================================================================
# PLACE (Wang et al., arXiv 2506.10573): pathological-level alignment + correlation exploration
# ============================================================================================
Matching = Literal["max_similarity", "optimal_transport", "hungarian"]


@torch.no_grad()
def _ot_plan(cos: Tensor, sentence_mask: Tensor, *, epsilon: float, iterations: int) -> Tensor:
    """Entropic optimal-transport plans (Sinkhorn) between the real sentences and the queries of every
    (image, report) pair: ``cos [Bi, Bt, S, Q]``, uniform marginals (1/n_sentences over the real
    sentences, 1/Q over the queries), total mass 1 per pair; no gradient (the plan is a constant, as
    MGCA treats its Sinkhorn codes)."""
    mask = sentence_mask.bool()[None, :, :, None]                                   # [1, Bt, S, 1]
    k = torch.exp((cos.float() - 1.0) / epsilon) * mask                            # <= 1, finite
    n = mask.sum(2, keepdim=True).clamp(min=1).float()                             # sentences per report
    a = mask.float() / n                                                           # [1, Bt, S, 1]
    q = cos.shape[-1]
    b = torch.full_like(k[..., :1, :], 1.0 / q)                                    # [Bi, Bt, 1, Q]
    tiny = torch.finfo(torch.float32).tiny
    u = torch.ones_like(k[..., :1])                                                # [Bi, Bt, S, 1]
    v = torch.ones_like(b)
    for _ in range(iterations):
        u = a / (k @ v.transpose(-1, -2)).clamp_min(tiny)
        v = b / (u.transpose(-1, -2) @ k).clamp_min(tiny)
    return (u * k * v).to(cos.dtype)


@torch.no_grad()
def _hungarian_plan(cos: Tensor, sentence_mask: Tensor) -> Tensor:
    """One-to-one assignment of each real sentence to a distinct query maximising the summed cosine
    (``scipy.optimize.linear_sum_assignment`` per pair; with more sentences than queries, Q of them
    are assigned); the plan puts ``1 / n_assigned`` on every assigned pair. No gradient."""
    from scipy.optimize import linear_sum_assignment

    c = cos.detach().float().cpu().numpy()
    m = sentence_mask.bool().cpu().numpy()
    plan = np.zeros_like(c)
    bi, bt = c.shape[:2]
    for t in range(bt):
        real = np.flatnonzero(m[t])
        if real.size == 0:
            continue
        for i in range(bi):
            rows, cols = linear_sum_assignment(c[i, t][real], maximize=True)
            plan[i, t, real[rows], cols] = 1.0 / len(rows)
    return torch.from_numpy(plan).to(device=cos.device, dtype=cos.dtype)


def pathology_similarity(
    v_pors: Tensor,
    t_pors: Tensor,
    sentence_mask: Tensor,
    *,
    matching: Matching = "max_similarity",
    ot_epsilon: float = 0.05,
    ot_iterations: int = 10,
) -> Tensor:
    """Pathological-level similarity of every (image, report) pair, ``[Bi, Bt]`` (DD-PLACE-3).

    ``v_pors [Bi, Q, E]`` (image i's visual pathology observations), ``t_pors [Bt, S, E]`` (report t's
    textual observations, ``sentence_mask [Bt, S]`` True for real ones), both L2-normalised; with
    ``c_itsq = cos(t_ts, v_iq)``:

    * ``max_similarity``: each textual observation takes its best-matching visual one,
      ``s_it = mean_s max_q c_itsq`` (over the real sentences; late interaction);
    * ``optimal_transport``: ``s_it = sum_sq P_itsq c_itsq`` with ``P`` the entropic OT plan
      (Sinkhorn, ``ot_epsilon``, ``ot_iterations``; uniform marginals, mass 1, held constant): every
      query receives 1/Q of the mass, so a report with fewer observations than queries spreads them
      over all queries (balanced OT, as PLOT matches prompts to patches);
    * ``hungarian``: ``P`` a one-to-one assignment (sentences to distinct queries) instead.

    A report without any real observation scores 0 against every image. No labels are involved.
    """
    mask = sentence_mask.bool()
    cos = torch.einsum("tse,iqe->itsq", t_pors, v_pors)                              # [Bi, Bt, S, Q]
    if matching == "max_similarity":
        best = cos.amax(dim=-1).masked_fill(~mask.unsqueeze(0), 0.0)                # [Bi, Bt, S]
        return best.sum(-1) / mask.sum(-1).clamp(min=1).to(best.dtype).unsqueeze(0)
    if matching == "optimal_transport":
        plan = _ot_plan(cos, mask, epsilon=ot_epsilon, iterations=ot_iterations)
    elif matching == "hungarian":
        plan = _hungarian_plan(cos, mask)
    else:
        raise ValueError(f"matching must be max_similarity, optimal_transport or hungarian, got {matching!r}")
    return (plan * cos).sum(dim=(-1, -2))


def pcma_loss(
    v_pors: Tensor,
    t_pors: Tensor,
    sentence_mask: Tensor,
    *,
    temperature: float = 0.1,
    matching: Matching = "max_similarity",
    ot_epsilon: float = 0.05,
    ot_iterations: int = 10,
) -> Tensor:
    """PLACE's pathological-level cross-modal alignment (PCMA, DD-PLACE-3): a symmetric InfoNCE over
    the batch on :func:`pathology_similarity` at ``temperature``, ``½ [CE(S / τ) + CE(Sᵀ / τ)]``. An
    image's observations must agree with its own report's observations more than with any other
    report's; no disease label is used anywhere."""
    s = pathology_similarity(v_pors, t_pors, sentence_mask, matching=matching, ot_epsilon=ot_epsilon,
                             ot_iterations=ot_iterations)
    rows, cols = O.info_nce(s / temperature)
    return 0.5 * (rows + cols)


def patch_correlation(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Correlation matrices between the patches of each sample: ``x [B, N, D]`` -> ``[B, N, N]``.

    Each patch vector is centred over its own D entries and L2-normalised, ``C = x̂ x̂ᵀ`` (Pearson
    correlation of every pair of patches). A Gram matrix, so symmetric positive semi-definite, with
    entries in [-1, 1] and a unit diagonal (0 for a constant patch). DD-PLACE-4's target and
    prediction both have this form."""
    with torch.autocast(device_type=x.device.type, enabled=False):   # float32 even under bf16 autocast
        x = x.float()
        x = x - x.mean(dim=-1, keepdim=True)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
        return x @ x.transpose(-1, -2)


def pixel_patches(images: Tensor, grid: tuple[int, int], block: int = 8) -> Tensor:
    """The raw pixels under each cell of a ``grid`` (the local tokens' grid), ``[B, h*w, block²]``.

    ``images [B, C, H, W]`` (prepared; channels averaged: a radiograph is grey) are resized
    (bilinear, antialiased) to ``(h*block, w*block)`` so that every grid cell covers ``block x block``
    pixels, whatever the tower's stride or input size (ResNet-50 at 299 px has a 19 x 19 grid)."""
    h, w = int(grid[0]), int(grid[1])
    x = images.float().mean(dim=1, keepdim=True)
    x = F.interpolate(x, size=(h * block, w * block), mode="bilinear", align_corners=False, antialias=True)
    return F.unfold(x, kernel_size=block, stride=block).transpose(1, 2)             # [B, h*w, block²]


def cce_loss(
    predicted: Tensor,
    target: Tensor,
    *,
    loss: Literal["mse", "kl", "cosine"] = "mse",
    temperature: float = 0.1,
) -> Tensor:
    """PLACE's correlation-exploration loss (CCE, DD-PLACE-4) between a predicted and a target patch
    correlation matrix ``[B, N, N]`` (the target carries no gradient: it is detached here).

    * ``mse``: mean squared difference of all entries;
    * ``kl``: per row (patch), ``KL(softmax(target / τ) || softmax(predicted / τ))``, averaged;
    * ``cosine``: ``1 - cos(vec(predicted), vec(target))`` per sample, averaged.
    """
    target = target.detach().to(predicted.dtype)
    if loss == "mse":
        return (predicted - target).pow(2).mean()
    if loss == "kl":
        p = F.log_softmax(target / temperature, dim=-1)
        q = F.log_softmax(predicted / temperature, dim=-1)
        return (p.exp() * (p - q)).sum(-1).mean()
    if loss == "cosine":
        return (1.0 - F.cosine_similarity(predicted.flatten(1), target.flatten(1), dim=1)).mean()
    raise ValueError(f"cce loss must be mse, kl or cosine, got {loss!r}")


def place_objective(
    img: Tensor,
    txt: Tensor,
    v_pors: Tensor | None = None,
    t_pors: Tensor | None = None,
    sentence_mask: Tensor | None = None,
    cce_predicted: Tensor | None = None,
    cce_target: Tensor | None = None,
    *,
    ita_temperature: float = 0.07,
    pcma_temperature: float = 0.1,
    matching: Matching = "max_similarity",
    ot_epsilon: float = 0.05,
    ot_iterations: int = 10,
    cce_loss_kind: Literal["mse", "kl", "cosine"] = "mse",
    cce_temperature: float = 0.1,
    lambda_ita: float = 1.0,
    lambda_pcma: float = 1.0,
    lambda_cce: float = 1.0,
) -> dict[str, Tensor]:
    """PLACE's named loss terms (DD-PLACE-5): ``L = λ_ita L_ITA + λ_pcma L_PCMA + λ_cce L_CCE``.

    ``ita``: MGCA's instance-wise InfoNCE on the global embeddings (DD-COMMON-1); ``pcma``:
    :func:`pcma_loss`; ``cce``: :func:`cce_loss`. A term whose weight is 0 is absent (its module is
    switched off), and so is a term whose inputs are None.
    """
    terms: dict[str, Tensor] = {}
    if lambda_ita:
        terms["ita"] = lambda_ita * O.mgca_ita(img, txt, temperature=ita_temperature)
    if lambda_pcma and v_pors is not None and t_pors is not None and sentence_mask is not None:
        terms["pcma"] = lambda_pcma * pcma_loss(v_pors, t_pors, sentence_mask, temperature=pcma_temperature,
                                                matching=matching, ot_epsilon=ot_epsilon,
                                                ot_iterations=ot_iterations)
    if lambda_cce and cce_predicted is not None and cce_target is not None:
        terms["cce"] = lambda_cce * cce_loss(cce_predicted, cce_target, loss=cce_loss_kind,
                                             temperature=cce_temperature)
    return terms


# ============================================================================================
# RECLF (Li et al., IEEE TMI 2025): relation-enhanced local matchings
# ============================================================================================
def matching_context(
    regions: Tensor,
    words: Tensor,
    word_mask: Tensor,
    *,
    kind: Literal["gloria", "mgca"] = "gloria",
    temp1: float = 4.0,
    temperature: float = 0.1,
    pairs: Literal["all", "aligned"] = "all",
) -> Tensor:
    """The attended visual context of every word in its paired image (DD-RECLF-1: the local matchings
    RECLF's modules take as input).

    ``pairs = "all"``: ``regions [Bi, R, E]``, ``words [Bt, W, E]``, ``word_mask [Bt, W]`` -> every
    (image, report) pair, ``[Bi, Bt, W, E]``, one batched contraction (no loop over reports).
    ``pairs = "aligned"``: ``regions [P, R, E]``, ``words [P, W, E]``, ``word_mask [P, W]`` already
    gathered pair by pair -> ``[P, W, E]``.

    * ``gloria``: GLoRIA's double softmax on the embeddings as given (GLoRIA's are unnormalised
      projections): softmax over the report's real words for each region, then over regions at
      ``temp1``, ``c = Σ_r a_wr v_r`` (:func:`methods.vlp.objectives.gloria_attention`);
    * ``mgca``: MGCA's word->patch attention on L2-normalised embeddings (normalised here),
      ``a_wr = softmax_r(w · v_r / temperature)``, ``c = normalize(Σ_r a_wr v_r)``.

    Padded words get a context too (their matchings are masked downstream).
    """
    if pairs == "all":
        words, regions, word_mask = words.unsqueeze(0), regions.unsqueeze(1), word_mask.unsqueeze(0)
    elif pairs != "aligned":
        raise ValueError(f"pairs must be all or aligned, got {pairs!r}")
    if kind == "gloria":
        context, _ = O.gloria_attention(words, regions.transpose(-1, -2), temp1=temp1, word_mask=word_mask.bool())
        return context
    if kind == "mgca":
        words, regions = F.normalize(words, dim=-1), F.normalize(regions, dim=-1)
        attn = torch.softmax(words @ regions.transpose(-1, -2) / temperature, dim=-1)
        return F.normalize(attn @ regions, dim=-1)
    raise ValueError(f"local matching must be gloria or mgca, got {kind!r}")


def matching_vectors(context: Tensor, words: Tensor) -> Tensor:
    """SGRAF-style raw matching vectors, ``(ĉ - ŵ)²`` element-wise with the context and the word
    L2-normalised (``context [..., W, E]``, ``words`` broadcastable to it; DD-RECLF-2: the learned
    projection to the similarity space and its L2 norm follow in the relation module). Small
    entries: a word well matched by its image."""
    return (F.normalize(context, dim=-1) - F.normalize(words, dim=-1)).pow(2)


def hardest_candidates(similarity: Tensor, k: int, same_report: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Candidate lists for a local contrast restricted to hard negatives (DD-RECLF-4,
    ``local_candidates``): from a global similarity matrix ``[B, B]`` (images x reports; no gradient),
    ``rows [B, k+1]``: for each image its own report first, then the ``k`` most similar other reports;
    ``cols [B, k+1]``: for each report its own image first, then the ``k`` most similar other images.

    ``same_report [B, B]`` (bool) marks pairs whose reports are identical: such a pair is the most
    similar by construction and is no negative, so it is ranked last (chosen only when a row has fewer
    than ``k`` other reports)."""
    s = similarity.detach()
    b = s.shape[0]
    k = min(int(k), b - 1)
    own = torch.arange(b, device=s.device).unsqueeze(1)
    if same_report is not None:
        s = s.masked_fill(same_report, -1e4)   # below any cosine, above the diagonal's -inf
    off = s.masked_fill(torch.eye(b, dtype=torch.bool, device=s.device), _NEG_INF)
    rows = torch.cat([own, off.topk(k, dim=1).indices], dim=1)
    cols = torch.cat([own, off.t().topk(k, dim=1).indices], dim=1)
    return rows, cols


def candidates_from_matrix(scores: Tensor) -> tuple[Tensor, Tensor]:
    """A full ``[B, B]`` score matrix (diagonal = positives) in candidate form: ``rows [B, B]`` (image
    b's scores, its own report first, then the others in order) and ``cols [B, B]`` likewise per report.
    A softmax cross-entropy is invariant to the order of a row, so contrasting these with target 0 is
    InfoNCE on the matrix."""
    b = scores.shape[0]
    idx = torch.arange(b, device=scores.device).unsqueeze(1)
    others = torch.arange(b - 1, device=scores.device).unsqueeze(0)
    order = torch.cat([idx, others + (others >= idx).long()], dim=1)               # [b, b]: i, then j != i
    return scores.gather(1, order), scores.t().gather(1, order)


def hinge_hardest(rows: Tensor, cols: Tensor, margin: float = 0.2) -> tuple[Tensor, Tensor]:
    """SGRAF's (VSE++) hinge triplet loss with the hardest negative (DD-RECLF-4, ``local_loss =
    hinge_hardest``) on candidate-form scores (:func:`candidates_from_matrix`, positive at column 0):
    ``(mean_b max_{c>0} [m + rows_bc - rows_b0]_+, the same on cols)``: (image->text, text->image)."""
    def one(x: Tensor) -> Tensor:
        return (margin + x[:, 1:] - x[:, :1]).clamp(min=0).amax(dim=1).mean()
    return one(rows), one(cols)


def reclf_objective(
    img: Tensor,
    txt: Tensor,
    local_rows: Tensor | None = None,
    local_cols: Tensor | None = None,
    *,
    temperature: float = 0.07,
    local_loss: Literal["info_nce", "hinge_hardest"] = "info_nce",
    local_temperature: float = 0.1,
    margin: float = 0.2,
    lambda_global: float = 1.0,
    lambda_local: float = 1.0,
) -> dict[str, Tensor]:
    """RECLF's named loss terms (DD-RECLF-4): ``L = λ_g L_global + λ_l L_local_rel``.

    ``global``: MGCA's instance InfoNCE on the global embeddings (τ 0.07, mean of both directions).
    ``local``: a contrast of the relation-enhanced local scores ``S_loc`` (bounded, from the relation
    module) given in candidate form: ``local_rows [B, C]`` the scores of image b with C candidate
    reports, its own report first; ``local_cols [B, C]`` of report b with C candidate images, its own
    image first (all B for every pair of the batch, :func:`candidates_from_matrix`; or the hardest
    ones, :func:`hardest_candidates`). ``info_nce``: ``½ [CE(rows / τ_l, 0) + CE(cols / τ_l, 0)]``;
    ``hinge_hardest``: SGRAF's hinge at ``margin``, summed over both directions. A term with weight 0
    (or without its input) is absent.
    """
    terms: dict[str, Tensor] = {}
    if lambda_global:
        terms["global"] = lambda_global * O.mgca_ita(img, txt, temperature=temperature)
    if lambda_local and local_rows is not None and local_cols is not None:
        if local_loss == "info_nce":
            zero = torch.zeros(local_rows.shape[0], dtype=torch.long, device=local_rows.device)
            rows = F.cross_entropy(local_rows / local_temperature, zero)
            cols = F.cross_entropy(local_cols / local_temperature, zero)
            terms["local"] = lambda_local * 0.5 * (rows + cols)
        elif local_loss == "hinge_hardest":
            rows, cols = hinge_hardest(local_rows, local_cols, margin)
            terms["local"] = lambda_local * (rows + cols)
        else:
            raise ValueError(f"local_loss must be info_nce or hinge_hardest, got {local_loss!r}")
    return terms


# ============================================================================================
# SISTA (Bui et al., arXiv 2601.08165): semantic-aware instance + sparse token alignment
# ============================================================================================
def tfidf_similarity(input_ids: Tensor, attention_mask: Tensor, ignore_ids: Tensor | None = None) -> Tensor:
    """Cosine similarity of the reports' TF-IDF vectors over the batch, ``[B, B]`` (DD-SISTA-1,
    ``sia_similarity = tfidf``): term counts of each report's real token ids (``ignore_ids``, e.g. the
    special tokens, left out), ``idf = log((1 + B) / (1 + df)) + 1`` from the batch. Identical reports
    score exactly 1; no parameters, no gradient."""
    ids = input_ids.long()
    keep = attention_mask.bool()
    if ignore_ids is not None:
        keep &= ~torch.isin(ids, ignore_ids.to(ids.device))
    b = ids.shape[0]
    vocab = int(ids.max()) + 1 if ids.numel() else 1
    tf = torch.zeros(b, vocab, device=ids.device).scatter_add_(1, ids, keep.float())
    df = (tf > 0).float().sum(0)
    x = tf * (torch.log((1.0 + b) / (1.0 + df)) + 1.0)
    x = F.normalize(x, dim=1)
    return x @ x.t()


def batch_prototype_similarity(report_sim: Tensor) -> Tensor:
    """FaNe's batch offset statistic from a cosine-similarity matrix ``[B, B]`` of unit report vectors:
    the mean cosine between each report and the batch's mean report, ``mean_i Σ_j S_ij / sqrt(Σ_jk S_jk)``
    (``cos(r_i, r̄) = r_i · Σ_j r_j / ||Σ_j r_j||``), so it works for any similarity source. A scalar,
    no gradient; SISTA keeps its EMA ``o*`` (DD-SISTA-1)."""
    s = report_sim.detach().float()
    return (s.sum(1) / s.sum().clamp_min(1e-12).sqrt()).mean()


def sia_loss(
    img: Tensor,
    txt: Tensor,
    report_sim: Tensor,
    *,
    temperature: float = 0.07,
    mode: Literal["threshold", "soft"] = "threshold",
    threshold: float = 0.95,
    offset: float = 0.0,
    false_negatives: Literal["remove", "positive"] = "remove",
    soft_alpha: float = 0.2,
    soft_temperature: float = 0.1,
) -> Tensor:
    """SISTA's semantics-aware instance alignment (SIA, DD-SISTA-1), ``½ [L_i2t + L_t2i]``.

    ``img, txt [B, E]`` L2-normalised, logits ``S = img txtᵀ / temperature``; ``report_sim [B, B]`` the
    inter-report similarity (no gradient), rescaled by FaNe's offset as
    ``S' = (report_sim - offset) / (1 - offset)`` (``offset`` 0: unchanged).

    * ``threshold``: report pairs with ``S'_ij > threshold`` (i != j) are false negatives of each
      other. ``false_negatives = "remove"``: they leave the softmax denominators (image i no longer
      competes with report j, in both directions); ``"positive"``: they become extra positives,
      sharing the target mass uniformly with the diagonal. With no pair above the threshold this is
      exactly MGCA's instance InfoNCE; an exact duplicate report (``S = 1``) is never a negative.
    * ``soft``: soft targets ``y = (1 - α) I + α softmax_j(S'_ij / soft_temperature)`` (MedCLIP-like),
      cross-entropy against ``y`` for rows and, for columns, the same targets built from ``S'ᵀ``
      (each direction's targets sum to one per row).
    """
    logits = (img @ txt.t()).float() / temperature
    b = logits.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=logits.device)
    sim = report_sim.detach().to(logits.dtype)
    if offset:
        sim = (sim - offset) / (1.0 - offset)
    if mode == "threshold":
        extra = (sim > threshold) & ~eye
        extra = extra | extra.t()              # "the same report" is symmetric even if sim is not quite
        if false_negatives == "remove":
            masked = logits.masked_fill(extra, _NEG_INF)
            rows, cols = O.info_nce(masked)
            return 0.5 * (rows + cols)
        if false_negatives == "positive":
            # each direction's targets are normalised over its own rows: the relation need not be
            # transitive, so the transpose of the row-normalised matrix does not sum to one per row
            m = (eye | extra).to(logits.dtype)
            return 0.5 * (soft_cross_entropy(logits, m / m.sum(1, keepdim=True))
                          + soft_cross_entropy(logits.t(), m.t() / m.t().sum(1, keepdim=True)))
        raise ValueError(f"false_negatives must be remove or positive, got {false_negatives!r}")
    if mode == "soft":
        diag = (1.0 - soft_alpha) * eye.to(logits.dtype)
        y_rows = diag + soft_alpha * torch.softmax(sim / soft_temperature, dim=1)
        y_cols = diag + soft_alpha * torch.softmax(sim.t() / soft_temperature, dim=1)   # a distribution per report
        return 0.5 * (soft_cross_entropy(logits, y_rows) + soft_cross_entropy(logits.t(), y_cols))
    raise ValueError(f"sia mode must be threshold or soft, got {mode!r}")


def minmax(x: Tensor, mask: Tensor | None = None, dim: int = -1, eps: float = 1e-6) -> Tensor:
    """Min-max normalise ``x`` to [0, 1] along ``dim`` over the entries where ``mask`` is True (others
    0)."""
    if mask is None:
        lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(eps)
    m = mask.bool().expand_as(x)
    lo = x.masked_fill(~m, float("inf")).amin(dim, keepdim=True)
    hi = x.masked_fill(~m, _NEG_INF).amax(dim, keepdim=True)
    out = (x - lo) / (hi - lo).clamp_min(eps)
    return out.masked_fill(~m, 0.0)


def sparsemax(x: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
    """Sparsemax (Martins & Astudillo, 2016) along ``dim``: the Euclidean projection of ``x`` onto the
    simplex, ``max(x - τ, 0)`` with τ such that the result sums to 1; entries where ``mask`` is False
    get 0. Differentiable almost everywhere (autograd through the sort)."""
    if mask is not None:
        x = x.masked_fill(~mask.bool().expand_as(x), -1e4)
    x = x.transpose(dim, -1)
    z, _ = torch.sort(x, dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, device=x.device, dtype=x.dtype)
    cums = z.cumsum(-1)
    support = (1 + k * z) > cums
    k_z = support.sum(-1, keepdim=True).clamp(min=1)
    tau = (cums.gather(-1, k_z - 1) - 1) / k_z.to(x.dtype)
    out = (x - tau).clamp(min=0)
    return out.transpose(dim, -1)


Sparsifier = Literal["threshold", "topk", "sparsemax", "learned_gate"]


def sparse_weights(
    sim: Tensor,
    mask: Tensor,
    *,
    sparsifier: Sparsifier = "threshold",
    topk: int = 4,
    temperature: float = 0.1,
    gate: Tensor | None = None,
) -> Tensor:
    """Sparse alignment weights over the last dim of ``sim [..., T, P]`` (each row: one query token's
    similarity to the P candidate tokens; ``mask [..., 1 or T, P]`` True for real candidates), each row
    summing to 1 over its kept entries (DD-SISTA-2, after SPARC):

    * ``threshold``: SPARC's rule, ``ŝ = minmax(sim)``, keep ``ŝ ≥ 1 / n_real``, renormalise;
    * ``topk``: the ``topk`` largest ``ŝ`` (fewer when fewer are real), renormalised;
    * ``sparsemax``: ``sparsemax(sim / temperature)``;
    * ``learned_gate`` (FaNe-like): ``ŝ ⊙ gate`` with a learned ``gate`` in (0, 1), renormalised (no
      hard cut; the model adds an L1 sparsity term on the gate).
    """
    m = mask.bool().expand_as(sim)
    if sparsifier == "sparsemax":
        return sparsemax(sim / temperature, m)
    s = minmax(sim, m)
    if sparsifier == "threshold":
        n = m.sum(-1, keepdim=True).clamp(min=1).to(s.dtype)
        w = torch.where(m & (s >= 1.0 / n), s, torch.zeros_like(s))
    elif sparsifier == "topk":
        k = min(int(topk), s.shape[-1])
        kth = s.masked_fill(~m, -1.0).topk(k, dim=-1).values[..., -1:]
        w = torch.where(m & (s >= kth), s, torch.zeros_like(s))
    elif sparsifier == "learned_gate":
        if gate is None:
            raise ValueError("sparsifier learned_gate needs the gate values")
        w = (s * gate).masked_fill(~m, 0.0)
    else:
        raise ValueError(f"sparsifier must be threshold, topk, sparsemax or learned_gate, got {sparsifier!r}")
    return w / w.sum(-1, keepdim=True).clamp_min(1e-6)


def _within_sample_contrast(a: Tensor, b: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """``½ [CE(a_t · b_t' / τ) + CE(b_t · a_t' / τ)]`` over the real tokens of each sample (the other
    real tokens of the same sample are the negatives), averaged over all real tokens of the batch."""
    logits = a @ b.transpose(1, 2) / temperature                                    # [B, T, T]
    v = valid.bool()
    drop = ~v.unsqueeze(1)                                                          # padded candidates
    t = logits.shape[1]
    targets = torch.arange(t, device=logits.device).expand(logits.shape[0], t)
    ce_rows = F.cross_entropy(logits.masked_fill(drop, _NEG_INF)[v], targets[v], reduction="mean")
    ce_cols = F.cross_entropy(logits.transpose(1, 2).masked_fill(drop, _NEG_INF)[v], targets[v], reduction="mean")
    return 0.5 * (ce_rows + ce_cols)


def sta_loss(
    patches: Tensor,
    words: Tensor,
    word_mask: Tensor,
    *,
    direction: Literal["word_to_patch", "patch_to_word", "both"] = "word_to_patch",
    sparsifier: Sparsifier = "threshold",
    topk: int = 4,
    temperature: float = 0.1,
    gate: Tensor | None = None,
) -> dict[str, Tensor]:
    """SISTA's sparse token-level alignment (STA, DD-SISTA-2), within each sample, after SPARC.

    ``patches [B, P, E]``, ``words [B, W, E]`` (``word_mask [B, W]``), L2-normalised; ``s_tp = w_t · v_p``.

    * word->patch (``"word"`` term): per word, sparse weights over the patches
      (:func:`sparse_weights`), the token-grouped visual embedding ``c_t = normalize(Σ_p a_tp v_p)``,
      and a within-sample InfoNCE between each word and its grouped embedding (the sample's other
      words are the negatives);
    * patch->word (``"patch"`` term): the mirror, per patch sparse weights over the real words,
      ``d_p = normalize(Σ_t a_pt w_t)``, InfoNCE among the sample's patches.

    ``gate`` (learned_gate only): ``[B, W, P]`` gate values in (0, 1), used transposed for patch->word.
    Returns the terms of ``direction`` ("both": both).
    """
    mask = word_mask.bool()
    sim = words @ patches.transpose(1, 2)                                           # [B, W, P]
    out: dict[str, Tensor] = {}
    if direction in ("word_to_patch", "both"):
        ones = torch.ones_like(sim[:, :1, :], dtype=torch.bool)
        a = sparse_weights(sim, ones, sparsifier=sparsifier, topk=topk, temperature=temperature, gate=gate)
        c = F.normalize(a @ patches, dim=-1)
        out["word"] = _within_sample_contrast(words, c, mask, temperature)
    if direction in ("patch_to_word", "both"):
        gate_t = None if gate is None else gate.transpose(1, 2)
        a = sparse_weights(sim.transpose(1, 2), mask.unsqueeze(1), sparsifier=sparsifier, topk=topk,
                           temperature=temperature, gate=gate_t)                    # [B, P, W]
        d = F.normalize(a @ words, dim=-1)
        out["patch"] = _within_sample_contrast(patches, d, torch.ones_like(sim[:, 0, :], dtype=torch.bool),
                                               temperature)
    if not out:
        raise ValueError(f"sta direction must be word_to_patch, patch_to_word or both, got {direction!r}")
    return out


def sista_objective(
    img: Tensor,
    txt: Tensor,
    report_sim: Tensor,
    patches: Tensor | None = None,
    words: Tensor | None = None,
    word_mask: Tensor | None = None,
    gate: Tensor | None = None,
    gate_mask: Tensor | None = None,
    *,
    temperature: float = 0.07,
    sia_mode: Literal["threshold", "soft"] = "threshold",
    threshold: float = 0.95,
    offset: float = 0.0,
    false_negatives: Literal["remove", "positive"] = "remove",
    soft_alpha: float = 0.2,
    soft_temperature: float = 0.1,
    sta_direction: Literal["word_to_patch", "patch_to_word", "both"] = "word_to_patch",
    sparsifier: Sparsifier = "threshold",
    topk: int = 4,
    sta_temperature: float = 0.1,
    lambda_sia: float = 1.0,
    lambda_sta: float = 1.0,
    lambda_sparsity: float = 1.0,
) -> dict[str, Tensor]:
    """SISTA's named loss terms (DD-SISTA-3): ``L = λ_sia L_SIA + λ_sta L_STA (+ λ_sp L_sparsity)``.

    ``sia``: :func:`sia_loss`; ``sta_word`` / ``sta_patch``: :func:`sta_loss` (their sum is L_STA);
    ``sparsity``: the mean of the learned gate over the real (word, patch) pairs (``gate_mask``), only
    with ``sparsifier = "learned_gate"``. Terms with weight 0 (or without inputs) are absent.
    """
    terms: dict[str, Tensor] = {}
    if lambda_sia:
        terms["sia"] = lambda_sia * sia_loss(img, txt, report_sim, temperature=temperature, mode=sia_mode,
                                             threshold=threshold, offset=offset, false_negatives=false_negatives,
                                             soft_alpha=soft_alpha, soft_temperature=soft_temperature)
    if lambda_sta and patches is not None and words is not None and word_mask is not None:
        sta = sta_loss(patches, words, word_mask, direction=sta_direction, sparsifier=sparsifier, topk=topk,
                       temperature=sta_temperature, gate=gate)
        terms.update({f"sta_{k}": lambda_sta * v for k, v in sta.items()})
        if sparsifier == "learned_gate" and lambda_sparsity and gate is not None:
            m = gate_mask.expand_as(gate) if gate_mask is not None else torch.ones_like(gate, dtype=torch.bool)
            terms["sparsity"] = lambda_sparsity * gate.float().abs()[m].mean()
    return terms
