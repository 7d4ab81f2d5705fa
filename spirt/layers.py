"""Layers of the registered models that torch does not offer in the form they need (torch is imported
with this module: :mod:`spirt.models` imports it inside its builders only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)``, computed in channels-last layout.

    The same values and the same gradient, bit for bit (each window's gradient goes to its first
    maximum, in the same order), only faster: torch's single-thread pooling of NCHW tensors is 2-3x
    slower than of channels-last ones, and in the ``cnn`` model it took 60% of evaluating the test set
    and half of a batch-32 forward pass. The two layout copies cost less than that difference.
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return super().forward(x)
        return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2).contiguous()
