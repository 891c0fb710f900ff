"""The project's exceptions, in one place low in the layers, so that any module (and the CLI) can name them.

Each one derives from the built-in exception that callers would already catch: bad input is a ``ValueError``, missing
weights an ``OSError``.
"""

from __future__ import annotations

__all__ = [
    "USER_ERRORS",
    "BackboneWeightsError",
    "ImageReadError",
    "ModelNotFoundError",
    "RunMismatchError",
    "UnsupportedImageError",
    "one_line",
]


class ImageReadError(ValueError):
    """An image file cannot be read (missing, corrupt, truncated, or not an image)."""


class UnsupportedImageError(ImageReadError):
    """A readable image that anomalib's own reader would silently get wrong (e.g. 16-bit grayscale turns white)."""


class ModelNotFoundError(OSError):
    """A model's weights are neither in a local folder nor reachable on (or cached from) the Hub."""


class BackboneWeightsError(ValueError):
    """A backbone weights file that does not fit its architecture, or pretrained weights that cannot be reached
    (:mod:`anomalib_synth.backbones`)."""


class RunMismatchError(ValueError):
    """An output folder holds a run made with different settings."""


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
"""What the command line reports as one line: bad input (``ValueError``) and missing files or weights (``OSError``),
which include every exception above."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (multi-line messages from libraries are joined)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__
