"""Deprecated location: caption matching lives next to the adapter training that uses it,
:mod:`anomalib_synth.training.captions`."""

import warnings

from ..training.captions import *  # noqa: F403
from ..training.captions import __all__  # noqa: F401

warnings.warn(
    "anomalib_synth.data.captions moved to anomalib_synth.training.captions",
    DeprecationWarning,
    stacklevel=2,
)
