"""Method ``convirt``: ConVIRT (Zhang et al., MLHC 2022, arXiv 2010.00747).

Bidirectional global InfoNCE between an image and its report: ``L = lam * L(v->u) + (1 - lam) *
L(u->v)`` on cosine similarities at temperature ``tau`` (the paper's weighting; ``tau`` 0.1 and
``lam`` 0.75 as commonly cited, ``seed_methods.md`` §5.1 item 4: keys ``convirt.temperature`` and
``convirt.lam`` so they can be switched when confirmed). Image: the backbone's pooled feature; text:
max-pooling over BERT's last-layer token outputs (padding excluded); each through a one-hidden-layer
ReLU projection. Negatives are batch-wide: under DDP the embeddings are all-gathered
(``contrast_scope = "global"``, recorded in the checkpoint).

No official weights were released (DD-BASE-1): this is the method re-pretrained by the harness.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from bench.api import METHODS, MethodEntry, MethodOption
from bench.pretrain import PretrainConfig
from methods.vlp import objectives as O
from methods.vlp import text as T
from methods.vlp.method import (CAPABILITIES, PRETRAIN_SEED, VLPMethod, VLPRecipe, make_factory, make_pretrain,
                                tiny_recipe)
from methods.vlp.model import ProjectionMLP, VLPModel, l2

NAME = "convirt"
objective = O.convirt_loss

OPTIONS = {
    "temperature": MethodOption(0.1, "InfoNCE temperature tau (paper, as commonly cited; MGCA's re-implementation: 0.07)"),
    "lam": MethodOption(0.75, "weight of the image->text term; text->image gets 1 - lam"),
}


class ConVIRTModel(VLPModel):
    def __init__(self, image, text, recipe: VLPRecipe, options: Mapping[str, Any]) -> None:
        heads = {"image_global": ProjectionMLP(image.global_dim, recipe.head_hidden, recipe.embed_dim),
                 "text_global": ProjectionMLP(text.hidden_size, recipe.head_hidden, recipe.embed_dim)}
        super().__init__(image, text, heads, embed_dim=recipe.embed_dim)
        self.temperature, self.lam = float(options["temperature"]), float(options["lam"])
        self.contrast_scope = "global"

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        return l2(self.heads["image_global"](self.image(images).global_))

    def _text_pooled(self, tokens: T.TokenBatch) -> torch.Tensor:
        out = self.text(tokens)
        real = tokens.attention_mask.bool().unsqueeze(-1)
        return out.tokens.masked_fill(~real, float("-inf")).amax(dim=1)

    def text_embedding(self, tokens: T.TokenBatch) -> torch.Tensor:
        return l2(self.heads["text_global"](self._text_pooled(tokens)))

    def losses(self, images, tokens):
        v = self.gather(self.image_embedding(images))
        u = self.gather(self.text_embedding(tokens))
        return objective(v, u, temperature=self.temperature, lam=self.lam)


def recipe(preset: str, options: Mapping[str, Any]) -> VLPRecipe:
    epochs = options.get("epochs")
    if preset == "tiny":
        return tiny_recipe(options)
    # MGCA's re-implementation settings (seed_methods.md §5.1): AdamW 2e-5, wd 0.05, 40% warmup, 50 epochs
    return VLPRecipe(PretrainConfig(epochs=int(epochs or 50), batch_size=144, lr=2e-5, weight_decay=0.05,
                                    warmup_steps=20 * 1480, min_lr_ratio=5e-4, grad_clip=1.0, seed=PRETRAIN_SEED),
                     embed_dim=512, head_hidden=2048)


def text_spec(preset: str, options: Mapping[str, Any]) -> T.TextSpec:
    return T.tiny_text_spec() if preset == "tiny" else T.paper_text_spec(options.get("text_model_dir"))


DEFINITION = VLPMethod(name=NAME, reference="ConVIRT (Zhang et al., MLHC 2022), re-pretrained by medvlp-bench",
                       recipe_version=1, options=OPTIONS, recipe=recipe, text_spec=text_spec, build=ConVIRTModel)

METHODS.add(NAME, MethodEntry(
    name=NAME, factory=make_factory(DEFINITION), capabilities=CAPABILITIES, pretrain=make_pretrain(DEFINITION),
    options=DEFINITION.all_options(), objective=objective,
    description="ConVIRT: bidirectional global image-report InfoNCE (tau 0.1, lambda 0.75); pretrained on first "
                "use on the synthetic corpus and cached"))
