"""Deprecated location: the tiny random-weight models live in :mod:`anomalib_synth.testing`."""

import warnings

from ...testing import *  # noqa: F403
from ...testing import __all__  # noqa: F401

warnings.warn(
    "anomalib_synth.synthesizers.diffusion.tiny moved to anomalib_synth.testing",
    DeprecationWarning,
    stacklevel=2,
)
