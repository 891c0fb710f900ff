"""PyTorch core of the PatchCore refiner: PatchCore's normalised map plus a learned, zero-initialised correction.

PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022) scores a patch by the
distance of its locally aware feature (Sec. 3.1) to the nearest patch feature of a memory bank of normal images
(Sec. 3.2-3.3); its pixel map is the nearest-neighbour distance upsampled and smoothed by a Gaussian of
sigma 4 (Sec. 3.3 and the implementation details). This model keeps that map as it is and learns only an additive
correction from synthetic anomalies, as:

- **PCSNet** (Jiang et al., "Prototypical Learning Guided Context-Aware Segmentation Network for Few-Shot Anomaly
  Detection", IEEE TNNLS 2024; repository ``yuxin-jiang/PCSNet``, ``main.py``): its context-aware segmentation
  network takes the adapted features and the prototype (nearest-normal) score, and is trained per category on
  NSA-style pseudo anomalies mixed with normal images (the method section's segmentation network and loss; section
  numbers not checked here);
- **PNI** (Bae et al., "PNI: Industrial Anomaly Detection using Position and Neighborhood Information", ICCV 2023,
  arXiv 2211.12634): its anomaly-map refinement step, a pixel-wise refinement network trained separately on
  synthetic defect images, which improves PatchCore-style maps beyond plain resizing (Fig. 2; reported to help
  mainly on textures).

Head inputs, all at the feature grid (stride of the first layer):

1. the memory-bank distance map of **each layer** (nearest neighbour within that layer's channels of the embedding
   and of the bank), and PatchCore's own distance map (nearest neighbour on the concatenated embedding);
2. ``|query - nearest memory feature|`` per channel, the nearest feature gathered at the location that
   :meth:`PatchcoreModel.nearest_neighbors` returns, reduced by a learned 1x1 convolution;
3. optionally (``use_query_features``) the query feature itself, reduced by a learned 1x1 convolution.

Each input is standardised by statistics measured on augmented normal views of the shots at :meth:`fit`, so the
head sees the same scale in every category. The head (3x3, 3x3, 1x1 convolutions) outputs a correction ``c`` on the
feature grid; it goes through PatchCore's smoothing (anomalib's :class:`AnomalyMapGenerator` kernel: nearest
upsampling, Gaussian sigma 4, applied separably) and is **added** to PatchCore's normalised pixel map ``z = (map - mu) / sigma``::

    refined = z + smooth(upsample(c))

Where this departs, and why:

- The correction is added to PatchCore's map and the head's last convolution is zero-initialised (as ControlNet's
  zero convolutions), so an untrained refiner *is* PatchCore: its map equals ``z`` bit for bit and ranks every pixel
  as PatchCore does. PCSNet and PNI replace the score by the head's output; with one shot and no real defects, a
  head that starts at PatchCore and is selected on synthetic validation (its snapshots) can never be forced below
  it by initialisation alone.
- One shot, not 8 (PCSNet) or the full training set (PNI); the memory bank holds every patch of the un-augmented
  shots (coreset ratio 1, as our ``control-patchcore``). Training queries are augmented views of the shots (pose
  and light, :mod:`anomalib_synth.views`), never the shots themselves: a shot matches itself at distance 0.
- No feature adaptor (PCSNet's prototype adaptor) and no position/neighbourhood memory (PNI): the backbone stays
  frozen and only the head trains, which keeps training within a CPU-minute per category.
- ``pred_score`` is the maximum of the refined map (PatchCore's re-weighted image score does not apply to
  a learned map).

Inputs are images in ``[0, 1]``; ImageNet normalisation happens inside the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from torch import Tensor, nn

from ...backbones import BUILTIN, register_builtin
from ...views import ViewRanges, augmented_views

__all__ = ["PatchcoreRefinerModel", "RefinerHead"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CHUNK = 1024  # query patches per distance matrix (PatchCore's own chunk size)


class RefinerHead(nn.Module):
    """The trainable part: input reductions, a small convolutional body, and the loss calibration ``a, b``.

    Args:
        n_distances (int): distance channels (one per layer, plus PatchCore's combined distance).
        embedding_dim (int): channels of the concatenated embedding.
        use_query_features (bool): also take the (standardised) query feature.
        reduced (int): channels of each 1x1 reduction. Defaults to ``8``.
        hidden (int): channels of the body. Defaults to ``32``.
    """

    def __init__(self, n_distances: int, embedding_dim: int, use_query_features: bool, reduced: int = 8,
                 hidden: int = 32) -> None:  # fmt: skip
        super().__init__()
        self.residual = nn.Conv2d(embedding_dim, reduced, 1)
        self.query = nn.Conv2d(embedding_dim, reduced, 1) if use_query_features else None
        width = n_distances + reduced * (2 if use_query_features else 1)
        self.body = nn.Sequential(
            nn.Conv2d(width, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.out = nn.Conv2d(hidden, 1, 1)
        # loss calibration: probability = sigmoid(exp(log_a) * (refined - b)), monotone in the refined map
        self.log_a = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.full((), 3.0))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-uniform init (PyTorch's default for convolutions) from ``generator``; the last convolution zero."""
        for conv in [m for m in self.modules() if isinstance(m, nn.Conv2d)]:
            nn.init.kaiming_uniform_(conv.weight, a=5**0.5, generator=generator)
            fan_in = conv.weight[0].numel()
            bound = 1 / fan_in**0.5
            with torch.no_grad():
                conv.bias.copy_((torch.rand(conv.bias.shape, generator=generator) * 2 - 1) * bound)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        with torch.no_grad():
            self.log_a.zero_()
            self.b.fill_(3.0)

    def forward(self, distances: Tensor, residual: Tensor, query: Tensor | None = None) -> Tensor:
        """Correction ``[B, 1, h, w]`` from distances ``[B, n, h, w]``, ``|residual|`` and query ``[B, C, h, w]``."""
        parts = [distances, self.residual(residual)]
        if self.query is not None:
            if query is None:
                msg = "this head was built with use_query_features=True: pass the query features"
                raise ValueError(msg)
            parts.append(self.query(query))
        return self.out(self.body(torch.cat(parts, 1)))

    def probability(self, refined: Tensor) -> Tensor:
        """``sigmoid(a * (refined - b))`` with ``a = exp(log_a) > 0``: the training loss's pixel probability."""
        return torch.sigmoid(self.log_a.exp() * (refined - self.b))


class PatchcoreRefinerModel(nn.Module):
    """PatchCore on the shots plus a zero-initialised head trained on synthetic anomalies (see the module doc).

    Args:
        backbone (str, optional): timm backbone of PatchCore. Defaults to ``"efficientnet_lite0.local"`` (ImageNet
            weights from a local file, :mod:`anomalib_synth.backbones`).
        layers (Sequence[str], optional): backbone layers of the embedding. Defaults to ``("blocks.1", "blocks.2")``.
        pre_trained (bool, optional): ImageNet weights for the backbone. Defaults to ``True``.
        use_query_features (bool, optional): give the head the query feature too. Defaults to ``False``.
        reduced (int, optional): channels of the head's 1x1 reductions. Defaults to ``8``.
        hidden (int, optional): channels of the head's body. Defaults to ``32``.
        seed (int, optional): seed of the head's initialisation. Defaults to ``0``.

    Example:
        >>> model = PatchcoreRefinerModel()                               # doctest: +SKIP
        >>> model.fit(shots, torch.Generator().manual_seed(0))             # doctest: +SKIP
        >>> refined, patchcore = model.maps(images)                        # doctest: +SKIP

    Notes:
        Images are float ``[N, 3, H, W]`` in ``[0, 1]`` (not normalised). Maps come at the input resolution.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0.local",
        layers: Sequence[str] = ("blocks.1", "blocks.2"),
        pre_trained: bool = True,
        use_query_features: bool = False,
        reduced: int = 8,
        hidden: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if backbone in BUILTIN:
            register_builtin()
        self.layers = tuple(layers)
        self.use_query_features = use_query_features
        self.patchcore = PatchcoreModel(layers=list(self.layers), backbone=backbone, pre_trained=pre_trained)
        self.patchcore.requires_grad_(False)
        dims = [int(d) for d in self.patchcore.feature_extractor.out_dims]
        self.slices = [(sum(dims[:i]), sum(dims[: i + 1])) for i in range(len(dims))]
        n_distances = len(dims) + 1
        self.head = RefinerHead(n_distances, sum(dims), use_query_features, reduced, hidden)
        self.head.reset_parameters(torch.Generator().manual_seed(seed))
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # normalisation statistics, measured on augmented normal views of the shots by fit()
        self.register_buffer("map_mean", torch.zeros(()))
        self.register_buffer("map_std", torch.ones(()))
        self.register_buffer("distance_mean", torch.zeros(n_distances))
        self.register_buffer("distance_std", torch.ones(n_distances))
        self.register_buffer("residual_scale", torch.ones(sum(dims)))
        self.register_buffer("query_mean", torch.zeros(sum(dims)))
        self.register_buffer("query_std", torch.ones(sum(dims)))

    # --- memory bank and statistics ------------------------------------------------------------------------------
    @property
    def memory_bank(self) -> Tensor:
        """PatchCore's memory bank ``[M, C]`` (every patch of the shots)."""
        return self.patchcore.memory_bank

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has built the memory bank."""
        return self.patchcore.memory_bank.numel() > 0

    def embed(self, images: Tensor) -> Tensor:
        """PatchCore's locally aware embedding ``[N, C, h, w]`` of images in ``[0, 1]`` (no gradient)."""
        _check_images(images)
        with torch.no_grad():
            x = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
            features = self.patchcore.feature_extractor(x)
            features = {layer: self.patchcore.feature_pooler(f) for layer, f in features.items()}
            return self.patchcore.generate_embedding(features)

    @torch.no_grad()
    def fit(self, shots: Tensor, generator: torch.Generator | None = None, n_views: int = 16,
            views: ViewRanges | None = None, batch_size: int = 8) -> None:  # fmt: skip
        """Memory bank from the un-augmented ``shots`` ``[k, 3, H, W]`` (in ``[0, 1]``); normalisation statistics
        from ``n_views`` augmented views of them (``views`` ranges, drawn from ``generator``)."""
        bank = [self.patchcore.reshape_embedding(self.embed(shots[i : i + batch_size]))
                for i in range(0, len(shots), batch_size)]  # fmt: skip
        self.patchcore.memory_bank = torch.cat(bank)
        images, _ = augmented_views(shots, n_views, generator, views)
        maps, distances, residuals, queries = [], [], [], []
        for i in range(0, n_views, batch_size):
            inputs = self._inputs(images[i : i + batch_size], standardise=False)
            maps.append(inputs["map"].flatten())
            distances.append(inputs["distances"].transpose(0, 1).flatten(1))
            residuals.append(inputs["residual"].transpose(0, 1).flatten(1))
            queries.append(inputs["embedding"].transpose(0, 1).flatten(1))
        maps_, distances_ = torch.cat(maps), torch.cat(distances, 1)
        residuals_, queries_ = torch.cat(residuals, 1), torch.cat(queries, 1)
        eps = 1e-6
        self.map_mean.copy_(maps_.mean())
        self.map_std.copy_(maps_.std().clamp_min(eps))
        self.distance_mean.copy_(distances_.mean(1))
        self.distance_std.copy_(distances_.std(1).clamp_min(eps))
        self.residual_scale.copy_(residuals_.mean(1).clamp_min(eps))
        self.query_mean.copy_(queries_.mean(1))
        self.query_std.copy_(queries_.std(1).clamp_min(eps))

    # --- inference -----------------------------------------------------------------------------------------------
    def nearest(self, query: Tensor, bank: Tensor) -> tuple[Tensor, Tensor]:
        """Euclidean distance to, and index of, the nearest row of ``bank`` ``[M, c]`` for each row of ``query``
        ``[n, c]`` (in chunks of PatchCore's size). Used for the per-layer distances; PatchCore's own combined
        distance comes from :meth:`PatchcoreModel.nearest_neighbors`, so that its map is anomalib's exactly."""
        # argmin_j |q - m_j|^2 = argmin_j (|m_j|^2 - 2 q.m_j): one fused addmm per chunk, then |q|^2 is added to the
        # minima only (PatchCore's euclidean_dist makes four passes over the whole matrix)
        bank_norm = bank.pow(2).sum(1).unsqueeze(0)
        scores, locations = [], []
        for i in range(0, len(query), _CHUNK):
            chunk = query[i : i + _CHUNK]
            partial, location = torch.addmm(bank_norm, chunk, bank.T, alpha=-2).min(1)
            scores.append((partial + chunk.pow(2).sum(1)).clamp_min(0).sqrt())
            locations.append(location)
        return torch.cat(scores), torch.cat(locations)

    @torch.no_grad()
    def _inputs(self, images: Tensor, standardise: bool = True) -> dict[str, Tensor]:
        """Everything the head and the maps need, computed without gradient."""
        if not self.is_fitted:
            msg = "the refiner has no memory bank yet: call fit(shots, generator) first"
            raise RuntimeError(msg)
        n, _, height, width = images.shape
        embedding = self.embed(images)
        _, _, h, w = embedding.shape
        flat = self.patchcore.reshape_embedding(embedding)
        bank = self.patchcore.memory_bank
        combined, locations = self.patchcore.nearest_neighbors(flat, n_neighbors=1)  # PatchCore's own search
        per_layer = [self.nearest(flat[:, a:b], bank[:, a:b])[0] for a, b in self.slices]
        distances = torch.stack([*per_layer, combined], 1)  # [n*h*w, L+1]
        residual = (flat - bank[locations]).abs()  # |query - nearest memory feature|
        grid = lambda t: t.reshape(n, h, w, -1).permute(0, 3, 1, 2)  # noqa: E731
        patch = combined.reshape(n, 1, h, w)
        amap = self.patchcore.anomaly_map_generator(patch, (height, width))[:, 0]  # PatchCore's map, as anomalib's
        out = {"map": amap, "distances": grid(distances), "residual": grid(residual), "embedding": embedding}
        if standardise:
            out["distances"] = (out["distances"] - self.distance_mean.view(1, -1, 1, 1)) / self.distance_std.view(
                1, -1, 1, 1
            )
            out["residual"] = out["residual"] / self.residual_scale.view(1, -1, 1, 1)
            out["embedding"] = (embedding - self.query_mean.view(1, -1, 1, 1)) / self.query_std.view(1, -1, 1, 1)
        return out

    def maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(refined [N, H, W], PatchCore's normalised map [N, H, W])`` of images ``[N, 3, H, W]`` in ``[0, 1]``.

        Gradients flow into the head only (the backbone and the search run without gradient)."""
        return self.maps_from(self._inputs(images))

    def maps_from(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """:meth:`maps` from precomputed head inputs (``_inputs(images)``): the backbone and the nearest-neighbour
        search do not depend on the head, so several heads (training snapshots) can share them."""
        z = (inputs["map"] - self.map_mean) / self.map_std
        query = inputs["embedding"] if self.use_query_features else None
        correction = self.head(inputs["distances"], inputs["residual"], query)
        return z + self.smooth(correction, inputs["map"].shape[-2:])[:, 0], z

    def smooth(self, patch_map: Tensor, size: Sequence[int]) -> Tensor:
        """PatchCore's :class:`AnomalyMapGenerator` (nearest upsampling to ``size``, reflect padding, Gaussian of
        sigma 4 with anomalib's own kernel), applied as two 1-D convolutions: the kernel is an outer product, so the
        result is the same up to rounding and the backward pass is about 16 times cheaper at 256 px."""
        blur = self.patchcore.anomaly_map_generator.blur
        kernel = blur.kernel[0, 0]
        rows, cols = kernel.sum(1), kernel.sum(0)  # kernel == outer(rows, cols) since kernel.sum() == 1
        x = F.interpolate(patch_map, size=(int(size[0]), int(size[1])))
        x = F.pad(x, blur.padding_shape, mode=blur.border_type)
        x = F.conv2d(x, rows.view(1, 1, -1, 1).to(x.dtype))
        return F.conv2d(x, cols.view(1, 1, 1, -1).to(x.dtype))

    def forward(self, images: Tensor) -> InferenceBatch:
        """anomalib's ``InferenceBatch``: the refined map ``[N, 1, H, W]`` and its maximum as ``pred_score``."""
        refined, _ = self.maps(images)
        return InferenceBatch(pred_score=refined.flatten(1).amax(1), anomaly_map=refined.unsqueeze(1))


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        msg = f"images must be [N, 3, H, W], got shape {tuple(images.shape)}"
        raise ValueError(msg)
    if images.numel() and (images.min() < -0.1 or images.max() > 1.1):
        msg = (f"images must be in [0, 1] (the model normalises them itself), got values in "
               f"[{float(images.min()):.3g}, {float(images.max()):.3g}]")  # fmt: skip
        raise ValueError(msg)
