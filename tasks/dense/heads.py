"""Segmentation heads and the loss MGCA's protocol needs and mmseg lacks, registered in mmseg's registry.

* :class:`UNetHead`: the decoder of ``segmentation_models_pytorch.Unet`` that MGCA puts on a frozen
  ResNet (smp's defaults: nearest x2 upsampling, concatenation with the next finer pyramid level,
  two conv3x3-BN-ReLU per block, widths halving from ``channels``), continued without skips down to
  the input resolution where the pyramid has no finer level (our CNN pyramids start at stride 4;
  smp's also has the stride-2 stem).
* :class:`SETRPUPHead`: MGCA's head for a ViT (a one-level pyramid): a 1x1 projection (MGCA's Linear
  on the patch tokens), then one conv3x3-BN-ReLU and a bilinear x2 per block, widths 512/256/128/64
  at the paper preset. mmseg's ``SETRUPHead`` layer-normalises its input and keeps one width, which
  is neither MGCA's head nor usable on a one-channel pyramid (``pixels``).
* :class:`MixedFocalDiceLoss`: MGCA's ``MixedLoss(alpha=10)``: ``alpha * focal(gamma=2) - log(soft
  Dice)``, the focal term a mean over pixels without class weighting (torchvision's
  ``sigmoid_focal_loss`` with ``alpha=-1``), the Dice term over the whole batch with smoothing 1.

Both heads end in mmseg's ``BaseDecodeHead.cls_seg`` (dropout, 1x1 conv), so the rest of mmseg
(losses, ``predict`` with a sigmoid threshold for one output channel) treats them as its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.registry import MODELS
from torch import nn
from torchvision.ops import sigmoid_focal_loss


def _widths(start: int, n: int, minimum: int = 16) -> list[int]:
    return [max(minimum, start // 2 ** k) for k in range(n)]


@MODELS.register_module()
class UNetHead(BaseDecodeHead):
    """U-Net decoder over a multi-level pyramid (``in_index`` all levels, fine to coarse).

    ``strides`` are the pyramid's strides; blocks upsample x2 from the coarsest level until stride 1,
    concatenating the pyramid level of each stride they pass. ``channels`` is the width of the first
    block (smp: 256), halving per block down to 16; the last block's width feeds ``cls_seg``.
    """

    def __init__(self, strides: tuple[int, ...], decoder_channels: int, **kwargs) -> None:
        strides = tuple(int(s) for s in strides)
        n_blocks = max(1, (strides[-1] - 1).bit_length())      # x2 steps from the coarsest stride to 1
        widths = _widths(int(decoder_channels), n_blocks)
        super().__init__(input_transform="multiple_select", channels=widths[-1], **kwargs)
        if len(strides) != len(self.in_channels):
            raise ValueError(f"UNetHead: {len(strides)} strides for {len(self.in_channels)} input levels")
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"UNetHead: pyramid strides {strides} must double from level to level")
        self.strides = strides
        skip_of = {s: c for s, c in zip(strides[:-1], self.in_channels[:-1])}
        blocks, in_ch, stride = [], self.in_channels[-1], strides[-1]
        for width in widths:
            stride //= 2
            skip = skip_of.get(stride, 0)
            blocks.append(nn.Sequential(
                ConvModule(in_ch + skip, width, 3, padding=1, conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg,
                           act_cfg=self.act_cfg),
                ConvModule(width, width, 3, padding=1, conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg,
                           act_cfg=self.act_cfg)))
            in_ch = width
        self.blocks = nn.ModuleList(blocks)

    def forward(self, inputs):
        feats = self._transform_inputs(inputs)
        by_stride = {s: f for s, f in zip(self.strides[:-1], feats[:-1])}
        x, stride = feats[-1], self.strides[-1]
        for block in self.blocks:
            stride //= 2
            skip = by_stride.get(stride)
            x = F.interpolate(x, size=skip.shape[-2:] if skip is not None else None,
                              scale_factor=None if skip is not None else 2.0, mode="nearest")
            if skip is not None:
                x = torch.cat([x, skip], dim=1)
            x = block(x)
        return self.cls_seg(x)


@MODELS.register_module()
class SETRPUPHead(BaseDecodeHead):
    """MGCA's progressive-upsampling head for a one-level (ViT) pyramid: projection, then per block
    conv3x3-BN-ReLU and bilinear x2, widths ``decoder_channels``."""

    def __init__(self, decoder_channels: tuple[int, ...], **kwargs) -> None:
        widths = [int(c) for c in decoder_channels]
        super().__init__(input_transform=None, channels=widths[-1], **kwargs)
        self.proj = nn.Conv2d(self.in_channels, self.in_channels, 1)
        blocks, in_ch = [], self.in_channels
        for width in widths:
            blocks.append(ConvModule(in_ch, width, 3, padding=1, conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg,
                                     act_cfg=self.act_cfg))
            in_ch = width
        self.blocks = nn.ModuleList(blocks)

    def forward(self, inputs):
        x = self.proj(self._transform_inputs(inputs))
        for block in self.blocks:
            x = F.interpolate(block(x), scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.cls_seg(x)


@MODELS.register_module()
class MixedFocalDiceLoss(nn.Module):
    """``alpha * focal(gamma) - log(dice)`` of one-channel logits against 0/1 labels (MGCA's MixedLoss).

    Pixels labelled ``ignore_index`` (mmseg's padding value) are left out of both terms.
    """

    def __init__(self, alpha: float = 10.0, gamma: float = 2.0, smooth: float = 1.0, loss_weight: float = 1.0,
                 loss_name: str = "loss_focal_dice") -> None:
        super().__init__()
        self.alpha, self.gamma, self.smooth, self.loss_weight = float(alpha), float(gamma), float(smooth), float(loss_weight)
        self._loss_name = loss_name

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight=None, ignore_index: int = 255,
                **kwargs) -> torch.Tensor:
        if pred.dim() == 4:
            if pred.shape[1] != 1:
                raise ValueError(f"MixedFocalDiceLoss expects one output channel, got {pred.shape[1]}")
            pred = pred[:, 0]
        if pred.shape != target.shape:
            raise ValueError(f"MixedFocalDiceLoss: logits {tuple(pred.shape)} and labels {tuple(target.shape)} differ")
        valid = target != ignore_index
        logits = pred.float()[valid]
        labels = target[valid].float()
        focal = sigmoid_focal_loss(logits, labels, alpha=-1, gamma=self.gamma, reduction="mean")
        prob = torch.sigmoid(logits)
        dice = (2.0 * (prob * labels).sum() + self.smooth) / (prob.sum() + labels.sum() + self.smooth)
        return self.loss_weight * (self.alpha * focal - torch.log(dice))

    @property
    def loss_name(self) -> str:
        return self._loss_name
