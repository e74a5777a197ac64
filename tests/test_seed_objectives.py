"""The seed methods' objectives and modules (methods/vlp/seed_objectives.py, the learned modules of
methods/place.py, reclf.py, sista.py), by properties that can be checked by hand: SIA is InfoNCE when
no report pair is similar and never contrasts a duplicated report; PLACE's extractor ignores the order
of the patches and its correlation target is symmetric PSD; RECLF's importance weights sum to one and
learn to prefer content words; every objective prefers an aligned batch to a shuffled one."""
import pytest
import torch
import torch.nn.functional as F

from methods.place import CorrelationHead, PathologyQueryExtractor, sentence_states, window_index
from methods.reclf import RelationReasoner
from methods.sista import TokenGate
from methods.vlp import objectives as O
from methods.vlp import seed_objectives as SO


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


def _noisy(x: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    return F.normalize(x + noise * torch.randn(x.shape, generator=_gen(seed)), dim=-1)


def _shift(b: int) -> torch.Tensor:
    """A permutation without fixed points: every sample gets another sample's partner."""
    return torch.roll(torch.arange(b), 1)


# ============================================================================================ SISTA: SIA
def _pair(b=6, e=16, seed=0):
    img = _unit(b, e, seed=seed)
    return img, _noisy(img, 0.3, seed + 1)


@pytest.mark.parametrize("false_negatives", ["remove", "positive"])
@pytest.mark.parametrize("offset", [0.0, 0.3])
def test_sia_with_no_pair_above_the_threshold_is_plain_info_nce(false_negatives, offset):
    img, txt = _pair()
    sim = torch.rand(6, 6, generator=_gen(3)) * 0.8            # every pair far below 0.95 (after rescaling too)
    sim.fill_diagonal_(1.0)
    got = SO.sia_loss(img, txt, sim, threshold=0.95, offset=offset, false_negatives=false_negatives)
    expected = O.mgca_ita(img, txt, temperature=0.07)          # MGCA's instance InfoNCE (mean of both directions)
    assert torch.equal(got, expected)
    soft_off = SO.sia_loss(img, txt, sim, mode="soft", soft_alpha=0.0)
    assert torch.allclose(soft_off, expected, atol=1e-6)


def test_sia_a_duplicated_report_is_not_a_negative():
    img, txt = _pair(b=5, seed=4)
    txt = txt.clone()
    txt[3] = txt[1]                                             # report 3 is report 1 again
    r = F.normalize(torch.randn(5, 8, generator=_gen(5)), dim=-1)
    r[3] = r[1]
    sim = r @ r.t()                                             # inter-report similarity: 1 for the duplicate
    got = SO.sia_loss(img, txt, sim, offset=0.4)                # o* rescaling keeps a duplicate at exactly 1
    logits = img @ txt.t() / 0.07
    masked = logits.clone()
    masked[1, 3] = masked[3, 1] = float("-inf")                 # image 1 never competes with report 3, nor 3 with 1
    rows = [-torch.log_softmax(masked[i], 0)[i] for i in range(5)]
    cols = [-torch.log_softmax(masked[:, k], 0)[k] for k in range(5)]
    assert torch.allclose(got, 0.5 * (torch.stack(rows).mean() + torch.stack(cols).mean()), atol=1e-6)
    assert not torch.allclose(got, O.mgca_ita(img, txt))        # plain InfoNCE would contrast them
    # as extra positives instead: image 1's target mass is shared by reports 1 and 3 (and report 1's by images 1, 3)
    pos = SO.sia_loss(img, txt, sim, false_negatives="positive")
    y = torch.eye(5)
    y[1, 3] = y[3, 1] = 1.0
    y = y / y.sum(1, keepdim=True)
    by_hand = 0.5 * (-(y * torch.log_softmax(logits, 1)).sum(1).mean() - (y * torch.log_softmax(logits.t(), 1)).sum(1).mean())
    assert torch.allclose(pos, by_hand, atol=1e-6)


def test_sia_targets_are_distributions_in_both_directions_when_the_relation_is_not_transitive():
    img, txt = _pair(b=4, seed=11)
    sim = torch.eye(4)
    sim[0, 1] = sim[1, 0] = sim[1, 2] = sim[2, 1] = 1.0        # 0~1 and 1~2, but not 0~2
    logits = img @ txt.t() / 0.07
    m = (sim > 0.5).float()
    y_r, y_c = m / m.sum(1, keepdim=True), m.t() / m.t().sum(1, keepdim=True)
    by_hand = 0.5 * (-(y_r * torch.log_softmax(logits, 1)).sum(1).mean()
                     - (y_c * torch.log_softmax(logits.t(), 1)).sum(1).mean())
    assert torch.allclose(SO.sia_loss(img, txt, sim, false_negatives="positive"), by_hand, atol=1e-6)
    # soft targets: an asymmetric similarity gives each report its own distribution over images
    a = torch.rand(4, 4, generator=_gen(12))
    t_r = 0.8 * torch.eye(4) + 0.2 * torch.softmax(a / 0.1, 1)
    t_c = 0.8 * torch.eye(4) + 0.2 * torch.softmax(a.t() / 0.1, 1)
    soft = 0.5 * (-(t_r * torch.log_softmax(logits, 1)).sum(1).mean() - (t_c * torch.log_softmax(logits.t(), 1)).sum(1).mean())
    assert torch.allclose(SO.sia_loss(img, txt, a, mode="soft", soft_alpha=0.2, soft_temperature=0.1), soft, atol=1e-6)


def test_sista_default_similarity_cannot_collapse():
    """With the model's own text embeddings as similarity, collapsed embeddings remove every negative
    and SIA is 0; the default (TF-IDF of the reports) does not depend on the embeddings."""
    from methods.sista import OPTIONS

    assert OPTIONS["sia_similarity"].default == "tfidf"
    img = _unit(6, 16, seed=13)
    collapsed = _unit(1, 16, seed=14).expand(6, 16)
    own = collapsed @ collapsed.t()
    assert SO.sia_loss(img, collapsed, own).item() == pytest.approx(0.0, abs=1e-6)
    ids = torch.tensor([[2, 5 + i, 20 + i, 3] for i in range(6)])         # six different reports
    tfidf = SO.tfidf_similarity(ids, torch.ones_like(ids), torch.tensor([0, 2, 3]))
    assert SO.sia_loss(img, collapsed, tfidf).item() > 1.0                 # ~log 6: every negative stays


def test_hardest_candidates_skip_identical_reports():
    g = torch.tensor([[1.0, 0.9, 0.8, 0.1], [0.9, 1.0, 0.2, 0.3], [0.8, 0.2, 1.0, 0.5], [0.1, 0.3, 0.5, 1.0]])
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True                                         # reports 0 and 1 are identical
    rows, cols = SO.hardest_candidates(g, 1)
    assert rows[0].tolist() == [0, 1]                                      # without the mask: the duplicate
    rows, cols = SO.hardest_candidates(g, 1, same)
    assert rows[0].tolist() == [0, 2] and rows[1].tolist() == [1, 3] and cols[0].tolist() == [0, 2]
    rows, _ = SO.hardest_candidates(g, 3, same)                            # fewer others than k: duplicate last
    assert rows[0].tolist() == [0, 2, 3, 1]


def test_sia_offset_statistic_and_tfidf_duplicates():
    r = _unit(6, 8, seed=6)
    sim = r @ r.t()
    proto = F.normalize(r.mean(0), dim=0)
    assert torch.allclose(SO.batch_prototype_similarity(sim), (r @ proto).mean(), atol=1e-6)
    ids = torch.tensor([[2, 7, 8, 9, 3, 0], [2, 7, 8, 9, 3, 0], [2, 10, 11, 3, 0, 0]])
    mask = (ids != 0).long()
    s = SO.tfidf_similarity(ids, mask, torch.tensor([0, 2, 3]))
    assert torch.allclose(s[0, 1], torch.tensor(1.0)) and s[0, 2] == 0 and torch.allclose(s, s.t())


def test_sia_prefers_the_aligned_batch():
    img, txt = _pair(seed=7)
    sim = torch.eye(6)
    assert SO.sia_loss(img, txt, sim) < SO.sia_loss(img, txt[_shift(6)], sim)
    assert SO.sia_loss(img, txt, sim, mode="soft") < SO.sia_loss(img, txt[_shift(6)], sim, mode="soft")


# ============================================================================================ SISTA: STA
def _sta_batch(b=4, p=6, e=16, seed=10):
    """Each report's words are noisy copies of its own image's patches (in another order), so both
    directions have a partner for every token; report 0 has one extra word, the others a padded slot."""
    patches = _unit(b, p, e, seed=seed)
    perm = torch.stack([torch.randperm(p, generator=_gen(seed + i)) for i in range(b)])
    words = _noisy(torch.gather(patches, 1, perm.unsqueeze(-1).expand(-1, -1, e)), 0.2, seed + 20)
    words = torch.cat([words, _unit(b, 1, e, seed=seed + 30)], dim=1)
    mask = torch.ones(b, p + 1, dtype=torch.bool)
    mask[1:, p] = False
    return patches, words * mask.unsqueeze(-1), mask


def test_sparse_weights_keep_only_relevant_patches_and_sum_to_one():
    sim = torch.tensor([[[0.9, 0.1, 0.0, 0.5], [0.2, 0.2, 0.8, 0.3]]])
    mask = torch.ones(1, 1, 4, dtype=torch.bool)
    w = SO.sparse_weights(sim, mask, sparsifier="threshold")
    # min-max per row, then keep >= 1/4: row 0 keeps 0.9 and 0.5 (normalised 1.0, 0.556), drops 0.1 (0.111) and 0.0
    assert torch.allclose(w.sum(-1), torch.ones(1, 2))
    assert w[0, 0, 1] == 0 and w[0, 0, 3] > 0 and w[0, 0, 0] > w[0, 0, 3]
    top1 = SO.sparse_weights(sim, mask, sparsifier="topk", topk=1)
    assert torch.equal(top1, torch.tensor([[[1.0, 0, 0, 0], [0, 0, 1.0, 0]]]))
    sm = SO.sparse_weights(sim, mask, sparsifier="sparsemax", temperature=0.1)
    assert torch.allclose(sm.sum(-1), torch.ones(1, 2)) and (sm == 0).any()
    padded = SO.sparse_weights(sim, torch.tensor([[[True, True, True, False]]]), sparsifier="threshold")
    assert (padded[..., 3] == 0).all() and torch.allclose(padded.sum(-1), torch.ones(1, 2))


@pytest.mark.parametrize("sparsifier", ["threshold", "topk", "sparsemax", "learned_gate"])
@pytest.mark.parametrize("direction", ["word_to_patch", "patch_to_word", "both"])
def test_sta_prefers_words_with_their_own_image(sparsifier, direction):
    patches, words, mask = _sta_batch()
    gate = torch.full(words.shape[:2] + patches.shape[1:2], 0.5)
    kw = dict(direction=direction, sparsifier=sparsifier, gate=gate if sparsifier == "learned_gate" else None)
    aligned = sum(SO.sta_loss(patches, words, mask, **kw).values())
    shuffled = sum(SO.sta_loss(patches[_shift(4)], words, mask, **kw).values())
    assert aligned < shuffled
    expected = {"word_to_patch": {"word"}, "patch_to_word": {"patch"}, "both": {"word", "patch"}}[direction]
    assert set(SO.sta_loss(patches, words, mask, **kw)) == expected


def test_sta_ignores_padded_word_slots():
    patches, words, mask = _sta_batch()
    longer = torch.cat([words, _unit(4, 3, 16, seed=99)], dim=1)           # garbage in extra padded slots
    longer_mask = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], dim=1)
    for direction in ("word_to_patch", "patch_to_word"):
        a = SO.sta_loss(patches, words, mask, direction=direction)
        b = SO.sta_loss(patches, longer, longer_mask, direction=direction)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_token_gate_is_in_zero_one_with_the_pair_shape():
    torch.manual_seed(0)
    g = TokenGate(16, 8)(torch.randn(2, 5, 16), torch.randn(2, 7, 16))
    assert g.shape == (2, 5, 7) and bool(((g > 0) & (g < 1)).all())


# ============================================================================================ PLACE
@pytest.mark.parametrize("kind", ["decoder", "cross_attn"])
def test_vpoe_outputs_do_not_depend_on_the_order_of_the_patches(kind):
    torch.manual_seed(0)
    vpoe = PathologyQueryExtractor(16, num_queries=4, depth=2, heads=2, kind=kind).eval()
    patches = torch.randn(2, 9, 16, generator=_gen(1))
    perm = torch.randperm(9, generator=_gen(2))
    with torch.no_grad():
        pors, attn = vpoe(patches)
        pors_p, attn_p = vpoe(patches[:, perm])
    assert pors.shape == (2, 4, 16) and attn.shape == (2, 4, 9)
    assert torch.allclose(pors, pors_p, atol=1e-5)                 # V-PORs: invariant
    assert torch.allclose(attn[:, :, perm], attn_p, atol=1e-6)     # attention: equivariant (columns follow)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4), atol=1e-5)
    assert not torch.allclose(pors[:, 0], pors[:, 1])              # the queries differ


def test_cce_target_and_prediction_are_symmetric_psd_correlations():
    images = torch.rand(3, 3, 32, 32, generator=_gen(3))
    images[0, :, :8, :8] = 0.5                                     # a constant patch: correlation 0 with itself
    blocks = SO.pixel_patches(images, (4, 4), block=8)
    assert blocks.shape == (3, 16, 64)
    target = SO.patch_correlation(blocks)
    torch.manual_seed(0)
    predicted = CorrelationHead(16, 16, film=True)(torch.randn(3, 16, 16), torch.randn(3, 16))
    for c in (target, predicted.detach()):
        assert c.shape == (3, 16, 16)
        assert torch.allclose(c, c.transpose(1, 2), atol=1e-6)
        assert float(torch.linalg.eigvalsh(c.double()).min()) > -1e-6
        assert float(c.abs().max()) <= 1 + 1e-5
    assert torch.allclose(target[1].diagonal(), torch.ones(16), atol=1e-5)
    assert float(target[0, 0, 0]) == 0.0
    # a ResNet-50's 19x19 grid at 299 px: blocks still cover the grid exactly
    assert SO.pixel_patches(torch.rand(1, 3, 299, 299), (19, 19), block=4).shape == (1, 361, 16)


@pytest.mark.parametrize("loss", ["mse", "kl", "cosine"])
def test_cce_loss_prefers_the_matching_correlation(loss):
    target = SO.patch_correlation(SO.pixel_patches(torch.rand(4, 3, 32, 32, generator=_gen(4)), (4, 4), 8))
    predicted = SO.patch_correlation(target + 0.1 * torch.randn(target.shape, generator=_gen(5)))
    assert SO.cce_loss(predicted, target, loss=loss) < SO.cce_loss(predicted[_shift(4)], target, loss=loss)
    assert float(SO.cce_loss(target, target, loss=loss)) == pytest.approx(0.0, abs=1e-5)


def _pcma_batch(b=5, q=6, s=4, e=16, seed=20):
    v = _unit(b, q, e, seed=seed)
    pick = torch.stack([torch.randperm(q, generator=_gen(seed + i))[:s] for i in range(b)])
    t = _noisy(torch.gather(v, 1, pick.unsqueeze(-1).expand(-1, -1, e)), 0.3, seed + 50)
    mask = torch.arange(s).unsqueeze(0) < torch.tensor([[4], [2], [3], [1], [4]])
    return v, t * mask.unsqueeze(-1), mask


@pytest.mark.parametrize("matching", ["max_similarity", "optimal_transport", "hungarian"])
def test_pcma_prefers_the_aligned_batch(matching):
    v, t, mask = _pcma_batch()
    shift = _shift(5)
    aligned = SO.pcma_loss(v, t, mask, matching=matching)
    shuffled = SO.pcma_loss(v, t[shift], mask[shift], matching=matching)
    assert aligned < shuffled
    sim = SO.pathology_similarity(v, t, mask, matching=matching)
    assert sim.shape == (5, 5)
    if matching != "optimal_transport":   # OT spreads every report over all queries (uniform marginals)
        own = sim.diagonal().clone()
        assert bool((own > sim.fill_diagonal_(-9).amax(1)).all())


def test_pcma_matching_plans_by_hand():
    v, t, mask = _pcma_batch()
    cos = torch.einsum("tse,iqe->itsq", t, v)
    plan = SO._ot_plan(cos, mask, epsilon=0.05, iterations=200)
    assert torch.allclose(plan.sum((-1, -2)), torch.ones(5, 5), atol=1e-4)           # mass 1 per pair
    assert torch.allclose(plan.sum(-2), torch.full((5, 5, 6), 1 / 6), atol=1e-4)      # every query used equally
    assert (plan[:, ~mask] == 0).all()                                                # padded sentences get nothing
    hung = SO._hungarian_plan(cos, mask)
    assert torch.equal((hung > 0).sum((-1, -2)), mask.sum(1).expand(5, 5))            # one query per sentence
    assert bool(((hung > 0).sum(-2) <= 1).all())                                      # ... each query at most once
    # max_similarity by hand for image 0 and report 1 (2 real sentences)
    expected = (cos[0, 1, 0].max() + cos[0, 1, 1].max()) / 2
    assert torch.allclose(SO.pathology_similarity(v, t, mask)[0, 1], expected)


def test_t_por_units_from_sentence_and_window_indices():
    states = torch.arange(12, dtype=torch.float32).view(1, 6, 2)
    sent = torch.tensor([[-1, 0, 0, 1, 1, -1]])
    means, mask = sentence_states(states, sent)
    assert torch.equal(mask, torch.tensor([[True, True]]))
    assert torch.equal(means[0], torch.tensor([[3.0, 4.0], [7.0, 8.0]]))
    assert torch.equal(window_index(torch.tensor([[-1, 0, 1, 1, 2, 5, -1]]), 2), torch.tensor([[-1, 0, 0, 0, 1, 2, -1]]))


def test_switching_a_term_off_removes_it():
    img, txt = _pair(b=5)
    v, t, mask = _pcma_batch()
    c = SO.patch_correlation(torch.randn(5, 4, 8))
    assert set(SO.place_objective(img, txt, v, t, mask, c, c)) == {"ita", "pcma", "cce"}
    assert set(SO.place_objective(img, txt, v, t, mask, c, c, lambda_pcma=0)) == {"ita", "cce"}
    assert set(SO.place_objective(img, txt, v, t, mask, c, c, lambda_cce=0.0)) == {"ita", "pcma"}
    rows, cols = SO.candidates_from_matrix(torch.rand(6, 6))
    assert set(SO.reclf_objective(img, txt, rows, cols)) == {"global", "local"}
    assert set(SO.reclf_objective(img, txt, rows, cols, lambda_local=0)) == {"global"}
    patches, words, wmask = _sta_batch()
    sim = torch.eye(4)
    gate = torch.rand(4, 7, 6)
    full = SO.sista_objective(img[:4], txt[:4], sim, patches, words, wmask, gate, sparsifier="learned_gate")
    assert set(full) == {"sia", "sta_word", "sparsity"}
    assert set(SO.sista_objective(img[:4], txt[:4], sim, patches, words, wmask, lambda_sta=0)) == {"sia"}
    assert set(SO.sista_objective(img[:4], txt[:4], sim, patches, words, wmask, lambda_sia=0)) == {"sta_word"}


# ============================================================================================ RECLF
def test_candidate_form_of_a_full_matrix_is_info_nce():
    s = torch.rand(5, 5, generator=_gen(30))
    rows, cols = SO.candidates_from_matrix(s)
    assert torch.equal(rows[:, 0], s.diagonal()) and torch.equal(cols[:, 0], s.diagonal())
    assert torch.equal(rows.sort(1).values, s.sort(1).values)
    got = SO.reclf_objective(_pair(b=5)[0], _pair(b=5)[1], rows, cols, lambda_global=0, local_temperature=0.1)["local"]
    r, c = O.info_nce(s / 0.1)
    assert torch.allclose(got, 0.5 * (r + c), atol=1e-6)
    sim = torch.eye(5) + 0.1 * torch.arange(5.0).unsqueeze(0)              # report 4 is everyone's hardest negative
    ri, ci = SO.hardest_candidates(sim, 2)
    assert torch.equal(ri[:, 0], torch.arange(5)) and bool((ri[:4, 1] == 4).all()) and ri[4, 1] == 3
    assert torch.equal(ci[:, 0], torch.arange(5)) and bool((ri[:, 1:] != ri[:, :1]).all())
    assert bool((ci[:, 1:] != ci[:, :1]).all()) and ri.shape == ci.shape == (5, 3)
    h_rows, h_cols = SO.hinge_hardest(rows, cols, 0.2)
    assert torch.isclose(h_rows, (0.2 + s - s.diagonal().unsqueeze(1)).clamp(min=0).fill_diagonal_(0).amax(1).mean())


@pytest.mark.parametrize("kind", ["gloria", "mgca"])
def test_matching_vectors_are_small_for_the_words_own_image(kind):
    regions = _unit(4, 6, 16, seed=40)
    words = _noisy(regions[:, :5] * 3.0, 0.05, seed=41) * 3.0               # each word ~ one of its image's regions
    mask = torch.ones(4, 5, dtype=torch.bool)
    ctx = SO.matching_context(regions * 3.0, words, mask, kind=kind)        # all pairs: [4, 4, 5, 16]
    assert ctx.shape == (4, 4, 5, 16)
    dist = SO.matching_vectors(ctx, words.unsqueeze(0)).sum((-1, -2))       # [image, report]
    own = dist.diagonal().clone()
    assert bool((own < dist.fill_diagonal_(9).amin(0)).all())
    pi, pt = torch.tensor([0, 2, 3]), torch.tensor([1, 2, 0])
    aligned = SO.matching_context(regions[pi] * 3.0, words[pt], mask[pt], kind=kind, pairs="aligned")
    assert torch.allclose(aligned, ctx[pi, pt], atol=1e-5)


def _content_word_batch(b=8, r=6, e=16, seed=60):
    """Reports whose even slots are content words (their own image's regions: the only signal) and whose
    odd slots are function words (the same vectors in every report, telling nothing)."""
    regions = _unit(b, r, e, seed=seed)
    function = _unit(3, e, seed=seed + 1)
    words = torch.empty(b, 6, e)
    words[:, 0::2] = _noisy(regions[:, :3], 0.1, seed + 2)
    words[:, 1::2] = function.expand(b, -1, -1)
    mask = torch.ones(b, 6, dtype=torch.bool)
    mask[:2, 5] = False                                                     # two shorter reports
    glob_v, glob_t = _unit(b, e, seed=seed + 3), _unit(b, e, seed=seed + 4)  # uninformative global node
    return regions, words, mask, glob_v, glob_t


def _relation_loss(rel, regions, words, mask, gv, gt):
    ctx = SO.matching_context(regions, words, mask, kind="mgca")
    scores, weights, node_mask = rel(ctx, words.unsqueeze(0), mask.unsqueeze(0), gv.unsqueeze(1), gt.unsqueeze(0))
    rows, cols = SO.candidates_from_matrix(scores)
    return SO.reclf_objective(gv, gt, rows, cols, lambda_global=0)["local"], weights, node_mask


def test_irm_weights_sum_to_one_and_move_to_content_words():
    # no global node here: on 8 samples a random per-pair global node would be a handle for memorising the
    # pairs, and the test is about the word matchings
    torch.manual_seed(0)
    rel = RelationReasoner(16, 16, steps=3, global_node=False, irm=True)
    batch = _content_word_batch()
    own = torch.arange(8)

    def content_share(weights):
        w = weights[own, own].detach()                                      # each image with its own report
        return float(w[:, 0::2].sum() / w.sum())                            # content words sit in even slots

    with torch.no_grad():
        loss0, weights, node_mask = _relation_loss(rel, *batch)
    assert weights.shape == (8, 8, 6) and node_mask.shape == (8, 8, 6)
    assert torch.allclose(weights.sum(-1), torch.ones(8, 8), atol=1e-5)     # IRM weights sum to one per pair
    assert (weights[:, :2, 5] == 0).all() and (weights[:, 2:] > 0).all()    # padded matchings weigh nothing
    before = content_share(weights)
    opt = torch.optim.Adam(rel.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        loss, _, _ = _relation_loss(rel, *batch)
        loss.backward()
        opt.step()
    loss1, weights, _ = _relation_loss(rel, *batch)
    after = content_share(weights)
    assert loss1 < loss0
    assert after > before + 0.05 and after > 0.6, (before, after)          # content words gained the weight
    assert torch.allclose(weights.sum(-1), torch.ones(8, 8), atol=1e-5)
    # the trained relation scores prefer the aligned batch
    regions, words, mask, gv, gt = batch
    shift = _shift(8)
    shuffled, _, _ = _relation_loss(rel, regions, words[shift], mask[shift], gv, gt[shift])
    assert loss1 < shuffled


def test_relation_module_weights_and_global_node():
    torch.manual_seed(0)
    rel = RelationReasoner(16, 16, steps=2, global_node=True, irm=True)
    _, weights, node_mask = _relation_loss(rel, *_content_word_batch())
    assert weights.shape == (8, 8, 7) and bool(node_mask[..., 0].all())   # the global node comes first
    assert torch.allclose(weights.sum(-1), torch.ones(8, 8), atol=1e-5) and (weights[:, :2, 6] == 0).all()
    for m in rel.modules():                                                 # SGRAF's initialisation
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            assert not m.bias.any()


def test_irm_off_is_the_uniform_mean_and_srm_off_keeps_the_nodes():
    torch.manual_seed(0)
    rel = RelationReasoner(16, 8, steps=0, global_node=False, irm=False, score="sgraf")
    regions, words, mask, gv, gt = _content_word_batch()
    _, weights, _ = _relation_loss(rel, regions, words, mask, gv, gt)
    assert torch.allclose(weights[:, 2:], torch.full((8, 6, 6), 1 / 6))
    assert torch.allclose(weights[:, :2, :5], torch.full((8, 2, 5), 1 / 5)) and (weights[:, :2, 5] == 0).all()
    assert [n for n, _ in rel.named_parameters()] == ["local.weight", "local.bias", "score.weight", "score.bias"]


def test_weighted_cosine_score_is_the_importance_weighted_matching_cosine():
    regions, words, mask, gv, gt = _content_word_batch()
    ctx = SO.matching_context(regions, words, mask, kind="mgca")                     # [8, 8, 6, 16]
    cos = F.cosine_similarity(ctx, words.unsqueeze(0), dim=-1)                       # [image, report, word]
    # without the IRM: the plain mean over real words, and nothing else is built (nothing it would feed)
    plain = RelationReasoner(16, 8, steps=3, global_node=False, irm=False, score="weighted_cosine")
    scores, weights, _ = plain(ctx, words.unsqueeze(0), mask.unsqueeze(0), gv.unsqueeze(1), gt.unsqueeze(0))
    m = mask.unsqueeze(0).float()
    assert torch.allclose(scores, (cos * m).sum(-1) / m.sum(-1), atol=1e-5)
    assert list(plain.parameters()) == []
    # with the IRM and the global node: Σ a_i cos_i, the global node's cosine first
    torch.manual_seed(0)
    rel = RelationReasoner(16, 8, steps=2, global_node=True, irm=True, score="weighted_cosine")
    scores, weights, node_mask = rel(ctx, words.unsqueeze(0), mask.unsqueeze(0), gv.unsqueeze(1), gt.unsqueeze(0))
    g_cos = gv @ gt.t()
    full = torch.cat([g_cos.unsqueeze(-1), cos.masked_fill(~mask.unsqueeze(0), 0)], dim=-1)
    assert torch.allclose(scores, (weights * full).sum(-1), atol=1e-5)
    assert bool((scores.abs() <= 1 + 1e-5).all()) and "score" not in dict(rel.named_children())
    with pytest.raises(ValueError, match="score must be one of"):
        RelationReasoner(16, 8, steps=0, global_node=False, irm=True, score="mlp")
