"""CutPaste-scar (Li et al., "CutPaste: Self-Supervised Learning for Anomaly Detection and Localization", CVPR 2021,
Sec. 3.1): thin, long, rotated patches pasted elsewhere, as a synthesizer of its own (``scar``)."""

from __future__ import annotations

from .cutpaste import CutPasteSynthesizer
from .registry import register


@register("scar")
class ScarSynthesizer(CutPasteSynthesizer):
    """CutPaste in ``scar`` mode: thin, long, rotated patches (``cutpaste`` with ``mode="scar"``, longer scars).

    Departure from the CutPaste paper (Li et al., CVPR 2021, Sec. 3.1), on purpose: the paper's scars (2-16 x 10-25 px
    at 256 px) cover 0.1-0.4 % of the image and are hard to see; real scratches in inspection images (MVTec AD) run
    over much more of the part. Here they default to 4-16 x 32-96 px at 256 px (about 0.9 % of the image). The paper's
    sizes remain ``cutpaste`` with ``mode="scar"``, or ``scar_width=(2, 16), scar_height=(10, 25)``.
    """

    description = "CutPaste-scar: a thin, long, rotated patch pasted elsewhere (scratch-sized)"
    cost = "No network. As `cutpaste`, with thin patches."

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("mode", "scar")
        kwargs.setdefault("scar_width", (4.0, 16.0))
        kwargs.setdefault("scar_height", (32.0, 96.0))
        super().__init__(**kwargs)
