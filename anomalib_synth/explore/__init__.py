"""``anomalib-synth explore``: see what a synthesizer makes, with its controls, before you train.

The core is free of any web framework: :mod:`.controls` (controls derived from a synthesizer's constructor),
:mod:`.sources` (images as ``anomalib-synth generate`` reads them), :mod:`.availability` (weights reachable offline),
:mod:`.reproduce` (the YAML block and command line) and :mod:`.session` (:class:`Explorer`: settings -> preview).
:mod:`.app` is the Gradio page over it (``pip install -e ".[explore]"``).
"""

from .controls import Control, derive_controls
from .session import Explorer, Preview, Request

__all__ = ["Control", "Explorer", "Preview", "Request", "derive_controls"]
