"""The controls of a synthesizer, derived from its constructor: its signature, type hints and recorded config.

Every registered synthesizer, including third-party ones, gets controls without any explorer-specific code:

- ``tuple[float, float]`` / ``tuple[int, int]`` -> a ``"range"`` (min and max; empty when the default is ``None``);
- ``Literal[...]``, an ``Enum``, or a ``str`` argument the constructor checks with
  :func:`~anomalib_synth.synthesizers.validation.check_choice` -> a ``"choice"``;
- ``bool`` -> a ``"flag"``; ``int`` / ``float`` -> an ``"integer"`` / ``"number"``;
- the class's ``texture_argument`` -> a ``"folder"``; other strings and paths -> ``"text"``;
- anything else -> ``"yaml"`` (the value typed as YAML, as ``anomalib-synth generate -o KEY=VALUE`` reads it).

Defaults are the ones the synthesizer records (:meth:`Synthesizer.config`), so a subclass that changes its parent's
defaults through ``**kwargs`` (``scar`` over ``cutpaste``) shows its own.
"""

from __future__ import annotations

import ast
import enum
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import yaml

from ..synthesizers.base import Synthesizer, _jsonable

__all__ = ["FOREGROUND_ARGUMENT", "Control", "changed_arguments", "derive_controls", "plain", "yaml_text"]

FOREGROUND_ARGUMENT = "foreground"
"""Set by the explorer's foreground mode (auto / none / drawn) rather than by a control of its own."""

KINDS = ("range", "choice", "flag", "integer", "number", "folder", "text", "yaml")
_PROBE = "\x00explore-probe"


@dataclass(frozen=True)
class Control:
    """One constructor argument as the explorer shows it.

    Attributes:
        name (str): the argument's name.
        kind (str): one of :data:`KINDS`.
        default (Any): the recorded default, JSON-like (tuples as lists), ``None`` when unset.
        choices (tuple[str, ...]): the allowed values of a ``"choice"``.
        integer (bool): whether numbers (of a ``"range"`` too) are integers.
        optional (bool): whether ``None`` (an empty field) is allowed.
    """

    name: str
    kind: str
    default: Any = None
    choices: tuple[str, ...] = ()
    integer: bool = False
    optional: bool = False
    enum_type: type[enum.Enum] | None = None

    def ui_default(self) -> Any:
        """The default as the page shows it: ``(min, max)`` for a range, YAML text for ``"yaml"``, ``""`` for no
        text."""
        if self.kind == "range":
            return ("", "") if self.default is None else tuple(self.default)
        if self.kind == "yaml":
            return yaml_text(self.default)
        if self.kind in ("text", "folder"):
            return "" if self.default is None else str(self.default)
        return self.default

    def to_argument(self, raw: Any) -> Any:
        """The constructor value of what the page holds (``raw`` as :meth:`ui_default` gives it).

        Raises:
            ValueError: naming the argument, for a missing or unreadable value.
        """
        if self.kind == "range":
            low, high = (None if v == "" else v for v in raw) if raw is not None else (None, None)
            if low is None and high is None and self.optional:
                return None
            if low is None or high is None:
                msg = f"{self.name} needs both a min and a max, got ({low}, {high})"
                raise ValueError(msg)
            return (self._number(low), self._number(high))
        if self.kind in ("integer", "number"):
            if raw is None or str(raw).strip() == "":
                if self.optional:
                    return None
                msg = f"{self.name} needs a number"
                raise ValueError(msg)
            return self._number(raw)
        if self.kind == "flag":
            return bool(raw)
        if self.kind == "choice":
            return self.enum_type[raw] if self.enum_type is not None else raw
        if self.kind in ("text", "folder"):
            return None if (raw is None or str(raw).strip() == "") and self.optional else ("" if raw is None else raw)
        try:
            return yaml.safe_load(raw) if isinstance(raw, str) else raw
        except yaml.YAMLError as err:
            msg = f"{self.name} must be YAML (e.g. [1, 2] or 0.5), got {raw!r}: {err.problem}"
            raise ValueError(msg) from None

    def _number(self, value: Any) -> int | float:
        if self.integer:
            number = float(value)
            if number != int(number):
                msg = f"{self.name} must hold integers, got {value!r}"
                raise ValueError(msg)
            return int(number)
        return float(value)


def plain(value: Any) -> Any:
    """``value`` as YAML and the recorded config write it: tuples as lists, an ``Enum`` member as its name."""
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return _jsonable(value)


def yaml_text(value: Any) -> str:
    """``value`` as one line of flow-style YAML (``[0.2, 1.0]``, ``0.5``, ``auto``, ``null``)."""
    text = yaml.safe_dump(plain(value), default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def derive_controls(cls: type[Synthesizer]) -> tuple[Control, ...]:
    """The controls of ``cls``'s constructor arguments, in signature order (outermost class first).

    Arguments that do not change the output (``cls.config_ignore``), ``*args``/``**kwargs`` and ``foreground`` (the
    explorer's foreground mode) have none.
    """
    parameters = _constructor_parameters(cls)
    defaults = _recorded_defaults(cls, parameters)
    controls = []
    for name, (parameter, hint) in parameters.items():
        if name in cls.config_ignore or name == FOREGROUND_ARGUMENT:
            continue
        default = defaults.get(name, None if parameter.default is inspect.Parameter.empty else parameter.default)
        controls.append(_control(cls, name, hint, plain(default)))
    return tuple(controls)


def changed_arguments(controls: Sequence[Control], values: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments from the page's ``values`` (``{control name: raw value}``), only those that differ from
    their defaults (what the copied YAML and command line name).

    Raises:
        ValueError: for a value that cannot be read (see :meth:`Control.to_argument`).
    """
    arguments = {}
    for control in controls:
        if control.name not in values:
            continue
        value = control.to_argument(values[control.name])
        if plain(value) != control.default:
            arguments[control.name] = value
    return arguments


def _constructor_parameters(cls: type) -> dict[str, tuple[inspect.Parameter, Any]]:
    """``{name: (parameter, type hint or None)}`` of every keyword ``cls(...)`` takes, following ``**kwargs`` up the
    MRO as :func:`~anomalib_synth.synthesizers.registry.constructor_arguments` does."""
    found: dict[str, tuple[inspect.Parameter, Any]] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        init = inspect.unwrap(init)
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # unresolvable annotations: fall back to the defaults' types
            hints = {}
        parameters = inspect.signature(init).parameters.values()
        for p in parameters:
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                found.setdefault(p.name, (p, hints.get(p.name)))
        if not any(p.kind == p.VAR_KEYWORD for p in parameters) or klass is Synthesizer:
            break
    return found


def _recorded_defaults(cls: type[Synthesizer], parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults ``cls()`` records, for synthesizers that need no weights (signature defaults otherwise)."""
    if cls.requires_weights:
        return {}
    try:
        instance = cls()
    except Exception:  # a required argument, or a constructor that fails without one: keep the signature's
        return {}
    return dict(instance.__dict__.get("_init_config", {}))


def _control(cls: type[Synthesizer], name: str, hint: Any, default: Any) -> Control:
    optional, hint = _strip_none(hint)
    optional = optional or default is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return Control(name, "choice", default, tuple(str(a) for a in args), optional=optional)
    if inspect.isclass(hint) and issubclass(hint, enum.Enum):
        return Control(name, "choice", default, tuple(m.name for m in hint), optional=optional, enum_type=hint)
    if hint is bool or (hint is None and isinstance(default, bool)):
        return Control(name, "flag", default, optional=optional)
    if origin is tuple and len(args) == 2 and all(a in (int, float) for a in args) and len(set(args)) == 1:
        return Control(name, "range", default, integer=args[0] is int, optional=optional)
    if hint is None and _is_pair(default):
        return Control(name, "range", default, integer=all(isinstance(v, int) for v in default), optional=optional)
    if hint is int or (hint is None and isinstance(default, int)):
        return Control(name, "integer", default, integer=True, optional=optional)
    if hint is float or (hint is None and isinstance(default, float)):
        return Control(name, "number", default, optional=optional)
    if name == cls.texture_argument:
        return Control(name, "folder", default, optional=True)
    if _is_text(hint) or (hint is None and isinstance(default, str)):
        choices = _probe_choices(cls, name) if isinstance(default, str) else None
        if choices:
            return Control(name, "choice", default, choices, optional=optional)
        return Control(name, "text", default, optional=optional)
    return Control(name, "yaml", default, optional=optional)


def _strip_none(hint: Any) -> tuple[bool, Any]:
    """``(whether None is allowed, the hint without None)``; a union of several other types is left whole."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = typing.get_args(hint)
        rest = tuple(a for a in args if a is not type(None))
        if len(rest) == 1:
            return len(rest) < len(args), rest[0]
        return len(rest) < len(args), Union[rest]  # noqa: UP007  (a runtime union of the remaining types)
    return False, hint


def _is_text(hint: Any) -> bool:
    """``str``, a path, or a union of them."""
    import os
    from pathlib import Path

    members = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    return bool(members) and all(m in (str, Path, os.PathLike) for m in members)


def _is_pair(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def _probe_choices(cls: type[Synthesizer], name: str) -> tuple[str, ...] | None:
    """The choices a constructor that checks ``name`` with ``check_choice`` names in its error for a value it cannot
    take (only for synthesizers without weights, whose constructors are cheap)."""
    if cls.requires_weights:
        return None
    try:
        cls(**{name: _PROBE})
    except ValueError as err:
        match = re.search(rf"{re.escape(name)} must be one of (\(.*\)), got", str(err))
        if match:
            try:
                return tuple(str(c) for c in ast.literal_eval(match.group(1)))
            except (ValueError, SyntaxError):
                return None
    except Exception:
        return None
    return None
