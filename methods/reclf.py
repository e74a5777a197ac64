"""Method ``reclf``: RECLF (Li et al., "Enhancing Medical Vision-Language Contrastive Learning via
Inter-Matching Relation Modeling", IEEE TMI 2025, arXiv 2401.10501), re-implemented from its abstract:
no code or formulas are published (``seed_methods.md`` §3), so every structural choice is a design
decision with an ID and a ``--set reclf.<key>`` option.

``L = λ_global L_global + λ_local L_local_rel`` (DD-RECLF-4), on MGCA's pipeline (DD-COMMON-1,
:mod:`methods.vlp.seed`; recipe DD-RECLF-5):

* **Local matchings** (DD-RECLF-1): for each (image, report) pair scored, each report word
  attends over the image's sub-regions (the projected local tokens): GLoRIA's word->region double
  softmax (``local_matching = gloria``, ``gloria_temp1``) or MGCA's word->patch attention
  (``mgca``, ``mgca_temperature``). A matching is summarised by SGRAF's matching vector
  ``s = normalize(W (ĉ - ŵ)²)`` in a ``sim_dim``-wide similarity space, plus one global node from the
  global embeddings (``global_node``). The relation module's linear layers start as SGRAF's
  (Xavier-uniform, zero biases).
* **SRM** (semantic-relation reasoning, DD-RECLF-2): SGRAF's similarity-graph reasoning over the
  matchings of one pair: a fully connected graph whose edges are ``softmax((W_q s)(W_k s)ᵀ)`` over the
  pair's real matchings, node update ``s <- normalize(s + ReLU(W_g E s))``, ``srm_steps`` times (SGRAF's
  update has no residual, ``srm_residual = false``: it reads out only its global node, while here the
  IRM weighs every node, which must keep its own matching). Relations such as
  disease word <-> location word are learned as edges; no word typing (``srm_steps = 0`` turns the
  SRM off).
* **IRM** (importance-relation reasoning, DD-RECLF-3): SGRAF's attention filtration: a gate
  ``a_i = sigmoid(BN(wᵀ s_i))`` per matching, L1-normalised over the pair's real matchings (the weights
  sum to one); clinically important matchings should win over those of function words. ``irm = false``
  replaces it by the uniform mean (the "simple pooling" RECLF replaces; with ``weighted_cosine`` the
  matching vectors and the SRM then feed nothing and are not built). SRM and IRM are chained
  (SRM -> IRM). The relation-enhanced local score (``local_score``): ``sgraf`` (default), SGRAF's
  read-out ``S_loc = sigmoid(FC(normalize(Σ_i a_i s_i)))``; or ``weighted_cosine``,
  ``S_loc = Σ_i a_i cos(ĉ_i, ŵ_i)``, the matchings' own similarities (the global node's is
  ``cos(v, t)``) weighed by the importances the relation modules infer, GLoRIA-like, offered because
  SGRAF's read-out must learn from scratch to read a similarity from the direction of
  ``normalize(W (ĉ - ŵ)²)``, which discards the magnitude that carries it (``||ĉ - ŵ||² = 2 - 2 cos``).
  Measured on the synthetic default (exploration runs, seed 0, random negatives), ``weighted_cosine``
  probed worse (``rsna-cls`` 10% 0.502 against 0.554, ``chexpert-cls`` 10% 0.587 against 0.612), so
  SGRAF's stays.
* **Objective** (DD-RECLF-4): MGCA's global InfoNCE (τ 0.07) plus a contrast of ``S_loc``: symmetric
  InfoNCE at ``local_temperature`` (``local_loss = info_nce``) or SGRAF's hardest-negative hinge
  (``hinge_hardest``, ``hinge_margin``), each image against candidate reports and each report
  against candidate images. ``local_candidates = null``: every pair of the batch (the design as
  first written, B² relation-module runs); the default, ``local_candidates = 5``: the own pair plus
  5 negatives per anchor (2·B·6 runs): every pair of a batch of 64 costs ~10x MGCA's step on CPU
  (``bench perf pretrain``) where the candidates cost under 2x. Which negatives
  (``local_negatives``): ``random`` (default), drawn uniformly from the batch, or ``hardest``, the
  closest in the global space, as ALBEF picks hard negatives for its matching head. Hardest negatives
  failed on the synthetic default: with them the local contrast stayed at chance (ln 6) and the
  global embedding collapsed (training loss at ln 64 from epoch 2 on), while with random ones
  both terms learn (README; why was not isolated further). Identical reports are never negatives
  (ranked last either way).

Cost: the relation modules run as one batched computation over the pairs (no loop over reports):
O(P·L·sim_dim²) for the projections and O(P·L²·sim_dim) for the graph, P the pairs and L the longest
report's word count in the batch (padding slots beyond it are dropped). ``srm_edge_bias = radgraph``
(typed disease/location edges) is not offered: RadGraph does not ship offline.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from bench.api import METHODS, MethodEntry, MethodOption
from methods.vlp import seed
from methods.vlp import seed_objectives as SO
from methods.vlp.method import CAPABILITIES, VLPMethod, VLPRecipe, make_factory, make_pretrain
from methods.vlp.model import l2

NAME = "reclf"
MATCHINGS = ("gloria", "mgca")
LOCAL_LOSSES = ("info_nce", "hinge_hardest")
LOCAL_SCORES = ("weighted_cosine", "sgraf")
LOCAL_NEGATIVES = ("random", "hardest")

OPTIONS = {
    "global_head": seed.GLOBAL_HEAD_OPTION,
    "local_matching": MethodOption("gloria", "DD-RECLF-1: word->region attention of the local matchings: gloria "
                                             "(double softmax) or mgca (softmax at mgca_temperature)"),
    "gloria_temp1": MethodOption(4.0, "DD-RECLF-1: GLoRIA's region-softmax sharpening (local_matching=gloria)"),
    "mgca_temperature": MethodOption(0.1, "DD-RECLF-1: MGCA's word->patch temperature (local_matching=mgca)"),
    "sim_dim": MethodOption(32, "DD-RECLF-2: width of the matching vectors (SGRAF: 256 on its 1024-d features, "
                                "a quarter; here a quarter of MGCA's 128-d joint space)"),
    "global_node": MethodOption(True, "DD-RECLF-2: add SGRAF's global matching node (global embeddings) to "
                                      "each pair's graph"),
    "srm_steps": MethodOption(3, "DD-RECLF-2: graph-reasoning steps of the SRM (SGRAF: 3; 0 turns the SRM off)"),
    "srm_residual": MethodOption(True, "DD-RECLF-2: SRM update s <- normalize(s + ReLU(W E s)) (true) or SGRAF's "
                                       "s <- ReLU(W E s) (false; SGRAF reads out only its global node, but chained "
                                       "into the IRM each node must keep its own matching: without the residual the "
                                       "near-uniform initial edges make every node of a pair the same)"),
    "irm": MethodOption(True, "DD-RECLF-3: importance gate over matchings (false: uniform mean pooling)"),
    "local_score": MethodOption("sgraf", "DD-RECLF-3: the relation-enhanced local score S_loc: sgraf "
                                         "(sigmoid(FC(normalize(Σ a_i s_i))), SGRAF's read-out) or weighted_cosine "
                                         "(Σ a_i cos(ĉ_i, ŵ_i), the matchings' similarities weighed by the IRM)"),
    "local_candidates": MethodOption(5, "DD-RECLF-4: negatives per anchor in the local contrast: each image is "
                                        "scored against its own report and N others (local_negatives says which; "
                                        "each report likewise against N images), 2·B·(N+1) relation-module runs; "
                                        "null: every pair of the batch (B² runs)"),
    "local_negatives": MethodOption("random", "DD-RECLF-4: which local_candidates negatives: random (drawn "
                                              "uniformly from the batch) or hardest (closest in the global space; "
                                              "collapsed the global embedding at the tiny recipe)"),
    "local_loss": MethodOption("info_nce", "DD-RECLF-4: contrast of the relation-enhanced scores: info_nce or "
                                           "hinge_hardest (SGRAF's)"),
    "local_temperature": MethodOption(0.1, "DD-RECLF-4: temperature of the local InfoNCE on S_loc"),
    "hinge_margin": MethodOption(0.2, "DD-RECLF-4: margin of local_loss=hinge_hardest (SGRAF's)"),
    "temperature": MethodOption(0.07, "DD-COMMON-1: temperature of the global InfoNCE (MGCA's)"),
    "lambda_global": MethodOption(1.0, "DD-RECLF-4: weight of the global loss (0 turns it off)"),
    "lambda_local": MethodOption(1.0, "DD-RECLF-4: weight of the relation-enhanced local loss (0 turns off the "
                                      "local matchings, SRM and IRM)"),
}


class GraphStep(nn.Module):
    """One SRM step (DD-RECLF-2): edges ``softmax((W_q s)(W_k s)ᵀ)`` over a pair's real nodes, then
    ``s <- normalize(s + ReLU(W_g (E s)))`` (``residual``) or SGRAF's ``s <- ReLU(W_g (E s))``; padded
    nodes stay 0."""

    def __init__(self, dim: int, *, residual: bool = True) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.update = nn.Linear(dim, dim)
        self.residual = residual

    def forward(self, nodes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        edges = self.query(nodes) @ self.key(nodes).transpose(-1, -2)               # [..., L, L]
        edges = edges.masked_fill(~mask.unsqueeze(-2), float("-inf")).softmax(dim=-1)
        out = F.relu(self.update(edges @ nodes))
        if self.residual:
            out = l2(nodes + out)
        return out * mask.unsqueeze(-1).to(nodes.dtype)


class RelationReasoner(nn.Module):
    """Matching vectors -> SRM -> IRM -> relation-enhanced local score of (image, report) pairs.

    ``forward(context [..., W, E], words [..., W, E], word_mask [..., W], img [..., E], txt [..., E])``,
    all broadcastable over the leading pair dims ``...`` (``[Bi, Bt]`` for every pair, ``[P]`` for a
    gathered list), returns ``(scores [...], weights [..., L], node_mask [..., L])`` with L = W (+1 for
    the global node, first): scores in [-1, 1] (``weighted_cosine``) or (0, 1) (``sgraf``); ``weights``
    are the IRM importances, summing to one over each pair's real matchings."""

    def __init__(self, dim: int, sim_dim: int, *, steps: int, global_node: bool, irm: bool,
                 residual: bool = True, score: str = "sgraf") -> None:
        super().__init__()
        if score not in LOCAL_SCORES:
            raise ValueError(f"score must be one of {', '.join(LOCAL_SCORES)}, got {score!r}")
        # with the uniform mean and the cosine score, the matching vectors would feed nothing: not built
        uses_nodes = irm or score == "sgraf"
        self.global_node = global_node
        self.local = nn.Linear(dim, sim_dim) if uses_nodes else None
        self.global_ = nn.Linear(dim, sim_dim) if global_node and uses_nodes else None
        self.srm = nn.ModuleList(GraphStep(sim_dim, residual=residual) for _ in range(steps if uses_nodes else 0))
        self.gate = nn.Linear(sim_dim, 1, bias=False) if irm else None   # a bias would be cancelled by the BN
        self.gate_bn = nn.BatchNorm1d(1) if irm else None
        self.score = nn.Linear(sim_dim, 1) if score == "sgraf" else None
        # SGRAF's initialisation: Xavier-uniform weights, zero biases. It matters: the squared differences
        # of unit vectors are ~1/E per entry, so a default-initialised bias would swamp W (ĉ - ŵ)² and every
        # matching vector would start as the same direction, normalize(b).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def importance(self, nodes: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """IRM weights ``[..., L]``: ``l1norm(sigmoid(BN(wᵀ s)))`` over real nodes (BN statistics over
        the real matchings of the whole batch); uniform over real nodes without the IRM."""
        if self.gate is None:
            w = mask.float()
        else:
            logits = self.gate(nodes).squeeze(-1).float()
            flat = self.gate_bn(logits[mask].unsqueeze(-1)).squeeze(-1).float()
            w = torch.zeros_like(logits).masked_scatter(mask, torch.sigmoid(flat))
        return w / w.sum(-1, keepdim=True).clamp_min(1e-12)

    def forward(self, context, words, word_mask, img, txt):
        raw = SO.matching_vectors(context, words)                                     # [..., W, E]
        lead = raw.shape[:-2]
        word_mask = word_mask.bool().expand(*lead, word_mask.shape[-1])
        mask = word_mask
        nodes = None if self.local is None else l2(self.local(raw))                 # [..., W, s]
        if self.global_node:
            if nodes is not None:
                g = l2(self.global_((img - txt).pow(2))).expand(*lead, nodes.shape[-1])   # [..., s]
                nodes = torch.cat([g.unsqueeze(-2), nodes], dim=-2)
            mask = torch.cat([torch.ones_like(mask[..., :1]), mask], dim=-1)
        if nodes is not None:
            nodes = nodes * mask.unsqueeze(-1).to(nodes.dtype)
            for step in self.srm:
                nodes = step(nodes, mask)
        weights = self.importance(nodes, mask)
        if self.score is None:       # weighted_cosine: the matchings' own similarities, weighed by the IRM
            # ||ĉ - ŵ||² = 2 - 2 cos(ĉ, ŵ) for unit vectors
            cosines = (1 - 0.5 * raw.sum(-1)).expand(*lead, raw.shape[-2])
            cosines = cosines.masked_fill(~word_mask, 0)
            if self.global_node:
                cosines = torch.cat([(l2(img) * l2(txt)).sum(-1).expand(*lead).unsqueeze(-1), cosines], dim=-1)
            return (weights * cosines).sum(-1), weights, mask
        pooled = l2((weights.unsqueeze(-1) * nodes).sum(-2))
        return torch.sigmoid(self.score(pooled)).squeeze(-1), weights, mask


class RECLFModel(seed.SeedModel):
    def __init__(self, image, text, recipe: VLPRecipe, options: Mapping[str, Any]) -> None:
        o = options
        weights = seed.loss_weights(NAME, o, ("lambda_global", "lambda_local"))
        extra = {}
        if weights["lambda_local"]:
            extra["relation"] = RelationReasoner(recipe.embed_dim, seed.positive(NAME, o, "sim_dim", int),
                                                 steps=seed.positive(NAME, o, "srm_steps", int, allow_zero=True),
                                                 global_node=bool(o["global_node"]), irm=bool(o["irm"]),
                                                 residual=bool(o["srm_residual"]),
                                                 score=seed.choice(NAME, o, "local_score", LOCAL_SCORES))
        super().__init__(image, text, recipe, options, local_image=bool(weights["lambda_local"]),
                         local_text=bool(weights["lambda_local"]), extra=extra)
        self.weights = weights
        self.matching = seed.choice(NAME, o, "local_matching", MATCHINGS)
        self.local_loss = seed.choice(NAME, o, "local_loss", LOCAL_LOSSES)
        self.negatives = seed.choice(NAME, o, "local_negatives", LOCAL_NEGATIVES)
        self.temps = {k: seed.positive(NAME, o, k) for k in ("gloria_temp1", "mgca_temperature", "local_temperature",
                                                              "temperature")}
        self.margin = seed.positive(NAME, o, "hinge_margin", allow_zero=True)
        self.candidates_per_anchor = (None if o["local_candidates"] is None
                                      else seed.positive(NAME, o, "local_candidates", int))

    def candidates(self, g_v: torch.Tensor, g_t: torch.Tensor,
                   same_report: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate indices ``rows [B, k+1]`` (each image's own report, then k negatives) and ``cols``
        (each report's own image, then k negatives) by ``local_negatives``; random draws come from the
        global RNG, so a seeded run draws the same negatives."""
        if self.negatives == "random":      # the top k of i.i.d. uniform scores: k drawn without replacement
            sim = torch.rand(g_v.shape[0], g_t.shape[0], device=g_v.device)
        else:
            sim = g_v @ g_t.t()
        return SO.hardest_candidates(sim, self.candidates_per_anchor, same_report)

    def local_scores(self, img, txt, g_v: torch.Tensor, g_t: torch.Tensor,
                     same_report: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Relation-enhanced local scores in candidate form (``rows [B, C]``, ``cols [B, C]``, own pair
        first; :func:`methods.vlp.seed_objectives.reclf_objective`), the IRM weights of the pairs
        computed and their node mask."""
        regions = self.local_patches(img)
        words, mask = self.local_words(txt)
        kw = dict(kind=self.matching, temp1=self.temps["gloria_temp1"], temperature=self.temps["mgca_temperature"])
        b = regions.shape[0]
        k = self.candidates_per_anchor
        if k is None or k + 1 >= b:         # every pair of the batch, one batched computation
            context = SO.matching_context(regions, words, mask, pairs="all", **kw)        # [B, B, W, E]
            scores, weights, node_mask = self.heads["relation"](context, words.unsqueeze(0), mask.unsqueeze(0),
                                                                g_v.unsqueeze(1), g_t.unsqueeze(0))
            rows, cols = SO.candidates_from_matrix(scores)
            return rows, cols, weights, node_mask
        rows_idx, cols_idx = self.candidates(g_v, g_t, same_report)                      # [B, k+1] each
        own = torch.arange(b, device=regions.device).repeat_interleave(rows_idx.shape[1])
        pi = torch.cat([own, cols_idx.flatten()])                                         # image of each pair
        pt = torch.cat([rows_idx.flatten(), own])                                         # report of each pair
        context = SO.matching_context(regions[pi], words[pt], mask[pt], pairs="aligned", **kw)   # [P, W, E]
        scores, weights, node_mask = self.heads["relation"](context, words[pt], mask[pt], g_v[pi], g_t[pt])
        n = rows_idx.numel()
        return scores[:n].view_as(rows_idx), scores[n:].view_as(cols_idx), weights, node_mask

    def losses(self, images, tokens):
        img = self.image(images)
        txt = self.text(tokens)
        g_v, g_t = self.global_embeddings(img, txt)
        rows = cols = None
        if self.weights["lambda_local"]:
            ids = tokens.input_ids      # identical reports (3.5% of the synthetic corpus's) are no hard negatives
            rows, cols, _, _ = self.local_scores(img, txt, g_v, g_t, (ids.unsqueeze(0) == ids.unsqueeze(1)).all(-1))
        return SO.reclf_objective(g_v, g_t, rows, cols, temperature=self.temps["temperature"],
                                  local_loss=self.local_loss, local_temperature=self.temps["local_temperature"],
                                  margin=self.margin, **self.weights)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "loss_weights": dict(self.weights)}


objective = SO.reclf_objective

DEFINITION = VLPMethod(name=NAME, reference="RECLF (Li et al., IEEE TMI 2025, arXiv 2401.10501), re-implemented from "
                                            "the abstract by medvlp-bench (design decisions DD-RECLF-1..5)",
                       recipe_version=2, options=OPTIONS, recipe=seed.recipe, text_spec=seed.text_spec,
                       build=RECLFModel)

METHODS.add(NAME, MethodEntry(
    name=NAME, factory=make_factory(DEFINITION), capabilities=CAPABILITIES, pretrain=make_pretrain(DEFINITION),
    options=DEFINITION.all_options(), objective=objective,
    description="RECLF: global + relation-enhanced local contrast (word-region matchings of each image with its "
                "own and 5 other reports, semantic-relation graph reasoning, importance gate); MGCA's pipeline; "
                "pretrained on first use on the synthetic corpus and cached; no released weights"))
