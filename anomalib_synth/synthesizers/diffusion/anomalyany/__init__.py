"""AnomalyAny (Sun et al., CVPR 2025, arXiv 2406.01078): training-free anomaly generation with attention-guided
Stable Diffusion."""

from .synthesizer import AnomalyAnySynthesizer, attention_resolution

__all__ = ["AnomalyAnySynthesizer", "attention_resolution"]
