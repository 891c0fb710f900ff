"""PatchCore refiner: PatchCore's normalised map plus a zero-initialised correction trained per category on synthetic
anomalies (after PCSNet and PNI). ``torch_model`` and ``training`` are plain torch; ``lightning_model`` is the
anomalib model (imported lazily: ``from anomalib_synth.models import PatchcoreRefiner``)."""

from .torch_model import PatchcoreRefinerModel, RefinerHead
from .training import train_refiner

__all__ = ["PatchcoreRefiner", "PatchcoreRefinerModel", "RefinerHead", "train_refiner"]


def __getattr__(name: str):  # noqa: ANN202
    if name == "PatchcoreRefiner":
        from .lightning_model import PatchcoreRefiner

        return PatchcoreRefiner
    raise AttributeError(name)
