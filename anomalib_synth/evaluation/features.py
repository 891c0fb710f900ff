"""Per-image caching of a frozen backbone's features within a run.

anomalib's detectors run their ImageNet backbone frozen (eval mode, no gradient): the features of an image depend
only on its pixels. In a 1-shot run the same shot is seen again and again (every normal sample of every batch, GLASS's
center pass each epoch, ...), so :class:`FeatureCache` keys each input image by a hash of its bytes and computes the
backbone only for images it has not seen. It is installed on a model's ``TimmFeatureExtractor`` modules that do not
require gradients (:func:`cache_frozen_features`); the model's state dict is unchanged.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn


def _key(image: Tensor) -> bytes:
    data = image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).digest() + str(tuple(image.shape)).encode()


class FeatureCache:
    """Features of each image seen, keyed by its bytes; least recently used entries go beyond ``max_bytes``.

    Args:
        max_bytes (int): memory bound of the stored features. Defaults to 1 GiB.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = int(max_bytes)
        self.store: OrderedDict[bytes, dict[Any, Tensor]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self.store), "bytes": self.bytes}

    def _put(self, key: bytes, features: dict[Any, Tensor]) -> None:
        self.store[key] = features
        self.bytes += sum(t.numel() * t.element_size() for t in features.values())
        while self.bytes > self.max_bytes and len(self.store) > 1:
            _, old = self.store.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in old.values())

    def wrap(self, forward: Any) -> Any:
        """A cached version of a feature extractor's ``forward(images) -> {layer: [B, ...]}``."""

        def cached(inputs: Tensor) -> dict[Any, Tensor]:
            keys = [_key(image) for image in inputs]
            found: dict[bytes, dict[Any, Tensor]] = {}
            missing: dict[bytes, int] = {}
            for i, key in enumerate(keys):
                if key in self.store:
                    self.store.move_to_end(key)
                    found[key] = self.store[key]
                elif key not in missing:
                    missing[key] = i
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
            if missing:
                index = torch.tensor(list(missing.values()), device=inputs.device)
                out = forward(inputs.index_select(0, index))
                for j, key in enumerate(missing):
                    found[key] = {layer: t[j].detach().clone() for layer, t in out.items()}
                    self._put(key, found[key])
            rows = [found[key] for key in keys]
            return {layer: torch.stack([row[layer] for row in rows]) for layer in rows[0]}

        return cached


def cache_frozen_features(model: nn.Module, cache: FeatureCache) -> int:
    """Install ``cache`` on every frozen ``TimmFeatureExtractor`` of ``model``; returns how many were found.

    Extractors that train their backbone (``requires_grad=True``) are left alone.
    """
    from anomalib.models.components import TimmFeatureExtractor

    count = 0
    for module in model.modules():
        if isinstance(module, TimmFeatureExtractor) and not module.requires_grad and "forward" not in vars(module):
            module.forward = cache.wrap(module.forward)  # an instance attribute: nn.Module.__call__ uses it
            count += 1
    return count
