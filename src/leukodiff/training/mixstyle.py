"""MixStyle (Zhou et al., ICLR 2021): new "labs" made during training from the ones we have.

A convolutional layer's per-channel mean and spread over the image carry the image's
style (stain, lamp, sharpness) more than its content (the cell's shape). Mixing them
between two training images, with the content of one and a blend of both styles, shows
the network styles between and beyond its training labs, so it learns to rely on less
of the style. Only while training: in evaluation mode the hooks do nothing, the network
and its exported file are unchanged, and nothing costs time at inference.
"""

from __future__ import annotations

import torch
from torch import nn

from leukodiff.models.mobilenet import MobileNetClassifier

# After the last block at each of the first three resolutions (64, 32 and 16 px for a
# 128-px crop), as the original method mixes after a ResNet's first three stages: early
# layers hold style, late ones the type.
MIXED_BLOCKS = (2, 6, 10)


class MixStyle:
    """A forward hook: with probability `p`, each image's feature statistics become a
    Beta(`alpha`, `alpha`) blend of its own and another image's in the batch."""

    def __init__(self, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"MixStyle probability must be in [0, 1], got {p}")
        self.p, self.eps = p, eps
        self.beta = torch.distributions.Beta(alpha, alpha)

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training or len(output) < 2 or float(torch.rand(())) >= self.p:
            return output
        mean = output.mean(dim=(2, 3), keepdim=True).detach()
        std = (output.var(dim=(2, 3), keepdim=True) + self.eps).sqrt().detach()
        share = self.beta.sample((len(output), 1, 1, 1)).to(output)
        other = torch.randperm(len(output))
        mixed_mean = share * mean + (1 - share) * mean[other]
        mixed_std = share * std + (1 - share) * std[other]
        return (output - mean) / std * mixed_std + mixed_mean


def add_mixstyle(model: MobileNetClassifier, p: float) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook MixStyle onto the backbone's `MIXED_BLOCKS`; the handles remove it."""
    blocks = list(model.backbone.blocks())
    hook = MixStyle(p)
    return [blocks[i].register_forward_hook(hook) for i in MIXED_BLOCKS]
