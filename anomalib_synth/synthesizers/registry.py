"""Short names for synthesizers, so that the CLI and YAML configs can name them."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from .base import Synthesizer

_REGISTRY: dict[str, type[Synthesizer]] = {}
_LAZY: dict[str, tuple[str, str]] = {}
S = TypeVar("S", bound=type[Synthesizer])


def register(name: str) -> Callable[[S], S]:
    """Class decorator: register a :class:`Synthesizer` under ``name`` (also set as its ``name`` attribute)."""

    def wrap(cls: S) -> S:
        _LAZY.pop(name, None)
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            msg = f"synthesizer name {name!r} is already registered by {_REGISTRY[name].__qualname__}"
            raise ValueError(msg)
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def register_lazy(name: str, target: str, description: str) -> None:
    """Register ``"module:Class"`` under ``name`` without importing it (for heavy optional dependencies)."""
    if name not in _REGISTRY:
        _LAZY[name] = (target, description)


ENTRY_POINT_GROUP = "anomalib_synth.synthesizers"
"""Other packages register synthesizers under this entry-point group: ``name = "package.module:Class"``."""

_entry_points_loaded = False


def _load_entry_points() -> None:
    """Register (lazily) every synthesizer that installed packages declare in :data:`ENTRY_POINT_GROUP`."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        register_lazy(entry.name, entry.value, f"(plugin {entry.value})")


def names(kind: str | None = None, requires_weights: bool | None = None) -> list[str]:
    """Registered names, sorted, optionally only those of ``kind`` (``"classical"``, ``"diffusion"``) or with the
    given ``requires_weights``. Filtering imports the lazily registered classes."""
    selected = []
    for name in available():
        if kind is None and requires_weights is None:
            selected.append(name)
            continue
        cls = get_class(name)
        if (kind is None or cls.kind == kind) and (
            requires_weights is None or cls.requires_weights == requires_weights
        ):
            selected.append(name)
    return selected


def available() -> dict[str, str]:
    """``{short name: one-line description}`` of every registered synthesizer, sorted by name."""
    _load_entry_points()
    entries = {name: cls.description for name, cls in _REGISTRY.items()}
    entries.update({name: description for name, (_, description) in _LAZY.items()})
    return dict(sorted(entries.items()))


def get_class(name: str) -> type[Synthesizer]:
    """The synthesizer class registered under ``name``; ``ValueError`` listing the choices otherwise."""
    _load_entry_points()
    if name in _LAZY:
        module, _, attr = _LAZY[name][0].partition(":")
        return getattr(importlib.import_module(module), attr)
    try:
        return _REGISTRY[name]
    except KeyError:
        msg = f"unknown synthesizer {name!r}; available: {', '.join(available())}"
        raise ValueError(msg) from None


def constructor_arguments(cls: type) -> list[str] | None:
    """Names of the keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the MRO (``None``: any)."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return sorted(set(names))
    return None


def get(name: str, **kwargs: Any) -> Synthesizer:
    """Build the synthesizer registered under ``name`` with ``kwargs``, e.g. ``get("perlin", beta=(0.5, 1.0))``.

    Raises:
        ValueError: for an unknown name, or an argument the synthesizer does not take (the message lists those it
            takes).
    """
    cls = get_class(name)
    accepted = constructor_arguments(cls)
    unknown = sorted(set(kwargs) - set(accepted)) if accepted is not None else []
    if unknown:
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        msg = (
            f"synthesizer {name!r} takes no argument {', '.join(map(repr, unknown))}{hint}; "
            f"it takes: {', '.join(accepted)}"
        )
        raise ValueError(msg)
    return cls(**kwargs)
