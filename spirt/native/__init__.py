"""The in-database tensor module (C): its source lives here and its build lands here."""

from __future__ import annotations

import sysconfig
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def module_path() -> Path:
    """Path of the built tensor module (a shared object to load with ``--loadmodule``).

    Raises FileNotFoundError with the build command when the package was installed without it.
    """
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    exact = _HERE / f"spirt_tensor{suffix}"
    if exact.exists():
        return exact
    found = sorted(_HERE.glob("spirt_tensor*.so"))
    if found:
        return found[0]
    raise FileNotFoundError(
        f"the spirt tensor module is not built in {_HERE}; run `pip install -e .` (or `pip install .`) "
        "from the source tree, which compiles spirt/native/tensor.c and kernels.c"
    )
