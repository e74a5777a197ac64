"""PLACE, RECLF and SISTA on the shared engine: a short pretraining on the micro corpus lowers each
loss and gives a working encoder; gradients reach every parameter (nothing is frozen); switching a
module off removes its parameters and its term; the switches are part of the run's identity;
sentence boundaries survive MGCA's marker-free captions; same seed, same numbers."""
from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch

import methods  # noqa: F401  (registers the methods)
from bench.api import METHODS, Capability, RunSpec, resolve_options
from bench.errors import BenchError
from bench.pretrain import PretrainConfig
from methods import mgca, place, reclf, sista
from methods.vlp import method as M
from methods.vlp import objectives as O
from methods.vlp import text as T
from methods.vlp.pairs import Caption, mgca_caption, mgca_caption_with_sentences
from model_helpers import biases_before_batchnorm

MODULES = {"place": place, "reclf": reclf, "sista": sista}
CAPTIONS = [Caption([["mild", "patchy", "opacity"], ["in", "the", "left", "lower", "lobe"]]),
            Caption([["no", "pneumothorax"], ["heart", "size", "is", "normal"], ["no", "effusion"]]),
            Caption([["moderate", "right", "pleural", "effusion"]]),
            Caption([["small", "left", "effusion"], ["mild", "edema"]])] * 2


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVLP_BENCH_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path / "cache"
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return T.fast_tokenizer(T.train_wordpiece([str(c) for c in CAPTIONS] * 3, 120))


def _model(name: str, tokenizer, **options):
    d = MODULES[name].DEFINITION
    model = M.build_model(d, "tiny", resolve_options(name, d.all_options(), options), tokenizer=tokenizer)
    x = torch.randn(len(CAPTIONS), 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return model, x, model.text.tokenize(CAPTIONS)


# --------------------------------------------------------------------------------------------- sentences
def test_captions_keep_their_text_and_carry_sentence_ends():
    f, i = "Heart size is normal. 1. No effusion.", "Mild  edema. Ok."
    cap = mgca_caption_with_sentences(f, i)
    assert cap == mgca_caption(f, i) == "mild edema heart size is normal no effusion"   # the text every method sees
    assert isinstance(cap, str) and cap.sentence_ends == (10, 31, 43)
    assert pickle.loads(pickle.dumps(cap)).sentence_ends == cap.sentence_ends
    tok = T.fast_tokenizer(T.train_wordpiece([cap] * 4, 60))
    plain = T.tokenize(tok, [cap], 16)
    marked = T.tokenize(tok, [cap, "no edema. heart normal", str(cap)], 16, sentences=True)
    assert plain.sentence_index is None and torch.equal(plain.input_ids, marked.input_ids[:1])   # same tokens
    words = tok.convert_ids_to_tokens(marked.input_ids[0].tolist())
    by_sentence = {}
    for w, s in zip(words, marked.sentence_index[0].tolist()):
        by_sentence.setdefault(s, []).append(w)
    assert by_sentence[0] == ["mild", "edema"] and by_sentence[1] == ["heart", "size", "is", "normal"]
    assert by_sentence[2] == ["no", "effusion"] and by_sentence[-1][0] == "[CLS]"
    assert marked.sentence_index[1].max() == 1                  # a plain string ends sentences at "."
    assert marked.sentence_index[2].max() == 0                  # ... and a string without one is one sentence
    sub = marked[[1]]
    assert torch.equal(sub.sentence_index, marked.sentence_index[[1]])


# --------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name,options", [
    ("place", {}), ("place", {"pcma_matching": "optimal_transport", "cce_target": "features", "vpoe_type": "cross_attn"}),
    ("reclf", {}), ("reclf", {"local_candidates": None, "local_matching": "mgca", "local_loss": "hinge_hardest"}),
    ("reclf", {"local_negatives": "hardest", "local_score": "weighted_cosine"}),
    ("sista", {}), ("sista", {"sta_sparsifier": "learned_gate", "sta_direction": "both", "sia_similarity": "own_text_stopgrad"}),
    ("place", {"image_arch": "vit"}),
])
def test_gradients_reach_every_parameter_and_none_is_frozen(name, options, tokenizer):
    model, x, tok = _model(name, tokenizer, **options)
    assert model.frozen_parameters() == []
    torch.manual_seed(0)                                          # BERT's dropout draws from the global RNG
    # timm zero-initialises each residual block's last BN scale: take one step, then look
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sum(model(x, tok).values()).backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    terms = model(x, tok)
    assert all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    cancelled = biases_before_batchnorm(model)
    assert cancelled and all(".head." in n for n in cancelled)   # MGCA's projection heads (Linear -> BN) only
    no_grad = sorted(n for n, p in model.named_parameters()
                     if n not in cancelled and (p.grad is None or not torch.any(p.grad != 0)))
    assert no_grad == []


# --------------------------------------------------------------------------------------------- switches
@pytest.mark.parametrize("name,option,term,module", [
    ("place", "lambda_pcma", "pcma", "heads.vpoe."), ("place", "lambda_cce", "cce", "heads.cce."),
    ("reclf", "lambda_local", "local", "heads.relation."), ("sista", "lambda_sta", "sta_word", "heads.image_local."),
])
def test_switching_a_module_off_removes_its_term_and_its_parameters(name, option, term, module, tokenizer):
    on, x, tok = _model(name, tokenizer)
    off, _, _ = _model(name, tokenizer, **{option: 0})
    on.eval(), off.eval()
    with torch.no_grad():
        t_on, t_off = on(x, tok), off(x, tok)
    assert term in t_on and term not in t_off and set(t_off) < set(t_on)
    assert any(k.startswith(module) for k in on.state_dict()) and not any(k.startswith(module) for k in off.state_dict())


def test_module_switches_that_keep_their_parameters():
    """SISTA's SIA ablation is plain InfoNCE; RECLF without SRM/IRM has no graph or gate."""
    tok = T.fast_tokenizer(T.train_wordpiece([str(c) for c in CAPTIONS] * 3, 120))
    sia, x, t = _model("sista", tok, lambda_sta=0)
    plain, _, _ = _model("sista", tok, lambda_sta=0, semantic_negatives=False)
    sia.eval(), plain.eval()
    with torch.no_grad():
        g_v, g_t = plain.global_embeddings(plain.image(x), plain.text(t))
        a, b = sia(x, t)["sia"], plain(x, t)["sia"]
    assert torch.allclose(b, O.mgca_ita(g_v, g_t), atol=1e-6)
    assert a < b                                                 # duplicated captions stop being negatives
    bare, _, _ = _model("reclf", tok, srm_steps=0, irm=False, local_score="sgraf")
    names = [n for n, _ in bare.named_parameters() if n.startswith("heads.relation.")]
    assert not any(".srm." in n or ".gate" in n for n in names) and names
    mean, _, _ = _model("reclf", tok, irm=False, local_score="weighted_cosine")   # the matchings' mean cosine
    assert not any(n.startswith("heads.relation.") for n, _ in mean.named_parameters())


@pytest.mark.parametrize("negatives", ["random", "hardest"])
def test_reclf_local_negatives_skip_identical_reports_and_follow_the_seed(negatives, tokenizer):
    model, _, tok = _model("reclf", tokenizer, local_negatives=negatives, local_candidates=3)
    ids = tok.input_ids
    same = (ids.unsqueeze(0) == ids.unsqueeze(1)).all(-1)                  # CAPTIONS repeats: i and i + 4
    g = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    draws = []
    for _ in range(2):
        torch.manual_seed(5)
        rows, cols = model.candidates(g, g.flip(0), same)
        draws.append((rows, cols))
        own = torch.arange(8)
        assert torch.equal(rows[:, 0], own) and torch.equal(cols[:, 0], own) and rows.shape == (8, 4)
        for idx in (rows, cols):
            drawn = idx[:, 1:]
            assert not bool(same[own.unsqueeze(1), drawn].any())            # never the own or an identical report
            assert all(len(set(r.tolist())) == 3 for r in drawn)            # without replacement
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    if negatives == "hardest":
        sim = (g @ g.flip(0).t()).masked_fill(same, -9)
        assert torch.equal(rows[:, 1], sim.masked_fill(torch.eye(8, dtype=torch.bool), -9).argmax(1))
    else:                                    # a uniform draw: over many draws every other report comes up
        torch.manual_seed(6)
        seen = torch.stack([model.candidates(g, g, same)[0][:, 1:] for _ in range(40)])
        assert all(set(seen[:, i].flatten().tolist()) == set(range(8)) - {i, (i + 4) % 8} for i in range(8))


@pytest.mark.parametrize("name,bad", [("place", {"pcma_matching": "greedy"}), ("place", {"t_por_unit": "noun_phrase"}),
                                      ("reclf", {"local_matching": "scan"}), ("sista", {"sta_sparsifier": "dense"}),
                                      ("reclf", {"sim_dim": 0}), ("sista", {"global_head": "linear"})])
def test_bad_option_values_are_refused_with_the_choices(name, bad, tokenizer):
    with pytest.raises(BenchError, match=f"{name}\\.{next(iter(bad))}"):
        _model(name, tokenizer, **bad)


def test_sista_duplicates_are_similar_and_the_offset_tracks_batches(tokenizer):
    # the model's own embeddings as similarity: under dropout each pass of the same batch gives other
    # similarities, so the EMA must move (TF-IDF, the default, is the same for the same batch)
    model, x, tok = _model("sista", tokenizer, sia_similarity="own_text_stopgrad")
    model.train()
    torch.manual_seed(0)
    g_t = model.global_embeddings(model.image(x), model.text(tok))[1]
    sim = model.report_similarity(tok, g_t)
    assert bool((sim[torch.arange(4), torch.arange(4) + 4] == 1).all())   # the batch holds each caption twice
    assert torch.isnan(model.sia_offset)
    model(x, tok)
    first = float(model.sia_offset)
    model(x, tok)
    assert 0 < first < 1 and float(model.sia_offset) != first            # EMA moved
    model.eval()
    kept = float(model.sia_offset)
    model(x, tok)
    assert float(model.sia_offset) == kept                                # evaluation does not move it


# --------------------------------------------------------------------------------------------- identity
def test_ablations_are_their_own_run_identity(micro_mimic):
    from bench import runner
    from bench.data.prepare import prepare_dataset
    from bench.results import result_path

    runner.load_registries()
    from bench.api import TASKS

    task = TASKS.get("chexpert-cls")
    full = RunSpec("place", "chexpert-cls", 0.1)
    ablation = RunSpec("place", "chexpert-cls", 0.1, overrides=(("place.lambda_cce", 0),))
    assert runner.split_overrides(ablation) == ((), {"lambda_cce": 0})
    assert runner.method_options(ablation, METHODS.get("place")) == {"lambda_cce": 0}
    assert result_path(full, task) != result_path(ablation, task)            # own result file (and leaderboard row)
    with pytest.raises(BenchError, match="no option 'num_querys'.*num_queries"):
        runner.method_options(RunSpec("place", "chexpert-cls", 0.1, overrides=(("place.num_querys", 4),)),
                              METHODS.get("place"))
    mimic = prepare_dataset("mimic-cxr", str(micro_mimic), image_size=64)
    for name, option in (("place", {"lambda_cce": 0}), ("reclf", {"irm": False}), ("sista", {"semantic_negatives": False})):
        d = MODULES[name].DEFINITION
        keys = [M.weights_key(d, "tiny", resolve_options(name, d.all_options(), o), mimic) for o in ({}, option)]
        assert M.weights_dir(keys[0]) != M.weights_dir(keys[1])              # own cached pretraining
        assert keys[0]["config"] == M.weights_key(mgca.DEFINITION, "tiny", resolve_options(
            "mgca", mgca.DEFINITION.all_options(), {}), mimic)["config"]       # MGCA's recipe (DD-COMMON-1)


@pytest.mark.parametrize("name", list(MODULES))
def test_global_heads_are_mlps_by_default_and_mgcas_on_request(name, tokenizer):
    from methods.vlp.model import MGCAEmbedding, ProjectionMLP

    default, mgca_heads = _model(name, tokenizer)[0], _model(name, tokenizer, global_head="mgca")[0]
    for key in ("image_global", "text_global"):
        assert type(default.heads[key]) is ProjectionMLP and type(mgca_heads.heads[key]) is MGCAEmbedding
        assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in default.heads[key].modules())
    assert default.describe()["options"]["global_head"] == "mlp"
    assert mgca_heads.describe()["options"]["global_head"] == "mgca"


def test_recipe_and_towers_follow_mgca(monkeypatch):
    for name, mod in MODULES.items():
        d = mod.DEFINITION
        for preset in ("tiny", "paper"):
            opts = resolve_options(name, d.all_options(), {"epochs": 3})
            assert d.recipe(preset, opts) == mgca.recipe(preset, opts)
            assert d.text_spec(preset, opts) == mgca.text_spec(preset, opts)
        entry = METHODS.get(name)
        assert entry.objective is not None and entry.pretrain is not None and entry.convert is None
        assert Capability.TEXT in entry.capabilities
    # a re-tuned MGCA recipe is picked up, not a copy of its numbers
    tuned = dataclasses.replace(mgca.recipe("tiny", {}), embed_dim=64)
    monkeypatch.setattr(mgca, "recipe", lambda preset, options: tuned)
    assert place.DEFINITION.recipe("tiny", {}) is tuned


def test_same_seed_same_losses(tokenizer):
    for name in MODULES:
        values = []
        for _ in range(2):
            model, x, tok = _model(name, tokenizer)
            torch.manual_seed(0)                                 # BERT's dropout draws from the global RNG
            with torch.no_grad():
                values.append({k: float(v) for k, v in model(x, tok).items()})
        assert values[0] == values[1], name


# --------------------------------------------------------------------------------------------- end to end
BATCH = 5
MAIN_TERM = {"place": "pcma", "reclf": "local", "sista": "sta_word"}


def short(definition: M.VLPMethod, epochs: int) -> M.VLPMethod:
    """The mechanics, not the recipe, are under test: a fixed short schedule of small batches (the micro
    corpus has 15 training pairs: 3 batches of 5), the rest of MGCA's recipe (widths) kept."""
    def recipe(preset, options):
        r = definition.recipe(preset, options)
        return dataclasses.replace(r, config=PretrainConfig(epochs=epochs, batch_size=BATCH, lr=2e-3, weight_decay=0.05,
                                                            warmup_steps=2, grad_clip=1.0, seed=0))
    return dataclasses.replace(definition, recipe=recipe)


def _training_loss(enc, mimic, pairs) -> dict[str, float]:
    """The objective on all training pairs at once, without dropout (BatchNorm on the batch's statistics,
    as in training): a smooth measure of what the pretraining fitted, unlike the per-epoch means of
    batches of 5 (shuffled, augmented), which swing by more than the first epochs move them."""
    from tasks.common.inputs import images_of

    model = enc.model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    x = enc.prepare(images_of(mimic, pairs.rows))
    with torch.no_grad():
        return {k: float(v) for k, v in model(x, model.text.tokenize(pairs.captions)).items()}


@pytest.mark.parametrize("name", list(MODULES))
def test_pretraining_lowers_the_loss_and_gives_an_encoder(name, micro_mimic, cache, monkeypatch):
    from bench.data.prepare import prepare_dataset
    from methods.vlp.pairs import pretraining_pairs

    monkeypatch.setenv("MEDVLP_BENCH_THREADS", "1")   # the loop's thread count: fixed numbers, fast on a busy box
    d = MODULES[name].DEFINITION
    start = M.train_vlp(short(d, 0), "tiny", str(micro_mimic), out_dir=cache / "start", device="cpu")   # its init
    folder = M.train_vlp(short(d, 6), "tiny", str(micro_mimic), out_dir=cache / "trained", device="cpu")
    meta = json.loads((folder / M.META_FILE).read_text())
    assert len(meta["history"]) == 6 and meta["options"] == resolve_options(name, d.all_options(), {})
    mimic = prepare_dataset("mimic-cxr", str(micro_mimic), image_size=64)
    pairs = pretraining_pairs(mimic, "train")
    before = _training_loss(M.load_folder(d, "tiny", start, {}, weights_tag="init"), mimic, pairs)
    enc = M.load_folder(d, "tiny", folder, {}, weights_tag="test")
    after = _training_loss(enc, mimic, pairs)
    assert set(before) == set(after) == {"place": {"ita", "pcma", "cce"}, "reclf": {"global", "local"},
                                         "sista": {"sia", "sta_word"}}[name]
    assert sum(after.values()) < sum(before.values()), (before, after)
    assert after[MAIN_TERM[name]] < before[MAIN_TERM[name]], (before, after)     # the method's own module learns
    x = enc.prepare(torch.randint(0, 255, (2, 1, 64, 64), dtype=torch.uint8))
    with torch.no_grad():
        f = enc.image_features(x)
        zi, zt = enc.encode_image(x), enc.encode_text(["mild edema", "no effusion. heart normal"])
    assert f.pooled.shape == (2, enc.card.embed_dim) and zi.shape == zt.shape == (2, enc.card.joint_dim)
    assert torch.allclose(zt.norm(dim=1), torch.ones(2), atol=1e-5)


def test_the_global_head_is_keyed_in_the_weights_at_every_value():
    """The default moved from MGCA's heads to MLPs: MGCA-head pretrainings cached before (keyed without
    the option) must never be read as the default, and the default is the same pretraining as asking
    for ``global_head=mlp`` explicitly."""
    class Mimic:
        source = {"manifest_sha256": "m", "kind": "synthetic"}

        class images:
            fingerprint = "f"

    for name, mod in MODULES.items():
        d = mod.DEFINITION
        key = {head: M.weights_key(d, "tiny", resolve_options(name, d.all_options(), {"global_head": head}), Mimic())
               for head in ("mlp", "mgca")}
        default = M.weights_key(d, "tiny", resolve_options(name, d.all_options(), {}), Mimic())
        assert default["options"]["global_head"] == "mlp" and key["mgca"]["options"]["global_head"] == "mgca"
        assert M.weights_dir(default) == M.weights_dir(key["mlp"]) != M.weights_dir(key["mgca"])
        unkeyed = {**key["mgca"], "options": {k: v for k, v in key["mgca"]["options"].items() if k != "global_head"}}
        assert M.weights_dir(unkeyed) not in {M.weights_dir(default), M.weights_dir(key["mgca"])}
