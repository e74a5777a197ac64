"""Helpers the model tests share."""
from __future__ import annotations

import torch


def biases_before_batchnorm(model: torch.nn.Module) -> set[str]:
    """Biases of layers whose output goes straight into a BatchNorm: the batch mean removes them, so
    their gradient is zero up to rounding in training (MGCA's head layout has them)."""
    out = set()
    for prefix, module in model.named_modules():
        if isinstance(module, torch.nn.Sequential):
            layers = list(module.named_children())
            for (name, layer), (_, after) in zip(layers, layers[1:]):
                if getattr(layer, "bias", None) is not None and isinstance(after, torch.nn.modules.batchnorm._BatchNorm):
                    out.add(f"{prefix}.{name}.bias")
    return out
