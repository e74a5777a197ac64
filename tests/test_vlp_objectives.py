"""The vision-language pretraining losses (methods/vlp/objectives.py), by hand-checkable properties."""
import math

import pytest
import torch
import torch.nn.functional as F

from methods.vlp import objectives as O


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=_gen(seed)), dim=-1)


def _pair(b: int = 6, e: int = 16, noise: float = 0.1, seed: int = 0):
    """Paired embeddings: each text is a noisy copy of its image."""
    img = _unit(b, e, seed=seed)
    txt = F.normalize(img + noise * torch.randn(b, e, generator=_gen(seed + 1)), dim=-1)
    return img, txt


def _derangement(b: int) -> torch.Tensor:
    return torch.roll(torch.arange(b), 1)


# ------------------------------------------------------------------------------------ InfoNCE
def test_temperature_is_a_division_of_the_similarities():
    a, b = _unit(5, 8, seed=1), _unit(5, 8, seed=2)
    t = 0.3
    rows, cols = O.bidirectional_info_nce(a, b, t, reduce="none")
    rows1, cols1 = O.bidirectional_info_nce(a / t, b, 1.0, reduce="none")
    rows2, cols2 = O.info_nce((a @ b.t()) / t)
    for x, y, z in ((rows, rows1, rows2), (cols, cols1, cols2)):
        assert torch.allclose(x, y, atol=1e-6) and torch.allclose(x, z, atol=1e-6)
    weighted = O.bidirectional_info_nce(a, b, t, weight_a2b=0.25)
    assert torch.allclose(weighted, 0.25 * rows + 0.75 * cols)
    assert torch.allclose(O.bidirectional_info_nce(a, b, t, reduce="sum"), rows + cols)
    assert torch.allclose(O.bidirectional_info_nce(a, b, t), (rows + cols) / 2)


def test_transposing_the_logits_swaps_the_directions():
    logits = torch.randn(4, 4, generator=_gen(3))
    rows, cols = O.info_nce(logits)
    rows_t, cols_t = O.info_nce(logits.t())
    assert torch.allclose(rows, cols_t) and torch.allclose(cols, rows_t)
    assert not torch.allclose(rows, cols)


def test_info_nce_rejects_a_non_square_matrix():
    with pytest.raises(ValueError):
        O.info_nce(torch.zeros(2, 3))


# ------------------------------------------------------------------------------------ ConVIRT
def test_convirt_two_by_two_by_hand():
    img = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # not unit: ConVIRT normalises inside
    txt = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    tau, lam = 0.1, 0.75
    h = 1 / math.sqrt(2)
    # cosine matrix [[1, h], [0, h]] divided by tau
    s = [[1 / tau, h / tau], [0.0, h / tau]]
    row0 = -s[0][0] + math.log(math.exp(s[0][0]) + math.exp(s[0][1]))
    row1 = -s[1][1] + math.log(math.exp(s[1][0]) + math.exp(s[1][1]))
    col0 = -s[0][0] + math.log(math.exp(s[0][0]) + math.exp(s[1][0]))
    col1 = -s[1][1] + math.log(math.exp(s[0][1]) + math.exp(s[1][1]))  # = log 2
    out = O.convirt_loss(img, txt, temperature=tau, lam=lam)
    assert out["img2txt"].item() == pytest.approx(lam * (row0 + row1) / 2, rel=1e-5)
    assert out["txt2img"].item() == pytest.approx((1 - lam) * (col0 + col1) / 2, rel=1e-5)


def test_convirt_swapping_modalities_swaps_the_unweighted_terms():
    img, txt = _pair(seed=4)
    lam = 0.75
    ab = O.convirt_loss(img, txt, lam=lam)
    ba = O.convirt_loss(txt, img, lam=lam)
    assert torch.allclose(ab["img2txt"] / lam, ba["txt2img"] / (1 - lam), atol=1e-6)
    assert torch.allclose(ab["txt2img"] / (1 - lam), ba["img2txt"] / lam, atol=1e-6)


def _convirt_total(i, t):
    return sum(O.convirt_loss(i, t).values())


def _gloria_global_total(i, t):
    return sum(O.gloria_global_loss(i, t))


def _ita(i, t):
    return O.mgca_ita(i, t)


@pytest.mark.parametrize("loss", [_convirt_total, _gloria_global_total, _ita])
def test_global_losses_prefer_the_aligned_batch(loss):
    img, txt = _pair(seed=5)
    assert loss(img, txt) < loss(img, txt[_derangement(img.shape[0])])


# ------------------------------------------------------------------------------ GLoRIA global
def test_gloria_global_is_cosine_times_temp3_and_symmetric():
    img, txt = _pair(seed=6)
    l0, l1 = O.gloria_global_loss(3.0 * img, 0.5 * txt, temp3=10.0)  # scale-free: cosine
    r0, r1 = O.info_nce(10.0 * img @ txt.t())
    assert torch.allclose(l0, r0, atol=1e-5) and torch.allclose(l1, r1, atol=1e-5)
    s0, s1 = O.gloria_global_loss(txt, img)
    assert torch.allclose(l0, s1, atol=1e-5) and torch.allclose(l1, s0, atol=1e-5)


def test_mgca_ita_sum_quirk_is_twice_the_paper_mean():
    img, txt = _pair(seed=7)
    mean = O.mgca_ita(img, txt)
    assert torch.allclose(O.mgca_ita(img, txt, sum_directions=True), 2 * mean)
    rows, cols = O.info_nce(img @ txt.t() / 0.07)
    assert torch.allclose(mean, (rows + cols) / 2)


# ------------------------------------------------------------------------------- GLoRIA local
def _gloria_batch(b=3, d=8, r=6, lengths=(4, 2, 3), pad_to=5, seed=10, noise=0.1):
    """Each report's words are noisy copies of some of its own image's regions."""
    g = _gen(seed)
    regions = torch.randn(b, d, r, generator=g)
    words = torch.randn(b, pad_to, d, generator=g)  # padded slots stay random on purpose
    mask = torch.zeros(b, pad_to, dtype=torch.bool)
    for i, n in enumerate(lengths):
        picks = torch.randint(0, r, (n,), generator=g)
        words[i, :n] = regions[i, :, picks].t() + noise * torch.randn(n, d, generator=g)
        mask[i, :n] = True
    return regions, words, mask


def _gloria_local_by_loop(regions, words, lengths, temp1=4.0, temp2=5.0, temp3=10.0):
    """GLoRIA's local loss written as its per-report loop over real words only."""
    b = regions.shape[0]
    scores = torch.zeros(b, b)
    for t in range(b):
        e = words[t, : lengths[t]]  # [n, D]
        for i in range(b):
            v = regions[i]  # [D, R]
            alpha = torch.softmax(e @ v, dim=0)  # over words, per region
            a = torch.softmax(temp1 * alpha, dim=1)  # over regions, per word
            c = a @ v.t()  # [n, D]
            m = (e * c).sum(-1) / (e.norm(dim=-1) * c.norm(dim=-1))
            scores[i, t] = temp3 * torch.log(torch.exp(temp2 * m).sum())
    return O.info_nce(scores)


def test_gloria_local_matches_the_per_report_loop():
    lengths = (4, 2, 3)
    regions, words, mask = _gloria_batch(lengths=lengths)
    l0, l1, attn = O.gloria_local_loss(regions, words, mask)
    r0, r1 = _gloria_local_by_loop(regions, words, lengths)
    assert torch.allclose(l0, r0, atol=1e-4) and torch.allclose(l1, r1, atol=1e-4)
    assert attn.shape == (3, 5, 6)
    assert torch.allclose(attn[mask].sum(-1), torch.ones(int(mask.sum())), atol=1e-6)
    assert (attn[~mask] == 0).all()


def test_gloria_local_does_not_depend_on_padding_length():
    regions, words, mask = _gloria_batch(noise=2.0)  # a hard batch: losses far from 0
    extra = torch.randn(3, 4, 8, generator=_gen(11))
    words_long = torch.cat([words, extra], dim=1)
    mask_long = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    for agg in ("sum", "mean"):
        a = O.gloria_local_loss(regions, words, mask, agg=agg)
        b = O.gloria_local_loss(regions, words_long, mask_long, agg=agg)
        assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)
    # the mask is what makes this hold: treating the padding as words changes the loss
    unmasked = O.gloria_local_loss(regions, words_long, torch.ones_like(mask_long))
    assert not torch.allclose(unmasked[0], a[0], atol=1e-3)


def test_gloria_local_mean_aggregation_subtracts_log_length():
    regions, words, mask = _gloria_batch(lengths=(3, 3, 3))  # equal lengths: a constant shift
    s = O.gloria_local_loss(regions, words, mask, agg="sum")
    m = O.gloria_local_loss(regions, words, mask, agg="mean")
    # CE is shift-invariant within a row, so with equal lengths both aggregations agree
    assert torch.allclose(s[0], m[0], atol=1e-5)
    regions, words, mask = _gloria_batch(lengths=(4, 1, 3))
    s = O.gloria_local_loss(regions, words, mask, agg="sum")
    m = O.gloria_local_loss(regions, words, mask, agg="mean")
    assert not torch.allclose(s[0], m[0], atol=1e-4)


def test_gloria_attention_with_one_word_is_uniform_over_regions():
    # softmax over a single word is 1 at every region, so temp1 * alpha is constant over regions
    words = torch.randn(2, 1, 4, generator=_gen(12))
    regions = torch.randn(2, 4, 5, generator=_gen(13))
    context, attn = O.gloria_attention(words, regions)
    assert torch.allclose(attn, torch.full_like(attn, 0.2))
    assert torch.allclose(context[:, 0], regions.mean(-1), atol=1e-6)


def test_gloria_local_prefers_the_aligned_batch():
    regions, words, mask = _gloria_batch()
    perm = _derangement(3)
    aligned = sum(O.gloria_local_loss(regions, words, mask)[:2])
    shuffled = sum(O.gloria_local_loss(regions, words[perm], mask[perm])[:2])
    assert aligned < shuffled


# -------------------------------------------------------------------------------- word weights
# [CLS] mild card ##io ##megaly [SEP] [PAD]
_ATTN = torch.tensor([[0.30, 0.05, 0.10, 0.15, 0.20, 0.18, 0.0]])
_WORDS = torch.tensor([[-1, 0, 1, 1, 1, -1, -1]])


def test_word_weights_without_the_shift_sum_each_words_own_pieces():
    w = O.word_weights(_ATTN, _WORDS, 3, clip=None)
    # mild 0.05; cardiomegaly 0.10 + 0.15 + 0.20 = 0.45; the third slot is absent
    assert w[0].tolist() == pytest.approx([0.05 / 0.50, 0.45 / 0.50, 0.0], abs=1e-6)


def test_word_weights_shift_quirk_takes_the_next_tokens_attention():
    w = O.word_weights(_ATTN, _WORDS, 3, shift_quirk=True, clip=None)
    # mild <- card 0.10; cardiomegaly <- ##io + ##megaly + [SEP] = 0.15 + 0.20 + 0.18 = 0.53
    assert w[0].tolist() == pytest.approx([0.10 / 0.63, 0.53 / 0.63, 0.0], abs=1e-6)


def test_word_weights_clip_to_quantiles_then_sum_to_one():
    w = O.word_weights(_ATTN, _WORDS, 3)
    # two values 0.05, 0.45: q10 = 0.09, q90 = 0.41 (linear interpolation) -> 0.09 / 0.50 ...
    assert w[0].tolist() == pytest.approx([0.18, 0.82, 0.0], abs=1e-6)
    # a batch of reports with different lengths; each row sums to 1 over its own words
    attn = torch.rand(2, 8, generator=_gen(14)) + 0.01
    index = torch.tensor([[-1, 0, 1, 2, 3, 4, -1, -1], [-1, 0, 0, 1, -1, -1, -1, -1]])
    ww = O.word_weights(attn, index, 6, shift_quirk=True)
    assert torch.allclose(ww.sum(1), torch.ones(2))
    assert (ww[0, 5:] == 0).all() and (ww[1, 2:] == 0).all() and (ww[:, :2] > 0).all()
    # clipping narrows the spread of the weights
    raw = O.word_weights(attn, index, 6, clip=None)[0, :5]
    clipped = O.word_weights(attn, index, 6)[0, :5]
    assert clipped.max() / clipped.min() < raw.max() / raw.min()


def test_patch_weights_uniform_for_resnet_and_clipped_for_vit():
    u = O.patch_weights(None, 4, batch_size=2)
    assert u.shape == (2, 4) and torch.allclose(u, torch.full((2, 4), 0.25))
    attn = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]])
    w = O.patch_weights(attn, 11)
    # q10 = 1, q90 = 9: [1, 1, 2, ..., 8, 9, 9], total 55
    expected = torch.tensor([[1.0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]]) / 55
    assert torch.allclose(w, expected)


# --------------------------------------------------------------------------------------- TCA
def _tca_batch(b=2, n=5, w=4, e=8, seed=20, pad=1):
    """Word i is a noisy copy of its own image's patch i mod n; the last `pad` words are PAD."""
    g = _gen(seed)
    patches = F.normalize(torch.randn(b, n, e, generator=g), dim=-1)
    copied = patches[:, torch.arange(w) % n]
    words = F.normalize(copied + 0.1 * torch.randn(b, w, e, generator=g), dim=-1)
    mask = torch.ones(b, w, dtype=torch.bool)
    mask[:, w - pad:] = False
    ww = torch.rand(b, w, generator=g) * mask
    ww = ww / ww.sum(1, keepdim=True)
    pw = torch.rand(b, n, generator=g) + 0.1
    pw = pw / pw.sum(1, keepdim=True)
    return patches, words, mask, ww, pw


def _tca_by_loop(patches, words, mask, ww, pw, tau=0.1, normalise_d=True):
    """The released code's formula (PAD words as negatives), one sample and one token at a time."""
    b = patches.shape[0]
    lw = lp = 0.0
    for s in range(b):
        v, t = patches[s], words[s]
        c = F.normalize(torch.softmax(t @ v.t() / tau, -1) @ v, dim=-1)
        sim = t @ c.t() / tau
        logits = (t @ v.t()).t() / tau  # [N, W]
        logits[:, ~mask[s]] = float("-inf")
        d = torch.softmax(logits, -1) @ t
        if normalise_d:
            d = F.normalize(d, dim=-1)
        psim = v @ d.t() / tau
        for mat, wt, acc in ((sim, ww[s], "w"), (psim, pw[s], "p")):
            total = 0.0
            for i in range(mat.shape[0]):
                total += wt[i] * (torch.logsumexp(mat[i], 0) - mat[i, i])
                total += wt[i] * (torch.logsumexp(mat[:, i], 0) - mat[i, i])
            if acc == "w":
                lw = lw + total / 2
            else:
                lp = lp + total / 2
    return lw / b, lp / b


def test_tca_official_mode_matches_the_loop():
    patches, words, mask, ww, pw = _tca_batch()
    out = O.mgca_tca(patches, words, mask, ww, pw, pad_words_as_negatives=True)
    lw, lp = _tca_by_loop(patches, words, mask, ww, pw)
    assert torch.allclose(out["word"], lw, atol=1e-5)
    assert torch.allclose(out["patch"], lp, atol=1e-5)


def test_tca_paper_mode_ignores_padding_and_official_mode_does_not():
    patches, words, mask, ww, pw = _tca_batch()
    extra = F.normalize(torch.randn(2, 3, 8, generator=_gen(21)), dim=-1)
    words_l = torch.cat([words, extra], 1)
    mask_l = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1)
    ww_l = torch.cat([ww, torch.zeros(2, 3)], 1)
    short = O.mgca_tca(patches, words, mask, ww, pw)
    long = O.mgca_tca(patches, words_l, mask_l, ww_l, pw)
    for key in ("word", "patch"):
        assert torch.allclose(short[key], long[key], atol=1e-5)
    q_short = O.mgca_tca(patches, words, mask, ww, pw, pad_words_as_negatives=True)
    q_long = O.mgca_tca(patches, words_l, mask_l, ww_l, pw, pad_words_as_negatives=True)
    assert not torch.allclose(q_short["word"], q_long["word"], atol=1e-4)
    assert torch.allclose(q_short["patch"], q_long["patch"], atol=1e-5)  # PAD is -inf there


def test_tca_patch_context_normalisation_switch():
    patches, words, mask, ww, pw = _tca_batch()
    on = O.mgca_tca(patches, words, mask, ww, pw)
    off = O.mgca_tca(patches, words, mask, ww, pw, normalise_patch_context=False)
    # d_j is a convex mix of unit word vectors, so its norm is below 1 and the switch matters
    assert not torch.allclose(on["patch"], off["patch"], atol=1e-4)
    assert torch.allclose(on["word"], off["word"])
    lw, lp = _tca_by_loop(patches, words, mask, ww, pw, normalise_d=False)
    off_q = O.mgca_tca(patches, words, mask, ww, pw, pad_words_as_negatives=True,
                       normalise_patch_context=False)
    assert torch.allclose(off_q["patch"], lp, atol=1e-5)


def test_tca_prefers_words_from_their_own_image():
    # every patch has a real word copying it, so both directions can be matched
    patches, words, mask, ww, pw = _tca_batch(b=3, n=4, w=5, pad=1)
    perm = _derangement(3)
    aligned = sum(O.mgca_tca(patches, words, mask, ww, pw).values())
    shuffled = sum(O.mgca_tca(patches, words[perm], mask[perm], ww[perm], pw).values())
    assert aligned < shuffled


def test_tca_accepts_uniform_resnet_patch_weights():
    patches, words, mask, ww, _ = _tca_batch()
    a = O.mgca_tca(patches, words, mask, ww, O.patch_weights(None, 5))
    b = O.mgca_tca(patches, words, mask, ww, torch.full((2, 5), 0.2))
    assert torch.allclose(a["patch"], b["patch"])


# ------------------------------------------------------------------------------- Sinkhorn/CPA
def test_sinkhorn_marginals():
    b, k = 8, 4
    scores = torch.rand(b, k, generator=_gen(30)) * 2 - 1
    # each prototype is used equally across the batch (B/K samples' worth) once converged;
    # at MGCA's sharp epsilon = 0.05 that takes many more iterations than at 0.5
    for eps, iters in ((0.5, 50), (0.05, 2000)):
        q = O.sinkhorn(scores, epsilon=eps, iterations=iters)
        assert torch.allclose(q.sum(1), torch.ones(b), atol=1e-5)
        assert torch.allclose(q.sum(0), torch.full((k,), b / k), atol=1e-3)
    q3 = O.sinkhorn(scores)
    assert torch.allclose(q3.sum(1), torch.ones(b), atol=1e-6)
    assert (q3 >= 0).all()
    raw = torch.softmax(scores / 0.05, dim=1).sum(0)
    # even three iterations bring the prototype usage closer to equal than a plain softmax
    assert (q3.sum(0) - b / k).abs().max() < (raw - b / k).abs().max()


def test_sinkhorn_carries_no_gradient():
    scores = torch.randn(4, 3, requires_grad=True)
    q = O.sinkhorn(scores)
    assert not q.requires_grad


def _cpa_batch(b=4, k=6, e=16, seed=40):
    protos = _unit(k, e, seed=seed)
    noise = torch.randn(2, b, e, generator=_gen(seed + 1)) * 0.05
    img = F.normalize(protos[:b] + noise[0], dim=-1)  # sample i near prototype i
    txt = F.normalize(protos[:b] + noise[1], dim=-1)
    return img, txt, protos


def test_cpa_prefers_the_aligned_batch():
    img, txt, protos = _cpa_batch()
    assert O.mgca_cpa(img, txt, protos) < O.mgca_cpa(img, txt[_derangement(4)], protos)


def test_cpa_targets_are_detached():
    img, txt, protos = _cpa_batch()
    protos = protos.clone().requires_grad_(True)
    O.mgca_cpa(img, txt, protos).backward()
    got = protos.grad.clone()

    # the same loss with the Sinkhorn targets computed beforehand, as constants
    p2 = protos.detach().clone().requires_grad_(True)
    q_v = O.sinkhorn(img @ protos.detach().t())
    q_t = O.sinkhorn(txt @ protos.detach().t())
    lp_v = F.log_softmax(img @ p2.t() / 0.2, 1)
    lp_t = F.log_softmax(txt @ p2.t() / 0.2, 1)
    (0.5 * (-(q_v * lp_t).sum(1).mean() - (q_t * lp_v).sum(1).mean())).backward()
    assert torch.allclose(got, p2.grad, atol=1e-6)
    assert got.abs().sum() > 0


# ------------------------------------------------------------------------------------ gradients
def _leaves(*xs):
    return [x.detach().clone().requires_grad_(True) for x in xs]


def _assert_all_have_grad(xs):
    for x in xs:
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_every_input_receives_gradient():
    img, txt = _leaves(*_pair(seed=50))
    sum(O.convirt_loss(img, txt).values()).backward()
    _assert_all_have_grad([img, txt])

    img, txt = _leaves(*_pair(seed=51))
    (sum(O.gloria_global_loss(img, txt)) + O.mgca_ita(img, txt)).backward()
    _assert_all_have_grad([img, txt])

    regions, words, mask = _gloria_batch()
    regions, words = _leaves(regions, words)
    sum(O.gloria_local_loss(regions, words, mask)[:2]).backward()
    _assert_all_have_grad([regions, words])
    assert (words.grad[~mask] == 0).all()  # padded slots take no part

    patches, words, mask, ww, pw = _tca_batch()
    patches, words = _leaves(patches, words)
    out = O.mgca_tca(patches, words, mask, ww, pw)
    out["word"].backward(retain_graph=True)
    _assert_all_have_grad([patches, words])
    patches.grad = words.grad = None
    out["patch"].backward()
    _assert_all_have_grad([patches, words])

    img, txt, protos = _leaves(*_cpa_batch())
    O.mgca_cpa(img, txt, protos).backward()
    _assert_all_have_grad([img, txt, protos])


def test_weights_carry_no_gradient():
    attn = torch.rand(1, 7, requires_grad=True)
    assert not O.word_weights(attn, _WORDS, 3).requires_grad
    assert not O.patch_weights(attn, 7).requires_grad
