"""k-shot evaluation harness: what synthetic anomalies buy a real detector, measured on real defects."""

from .data import CategoryData, load_category
from .protocols import CONTROLS, PROTOCOLS, Budget
from .runner import EvalConfig, evaluate
from .scores import METRICS, evaluate_maps

__all__ = ["CONTROLS", "METRICS", "PROTOCOLS", "Budget", "CategoryData", "EvalConfig", "evaluate", "evaluate_maps",
           "load_category"]
