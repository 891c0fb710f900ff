"""One way to derive seeds: every reproducible stream of the package is ``derive_seed(base seed, salt, indices...)``.

The salts name the streams, so that two streams never share a seed by accident (the shots of a data set and its
synthetic validation anomalies, say), and a stream's seed does not depend on which other streams ran before it.
"""

from __future__ import annotations

__all__ = ["SALT", "derive_seed", "generator_for"]

_PRIME = 1_000_003
_MODULUS = 2**63 - 1

SALT = {
    "batch": 1,  # generate / cache: one stream per fixed batch of samples
    "shots": 2,  # which normal images become the k shots
    "train": 3,  # cache-mode training anomalies
    "val": 4,  # synthetic validation anomalies
    "test": 5,  # synthetic test anomalies
    "online": 6,  # online anomalies of one training batch (epoch, batch index, rank)
    "rank": 7,  # a callback's generator on one DDP rank
    "worker": 8,  # a transform's generator in one DataLoader worker
}
"""The named streams of the package."""


def derive_seed(seed: int, stream: str, *indices: int) -> int:
    """The seed of ``stream`` (a key of :data:`SALT`) at ``indices`` (e.g. epoch, batch, rank) under ``seed``.

    >>> derive_seed(0, "batch", 3) == derive_seed(0, "batch", 3) != derive_seed(0, "batch", 4)
    True
    """
    if stream not in SALT:
        msg = f"unknown seed stream {stream!r}; choose from {', '.join(SALT)}"
        raise ValueError(msg)
    value = 0
    for part in (int(seed), SALT[stream], *indices):
        value = (value * _PRIME + int(part) + 1) % _MODULUS
    return value


def generator_for(seed: int, stream: str, *indices: int):  # noqa: ANN201 (torch imported lazily)
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    import torch

    return torch.Generator().manual_seed(derive_seed(seed, stream, *indices))
