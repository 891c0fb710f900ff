"""Test aliases of :mod:`anomalib_synth.toydata` (a tiny Folder data set from scikit-image photos)."""

from anomalib_synth.toydata import make_toy_folder as make_folder_dataset
from anomalib_synth.toydata import toy_folder_datamodule as folder_datamodule

__all__ = ["folder_datamodule", "make_folder_dataset"]
