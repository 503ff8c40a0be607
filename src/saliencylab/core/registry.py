"""One registry type for everything chosen by name: methods, metrics, environments, suites, baselines.

A registry maps names to classes (or factories). Metadata lives on the registered class (a method's
`differentiable`, a metric's `higher_is_better`, ...), never in the registry, so `available(**filters)`
can select by it. Parameters are declared once, on the class (`Param` attributes or the keyword
arguments of `__init__`), and `build` rejects unknown ones with one clear line.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import ConfigError, unknown_name

T = TypeVar("T")

_MISSING = object()


class Param:
    """A declared parameter: its default and a one-line description.

    Declared as a class attribute (`steps = Param(10, "optimisation steps")`); subclasses inherit and
    may override a declaration. `Configurable.__init__` accepts exactly the declared names.
    """

    def __init__(self, default: Any = _MISSING, doc: str = ""):
        self.default = default
        self.doc = doc
        self.name = ""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, instance, owner):
        if instance is None:
            return self
        try:
            return instance.__dict__[self.name]
        except KeyError:
            if self.default is _MISSING:
                raise AttributeError(self.name) from None
            return self.default

    def __set__(self, instance, value):
        instance.__dict__[self.name] = value

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def __repr__(self) -> str:
        return f"Param({'required' if self.required else repr(self.default)})"


def declared_params(cls) -> dict[str, Param]:
    """Every `Param` declared on `cls` or its bases, in declaration order (bases first)."""
    out: dict[str, Param] = {}
    for klass in reversed(cls.__mro__):
        for key, value in vars(klass).items():
            if isinstance(value, Param):
                out.pop(key, None)
                out[key] = value
    return out


def parameters_of(cls, skip: int = 1) -> dict[str, Any]:
    """A class's parameters and defaults: its declared `Param`s, else the keyword arguments of
    `__init__` after the first `skip` positional ones (the model, for methods)."""
    declared = declared_params(cls)
    if declared:
        return {name: (None if p.required else p.default) for name, p in declared.items()}
    sig = inspect.signature(cls.__init__)
    return {p.name: (None if p.default is inspect.Parameter.empty else p.default)
            for p in list(sig.parameters.values())[skip:]
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def check_known(kind: str, name: str, params: dict, known) -> None:
    unknown = [k for k in params if k not in known]
    if unknown:
        raise ConfigError(
            f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"for {kind} '{name}'; its parameters are: {', '.join(known) or '(none)'}"
        )


class Registry(Generic[T]):
    """Names -> classes, with did-you-mean on unknown names; see the module docstring."""

    def __init__(self, kind: str, *, base: type | None = None, skip: int = 1,
                 check: Callable[[type], None] | None = None):
        self.kind = kind
        self.base = base
        self.skip = skip  # positional constructor arguments before the parameters (model: 1)
        self._check = check
        self._items: dict[str, Any] = {}

    def register(self, cls=None, *, name: str | None = None):
        """Class decorator (or call): make `cls` available by `name` (default: `cls.name`)."""
        def add(c):
            key = name or getattr(c, "name", "")
            if not key:
                raise TypeError(f"{getattr(c, '__name__', c)} needs a `name` to be registered as a {self.kind}")
            if self._check is not None:
                self._check(c)
            if key in self._items and self._items[key] is not c:
                raise TypeError(f"{self.kind} name '{key}' is already registered by {self._items[key].__name__}")
            self._items[key] = c
            return c

        return add if cls is None else add(cls)

    def get(self, name):
        if self.base is not None and isinstance(name, type) and issubclass(name, self.base):
            return name
        if name not in self._items:
            raise unknown_name(self.kind, name, self._items)
        return self._items[name]

    def available(self, **filters) -> list[str]:
        """Registered names, optionally only those whose class attributes equal `filters`."""
        return sorted(n for n, c in self._items.items()
                      if all(getattr(c, k, _MISSING) == v for k, v in filters.items()))

    def parameters(self, name) -> dict[str, Any]:
        return parameters_of(self.get(name), self.skip)

    def build(self, name, *args, **params):
        """Instantiate by name; unknown parameters are one clear error."""
        cls = self.get(name)
        check_known(self.kind, getattr(cls, "name", str(name)), params, self.parameters(name))
        return cls(*args, **params)

    def describe(self) -> dict[str, str]:
        return {n: getattr(self._items[n], "description", "") for n in self.available()}

    def __contains__(self, name) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.available())

    def __len__(self) -> int:
        return len(self._items)
