"""``anomalib-synth`` command line: ``list``, ``generate``, ``demo``, and anomalib's ``train``/``fit``/``test``/... with
the plugin imported."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .errors import USER_ERRORS, one_line

ANOMALIB_COMMANDS = ("train", "fit", "validate", "test", "predict")
"""Subcommands handed to anomalib's CLI (with the plugin imported)."""

EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 130, 143


def _parse_options(options: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are read as YAML (``0.5``, ``[0.2, 1.0]``, ``auto``)."""
    parsed = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            msg = f"options must look like KEY=VALUE, got {option!r}"
            raise ValueError(msg)
        parsed[key.replace("-", "_")] = _number(yaml.safe_load(value))
    return parsed


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string; numbers written that way are meant as floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _positive(text: str) -> int:
    """argparse type: a positive integer (sizes, counts)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"must be a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _cmd_list(_: argparse.Namespace) -> int:
    from .synthesizers import available

    width = max(len(n) for n in available())
    for name, description in available().items():
        print(f"{name:<{width}}  {description}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate

    kwargs = _parse_options(args.option)
    if args.foreground:
        kwargs["foreground"] = args.foreground
    if args.model_path:
        kwargs["model"] = args.model_path
    start = time.perf_counter()
    records = generate(
        args.source,
        args.output,
        args.synthesizer,
        num=args.num,
        seed=args.seed,
        size=tuple(args.size),
        device=args.device,
        batch_size=args.batch_size,
        name=args.name,
        progress=not args.quiet,
        channels=1 if args.grayscale else 3,
        on_error=args.on_error,
        **kwargs,
    )
    print(generation_summary(records, args.output, time.perf_counter() - start))
    return 0


def generation_summary(records: Any, output: str, seconds: float) -> str:
    """What a ``generate`` call did, in one line (a rerun that finds everything done says so)."""
    anomalous = sum(r["label"] for r in records)
    if records.written == 0:
        text = f"nothing to do: {output} already holds all {len(records)} samples ({anomalous} anomalous)"
    elif records.written < len(records):
        text = (f"wrote {records.written} missing samples; {output} now holds all {len(records)} "
                f"({anomalous} anomalous) in {seconds:.1f}s")  # fmt: skip
    else:
        text = f"wrote {len(records)} samples ({anomalous} anomalous) to {output} in {seconds:.1f}s"
    if records.skipped:
        text += f"; skipped {len(records.skipped)} unreadable source file(s) (see the warnings above)"
    return text


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    start = time.perf_counter()
    table = run_demo(args.output, gallery=args.gallery, seed=args.seed, size=args.size, device=args.device,
                     progress=not args.quiet)  # fmt: skip
    print(format_table(table))
    print(f"\nMVTec-style folders: {args.output}/<synthesizer>/ (test/, ground_truth/, manifest.jsonl)")
    print(f"gallery: {table['_gallery']['path']}  ({time.perf_counter() - start:.1f}s)")
    return 0


def _cmd_explore(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        msg = 'the explorer needs Gradio, an optional extra: pip install -e ".[explore]"'
        raise ValueError(msg)
    from .explore.app import launch

    # the address is printed once the server is up (a bad folder or a busy port fails first, in one line)
    app = launch(args.images, host=args.host, port=args.port, size=args.size, batch_size=args.batch_size, quiet=True,
                 prevent_thread_lock=True)  # fmt: skip
    print(f"anomalib-synth explore: http://{args.host}:{args.port}/ (Ctrl-C stops it)", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:  # Ctrl-C is how the explorer stops: not an interrupted job
        app.close()
        print("anomalib-synth explore: stopped")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import EvalConfig, evaluate

    def split(text: str) -> list[str]:
        return [t for t in text.split(",") if t]

    budgets: dict[str, dict[str, Any]] = {}
    for protocol in split(args.protocol):
        budget = {}
        if args.steps is not None:
            budget["steps"] = args.steps
        if args.batch_size is not None:
            budget["batch_size"] = args.batch_size
        if args.accelerator is not None:
            budget["accelerator"] = args.accelerator
        if budget:  # an empty entry would make a resumed evaluation with other protocols look changed
            budgets[protocol] = budget
    for spec in args.budget:  # PROTOCOL:KEY=VALUE[,KEY=VALUE]
        protocol, _, assignments = spec.partition(":")
        budgets.setdefault(protocol, {}).update(_parse_options(assignments.split(",")))
    config = EvalConfig(
        data_root=args.data_root,
        categories=split(args.categories),
        synthesizers=split(args.synthesizers),
        protocols=split(args.protocol),
        seeds=[int(s) for s in split(args.seeds)],
        shots=args.shots,
        image_size=args.image_size,
        texture_dir=args.texture_dir,
        budgets=budgets,
        model=args.model,
        model_args=_parse_options(args.model_arg),
        workers=args.workers,
        backbone=args.backbone,
        layers=split(args.layers) or None,
        backbone_weights=_backbone_weights(args.backbone_weights),
        extra_normals=args.extra_normals,
        protocol_synthesizers={p: split(names) for p, _, names in (spec.partition("=") for spec in args.synthesizers_for)},
        segmenter_dir=args.segmenter_dir,
    )
    start = time.perf_counter()
    evaluate(config, args.output, progress=not args.quiet)
    print((Path(args.output) / "results.md").read_text())
    print(f"results in {args.output} ({time.perf_counter() - start:.0f}s)")
    return 0


def _backbone_weights(specs: Sequence[str]) -> dict[str, str]:
    """Register each ``--backbone-weights NAME=PATH`` with timm (the built-in offline backbones are registered by the
    plugin import); returns ``{NAME: PATH}``."""
    from .backbones import parse_weights_spec, register_weights

    pairs = dict(parse_weights_spec(spec) for spec in specs)
    for name, path in pairs.items():
        register_weights(name, path)
    return pairs


def run_anomalib(args: Sequence[str]) -> int:
    """Run anomalib's CLI with this plugin imported, so that short names such as ``SyntheticAnomalyDataModule``
    resolve (``anomalib-synth train --config configs/....yaml`` == ``anomalib train ...`` plus the plugin) and the
    offline backbones (``efficientnet_lite0.local``, ``--backbone-weights NAME=PATH``) are registered."""
    import logging
    import warnings

    with warnings.catch_warnings():  # anomalib's own imports of deprecated modules: nothing the user can act on
        warnings.filterwarnings("ignore", r".*(timm\.models\.layers|components\.dinov2).* deprecated", FutureWarning)
        from anomalib.cli.cli import AnomalibCLI
        from anomalib.loggers import configure_logger

        import anomalib_synth.data  # noqa: F401  (registers the datamodule class for jsonargparse, and the backbones)

    from jsonargparse import ArgumentError

    from .backbones import explain_missing_weights

    class OneLineAnomalibCLI(AnomalibCLI):
        """anomalib's CLI whose parse errors raise (one line, exit 2, from :func:`main`) instead of printing the
        usage and a multi-line message."""

        @staticmethod
        def init_parser(**kwargs: Any) -> Any:
            return AnomalibCLI.init_parser(**{"exit_on_error": False, **kwargs})

    ours = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ours.add_argument("--backbone-weights", action="append", default=[])
    known, args = ours.parse_known_args(list(args))
    _backbone_weights(known.backbone_weights)
    logging.getLogger("anomalib.cli.utils.openvino").setLevel(logging.WARNING)  # "OpenVINO is possibly not installed"
    configure_logger()
    before = _empty_dirs(Path("results"))
    try:
        with explain_missing_weights():
            try:
                OneLineAnomalibCLI(args)
            except ArgumentError as err:
                msg = f"{one_line(err)} (see anomalib-synth {args[0] if args else 'train'} --help)"
                raise ValueError(msg) from err
    except BaseException:
        _remove(_empty_dirs(Path("results")) - before)  # the run's empty results/<Model>/<data>/<category>/vN
        raise
    return 0


def _empty_dirs(root: Path) -> set[Path]:
    """Folders under ``root`` (and ``root``) that hold no file at any depth, with the symlinks in them that point
    to such folders or nowhere (anomalib's ``latest``), found in one bottom-up walk."""
    empty: set[Path] = set()

    def removable(entry: Path) -> bool:
        if entry.is_symlink():
            return not entry.exists() or entry.resolve() in empty
        return entry in empty

    for folder, subfolders, files in os.walk(root.resolve(), topdown=False):
        entries = [Path(folder, name) for name in (*subfolders, *files)]
        if all(removable(entry) for entry in entries):
            empty.update(entries)
            empty.add(Path(folder))
    return empty


def _remove(paths: set[Path]) -> None:
    for path in sorted(paths, key=lambda p: len(p.parts), reverse=True):
        path.unlink() if path.is_symlink() else path.rmdir()


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (the usage stays in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="anomalib-synth",
        description="Synthetic, labelled defects for anomalib (image + mask + label).",
        epilog="Errors print one line; add --debug (anywhere) to see the traceback.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ANOMALIB_COMMANDS:
        sub.add_parser(command, help=f"anomalib {command} with this plugin imported (all arguments go to anomalib)")

    p = sub.add_parser("list", help="list the synthesizers")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("generate", help="synthesize anomalies from normal images into an MVTec-style folder")
    p.add_argument("source", help="folder of normal images, or builtin:brick|grass|gravel|coffee[,...]")
    p.add_argument("output", help="output folder (resumable: rerun the same command after an interruption)")
    p.add_argument("--synthesizer", "-s", required=True, help="registry name, see `anomalib-synth list`")
    p.add_argument("--num", "-n", type=_positive, default=16, help="number of samples (default 16)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--size", type=_positive, nargs=2, default=(256, 256), metavar=("H", "W"), help="default 256 256")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--name", default=None, help="defect folder name (default: the synthesizer name)")
    p.add_argument(
        "--foreground",
        choices=("none", "auto"),
        default=None,
        help="auto (the default): defects on the estimated object; none: anywhere",
    )
    p.add_argument("--grayscale", action="store_true", help="load images as 1-channel")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="synthesizer argument, e.g. -o beta=[0.5,1.0] -o texture_dir=dtd/images")  # fmt: skip
    p.add_argument(
        "--model-path",
        default=None,
        help="diffusion synthesizers: Hub id or local folder of the base model (sets option model=)",
    )
    p.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                   help="unreadable source files: skip them with a warning (default) or stop")  # fmt: skip
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("explore", help="a local web page to try every synthesizer and copy its config (Gradio)")
    p.add_argument("--images", default=None, metavar="FOLDER",
                   help="images to try them on: a folder, or an MVTec-style root (default: scikit-image's photos)")  # fmt: skip
    p.add_argument("--port", type=_positive, default=7860, help="default 7860")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--size", type=_positive, default=256, help="image size shown first (default 256)")
    p.add_argument("--batch-size", type=_positive, default=4, help="batch shown first (default 4)")
    p.set_defaults(func=_cmd_explore)

    p = sub.add_parser("evaluate", help="k-shot evaluation on real defects (MVTec layout)")
    p.add_argument("--data-root", required=True, help="folder holding <category>/train/good, test/, ground_truth/")
    p.add_argument("--categories", required=True, help="comma-separated, e.g. bottle,grid")
    p.add_argument("--synthesizers", default="anomalib-perlin,perlin,cutpaste,nsa")
    p.add_argument("--protocol", default="segmentation",
                   help="comma-separated: segmentation, draem, anomalib, patchcore, supersimplenet, glass, refiner, "
                        "segmenter, fusion")  # fmt: skip
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--image-size", type=int, default=None,
                   help="for every protocol (default per protocol: 256 for the anomalib detectors, else 128)")  # fmt: skip
    p.add_argument("--texture-dir", default=None, help="anomaly-source textures for every synthesizer that takes one")
    p.add_argument("--steps", type=int, default=None, help="training steps (default per protocol)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--accelerator", default=None, help="Lightning accelerator of the anomalib detectors (default cpu)")
    p.add_argument("--budget", action="append", default=[], metavar="PROTOCOL:KEY=VALUE[,...]",
                   help="per-protocol budget, e.g. --budget draem:steps=10,batch_size=2")  # fmt: skip
    p.add_argument("--model", default="anomalib.models.Patchcore", help="anomalib protocol: model class path")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--backbone",
        default="efficientnet_lite0.local",
        help="timm backbone of PatchCore/SuperSimpleNet/GLASS and control-patchcore ('none': no such rows)",
    )
    p.add_argument(
        "--layers",
        default="",
        help="backbone layers, comma-separated (default: blocks.1,blocks.2 for "
        "PatchCore, blocks.2,blocks.4 for SuperSimpleNet and GLASS)",
    )
    p.add_argument(
        "--backbone-weights",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="register a local weights file as timm's pretrained NAME (e.g. resnet18.local=r18.pth)",
    )
    p.add_argument("--synthesizers-for", action="append", default=[], metavar="PROTOCOL=A,B",
                   help="the synthesizers of one protocol, instead of --synthesizers (e.g. refiner=nsa+cutpaste)")
    p.add_argument("--extra-normals", type=int, default=0, metavar="N",
                   help="normal images beyond the shots for validation splits (default 0: strict k-shot, validation "
                        "from augmented views of the shots)")  # fmt: skip
    p.add_argument("--segmenter-dir", default=None,
                   help="pretrained one-prompt segmenters, one per left-out category (default OUTPUT/segmenters)")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (one CPU thread each)")
    p.add_argument("--output", required=True)
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("pretrain-segmenter",
                       help="pretrain the one-prompt segmenter on synthetic change pairs from normal images")  # fmt: skip
    p.add_argument("--data-root", action="append", required=True, metavar="ROOT",
                   help="folder searched for normal images (**/good/*, texture folders); repeat for several")  # fmt: skip
    p.add_argument("--exclude", default="", metavar="A[,B]",
                   help="categories to leave out by name in every root (the ones you will evaluate on)")  # fmt: skip
    p.add_argument("--output", required=True, help="model folder (config.json, model.safetensors, checkpoints/); "
                   "rerun the same command to resume")  # fmt: skip
    p.add_argument("--steps", type=_positive, default=None,
                   help="batches (default 600: about 10 CPU-minutes at 256 px on one core)")  # fmt: skip
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--image-size", type=_positive, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--texture-dir", default=None, help="anomaly-source textures (e.g. DTD images/) for perlin")
    p.add_argument("--synthesizers", default=None,
                   help="'+'-separated, drawn per sample (default perlin+cutpaste+nsa+scar)")  # fmt: skip
    p.add_argument("--anomaly-ratio", type=float, default=0.75, help="fraction of queries made anomalous")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--checkpoint-every", type=_positive, default=100)
    p.add_argument("--no-builtin-photos", action="store_true", help="leave scikit-image's photos out of the sources")
    p.add_argument("--threads", type=_positive, default=1,
                   help="torch CPU threads (default 1: the least CPU time per step on a shared machine)")  # fmt: skip
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pretrain_segmenter)

    p = sub.add_parser("demo", help="run every classical synthesizer on builtin photos; write folders and a gallery")
    p.add_argument("--output", default="anomalib_synth_demo", help="default ./anomalib_synth_demo")
    p.add_argument("--gallery", default=None, help="gallery image path (default OUTPUT/gallery.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_positive, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("score", help="IS, KID, IC-LPIPS and background preservation of a generated folder")
    p.add_argument("generated", help="folder written by `anomalib-synth generate`")
    p.add_argument("--real", required=True, help="folder of real anomalous images")
    p.add_argument("--metrics", default="is,kid,ic-lpips,background", help="comma-separated subset")
    p.add_argument("--distance", default="lpips-alex", choices=("lpips-alex", "lpips-vgg", "pixel"),
                   help="for IC-LPIPS and the background; 'pixel' needs no weights (smoke tests only)")  # fmt: skip
    p.add_argument("--size", type=_positive, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=None, help="JSON path (default GENERATED/scores.json; a .md table next to it)")
    p.set_defaults(func=_cmd_score)
    return parser


def _cmd_pretrain_segmenter(args: argparse.Namespace) -> int:
    from .models.one_prompt_segmenter.pairs import DEFAULT_SYNTHESIZERS
    from .models.one_prompt_segmenter.pretrain import DEFAULT_STEPS, pretrain_segmenter

    result = pretrain_segmenter(
        args.data_root, [c for c in args.exclude.split(",") if c], args.output,
        steps=args.steps or DEFAULT_STEPS, batch_size=args.batch_size, image_size=args.image_size, seed=args.seed,
        texture_dir=args.texture_dir, synthesizers=args.synthesizers or DEFAULT_SYNTHESIZERS,
        anomaly_ratio=args.anomaly_ratio, lr=args.lr, checkpoint_every=args.checkpoint_every,
        builtin_photos=not args.no_builtin_photos, progress=not args.quiet, threads=args.threads,
    )  # fmt: skip
    tail = result.losses[-max(1, len(result.losses) // 10) :]
    print(f"segmenter written to {result.folder}: {len(result.model.training_data)} source images, "
          f"final loss {sum(tail) / max(1, len(tail)):.3f}, {result.cpu_seconds / 60:.1f} CPU-min "
          f"({result.wall_seconds / 60:.1f} min wall)")  # fmt: skip
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from .scoring import markdown_table, score_folder, write_scores

    scores = score_folder(args.generated, args.real, metrics=args.metrics.split(","), size=args.size,
                          distance=args.distance, device=args.device)  # fmt: skip
    output = Path(args.output) if args.output else Path(args.generated) / "scores.json"
    write_scores(scores, output)
    print(markdown_table(scores))
    print(f"wrote {output} and {output.with_suffix('.md')}")
    return 0


TRAINER_OPTIONS = ("precision", "accelerator", "devices", "strategy", "checkpoint_every", "seed")


def _trainer_options(args: argparse.Namespace) -> dict:
    return {**{k: getattr(args, k) for k in TRAINER_OPTIONS}, "progress": not args.quiet}


def _exclusions(args: argparse.Namespace) -> dict:
    return {"exclude_categories": args.exclude_categories.split(",") if args.exclude_categories else None,
            "exclude_images": args.exclude_images, "exclude_split": args.exclude_split}  # fmt: skip


def _cmd_train_xfusion(args: argparse.Namespace) -> int:
    from .training.xfusion import train_xfusion

    adapter = train_xfusion(
        args.data_root, args.captions, output=args.output,
        categories=args.categories.split(",") if args.categories else None,
        base_model=args.base_model, clip_model=args.clip_model, max_steps=args.max_steps,
        batch_size=args.batch_size, image_size=args.image_size, lr=args.lr, num_tokens=args.num_tokens,
        lora_rank=args.lora_rank, **_exclusions(args), **_trainer_options(args),
    )  # fmt: skip
    print(f"adapter written to {adapter}")
    return 0


def _cmd_train_control(args: argparse.Namespace) -> int:
    from .training.control import train_control

    adapter = train_control(
        args.data_root, args.captions, output=args.output,
        categories=args.categories.split(",") if args.categories else None, pairing=args.pairing,
        base_model=args.base_model, vlm=args.vlm, max_steps=args.max_steps, batch_size=args.batch_size,
        image_size=args.image_size, lr=args.lr, num_tokens=args.num_tokens, image_embed_dim=args.image_embed_dim,
        asea_steps=args.asea_steps, init_adapter=args.init_adapter, **_exclusions(args), **_trainer_options(args),
    )  # fmt: skip
    print(f"adapter written to {adapter}")
    return 0


def _add_training_arguments(p: argparse.ArgumentParser, output: str) -> None:
    p.add_argument("--data-root", required=True, help="folder of <category>/test/<defect>/NNN.png + ground_truth/")
    p.add_argument("--captions", required=True, help="MVTec-Caption JSON {category: {defect: [caption, ...]}}")
    p.add_argument("--categories", default=None, help="comma-separated (default: every captioned category found)")
    p.add_argument("--output", default=output, help="run folder: checkpoints/, logs/, adapter/ (rerun to resume)")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--num-tokens", type=int, default=4, help="adapter tokens")
    p.add_argument("--exclude-categories", default=None, metavar="A,B",
                   help="leave these categories out (e.g. the ones you will evaluate on)")  # fmt: skip
    p.add_argument("--exclude-images", nargs="+", default=None, metavar="PATH",
                   help="leave these images out (paths, or suffixes such as bottle/test/crack/000.png)")  # fmt: skip
    p.add_argument("--exclude-split", default=None, metavar="FILE",
                   help="leave out the images listed in FILE (one path per line, or a JSON list), e.g. a test split")  # fmt: skip
    p.add_argument("--precision", default=None, help="Lightning precision (default 16-mixed on CUDA, else 32-true)")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto")
    p.add_argument("--strategy", default="auto", help="e.g. ddp for several GPUs")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", "-q", action="store_true")


def build_train_parser() -> argparse.ArgumentParser:
    """``anomalib-synth train xfusion|control ...``: our adapters (every other ``train`` goes to anomalib's CLI)."""
    from .synthesizers.diffusion.anomalycontrol import BLIP2_ITM
    from .synthesizers.diffusion.loading import CLIP_VIT_L14, SD15, SD15_INPAINTING
    from .training.control import PAIRINGS

    parser = OneLineParser(prog="anomalib-synth train", description=build_train_parser.__doc__)
    sub = parser.add_subparsers(dest="method", required=True)
    p = sub.add_parser("xfusion", help="train an AnomalyXFusion adapter (MIF + DDF [+ LoRA]) on captioned defects")
    _add_training_arguments(p, "xfusion_run")
    p.add_argument("--base-model", default=SD15)
    p.add_argument("--clip-model", default=CLIP_VIT_L14)
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA on cross-attention (0 = off; needs peft)")
    p.set_defaults(func=_cmd_train_xfusion, command="train xfusion")
    p = sub.add_parser("control", help="train an AnomalyControl Semantic Guided Adapter on captioned defect pairs")
    _add_training_arguments(p, "control_run")
    p.add_argument("--base-model", default=SD15_INPAINTING)
    p.add_argument("--vlm", default=BLIP2_ITM, help="BLIP-2 image-text model for the CSM")
    p.add_argument("--pairing", choices=PAIRINGS, default="self",
                   help="reference of each target (default: the target itself, as the official training)")  # fmt: skip
    p.add_argument("--init-adapter", default=None, metavar="FILE|OWNER/REPO/PATH",
                   help="IP-Adapter SD 1.5 checkpoint to start the SGA from, as the official training, e.g. "
                   "h94/IP-Adapter/models/ip-adapter_sd15.safetensors (default: text K/V, random projections)")  # fmt: skip
    p.add_argument("--image-embed-dim", type=int, default=1024)
    p.add_argument("--asea-steps", type=int, default=5)
    p.set_defaults(func=_cmd_train_control, command="train control")
    return parser


OUR_TRAINERS = ("xfusion", "control")


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler, so that a terminated run cleans up as after Ctrl-C (temp files, progress)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def offline_weights_hint(err: BaseException) -> str | None:
    """A one-line fix when ``err`` (or what caused it) is pretrained weights that cannot be fetched offline."""
    chain, seen = [], err
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain)
    hub = re.search(r"hugging ?face|on the hub|hf_hub|urlopen|name or service not known", text, re.IGNORECASE)
    missing = re.search(r"offline|connection|cannot find the requested files|not known", text, re.IGNORECASE)
    if not ({"LocalEntryNotFoundError", "OfflineModeIsEnabled", "URLError"} & names or (hub and missing)):
        return None
    from .backbones import offline_hint

    backbone = re.search(r"backbone='([^']+)'", text)
    name = backbone.group(1) if backbone else "ARCH"
    what = f"backbone {name!r}" if backbone else "the model's backbone"
    return f"{what} needs pretrained weights that cannot be downloaded here (offline). {offline_hint(name)}"


def _dispatch(argv: list[str]) -> int:
    if len(argv) > 1 and argv[0] == "train" and argv[1] in OUR_TRAINERS:  # our adapters; any other train is anomalib's
        args = build_train_parser().parse_args(argv[1:])
        return args.func(args)
    if argv and argv[0] in ANOMALIB_COMMANDS:
        return run_anomalib(argv)
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. User mistakes print one line on stderr and exit 2 (``--debug`` shows the traceback);
    Ctrl-C exits 130 and SIGTERM 143, each with one line, after the temp files of the sample in flight are removed."""
    import signal

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    ours = len(argv) > 1 and argv[0] == "train" and argv[1] in OUR_TRAINERS
    command = " ".join(argv[:2] if ours else argv[:1])
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _dispatch(argv)
    except KeyboardInterrupt as err:
        if debug:
            raise
        what, code = (
            ("terminated", EXIT_TERMINATED) if isinstance(err, Terminated) else ("interrupted", EXIT_INTERRUPTED)
        )
        print(f"anomalib-synth {command}: {what}; finished samples are kept, rerun the same command to resume",
              file=sys.stderr)  # fmt: skip
        return code
    except USER_ERRORS as err:
        if debug:
            raise
        hint = offline_weights_hint(err)
        print(f"anomalib-synth {command}: error: {hint or one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
