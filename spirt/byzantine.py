"""What a Byzantine peer does differently from an honest one.

The last ``attack.byzantine`` peers of a run are Byzantine. A data attack poisons the minibatches of
their gradient functions (the functions receive the attack with their tasks); a model attack forges what
they send: the attack maps each recipient to the vector it gets (``attack.outgoing``), from the peer's
own honestly computed average and, for an omniscient attack, the honest peers' vectors of the round,
which the honest peers pushed into the Byzantine peer's inbox too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .config import Config
from .tensors import as_f32_bytes, from_f32_bytes


def is_byzantine(cfg: Config, index: int) -> bool:
    """Whether peer ``index`` of the run is one of its (last) Byzantine peers."""
    b = cfg.attack.byzantine
    return b > 0 and cfg.peers.count - b <= index < cfg.peers.count


def configured_defense(cfg: Config):
    """The aggregation rule as every peer builds it (a fresh object: the attack may keep its own state)."""
    import defenses

    return defenses.get(cfg.aggregation.defense, pre=cfg.aggregation.pre or None, **cfg.aggregation.params)


class Byzantine:
    """The attack of a Byzantine peer ``index``.

    An attack whose class sets ``needs_defense = True`` (the adaptive ones, see :mod:`attacks._adaptive`)
    is tuned against the rule the honest peers run: it receives ``defense=``, that rule built exactly as
    the peers build it (``aggregation.defense`` with ``aggregation.params`` and ``aggregation.pre``, ``f``
    included), and ``f = attack.byzantine`` when it takes ``f`` and ``attack.params`` does not set it.
    """

    def __init__(self, cfg: Config, index: int):
        import attacks

        name = cfg.attack.name
        params = dict(cfg.attack.params)
        info = attacks.info(name)
        if "seed" in info.params and "seed" not in params:
            params["seed"] = cfg.run.seed * 1000 + index  # each Byzantine peer its own noise
        if getattr(attacks.registry.cls(name), "needs_defense", False):
            params["defense"] = configured_defense(cfg)
            if "f" in info.params and "f" not in params:
                params["f"] = cfg.attack.byzantine
        self.attack = attacks.get(name, **params)
        self.omniscient = info.omniscient
        #: the honest peers: the first ones
        self.honest = range(cfg.peers.count - cfg.attack.byzantine)
        #: (name, params) handed to the gradient functions, for an attack on the data
        self.data_attack = (name, dict(cfg.attack.params)) if isinstance(self.attack, attacks.DataAttack) else None
        #: whether the published vectors are forged (an attack on the model)
        self.forges = isinstance(self.attack, attacks.ModelAttack)

    def outgoing(self, own_raw: bytes, recipients: list[int],
                 read_honest: Callable[[], list[bytes]]) -> dict[int, bytes]:
        """What to send each recipient instead of our honest average ``own_raw``. ``read_honest`` returns
        the honest peers' vectors of the round (waiting for them), read only by omniscient attacks."""
        if not self.forges:
            return {q: own_raw for q in recipients}
        own = from_f32_bytes(own_raw)
        honest = None
        if self.omniscient:
            vecs = [from_f32_bytes(b) for b in read_honest()]
            honest = np.stack(vecs) if vecs else own[None, :]
        forged = self.attack.outgoing(recipients, honest=honest, own=own)
        encoded: dict[int, bytes] = {}  # each distinct vector encoded (and later signed) once
        out = {}
        for q in recipients:
            vec = forged[q]
            if id(vec) not in encoded:
                encoded[id(vec)] = as_f32_bytes(np.asarray(vec, dtype=np.float32)).tobytes()
            out[q] = encoded[id(vec)]
        return out
