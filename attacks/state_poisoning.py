"""State poisoning: colluding Byzantine peers hand a joining peer a poisoned model."""

from __future__ import annotations

import numpy as np

from defenses._registry import choice_param, float_param, int_param

from ._base import register
from ._protocol import ProtocolAttack


@register("state_poisoning")
class StatePoisoning(ProtocolAttack):
    r"""State poisoning: serve a joining peer the same poisoned state from every colluder.

    .. math::

        \theta' = \begin{cases} -\theta & \text{mode = flip} \\
        \theta + s\, \xi,\ \xi \sim \mathcal{N}(0, I) \text{ drawn from } \texttt{key} & \text{mode = noise}
        \end{cases}, \qquad m' = 0

    with :math:`\theta` the Byzantine peer's parameters and m its momentum. Every colluder derives the
    same :math:`\theta'` (the noise comes from the shared ``key``, not from a per-peer seed), so their
    snapshots agree with each other. A joiner that took the state of one source, or of f of them, would
    start from it; the state transfer takes only a state f + 1 sources hand over.

    Parameters
    ----------
    mode : {"flip", "noise"}, default "flip"
    scale : float, default 1.0
        The noise's standard deviation (``mode="noise"``).
    key : int, default 0
        The colluders' shared seed of the noise.

    References
    ----------
    M. Castro, B. Liskov. "Practical Byzantine Fault Tolerance." OSDI 1999 (a replica fetching state
    accepts a checkpoint only with f + 1 matching digests).

    Examples
    --------
    >>> import numpy as np
    >>> import attacks
    >>> attacks.get("state_poisoning").served_state(np.array([1.0, -2.0]), np.array([0.5, 0.5]))
    (array([-1.,  2.]), array([0., 0.]))
    """

    needs_own = True
    reference = "Castro, Liskov, OSDI 1999"

    def __init__(self, mode: str = "flip", scale: float = 1.0, key: int = 0):
        self.mode = choice_param(self.name, "mode", mode, ("flip", "noise"))
        self.scale = float_param(self.name, "scale", scale, minimum=0.0)
        self.key = int_param(self.name, "key", key, minimum=0)

    def served_state(self, params: np.ndarray, momentum: np.ndarray | None
                     ) -> tuple[np.ndarray, np.ndarray | None]:
        if self.mode == "flip":
            poisoned = -params
        else:
            noise = np.random.default_rng(self.key).standard_normal(params.shape)
            poisoned = params + self.scale * noise
        return poisoned.astype(params.dtype), None if momentum is None else np.zeros_like(momentum)
