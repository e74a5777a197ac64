"""Method ``mgca``: MGCA (Wang et al., NeurIPS 2022; code HKU-MedAI/MGCA), ``mgca.md``.

``L = lambda_ita * L_ITA + lambda_local * (L_word + L_patch) + lambda_proto * L_CPA`` with the weights
the official training command uses (1 / 1 / 1):

* ITA: instance-wise InfoNCE between the projected global embeddings (tau 0.07);
* TCA: bidirectional token-wise alignment: word -> patch and patch -> word cross-attention, a
  within-sample contrast of each word (patch) with its attended context (tau 0.1), weighted by word
  importance (the last BERT layer's [CLS] attention, clipped to its [q10, q90] and normalised) and
  patch importance (the last ViT block's [CLS] attention; uniform for ResNet);
* CPA: cross-modal prototype alignment: 500 prototypes, Sinkhorn-Knopp targets (epsilon 0.05,
  3 iterations) with swapped prediction (tau 0.2); the prototypes are re-normalised every step and
  frozen in the first epoch.

The default is the paper's formulation. ``mgca.official_quirks=true`` reproduces the released
code's deviations, each also on its own key (``null`` = follow ``official_quirks``):
``sum_ita_directions`` (sum, not mean, of the two ITA cross-entropies), ``shift_word_weights``
(each token takes the [CLS] attention of the next token), ``pad_words_as_negatives`` ([PAD] word
slots stay in the word contrast as negatives), ``unnormalised_patch_context`` (ViT: the patch ->
word context is not L2-normalised) and ``zero_text_positions`` (the text tower sees position 0 for
every token: the official code passes token-type ids in the position-ids argument). The options
are part of the method's identity: results and leaderboard rows name them.

Each process contrasts its own batch and runs its own Sinkhorn, as the official DDP code does
(``contrast_scope = "rank"``). Released checkpoints (``resnet_50.ckpt``, ``vit_base.ckpt``)
convert through ``--checkpoint FILE`` (:func:`methods.vlp.convert.convert_mgca`).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from bench.api import METHODS, MethodEntry, MethodOption
from bench.pretrain import PretrainConfig
from methods.vlp import objectives as O
from methods.vlp import text as T
from methods.vlp.method import (CAPABILITIES, PRETRAIN_SEED, VLPMethod, VLPRecipe, make_factory, make_pretrain,
                                tiny_recipe)
from methods.vlp.model import MGCAEmbedding, VLPModel, l2, project_tokens

NAME = "mgca"
QUIRKS = ("sum_ita_directions", "shift_word_weights", "pad_words_as_negatives", "unnormalised_patch_context",
          "zero_text_positions")

OPTIONS = {
    "official_quirks": MethodOption(False, "reproduce the released code's deviations from the paper (all five below)"),
    "sum_ita_directions": MethodOption(None, "sum (official code) instead of mean (paper) of the two ITA terms"),
    "shift_word_weights": MethodOption(None, "word weight of token t = [CLS] attention of token t+1 (official code)"),
    "pad_words_as_negatives": MethodOption(None, "[PAD] word slots stay as negatives in the word contrast (official)"),
    "unnormalised_patch_context": MethodOption(None, "ViT: patch->word context not L2-normalised (official code)"),
    "zero_text_positions": MethodOption(None, "text tower sees position 0 for every token (official code)"),
    "lambda_ita": MethodOption(1.0, "weight of ITA (official command: 1; class default 1)"),
    "lambda_local": MethodOption(1.0, "weight of TCA (official command: 1; class default 0.7)"),
    "lambda_proto": MethodOption(1.0, "weight of CPA (official command: 1; class default 0.5)"),
    "num_prototypes": MethodOption(500, "prototypes K"),
    "freeze_prototypes_epochs": MethodOption(1, "epochs the prototypes stay frozen"),
}


def quirk_flags(options: Mapping[str, Any], image_arch: str) -> dict[str, bool]:
    on = bool(options.get("official_quirks"))
    flags = {q: on if options.get(q) is None else bool(options[q]) for q in QUIRKS}
    if options.get("unnormalised_patch_context") is None:      # the official quirk is on the ViT path only
        flags["unnormalised_patch_context"] = on and image_arch == "vit"
    return flags


def objective(img: torch.Tensor, txt: torch.Tensor, patches: torch.Tensor, words: torch.Tensor,
              word_mask: torch.Tensor, word_w: torch.Tensor, patch_w: torch.Tensor, prototypes: torch.Tensor, *,
              sum_ita_directions: bool = False, pad_words_as_negatives: bool = False,
              unnormalised_patch_context: bool = False, lambda_ita: float = 1.0, lambda_local: float = 1.0,
              lambda_proto: float = 1.0) -> dict[str, torch.Tensor]:
    """MGCA's named loss terms on plain (L2-normalised) embeddings; ``prototypes`` row-normalised [K, E]."""
    ita = O.mgca_ita(img, txt, sum_directions=sum_ita_directions)
    tca = O.mgca_tca(patches, words, word_mask, word_w, patch_w, pad_words_as_negatives=pad_words_as_negatives,
                     normalise_patch_context=not unnormalised_patch_context)
    cpa = O.mgca_cpa(img, txt, prototypes)
    return {"ita": lambda_ita * ita, "tca_word": lambda_local * tca["word"], "tca_patch": lambda_local * tca["patch"],
            "cpa": lambda_proto * cpa}


class MGCAModel(VLPModel):
    def __init__(self, image, text, recipe: VLPRecipe, options: Mapping[str, Any]) -> None:
        e, h, d = recipe.embed_dim, recipe.head_hidden, text.hidden_size
        heads = {"image_global": MGCAEmbedding(image.global_dim, h, e),
                 "image_local": MGCAEmbedding(image.local_dim, h, e, conv=True),
                 "text_global": MGCAEmbedding(d, h, e),
                 "text_local": MGCAEmbedding(d, h, e, conv=True)}
        super().__init__(image, text, heads, embed_dim=e)
        self.prototypes = nn.Linear(e, int(options["num_prototypes"]), bias=False)
        self.flags = quirk_flags(options, image.spec.arch)
        self.text.zero_positions = self.flags["zero_text_positions"]
        self.weights = {k: float(options[k]) for k in ("lambda_ita", "lambda_local", "lambda_proto")}
        self.freeze_epochs = int(options["freeze_prototypes_epochs"])

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        return l2(self.heads["image_global"](self.image(images).global_))

    def text_embedding(self, tokens: T.TokenBatch) -> torch.Tensor:
        return l2(self.heads["text_global"](self.text(tokens).cls))

    def frozen_parameters(self) -> list[nn.Parameter]:
        return [self.prototypes.weight] if self.current_epoch <= self.freeze_epochs else []

    def losses(self, images, tokens):
        vit = self.image.spec.arch == "vit"
        img = self.image(images, attention=vit)
        txt = self.text(tokens, attention=True)
        g_v = l2(self.heads["image_global"](img.global_))
        g_t = l2(self.heads["text_global"](txt.cls))
        words, mask = txt.words()
        w_loc = l2(project_tokens(self.heads["text_local"], words, mask)) * mask.unsqueeze(-1)
        p_loc = l2(project_tokens(self.heads["image_local"], img.local))
        word_w = O.word_weights(txt.cls_attention, txt.word_index, txt.n_words,
                                shift_quirk=self.flags["shift_word_weights"])
        patch_w = O.patch_weights(img.cls_attention if vit else None, p_loc.shape[1], batch_size=p_loc.shape[0])
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        protos = self.prototypes.weight
        if self.current_epoch <= self.freeze_epochs:
            protos = protos.detach()
        return objective(g_v, g_t, p_loc, w_loc, mask, word_w, patch_w, protos,
                         sum_ita_directions=self.flags["sum_ita_directions"],
                         pad_words_as_negatives=self.flags["pad_words_as_negatives"],
                         unnormalised_patch_context=self.flags["unnormalised_patch_context"], **self.weights)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "quirks": dict(self.flags), "loss_weights": dict(self.weights)}


def recipe(preset: str, options: Mapping[str, Any]) -> VLPRecipe:
    epochs = options.get("epochs")
    if preset == "tiny":
        return tiny_recipe(options)
    # mgca.md §3: AdamW 2e-5, wd 0.05, 40% warmup of one cosine cycle to 1e-8, 50 epochs, batch 144 (72 x 2 GPUs)
    steps_per_epoch = 213_384 // 144
    return VLPRecipe(PretrainConfig(epochs=int(epochs or 50), batch_size=144, lr=2e-5, weight_decay=0.05,
                                    warmup_steps=int(0.4 * 50 * steps_per_epoch), min_lr_ratio=1e-8 / 2e-5,
                                    grad_clip=0.0, seed=PRETRAIN_SEED), embed_dim=128, head_hidden=2048)


def text_spec(preset: str, options: Mapping[str, Any]) -> T.TextSpec:
    return T.tiny_text_spec() if preset == "tiny" else T.paper_text_spec(options.get("text_model_dir"))


def convert_file(file, options):
    from methods.vlp.convert import convert_file as convert

    state, report, _ = convert(file, "mgca", image_arch="vit_base" if options.get("image_arch") == "vit" else "resnet50")
    return state, report


def convert(state_dict, **kw):
    from methods.vlp.convert import convert_mgca

    return convert_mgca(state_dict, **kw)


DEFINITION = VLPMethod(name=NAME, reference="MGCA (Wang et al., NeurIPS 2022), re-pretrained by medvlp-bench",
                       recipe_version=1, options=OPTIONS, recipe=recipe, text_spec=text_spec, build=MGCAModel,
                       convert_file=convert_file)

METHODS.add(NAME, MethodEntry(
    name=NAME, factory=make_factory(DEFINITION), capabilities=CAPABILITIES, pretrain=make_pretrain(DEFINITION),
    options=DEFINITION.all_options(), objective=objective, convert=convert,
    description="MGCA: instance + bidirectional token-wise + prototype alignment (paper formulation; "
                "mgca.official_quirks=true for the released code's); pretrained on first use on the synthetic "
                "corpus and cached; converts the authors' resnet_50.ckpt / vit_base.ckpt"))
