"""Pretraining objectives of the vision-language methods, as pure functions on plain tensors.

Nothing here holds state, owns parameters or knows about tokenizers: callers pass embeddings
(and, for MGCA, attention maps and word indices) and get scalar losses back. Every temperature
and weight is a keyword argument whose default is the published value; where MGCA's released
code differs from its paper, a named switch selects the code's behaviour (the default is the
paper's). References: ConVIRT (Zhang et al., arXiv 2010.00747), GLoRIA (Huang et al., ICCV 2021;
``marshuang80/gloria``, ``gloria/loss/gloria_loss.py``) and MGCA (Wang et al., NeurIPS 2022;
``HKU-MedAI/MGCA``, ``mgca/models/mgca/mgca_module.py``); see ``shared/reference/mgca.md`` §2 and
``shared/reference/seed_methods.md`` §5.

Layouts (B = batch, E/D = embedding dim):

* global embeddings: ``[B, E]``;
* GLoRIA regions: ``[B, D, R]`` (the CNN map flattened, channels first: ``x.flatten(2)``),
  GLoRIA words: ``[B, W, D]`` (channels last) with a boolean ``word_mask [B, W]`` (True = real);
* MGCA patches ``[B, N, E]`` and words ``[B, W, E]``, both channels last, already L2-normalised.

In every two-way matrix the image is the row and the text the column, so "rows" is image->text.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "info_nce",
    "bidirectional_info_nce",
    "convirt_loss",
    "gloria_global_loss",
    "gloria_attention",
    "gloria_local_loss",
    "mgca_ita",
    "word_weights",
    "patch_weights",
    "mgca_tca",
    "sinkhorn",
    "mgca_cpa",
]

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# InfoNCE
# --------------------------------------------------------------------------------------------
def info_nce(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Cross entropies of a square logit matrix with the diagonal as targets.

    ``loss_rows = mean_i -log softmax_k(logits[i, :])[i]`` (row i's positive is column i) and
    ``loss_cols = mean_k -log softmax_i(logits[:, k])[k]``. With images as rows these are the
    image->text and text->image terms.
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"info_nce needs a square [B, B] matrix, got {tuple(logits.shape)}")
    targets = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, targets), F.cross_entropy(logits.t(), targets)


def bidirectional_info_nce(
    a: Tensor,
    b: Tensor,
    temperature: float,
    weight_a2b: float = 0.5,
    reduce: Literal["weighted", "sum", "none"] = "weighted",
) -> Tensor | tuple[Tensor, Tensor]:
    """InfoNCE between paired, already L2-normalised embeddings ``a, b: [B, E]``.

    ``S = a bᵀ / temperature``; ``(L_a2b, L_b2a) = info_nce(S)``. ``reduce="weighted"`` returns
    ``weight_a2b * L_a2b + (1 - weight_a2b) * L_b2a`` (0.5: the mean), ``"sum"`` returns
    ``L_a2b + L_b2a`` and ``"none"`` the pair.
    """
    rows, cols = info_nce(a @ b.t() / temperature)
    if reduce == "weighted":
        return weight_a2b * rows + (1.0 - weight_a2b) * cols
    if reduce == "sum":
        return rows + cols
    if reduce == "none":
        return rows, cols
    raise ValueError(f"reduce must be 'weighted', 'sum' or 'none', got {reduce!r}")


# --------------------------------------------------------------------------------------------
# ConVIRT
# --------------------------------------------------------------------------------------------
def convirt_loss(
    img: Tensor, txt: Tensor, *, temperature: float = 0.1, lam: float = 0.75
) -> dict[str, Tensor]:
    """ConVIRT's bidirectional loss (paper formulation, Zhang et al. 2020, eqs. 2-4).

    With v, u the L2-normalised image and text embeddings (normalised here: ConVIRT scores
    cosine similarity) and ``S = v uᵀ / temperature``::

        L(v->u)_i = -log exp(S_ii) / sum_k exp(S_ik)
        L(u->v)_i = -log exp(S_ii) / sum_k exp(S_ki)
        L = mean_i [ lam * L(v->u)_i + (1 - lam) * L(u->v)_i ]

    Returns the two weighted terms, ``{"img2txt": lam * mean L(v->u), "txt2img": (1 - lam) *
    mean L(u->v)}``, so their sum is the loss. Defaults tau = 0.1, lambda = 0.75 as in the paper.
    """
    v = F.normalize(img, dim=-1)
    u = F.normalize(txt, dim=-1)
    l_vu, l_uv = info_nce(v @ u.t() / temperature)
    return {"img2txt": lam * l_vu, "txt2img": (1.0 - lam) * l_uv}


# --------------------------------------------------------------------------------------------
# GLoRIA
# --------------------------------------------------------------------------------------------
def _gloria_cosine(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine along the last dim; like GLoRIA, the product of the norms is clamped at ``eps``."""
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(eps)


def gloria_global_loss(
    img_g: Tensor, txt_g: Tensor, *, temp3: float = 10.0
) -> tuple[Tensor, Tensor]:
    """GLoRIA's global loss: ``S = temp3 * cos(img_g_i, txt_g_k)``; returns ``(CE(S), CE(Sᵀ))``.

    ``loss0`` is image->text (rows), ``loss1`` text->image; GLoRIA adds them. Inputs ``[B, D]``
    need not be normalised (cosine inside, norms clamped at 1e-8 as in ``global_loss``).
    """
    norms = img_g.norm(dim=-1, keepdim=True) * txt_g.norm(dim=-1, keepdim=True).t()
    scores = (img_g @ txt_g.t()) / norms.clamp_min(1e-8) * temp3
    return info_nce(scores)


def gloria_attention(
    words: Tensor, regions: Tensor, *, temp1: float = 4.0, word_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """GLoRIA's word->region attention (``attention_fn``), with a double softmax.

    ``words: [..., W, D]`` (channels last), ``regions: [..., D, R]`` (channels first); leading
    dims broadcast, which is how :func:`gloria_local_loss` scores every (image, report) pair::

        alpha_rw = softmax_w( v_r · e_w )        over the words, for each region r
        a_wr     = softmax_r( temp1 * alpha_rw ) over the regions, for each word w
        c_w      = sum_r a_wr v_r

    ``word_mask [..., W]`` (True = real word) drops padded words from the softmax over words,
    which is what GLoRIA gets by slicing each report to its length. Returns ``(context [..., W,
    D], attention [..., W, R])``; padded words get a (meaningless) uniform attention row.
    """
    sim = words @ regions  # [..., W, R]
    if word_mask is not None:
        sim = sim.masked_fill(~word_mask.bool()[..., :, None], _NEG_INF)
    alpha = sim.softmax(dim=-2)
    attn = (temp1 * alpha).softmax(dim=-1)
    context = attn @ regions.transpose(-1, -2)  # [..., W, D]
    return context, attn


def gloria_local_loss(
    regions: Tensor,
    words: Tensor,
    word_mask: Tensor,
    *,
    temp1: float = 4.0,
    temp2: float = 5.0,
    temp3: float = 10.0,
    agg: Literal["sum", "mean"] = "sum",
) -> tuple[Tensor, Tensor, Tensor]:
    """GLoRIA's local loss (``local_loss``), vectorised over all (image, report) pairs.

    ``regions [B, D, R]``, ``words [B, W, D]``, ``word_mask [B, W]`` (True = real word). For
    report t and image i, every real word w of t attends over i's regions
    (:func:`gloria_attention`), giving context ``c_itw`` and match ``m_itw = cos(e_tw, c_itw)``::

        R(i, t) = log sum_w exp(temp2 * m_itw)     over t's real words ("mean": log mean exp)
        S_it    = temp3 * R(i, t)
        loss0   = CE(S) (image->text),  loss1 = CE(Sᵀ) (text->image)

    Padded word slots take part in nothing, so the result does not depend on the padding length.
    Returns ``(loss0, loss1, attention)`` with ``attention [B, W, R]`` each report's words over its
    own image's regions (zero rows for padded words; reshape R to the map's H x W).
    Memory: the contexts hold ``B * B * W * D`` numbers (GLoRIA's loop keeps as many for backward).
    """
    mask = word_mask.bool()
    # [B_img, 1, D, R] against [1, B_txt, W, D] -> contexts [B_img, B_txt, W, D]
    context, attn = gloria_attention(
        words.unsqueeze(0), regions.unsqueeze(1), temp1=temp1, word_mask=mask.unsqueeze(0)
    )
    match = _gloria_cosine(words.unsqueeze(0), context)  # [B_img, B_txt, W]
    scaled = (temp2 * match).masked_fill(~mask.unsqueeze(0), _NEG_INF)
    score = torch.logsumexp(scaled, dim=-1)  # [B_img, B_txt]
    if agg == "mean":
        score = score - mask.sum(-1).to(score.dtype).log().unsqueeze(0)
    elif agg != "sum":
        raise ValueError(f"agg must be 'sum' or 'mean', got {agg!r}")
    loss0, loss1 = info_nce(temp3 * score)
    idx = torch.arange(regions.shape[0], device=regions.device)
    own = attn[idx, idx].masked_fill(~mask[..., None], 0.0)
    return loss0, loss1, own


# --------------------------------------------------------------------------------------------
# MGCA
# --------------------------------------------------------------------------------------------
def mgca_ita(
    img: Tensor, txt: Tensor, *, temperature: float = 0.07, sum_directions: bool = False
) -> Tensor:
    """MGCA's instance-wise alignment on L2-normalised ``[B, E]`` embeddings.

    ``S = g_v g_tᵀ / temperature``; ``L = ½ [CE(S) + CE(Sᵀ)]`` as in the paper, or the plain
    sum ``CE(S) + CE(Sᵀ)`` with ``sum_directions=True`` (the released code; mgca.md §2.1).
    """
    return bidirectional_info_nce(
        img, txt, temperature, reduce="sum" if sum_directions else "weighted"
    )


def _clip_and_normalise(
    w: Tensor, keep: Tensor, clip: tuple[float, float] | None
) -> Tensor:
    """Per row: clip the kept entries to their [q_lo, q_hi] quantiles, zero the rest, sum to 1."""
    if clip is not None:
        work = w.float()
        qs = torch.tensor(clip, dtype=work.dtype, device=work.device)
        # NaN hides the entries that are not kept; nanquantile interpolates linearly, as
        # torch.quantile does in MGCA's per-report loop.
        bounds = torch.nanquantile(work.masked_fill(~keep, float("nan")), qs, dim=1)  # [2, B]
        w = torch.minimum(torch.maximum(work, bounds[0, :, None]), bounds[1, :, None]).to(w.dtype)
    w = torch.where(keep, w, torch.zeros_like(w))  # also removes NaN bounds of empty rows
    return w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def word_weights(
    cls_attention: Tensor,
    word_index: Tensor,
    n_words: int,
    *,
    shift_quirk: bool = False,
    clip: tuple[float, float] | None = (0.1, 0.9),
) -> Tensor:
    """MGCA's word weights ω from the last text layer's [CLS] attention (no gradient).

    ``cls_attention [B, T]``: the attention from [CLS] to every token of the sequence (position 0
    is [CLS] itself), averaged over heads. ``word_index [B, T]`` (long): the word each token
    belongs to, -1 for [CLS]/[SEP]/[PAD]. A word's raw weight is the sum of its sub-word tokens'
    attention. With ``shift_quirk=True`` token t takes the attention of token t + 1, as in MGCA's
    ``aggregate_tokens`` (its attention vector already lacks [CLS] but is zipped with tokens that
    still start with [CLS]): in ``[CLS] mild card ##io ##megaly [SEP]`` "mild" gets "card"'s
    attention and "cardiomegaly" gets ##io + ##megaly + [SEP] (mgca.md §7).

    Then, per report, the non-zero weights of present words are clipped to their [q10, q90]
    quantiles (``clip=None``: no clipping) and normalised to sum to 1; absent words and words
    whose raw weight is exactly 0 stay 0 (the code clips only the non-zero entries).
    Returns ``[B, n_words]``.
    """
    attn = cls_attention.detach()
    if shift_quirk:
        attn = torch.cat([attn[:, 1:], attn.new_zeros(attn.shape[0], 1)], dim=1)
    # special tokens go to an extra bin that is dropped afterwards
    idx = torch.where(word_index < 0, torch.full_like(word_index, n_words), word_index)
    raw = attn.new_zeros(attn.shape[0], n_words + 1).scatter_add_(1, idx, attn)[:, :n_words]
    count = attn.new_zeros(attn.shape[0], n_words + 1).scatter_add_(1, idx, torch.ones_like(attn))
    count = count[:, :n_words]
    return _clip_and_normalise(raw, (count > 0) & (raw != 0), clip)


def patch_weights(
    cls_to_patch_attention: Tensor | None,
    n: int,
    *,
    clip: tuple[float, float] | None = (0.1, 0.9),
    batch_size: int | None = None,
) -> Tensor:
    """MGCA's patch weights ω' (no gradient).

    ViT: ``cls_to_patch_attention [B, n]``, the last block's [CLS]->patch attention averaged over
    heads, clipped per image to its [q10, q90] quantiles and normalised to sum 1. ResNet
    (``None``): uniform ``1/n``, of shape ``[batch_size or 1, n]`` (broadcasts in mgca_tca).
    """
    if cls_to_patch_attention is None:
        return torch.full((batch_size or 1, n), 1.0 / n)
    attn = cls_to_patch_attention.detach()
    if attn.shape[1] != n:
        raise ValueError(f"expected {n} patches, got attention of shape {tuple(attn.shape)}")
    # the code clips over all patches (softmax attention is positive, so "non-zero" is all)
    return _clip_and_normalise(attn, torch.ones_like(attn, dtype=torch.bool), clip)


def _weighted_token_contrast(sim: Tensor, weight: Tensor, valid: Tensor | None) -> Tensor:
    """``½ [Σ_b Σ_i ω_bi CE(S_b[i, :], i) + Σ_b Σ_k ω_bk CE(S_b[:, k], k)] / B``.

    ``sim [B, T, T]``, ``weight [B, T]``. With ``valid [B, T]``, a real token's row (column) loses
    the padded tokens as candidates; a padded token's own row/column is left whole so that its
    cross entropy stays finite, and its weight (0) removes it.
    """
    b, t, _ = sim.shape
    rows, cols = sim, sim
    if valid is not None:
        drop = valid[:, :, None] & ~valid[:, None, :]  # [b, i, k]: i real, k padded
        rows = sim.masked_fill(drop, _NEG_INF)
        cols = sim.masked_fill(drop.transpose(1, 2), _NEG_INF)
    targets = torch.arange(t, device=sim.device).repeat(b)
    ce_rows = F.cross_entropy(rows.reshape(b * t, t), targets, reduction="none")
    ce_cols = F.cross_entropy(cols.transpose(1, 2).reshape(b * t, t), targets, reduction="none")
    w = weight.reshape(-1)
    return 0.5 * ((ce_rows * w).sum() + (ce_cols * w).sum()) / b


def mgca_tca(
    patches: Tensor,
    words: Tensor,
    word_mask: Tensor,
    word_w: Tensor,
    patch_w: Tensor,
    *,
    temperature: float = 0.1,
    pad_words_as_negatives: bool = False,
    normalise_patch_context: bool = True,
) -> dict[str, Tensor]:
    """MGCA's token-wise alignment (mgca.md §2.2), both directions, within each sample.

    ``patches [B, N, E]`` and ``words [B, W, E]`` L2-normalised; ``word_mask [B, W]`` True for
    real words; ``word_w [B, W]`` and ``patch_w [B, N]`` (or broadcastable ``[1, N]``) from
    :func:`word_weights` / :func:`patch_weights`, each summing to 1 per sample::

        word->patch:  a_ij = softmax_j(w_i · v_j / τ),   c_i = normalize(Σ_j a_ij v_j)
                      S_ik = w_i · c_k / τ              (words of one report against each other)
        patch->word:  b_jl = softmax_l(v_j · w_l / τ)  over real words only (PAD = -inf)
                      d_j = Σ_l b_jl w_l  (normalised unless normalise_patch_context=False)
                      S'_jk = v_j · d_k / τ
        L_word  = ½ [Σ_b Σ_i ω_i CE(S_i·, i) + Σ_b Σ_k ω_k CE(S_·k, k)] / B,  L_patch likewise
                  with S' and ω'.

    ``pad_words_as_negatives=False`` (paper): PAD words are no candidates in S. ``True``
    (released code): they stay in S as negatives, only their weight is 0.
    ``normalise_patch_context=False`` reproduces the code's ViT path (d_j left unnormalised; the
    ResNet path normalises). Returns ``{"word": L_word, "patch": L_patch}``; MGCA's
    ``L_local`` is their sum.
    """
    b, n, _ = patches.shape
    mask = word_mask.bool()
    word_w = word_w * mask  # a PAD word never carries weight
    patch_w = patch_w.to(patches).expand(b, n)

    # word -> patch
    a = torch.softmax(words @ patches.transpose(1, 2) / temperature, dim=-1)  # [B, W, N]
    c = F.normalize(a @ patches, dim=-1)  # [B, W, E]
    s_word = words @ c.transpose(1, 2) / temperature  # [B, W, W]
    l_word = _weighted_token_contrast(s_word, word_w, None if pad_words_as_negatives else mask)

    # patch -> word; a report without any real word keeps all slots, so no row is all -inf
    attend = mask | ~mask.any(dim=1, keepdim=True)
    s_pw = patches @ words.transpose(1, 2) / temperature  # [B, N, W]
    s_pw = s_pw.masked_fill(~attend[:, None, :], _NEG_INF)
    d = torch.softmax(s_pw, dim=-1) @ words  # [B, N, E]
    if normalise_patch_context:
        d = F.normalize(d, dim=-1)
    s_patch = patches @ d.transpose(1, 2) / temperature  # [B, N, N]
    l_patch = _weighted_token_contrast(s_patch, patch_w, None)
    return {"word": l_word, "patch": l_patch}


@torch.no_grad()
def sinkhorn(scores: Tensor, *, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """SwAV-style Sinkhorn-Knopp soft assignments of B samples to K prototypes (no gradient).

    ``scores [B, K]`` (cosine scores). On ``Q = exp(scores / epsilon)ᵀ`` (``[K, B]``), normalised
    to total mass 1, each iteration scales the rows (prototypes) to sum 1/K, then the columns
    (samples) to sum 1/B; the result is ``Qᵀ`` with each sample's row rescaled to sum 1. So rows
    always sum to exactly 1, and as the iterations converge every prototype's column sums to
    B/K (equal use of the prototypes across the batch). MGCA: epsilon 0.05, 3 iterations.
    """
    s = scores.detach().float()
    # The global shift cancels in the first normalisation and keeps exp() finite.
    q = torch.exp((s - s.max()) / epsilon).t()
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q = q / (k * q.sum(dim=1, keepdim=True))
        q = q / (b * q.sum(dim=0, keepdim=True))
    return (q / q.sum(dim=0, keepdim=True)).t().to(scores.dtype)


def mgca_cpa(
    img: Tensor,
    txt: Tensor,
    prototypes: Tensor,
    *,
    epsilon: float = 0.05,
    iterations: int = 3,
    temperature: float = 0.2,
) -> Tensor:
    """MGCA's cross-modal prototype alignment (swapped prediction; mgca.md §2.3).

    ``img, txt [B, E]`` L2-normalised; ``prototypes [K, E]`` already row-normalised by the caller
    (MGCA renormalises its prototype layer under no_grad every step)::

        s_v = g_v Cᵀ,  s_t = g_t Cᵀ
        q_v = sinkhorn(s_v), q_t = sinkhorn(s_t)            targets, detached
        p_v = softmax(s_v / τ₃), p_t = softmax(s_t / τ₃)
        L = ½ [ -mean_b Σ_k q_v log p_t  -  mean_b Σ_k q_t log p_v ]

    Defaults ε = 0.05, 3 iterations, τ₃ = 0.2. Each modality's code is predicted from the other.
    """
    s_v = img @ prototypes.t()
    s_t = txt @ prototypes.t()
    q_v = sinkhorn(s_v, epsilon=epsilon, iterations=iterations)
    q_t = sinkhorn(s_t, epsilon=epsilon, iterations=iterations)
    logp_v = F.log_softmax(s_v / temperature, dim=1)
    logp_t = F.log_softmax(s_t / temperature, dim=1)
    loss_v = -(q_v * logp_t).sum(dim=1).mean()  # the image's code, predicted from the report
    loss_t = -(q_t * logp_v).sum(dim=1).mean()
    return 0.5 * (loss_v + loss_t)
