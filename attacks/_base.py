"""Base classes and registry of the attacks (shares the registry machinery of ``defenses``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from defenses._arrays import as_matrix, as_vector
from defenses._registry import Registry, default_params, summary_of


@dataclass(frozen=True)
class AttackInfo:
    """Metadata of a registered attack, as returned by :func:`attacks.info`."""

    name: str
    #: "data" (poisons the training data) | "model" (forges the published vector) | "protocol" (also
    #: attacks the exchange: whom it sends to and when, marks, states, evidence, replays)
    kind: str
    omniscient: bool  # True if it reads the honest peers' published vectors of the round
    summary: str
    reference: str
    params: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "omniscient": self.omniscient,
            "summary": self.summary,
            "reference": self.reference,
            "params": dict(self.params),
            "aliases": list(self.aliases),
        }


def _describe(name: str, cls: type) -> AttackInfo:
    return AttackInfo(
        name=name,
        kind=cls.kind,
        omniscient=cls.omniscient,
        summary=summary_of(cls),
        reference=cls.reference,
        params=default_params(cls),
        aliases=tuple(getattr(cls, "aliases", ())),
    )


registry = Registry("attack", _describe)


def register(name: str, aliases: tuple[str, ...] = ()):
    """Class decorator: register an attack under ``name`` (``aliases`` are also accepted by ``get``)."""
    return registry.register(name, aliases)


def honest_input(owner: str, honest: Any) -> tuple[np.ndarray, Any]:
    """The honest vectors an omniscient attack's ``outgoing`` was given, as an (h, d) float64 matrix, and
    the function restoring a (d,) result to their kind; an error naming ``owner`` when there are none."""
    if honest is None:
        raise ValueError(f"{owner} is omniscient: it needs the honest vectors (h, d) of the round")
    x, restore = as_matrix(honest, "honest")
    return x.astype(np.float64), restore


class Attack:
    """Common part of data and model attacks.

    Every attack can be called like a model attack, ``attack(honest=None, own=None) -> (d,)``, giving the
    vector the Byzantine peer publishes: ``honest`` is the (h, d) matrix of the honest peers' published
    vectors of the round, ``own`` the (d,) vector the Byzantine peer computed itself (on poisoned data for a
    data attack). The result has the kind (numpy/torch), dtype and device of ``own`` if given, else of
    ``honest``.
    """

    name: ClassVar[str] = "attack"
    kind: ClassVar[str] = ""
    omniscient: ClassVar[bool] = False
    reference: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    needs_own: ClassVar[bool] = False  # __call__ requires `own`
    needs_honest: ClassVar[bool] = False  # __call__ requires `honest`

    def __call__(self, honest: Any = None, own: Any = None) -> Any:
        if self.needs_honest and honest is None:
            raise ValueError(f"{self.name} is omniscient: it needs the honest vectors (h, d) of the round")
        if self.needs_own and own is None:
            raise ValueError(f"{self.name} needs `own`, the Byzantine peer's own (d,) vector")
        if honest is None and own is None:
            raise ValueError(f"{self.name}: give `honest` (h, d) and/or `own` (d,)")
        h = v = None
        restore = None
        if own is not None:
            v, restore = as_vector(own, "own")
        if honest is not None:
            h, restore_h = as_matrix(honest, "honest")
            restore = restore or restore_h
            if v is not None and h.shape[1] != v.shape[0]:
                raise ValueError(
                    f"{self.name}: honest vectors have length {h.shape[1]} but own has length {v.shape[0]}"
                )
        return restore(self.forge(h, v))

    def forge(self, honest: np.ndarray | None, own: np.ndarray | None) -> np.ndarray:
        """Numpy core: the published (d,) vector."""
        raise NotImplementedError

    def outgoing(self, recipients: Iterable[int], honest: Any = None, own: Any = None) -> dict[int, Any]:
        """What the Byzantine peer sends to each recipient: ``{peer index: (d,) vector}``.

        ``honest`` and ``own`` are those of :meth:`__call__`. By default the attack is computed once and
        the same vector goes to every recipient (treat it as read-only: it is one object). An attack
        that equivocates, sending different vectors to different peers, overrides this method.

        Examples
        --------
        >>> import numpy as np
        >>> import attacks
        >>> attacks.get("sign_flip", scale=-2.0).outgoing([0, 2], own=np.array([1.0, -0.5]))
        {0: array([-2.,  1.]), 2: array([-2.,  1.])}
        """
        peers = [int(q) for q in recipients]
        if not peers:
            return {}
        vector = self(honest=honest, own=own)
        return {q: vector for q in peers}

    def params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in default_params(type(self)) if hasattr(self, k)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class ModelAttack(Attack):
    """Forges the vector a Byzantine peer publishes."""

    kind: ClassVar[str] = "model"


class DataAttack(Attack):
    """Poisons the training data inside the Byzantine peer's gradient functions.

    ``poison(x, y) -> (x, y)`` is applied to each minibatch. Called as a model attack, a data attack
    publishes ``own`` unchanged (the gradient honestly computed on poisoned data).
    """

    kind: ClassVar[str] = "data"
    needs_own: ClassVar[bool] = True

    def poison(self, x: Any, y: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def forge(self, honest: np.ndarray | None, own: np.ndarray | None) -> np.ndarray:
        return own.copy()
