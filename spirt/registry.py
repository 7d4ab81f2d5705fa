"""One registry mechanism for every named, pluggable part: attacks, defenses, faults, models, data sets,
aggregation backends and executors.

A :class:`Registry` maps a name to a class (or a builder function). Each part registers itself with a
decorator in its own module; a package of parts imports every module of itself (:meth:`Registry.load_package`,
``pkgutil``), so that adding a part is one new file. There is no hand-kept table and no if/elif dispatch:
configuration checks, command-line help and ``spirt list`` read the names from here.

This module imports nothing heavy (no torch, no numpy): the launcher validates a configuration against
the registries before any process starts.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from collections.abc import Callable, Iterable
from typing import Any


class Registry:
    """A name -> class table filled by a decorator.

    Parameters
    ----------
    what:
        Noun used in error messages ("defense", "attack").
    describe:
        ``describe(name, cls) -> info`` builds the metadata object returned by :meth:`info` (default:
        the first paragraph of the class docstring).
    sort:
        :meth:`names` lists the names sorted (default) or, with ``sort=False``, in registration order
        (for tables whose first entry is the default and whose order means something, e.g. models from
        small to large).

    Examples
    --------
    >>> shapes = Registry("shape")
    >>> @shapes.register("square", aliases=("sq",))
    ... class Square:
    ...     '''A square of side a.'''
    ...     def __init__(self, a: float = 1.0):
    ...         self.a = a
    >>> shapes.names(), "SQ" in shapes, shapes.canonical("sq")
    (['square'], True, 'square')
    >>> shapes.get("sq", a=2.0).a
    2.0
    >>> shapes.get("square", b=1)
    Traceback (most recent call last):
    ...
    ValueError: square: unknown parameter(s) 'b'; accepted: a
    >>> shapes.get("circle")
    Traceback (most recent call last):
    ...
    ValueError: unknown shape 'circle'; allowed: square
    """

    def __init__(self, what: str, describe: Callable[[str, type], Any] | None = None, sort: bool = True):
        self.what = what
        self._describe = describe or (lambda name, cls: summary_of(cls))
        self._sort = sort
        self._classes: dict[str, type] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, aliases: Iterable[str] = ()) -> Callable[[type], type]:
        """Class decorator registering ``cls`` under ``name``; ``aliases`` are accepted by :meth:`get`
        and :meth:`info` but not listed by :meth:`names`."""
        aliases = tuple(aliases)
        for key in (name, *aliases):
            if not key or key != key.lower() or not key.replace("_", "").replace("-", "").isalnum():
                raise ValueError(
                    f"invalid {self.what} name {key!r}: use lower-case letters, digits, '-' or '_'"
                )

        def decorator(cls: type) -> type:
            for key in (name, *aliases):
                owner = self._classes.get(self._aliases.get(key, key))
                if owner is not None and owner is not cls:
                    raise ValueError(
                        f"{self.what} name {key!r} is registered twice "
                        f"({owner.__module__} and {cls.__module__})"
                    )
            cls.name = name
            cls.aliases = aliases
            self._classes[name] = cls
            for alias in aliases:
                self._aliases[alias] = name
            return cls

        return decorator

    def load_package(self, package_name: str, package_path: Iterable[str]) -> None:
        """Import every public module of a package so that their decorators run."""
        for mod in pkgutil.iter_modules(package_path):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{package_name}.{mod.name}")

    def names(self) -> list[str]:
        """The registered names (aliases excluded), sorted or in registration order (see ``sort``)."""
        return sorted(self._classes) if self._sort else list(self._classes)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._aliases.get(name.lower(), name.lower()) in self._classes

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or one of its aliases (case-insensitive)."""
        key = name.lower() if isinstance(name, str) else name
        key = self._aliases.get(key, key)
        if key not in self._classes:
            raise ValueError(f"unknown {self.what} {name!r}; allowed: {', '.join(self.names())}")
        return key

    def cls(self, name: str) -> type:
        """The class (or builder function) registered under ``name`` or one of its aliases."""
        return self._classes[self.canonical(name)]

    def get(self, name: str, **params: Any) -> Any:
        """Instantiate the class (or call the builder) registered under ``name`` with keyword parameters;
        a parameter it does not take is an error naming the accepted ones."""
        cls = self.cls(name)
        accepted = accepted_params(cls)
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ValueError(
                f"{cls.name}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"accepted: {', '.join(accepted) or '(none)'}"
            )
        return cls(**params)

    def info(self, name: str) -> Any:
        key = self.canonical(name)
        return self._describe(key, self._classes[key])


def _keyword_parameters(cls: Callable) -> list[inspect.Parameter]:
    """Keyword parameters of a class's ``__init__`` (without ``self``) or of a builder function."""
    target = cls.__init__ if isinstance(cls, type) else cls
    return [
        p
        for p in inspect.signature(target).parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def accepted_params(cls: Callable) -> list[str]:
    """Names of the keyword parameters of ``cls.__init__`` (excluding ``self``), or of a builder function."""
    return [p.name for p in _keyword_parameters(cls)]


def default_params(cls: Callable) -> dict[str, Any]:
    """Defaults of the keyword parameters of ``cls.__init__`` (or of a builder function)."""
    return {p.name: p.default for p in _keyword_parameters(cls)}


def summary_of(cls: Callable) -> str:
    """First paragraph of the class (or function) docstring, on one line."""
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


# reST markup that may appear in a summary, and the LaTeX of its inline math, as plain text
_ROLE = re.compile(r":([\w:.-]+):`([^`]*)`")
_LITERAL = re.compile(r"``([^`]*)``")
_LATEX_WRAPPERS = re.compile(r"\\(?:mathcal|mathrm|mathbf|mathit|operatorname|text|textrm)\s*\{([^{}]*)\}")
_LATEX_FRAC = re.compile(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_COMMAND = re.compile(r"\\([A-Za-z]+|.)")
_LATEX_SYMBOLS = {
    "mapsto": "->", "to": "->", "rightarrow": "->", "leftarrow": "<-", "Rightarrow": "=>",
    "le": "<=", "leq": "<=", "ge": ">=", "geq": ">=", "ne": "!=", "neq": "!=", "approx": "~",
    "cdot": "*", "times": "x", "pm": "+-", "in": "in", "infty": "inf", "dots": "...", "ldots": "...",
    "cdots": "...", "lVert": "|", "rVert": "|", "|": "|", "lvert": "|", "rvert": "|", "mid": "|",
    "varepsilon": "epsilon", "epsilon": "epsilon", "lfloor": "floor(", "rfloor": ")",
    "lceil": "ceil(", "rceil": ")", "left": "", "right": "", "big": "", "Big": "",
    ",": " ", ";": " ", ":": " ", "!": "", " ": " ", "quad": " ", "qquad": " ",
    "_": "_", "%": "%", "&": "&", "#": "#", "$": "$",
}
# escaped braces stand in for literal ones while the grouping braces are dropped
_BRACES = {"{": "\x00", "}": "\x01"}


def _operand(tex: str) -> str:
    tex = tex.strip()
    return tex if re.fullmatch(r"[\w.^\\]+", tex) else f"({tex})"


def _plain_math(tex: str) -> str:
    previous = None
    while previous != tex:  # innermost first, so nested wrappers unwind
        previous = tex
        tex = _LATEX_WRAPPERS.sub(r"\1", tex)
        tex = _LATEX_FRAC.sub(lambda m: f"{_operand(m.group(1))}/{_operand(m.group(2))}", tex)
    tex = _LATEX_COMMAND.sub(lambda m: _BRACES.get(m.group(1)) or _LATEX_SYMBOLS.get(m.group(1), m.group(1)), tex)
    tex = tex.replace("{", "").replace("}", "").replace("\x00", "{").replace("\x01", "}")
    return " ".join(tex.split())


def plain_text(text: str) -> str:
    r"""Docstring text (reST with inline LaTeX) as plain text for a terminal.

    Roles lose their markup (``:math:`` content is turned into plain notation, a ``~`` target keeps only
    its last component) and double-backquoted literals their backquotes.

    >>> plain_text(r"publish :math:`\|x\|` times ``factor``, see :class:`~attacks.ipm.IPM`")
    'publish |x| times factor, see IPM'
    >>> plain_text(r"i.i.d. :math:`\mathcal{N}(\mu, \sigma^2)` entries; :math:`y \mapsto C - 1 - y`")
    'i.i.d. N(mu, sigma^2) entries; y -> C - 1 - y'
    >>> plain_text(r":math:`\gamma^* = \max\{\gamma \ge 0\}`, :math:`\frac{1}{n} \sum_{i=1}^{n} x_i`")
    'gamma^* = max{gamma >= 0}, 1/n sum_i=1^n x_i'
    """

    def role(m: re.Match) -> str:
        kind, content = m.group(1).rsplit(":", 1)[-1], m.group(2)
        if kind == "math":
            return _plain_math(content)
        if content.startswith("~"):
            return content[1:].rsplit(".", 1)[-1]
        return content

    text = _ROLE.sub(role, text)
    text = _LITERAL.sub(r"\1", text)
    return text.replace(".. math::", "").strip()
