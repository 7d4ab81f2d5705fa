"""A peer's model outside its database: the seeded initial parameters, and test accuracy of a state.

The orchestrator never trains (its functions do); it builds the model once to write the initial
parameters (the same on every peer, from the run's seed) and to evaluate the parameters it holds.
"""

from __future__ import annotations

import hashlib

from .config import Config
from .shared import Shared

#: evaluations shared by the peers of one process (peers as threads hold bit-identical models most of
#: the time: one evaluation serves them all), keyed by the test set, the model and a digest of the
#: parameters
_SHARED = Shared(keep=64)


class Evaluator:
    """The run's model and test data, built on first use (torch is imported then)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._state = None

    def _build(self):
        if self._state is None:
            from .data import load_dataset
            from .models import build_model
            from .tensors import FlatParams

            c = self.cfg
            ds = load_dataset(c.data.dataset, c.data.data_dir, limit_train=1, limit_test=c.data.limit_test)
            model = build_model(c.model.name, ds.channels, ds.num_classes, ds.image_size, c.run.seed,
                                norm=c.model.norm)
            self._state = (model, FlatParams(model), ds)
        return self._state

    def warm(self) -> None:
        """Build the model and load the test data now (a joining peer does it before it asks to join)."""
        self._build()

    def initial(self) -> tuple[memoryview, int]:
        """(raw float32 bytes, number of floats) of the seeded initial parameters."""
        _, flat, _ = self._build()
        return flat.params_bytes(), flat.numel

    def evaluate(self, params: bytes, full: bool = False) -> tuple[float, float]:
        """(test loss, test accuracy) of ``params``: on ``run.eval_samples`` test images, or all of them.
        A peer of this process that evaluated the same parameters on the same test images already (or
        is evaluating them now) gives its result: evaluation is deterministic."""
        from .functions import evaluate

        c, samples = self.cfg, 0 if full else self.cfg.run.eval_samples
        key = (c.data.dataset, c.data.data_dir, c.data.limit_test, c.model.name, c.model.norm, samples,
               hashlib.blake2b(params, digest_size=16).digest())

        def compute() -> tuple[float, float]:
            model, flat, ds = self._build()
            return evaluate(model, flat, ds, params, samples=samples)

        return _SHARED.get(key, compute)
