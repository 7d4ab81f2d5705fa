"""Byzantine attacks: what a Byzantine peer publishes (model attacks) or trains on (data attacks).

Public API
----------
``get(name, **params)``
    Build a registered attack with its hyperparameters.
``names(kind=None, omniscient=None)``, ``info(name)``
    Registered names (optionally filtered by ``kind`` "data"/"model" and by ``omniscient``) and their
    metadata (:class:`AttackInfo`: kind, omniscient, summary, reference, defaults).

Model attacks: ``attack(honest=None, own=None) -> (d,)`` with ``honest`` the (h, d) honest vectors of
the round (read by omniscient attacks) and ``own`` the Byzantine peer's own honestly computed (d,) average
gradient (read by non-omniscient ones); numpy or torch, the output matches ``own`` if given, else
``honest``. Data attacks: ``attack.poison(x, y) -> (x, y)``; called as a model attack they return ``own``.

What a Byzantine peer actually pushes is ``attack.outgoing(recipients, honest=None, own=None) -> {peer
index: (d,) vector}``, one vector per recipient: by default the vector of ``attack(honest, own)``,
computed once, for every recipient.

Adding an attack: one module in this package with a class derived from :class:`ModelAttack` or
:class:`DataAttack`, decorated with ``@register("name")``; modules are imported automatically. Implement
``forge(honest, own)`` (numpy in, numpy (d,) out; the base class converts from and to torch), or
``poison(x, y)`` for a data attack. To send different vectors to different peers (equivocation), also
override ``outgoing``: it receives the recipients' peer indices and returns a vector for each, e.g.

.. code-block:: python

    @register("split_view")
    class SplitView(ModelAttack):
        # tells the even peers +own and the odd ones -own
        needs_own = True

        def forge(self, honest, own):
            return own.copy()

        def outgoing(self, recipients, honest=None, own=None):
            v = self(honest=honest, own=own)
            return {q: v if q % 2 == 0 else -v for q in recipients}

An attack on the peer-to-peer protocol itself (kind "protocol": equivocation, dissensus, omission,
rushing, round-mark inflation, state poisoning, framing, stale replay) derives from
:class:`attacks._protocol.ProtocolAttack`, whose hooks say what the Byzantine peer does besides choosing
its vector: whom it sends to, when, the round mark it advertises, the state it serves joiners, whom it
frames, which earlier messages it replays.

An adaptive attack, tuned against the defense the honest peers run (``optimal_alie``, ``optimal_ipm``,
``adaptive_equivocation``), also derives from :class:`attacks._adaptive.Adaptive`: the Byzantine peer
hands it that rule as ``defense=`` (see :mod:`attacks._adaptive`).

Give the class docstring a one-line summary (``spirt list`` shows it), the formula, parameters, the
reference, and an ``Examples`` section with a small numpy example and its exact output: the test suite
runs every example as a doctest.
"""

from __future__ import annotations

from typing import Any

from ._base import Attack, AttackInfo, DataAttack, ModelAttack, register, registry
from ._protocol import ProtocolAttack

registry.load_package(__name__, __path__)


def get(name: str, **params: Any) -> Attack:
    """Instantiate the attack ``name`` (or an alias) with ``params``."""
    return registry.get(name, **params)


def names(kind: str | None = None, omniscient: bool | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by ``kind`` ("data"/"model"/"protocol") and
    ``omniscient``."""
    if kind not in (None, "data", "model", "protocol"):
        raise ValueError(f"kind must be None, 'data', 'model' or 'protocol' (got {kind!r})")
    out = []
    for n in registry.names():
        cls = registry.cls(n)
        if (kind is None or cls.kind == kind) and (omniscient is None or cls.omniscient == omniscient):
            out.append(n)
    return out


def info(name: str) -> AttackInfo:
    """Metadata of the attack ``name`` (or an alias)."""
    return registry.info(name)


__all__ = ["get", "names", "info", "register", "Attack", "ModelAttack", "DataAttack", "ProtocolAttack",
           "AttackInfo"]
