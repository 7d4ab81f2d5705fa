"""Sign flipping (SPIRT's -10x gradient)."""

from __future__ import annotations

import numpy as np

from defenses._registry import float_param

from ._base import ModelAttack, register


@register("sign_flip", aliases=("sign_flipping", "sf"))
class SignFlip(ModelAttack):
    r"""Sign flipping: publish the Byzantine peer's own gradient multiplied by a negative ``scale``.

    .. math:: v = \mathrm{scale} \cdot g_{\mathrm{own}}, \qquad \mathrm{scale} < 0

    Parameters
    ----------
    scale : float, default -10.0
        Negative multiplier. -10 reproduces SPIRT (which multiplies the gradient by -10); -1 is the plain
        sign flip (ByzFL's ``SignFlipping`` uses -1 times the honest mean).

    Notes
    -----
    Not omniscient: needs ``own``.

    References
    ----------
    SPIRT (Barrak et al., IEEE QRS 2023); e.g. Allen-Zhu et al., ICLR 2021; Karimireddy et al., ICML 2021.

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> attacks.get("sign_flip")(own=np.array([0.5, -1.]))
    array([-5., 10.])
    >>> attacks.get("sign_flip", scale=-1.0).outgoing([0, 1], own=np.array([0.5, -1.]))
    {0: array([-0.5,  1. ]), 1: array([-0.5,  1. ])}
    """

    omniscient = False
    needs_own = True
    reference = "SPIRT (Barrak et al., QRS 2023); Karimireddy, He, Jaggi, ICML 2021"

    def __init__(self, scale: float = -10.0):
        self.scale = float_param(self.name, "scale", scale, maximum=0.0, strict_max=True)

    def forge(self, honest: np.ndarray | None, own: np.ndarray | None) -> np.ndarray:
        return own * self.scale
