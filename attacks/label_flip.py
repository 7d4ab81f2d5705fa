"""Label flipping (data poisoning)."""

from __future__ import annotations

from typing import Any

from defenses._registry import int_param

from ._base import DataAttack, register


@register("label_flip", aliases=("label_flipping", "lf"))
class LabelFlip(DataAttack):
    r"""Label flipping: train on labels mapped to :math:`y \mapsto C - 1 - y` (C classes).

    For MNIST (C = 10) this is SPIRT's ``9 - y``. The inputs ``x`` are unchanged; the Byzantine peer then
    publishes the gradient honestly computed on the flipped batch (so, called as a model attack, it
    returns ``own``).

    Parameters
    ----------
    num_classes : int, default 10
        Number of classes C (>= 2).

    Notes
    -----
    Labels keep their kind (numpy/torch/int), dtype and device. Not omniscient.

    References
    ----------
    As implemented by SPIRT (Barrak et al., IEEE QRS 2023); a classic data-poisoning baseline
    (e.g. Biggio, Nelson, Laskov, ICML 2012; Tolpegin et al., ESORICS 2020).

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> x, y = attacks.get("label_flip").poison("images", np.array([0, 3, 9]))
    >>> x, y
    ('images', array([9, 6, 0]))
    """

    omniscient = False
    reference = "SPIRT (Barrak et al., QRS 2023); Tolpegin et al., ESORICS 2020"

    def __init__(self, num_classes: int = 10):
        self.num_classes = int_param(self.name, "num_classes", num_classes, minimum=2)

    def poison(self, x: Any, y: Any) -> tuple[Any, Any]:
        """Return ``(x, num_classes - 1 - y)``."""
        return x, (self.num_classes - 1) - y
