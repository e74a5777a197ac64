"""The image tower of the vision-language methods: a timm ResNet or ViT with the outputs they contrast.

* ResNet (``features_only``): the global feature is the average of the last stage (C5); the local
  features are the stage of stride 16 (C4: GLoRIA's and MGCA-ResNet's ``layer3``); the pyramid is
  every stage, for dense heads. MGCA upsamples ResNet inputs to 299 px (19x19 local regions);
  ``ImageSpec.upsample_to`` reproduces that at the paper preset.
* ViT: the global feature is the ``[CLS]`` token after the final norm (MGCA's ViT pooling), the
  local features are the patch tokens, the pyramid is one map of the tokens at the patch stride;
  the last block's ``[CLS]`` -> patch attention (heads averaged) is returned for MGCA's patch
  weights, recomputed from the block's own query/key projections so timm's fused attention path
  stays untouched.

The state-dict prefix of the network is ``backbone.`` (``image.backbone.`` inside a VLP model), with
timm's own key names: torchvision's ResNet and MGCA's BLIP ViT use the same names.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ImageSpec:
    arch: str                                   # "resnet" or "vit"
    timm_name: str                              # "resnet18", "resnet50", "vit_base_patch16_224"
    image_size: int                             # input size the tower is trained at
    timm_args: tuple[tuple[str, Any], ...] = ()
    local_stride: int = 16                      # pyramid level the local features come from (ResNet)
    upsample_to: int | None = None              # MGCA-ResNet: bilinear upsampling to 299 before the network

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timm_args"] = [[k, list(v) if isinstance(v, tuple) else v] for k, v in self.timm_args]
        return d

    def describe(self) -> str:
        if not self.timm_args:
            return self.timm_name
        def fmt(v: Any) -> str:
            return "-".join(str(x) for x in v) if isinstance(v, (tuple, list)) else str(v)
        return self.timm_name + "[" + ",".join(f"{k}={fmt(v)}" for k, v in self.timm_args) + "]"


@dataclass
class ImageOutput:
    global_: torch.Tensor                       # [B, C_g]
    local: torch.Tensor                         # [B, N, C_l] local tokens (regions or patches), row-major
    local_hw: tuple[int, int]                   # grid of the local tokens
    pyramid: list[torch.Tensor] = field(default_factory=list)   # NCHW maps
    cls_attention: torch.Tensor | None = None   # [B, N] ViT only


class ImageTower(nn.Module):
    def __init__(self, spec: ImageSpec, seed: int) -> None:
        super().__init__()
        import timm

        self.spec = spec
        kwargs = dict(spec.timm_args)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            if spec.arch == "resnet":
                self.backbone = timm.create_model(spec.timm_name, pretrained=False, features_only=True,
                                                  out_indices=(1, 2, 3, 4), **kwargs)
            elif spec.arch == "vit":
                self.backbone = timm.create_model(spec.timm_name, pretrained=False, num_classes=0,
                                                  img_size=spec.image_size, **kwargs)
            else:
                raise ValueError(f"unknown image arch {spec.arch!r} (resnet, vit)")
        if spec.arch == "resnet":
            strides = list(self.backbone.feature_info.reduction())
            if spec.local_stride not in strides:
                raise ValueError(f"{spec.timm_name}: no stage of stride {spec.local_stride} (strides {strides})")
            self.local_level = strides.index(spec.local_stride)
            self.channels = tuple(int(c) for c in self.backbone.feature_info.channels())
            self.strides = tuple(int(s) for s in strides)
            self.global_dim, self.local_dim = self.channels[-1], self.channels[self.local_level]
        else:
            dim = int(self.backbone.embed_dim)
            patch = int(self.backbone.patch_embed.patch_size[0])
            self.local_level = 0
            self.channels, self.strides = (dim,), (patch,)
            self.global_dim = self.local_dim = dim
            self._attn_input: torch.Tensor | None = None
            self.backbone.blocks[-1].attn.register_forward_pre_hook(self._keep_attn_input)

    # ViT: the last block's attention input, for its [CLS] row
    def _keep_attn_input(self, module: nn.Module, args: tuple) -> None:
        self._attn_input = args[0] if self._want_attention else None

    _want_attention = False

    def _cls_attention(self) -> torch.Tensor:
        attn = self.backbone.blocks[-1].attn
        x = self._attn_input
        b, n, c = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        a = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)            # [B, heads, 1, N]
        return a.softmax(dim=-1)[:, :, 0, self.backbone.num_prefix_tokens:].mean(dim=1)

    def forward(self, x: torch.Tensor, *, attention: bool = False, upsample: bool = True) -> ImageOutput:
        if upsample and self.spec.upsample_to and x.shape[-1] != self.spec.upsample_to:
            x = F.interpolate(x, size=(self.spec.upsample_to, self.spec.upsample_to), mode="bilinear",
                              align_corners=False)
        if self.spec.arch == "resnet":
            pyramid = list(self.backbone(x))
            local_map = pyramid[self.local_level]
            return ImageOutput(global_=pyramid[-1].mean(dim=(2, 3)), local=local_map.flatten(2).transpose(1, 2),
                               local_hw=(int(local_map.shape[2]), int(local_map.shape[3])), pyramid=pyramid)
        self._want_attention = attention
        try:
            tokens = self.backbone.forward_features(x)                  # [B, prefix + N, D], final norm applied
            cls_attn = self._cls_attention() if attention else None
        finally:
            self._want_attention, self._attn_input = False, None
        prefix = self.backbone.num_prefix_tokens
        patches = tokens[:, prefix:]
        h, w = self.backbone.patch_embed.grid_size
        grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, h, w)
        return ImageOutput(global_=tokens[:, 0], local=patches, local_hw=(int(h), int(w)), pyramid=[grid],
                           cls_attention=cls_attn)
