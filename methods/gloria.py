"""Method ``gloria``: GLoRIA (Huang et al., ICCV 2021; code marshuang80/gloria).

Global loss (cosine similarity x ``temp3`` 10, cross-entropy both ways) plus the local loss: each
word attends over the image's regions (GLoRIA's double softmax, ``temp1`` 4), the word-context
cosine similarities are aggregated per report with ``log sum exp(temp2 * m)`` (``temp2`` 5,
``agg`` sum) and contrasted across the batch at ``temp3``; total ``global_weight * (L_g0 + L_g1) +
local_weight * (L_l0 + L_l1)`` with weights 1 / 1 (``seed_methods.md`` §5.2).

Towers as GLoRIA's: local features from the stride-16 stage (``layer3``: 19x19 regions at 299 px for
ResNet-50), projected by a 1x1 convolution without bias into the text width; the global feature
(pooled last stage) by a linear layer; text features are the sum of BERT's last 4 layers, sub-word
pieces summed into words. The report vector is the mean of its word vectors (GLoRIA averages the
aggregated token slots; here padding is left out so a report's vector does not depend on its
padding). Each process contrasts its own batch, as GLoRIA's single-GPU training did.

Released weights: GLoRIA's CheXpert checkpoint converts through ``--checkpoint FILE``
(:func:`methods.vlp.convert.convert_gloria`); note its pretraining data is CheXpert, not MIMIC
(DD-BASE-2), which the result's weights tag records.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from bench.api import METHODS, MethodEntry, MethodOption
from bench.pretrain import PretrainConfig
from methods.vlp import objectives as O
from methods.vlp import text as T
from methods.vlp.method import (CAPABILITIES, PRETRAIN_SEED, VLPMethod, VLPRecipe, make_factory, make_pretrain,
                                tiny_recipe)
from methods.vlp.model import VLPModel, l2

NAME = "gloria"

OPTIONS = {
    "temp1": MethodOption(4.0, "word->region attention sharpening"),
    "temp2": MethodOption(5.0, "word-match aggregation temperature"),
    "temp3": MethodOption(10.0, "logit scale of the global and local contrasts"),
    "global_weight": MethodOption(1.0, "weight of the global loss"),
    "local_weight": MethodOption(1.0, "weight of the local loss (0 turns it off)"),
    "last_n_layers": MethodOption(4, "BERT layers summed into the text features"),
}


def objective(img_global: torch.Tensor, txt_global: torch.Tensor, regions: torch.Tensor, words: torch.Tensor,
              word_mask: torch.Tensor, *, temp1: float = 4.0, temp2: float = 5.0, temp3: float = 10.0,
              global_weight: float = 1.0, local_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """GLoRIA's named loss terms on plain tensors (regions ``[B, D, R]``, words ``[B, W, D]``)."""
    g0, g1 = O.gloria_global_loss(img_global, txt_global, temp3=temp3)
    terms = {"global_img2txt": global_weight * g0, "global_txt2img": global_weight * g1}
    if local_weight:
        l0, l1, _ = O.gloria_local_loss(regions, words, word_mask, temp1=temp1, temp2=temp2, temp3=temp3)
        terms.update({"local_img2txt": local_weight * l0, "local_txt2img": local_weight * l1})
    return terms


class GLoRIAModel(VLPModel):
    def __init__(self, image, text, recipe: VLPRecipe, options: Mapping[str, Any]) -> None:
        d = text.hidden_size
        heads = {"image_global": nn.Linear(image.global_dim, d),
                 "image_local": nn.Conv2d(image.local_dim, d, kernel_size=1, bias=False)}
        super().__init__(image, text, heads, embed_dim=d)
        self.options = {k: options[k] for k in OPTIONS}

    def _image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.image(images)
        b, n, c = out.local.shape
        grid = out.local.transpose(1, 2).reshape(b, c, *out.local_hw)
        regions = self.heads["image_local"](grid).flatten(2)              # [B, D, R]
        return self.heads["image_global"](out.global_), regions

    def _text(self, tokens: T.TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.text(tokens)
        n = int(self.options["last_n_layers"])
        states = torch.stack(out.hidden_states[-n:]).sum(dim=0)
        words, mask = out.words(states)
        sent = (words * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return sent, words, mask

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        return l2(self._image(images)[0])

    def text_embedding(self, tokens: T.TokenBatch) -> torch.Tensor:
        return l2(self._text(tokens)[0])

    def losses(self, images, tokens):
        g_v, regions = self._image(images)
        g_t, words, mask = self._text(tokens)
        o = self.options
        return objective(g_v, g_t, regions, words, mask, temp1=o["temp1"], temp2=o["temp2"], temp3=o["temp3"],
                         global_weight=o["global_weight"], local_weight=o["local_weight"])


def recipe(preset: str, options: Mapping[str, Any]) -> VLPRecipe:
    epochs = options.get("epochs")
    if preset == "tiny":
        return tiny_recipe(options, grad_clip=0.25)    # GLoRIA clips at 0.25
    # GLoRIA's config: Adam(W) 5e-5, wd 1e-6, batch 48, 50 epochs, clip 0.25 (a cosine schedule stands in
    # for its ReduceLROnPlateau, which needs a validation loop outside this engine)
    return VLPRecipe(PretrainConfig(epochs=int(epochs or 50), batch_size=48, lr=5e-5, weight_decay=1e-6,
                                    warmup_steps=500, grad_clip=0.25, seed=PRETRAIN_SEED), embed_dim=768)


def text_spec(preset: str, options: Mapping[str, Any]) -> T.TextSpec:
    if preset == "tiny":
        return T.tiny_text_spec()
    return T.paper_text_spec(options.get("text_model_dir"), max_length=97 + 2, num_layers=12)


def convert_file(file, options):
    from methods.vlp.convert import convert_file as convert

    state, report, _ = convert(file, "gloria", image_arch="resnet50")
    return state, report


def convert(state_dict, **kw):
    from methods.vlp.convert import convert_gloria

    return convert_gloria(state_dict, **kw)


DEFINITION = VLPMethod(name=NAME, reference="GLoRIA (Huang et al., ICCV 2021), re-pretrained by medvlp-bench",
                       recipe_version=1, options=OPTIONS, recipe=recipe, text_spec=text_spec, build=GLoRIAModel,
                       convert_file=convert_file)

METHODS.add(NAME, MethodEntry(
    name=NAME, factory=make_factory(DEFINITION), capabilities=CAPABILITIES, pretrain=make_pretrain(DEFINITION),
    options=DEFINITION.all_options(), objective=objective, convert=convert,
    description="GLoRIA: global + word-to-region attention local contrast; pretrained on first use on the "
                "synthetic corpus and cached; converts the authors' CheXpert checkpoint"))
