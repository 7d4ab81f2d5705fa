"""Gaussian noise (SPIRT's N(0, 100^2) vector)."""

from __future__ import annotations

import numpy as np

from defenses._registry import float_param, seed_param

from ._base import ModelAttack, register


@register("gaussian", aliases=("gaussian_noise", "noise"))
class GaussianNoise(ModelAttack):
    r"""Gaussian noise: publish a random vector with i.i.d. :math:`\mathcal{N}(\mu, \sigma^2)` entries.

    .. math:: v_j \sim \mathcal{N}(\mu, \sigma^2), \quad j = 1, \dots, d

    Parameters
    ----------
    sigma : float, default 100.0
        Standard deviation (>= 0); 100 is SPIRT's choice.
    mu : float, default 0.0
        Mean.
    seed : int or None, default 0
        Seed of the attack's own ``numpy.random.Generator``; each call draws new noise, reproducibly.
        Give each Byzantine peer its own seed (identical seeds publish identical vectors). None draws OS
        entropy.

    Notes
    -----
    Not omniscient: only the dimension d is read, from ``own`` or else ``honest``. The output takes the
    kind/dtype/device of ``own`` if given, else of ``honest``.

    References
    ----------
    SPIRT (Barrak et al., IEEE QRS 2023); e.g. Blanchard et al., NeurIPS 2017 (Gaussian Byzantine workers).

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> a, b = attacks.get("gaussian", sigma=1.0, seed=7), attacks.get("gaussian", sigma=1.0, seed=7)
    >>> v = a(own=np.zeros(3, dtype=np.float32))
    >>> v.shape, v.dtype, bool(np.array_equal(v, b(own=np.zeros(3, dtype=np.float32))))
    ((3,), dtype('float32'), True)
    """

    omniscient = False
    reference = "SPIRT (Barrak et al., QRS 2023); Blanchard et al., NeurIPS 2017"

    def __init__(self, sigma: float = 100.0, mu: float = 0.0, seed: int | None = 0):
        self.sigma = float_param(self.name, "sigma", sigma, minimum=0.0)
        self.mu = float_param(self.name, "mu", mu)
        self.seed = seed_param(self.name, seed)
        self.reset()

    def reset(self) -> None:
        """Restart the noise stream from ``seed``."""
        self._rng = np.random.default_rng(self.seed)

    def forge(self, honest: np.ndarray | None, own: np.ndarray | None) -> np.ndarray:
        d = own.shape[0] if own is not None else honest.shape[1]
        return self._rng.normal(self.mu, self.sigma, size=d)
