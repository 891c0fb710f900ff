"""What the explorer's "copy config" box holds: the ``synthesizer:`` block of ``configs/data/*.yaml`` and the
``anomalib-synth generate`` command that reproduce the shown batch bit for bit.

The block names the synthesizer's class (``class_path``) and exactly the arguments the explorer built it with
(``init_args``: the ones that differ from their defaults, plus ``foreground``), as the shipped configs do. The
command writes the same batch: ``--num B --batch-size B`` makes it one batch, seeded as the explorer seeds it.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

import yaml

from ..synthesizers import Synthesizer
from .controls import FOREGROUND_ARGUMENT, plain, yaml_text

__all__ = ["DRAWN_NOTE", "class_path", "generate_command", "synthesizer_block"]

DRAWN_NOTE = (
    "the drawn foreground mask cannot be written here: without it, defects go where `foreground: auto` puts them"
)


class _FlowListDumper(yaml.SafeDumper):
    """Block-style mappings with flow-style lists (``beta: [0.2, 1.0]``), as the shipped configs write them."""


_FlowListDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
)


def class_path(cls: type[Synthesizer]) -> str:
    """The import path of ``cls``: the short public one (``anomalib_synth.synthesizers.PerlinSynthesizer``) when
    the package exports it, else its module's."""
    from .. import synthesizers

    if getattr(synthesizers, cls.__name__, None) is cls:
        return f"{synthesizers.__name__}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def synthesizer_block(cls: type[Synthesizer], arguments: Mapping[str, Any], drawn: bool = False) -> str:
    """The ``synthesizer:`` block of a ``configs/data/*.yaml`` file for ``cls(**arguments)``."""
    block = {"synthesizer": {"class_path": class_path(cls), "init_args": plain(dict(arguments))}}
    text = yaml.dump(block, Dumper=_FlowListDumper, sort_keys=False, default_flow_style=False, width=10**6)
    header = "# anomalib-synth explore: paste under init_args of a SyntheticAnomalyDataModule config\n"
    if drawn:
        header += f"# NOTE: {DRAWN_NOTE}\n"
    return header + text


def generate_command(
    name: str,
    arguments: Mapping[str, Any],
    source: str,
    size: int,
    batch_size: int,
    seed: int,
    output: str = "explore_output",
    drawn: bool = False,
) -> str:
    """The ``anomalib-synth generate`` command that writes the explorer's batch (one batch of ``batch_size``)."""
    parts = ["anomalib-synth", "generate", source, output, "--synthesizer", name, "--num", str(batch_size),
             "--batch-size", str(batch_size), "--seed", str(seed), "--size", str(size), str(size), "--device", "cpu"]  # fmt: skip
    for key, value in arguments.items():
        if key == FOREGROUND_ARGUMENT and value in ("auto", "none"):
            parts += ["--foreground", value]
        else:
            parts += ["-o", f"{key}={yaml_text(value).replace(', ', ',')}"]
    command = " ".join(shlex.quote(p) for p in parts)
    return f"# NOTE: {DRAWN_NOTE}\n{command}" if drawn else command
