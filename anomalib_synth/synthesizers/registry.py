"""Short names for synthesizers, so that the CLI and YAML configs can name them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .base import Synthesizer

_REGISTRY: dict[str, type[Synthesizer]] = {}
S = TypeVar("S", bound=type[Synthesizer])


def register(name: str) -> Callable[[S], S]:
    """Class decorator: register a :class:`Synthesizer` under ``name`` (also set as its ``name`` attribute)."""

    def wrap(cls: S) -> S:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            msg = f"synthesizer name {name!r} is already registered by {_REGISTRY[name].__qualname__}"
            raise ValueError(msg)
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> dict[str, str]:
    """``{short name: one-line description}`` of every registered synthesizer, sorted by name."""
    return {name: cls.description for name, cls in sorted(_REGISTRY.items())}


def get_class(name: str) -> type[Synthesizer]:
    """The synthesizer class registered under ``name``; ``ValueError`` listing the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        msg = f"unknown synthesizer {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        raise ValueError(msg) from None


def get(name: str, **kwargs: Any) -> Synthesizer:
    """Build the synthesizer registered under ``name`` with ``kwargs``, e.g. ``get("perlin", beta=(0.5, 1.0))``."""
    return get_class(name)(**kwargs)
