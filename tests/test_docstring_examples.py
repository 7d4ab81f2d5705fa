"""The examples in the docstrings run as doctests: every defense and attack shows a tiny numpy input with
its exact output, and so does the registry; an example that no longer holds fails the suite."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import attacks
import defenses

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules() -> list[str]:
    mods = []
    for pkg in (defenses, attacks):
        mods.append(pkg.__name__)
        mods += [f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
    return [*mods, "spirt.registry", "spirt.wire", "spirt.servers", "spirt.shared"]


@pytest.mark.parametrize("module", _modules())
def test_docstring_examples_hold(module):
    mod = importlib.import_module(module)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report: list[str] = []
    for test in doctest.DocTestFinder().find(mod, mod.__name__):
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(report)


@pytest.mark.parametrize("pkg", [defenses, attacks], ids=["defenses", "attacks"])
def test_every_rule_and_attack_has_an_example(pkg):
    for name in pkg.names():
        cls = pkg.registry.cls(name)
        tests = doctest.DocTestFinder(recurse=False).find(cls, name)
        assert tests and tests[0].examples, f"{pkg.__name__} {name!r}: no doctest example in its docstring"


def test_a_failing_example_is_reported():
    # the check above must not pass vacuously: a wrong expected output is a failure
    bad = doctest.DocTestParser().get_doctest(
        ">>> import numpy as np\n>>> import defenses\n>>> defenses.get('median')(np.array([[1.], [3.]]))\n"
        "array([1.])\n", {}, "bad", None, 0
    )
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    runner.run(bad, out=lambda _: None)
    assert runner.summarize(verbose=False).failed == 1
