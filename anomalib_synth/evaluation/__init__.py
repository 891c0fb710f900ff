"""k-shot evaluation harness: what synthetic anomalies buy a real detector, measured on real defects.

Protocols are :class:`Protocol` classes in :data:`REGISTRY` (``segmentation``, ``draem``, ``anomalib``,
``patchcore``, ``supersimplenet``, ``glass``); :func:`register_protocol` adds one.
"""

from . import detectors, protocols  # noqa: F401  (register the protocols)
from .base import CONTROLS, REGISTRY, Budget, Outcome, Protocol, RunContext, get_protocol, register_protocol
from .data import CategoryData, load_category
from .runner import EvalConfig, evaluate
from .scores import METRICS, evaluate_maps

PROTOCOLS = tuple(REGISTRY)
"""Names of the protocols registered at import."""

__all__ = [
    "CONTROLS",
    "METRICS",
    "PROTOCOLS",
    "REGISTRY",
    "Budget",
    "CategoryData",
    "EvalConfig",
    "Outcome",
    "Protocol",
    "RunContext",
    "evaluate",
    "evaluate_maps",
    "get_protocol",
    "load_category",
    "register_protocol",
]
