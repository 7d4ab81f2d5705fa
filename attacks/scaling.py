"""Gradient scaling (boosting)."""

from __future__ import annotations

import numpy as np

from defenses._registry import float_param

from ._base import ModelAttack, register


@register("scaling", aliases=("gradient_scaling", "boosting"))
class GradientScaling(ModelAttack):
    r"""Gradient scaling: publish the Byzantine peer's own gradient multiplied by a positive ``factor``.

    .. math:: v = \mathrm{factor} \cdot g_{\mathrm{own}}, \qquad \mathrm{factor} > 0

    Parameters
    ----------
    factor : float, default 10.0
        Positive multiplier (a negative one is :class:`attacks.sign_flip.SignFlip`). 10 matches the
        magnitude of SPIRT's sign-flip attack; model-replacement attacks use n / lr.

    Notes
    -----
    Not omniscient: needs ``own``. Defeats the mean; norm-based and median-type rules are expected to
    bound it.

    References
    ----------
    A. N. Bhagoji, S. Chakraborty, P. Mittal, S. Calo. "Analyzing Federated Learning through an Adversarial
    Lens." ICML 2019 (explicit boosting); E. Bagdasaryan et al. "How To Backdoor Federated Learning."
    AISTATS 2020 (model replacement).

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> attacks.get("scaling", factor=3.0)(own=np.array([1., -2.]))
    array([ 3., -6.])
    """

    omniscient = False
    needs_own = True
    reference = "Bhagoji, Chakraborty, Mittal, Calo, ICML 2019; Bagdasaryan et al., AISTATS 2020"

    def __init__(self, factor: float = 10.0):
        self.factor = float_param(self.name, "factor", factor, minimum=0.0, strict_min=True)

    def forge(self, honest: np.ndarray | None, own: np.ndarray | None) -> np.ndarray:
        return own * self.factor
