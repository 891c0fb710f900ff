"""``results.json``, ``results.md`` and plots of an evaluation."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..io import write_text
from .base import BASELINE, CONTROLS, get_protocol
from .scores import METRICS
from .selection import DEFAULT_DESIGN

TITLES = {"pixel_AP": "Pixel AP", "pixel_AUROC": "Pixel AUROC", "pixel_F1max": "Pixel F1-max",
          "image_AUROC": "Image AUROC", "image_F1": "Image F1 at the threshold"}  # fmt: skip


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, dict[str, float]]]]]:
    """``{protocol: {category: {method: {metric: {"mean", "std", "n"}}}}}`` over seeds (metrics a row does not
    report, NaN in every seed, are left out)."""
    grouped: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for r in records:
        grouped.setdefault((r["protocol"], r["category"], r["method"]), []).append(r["metrics"])
    out: dict = {}
    for (protocol, category, method), runs in grouped.items():
        stats = {}
        for metric in METRICS:
            values = [run[metric] for run in runs if _finite(run.get(metric))]
            if not values:
                continue
            stats[metric] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
            }
        out.setdefault(protocol, {}).setdefault(category, {})[method] = stats
    return out


def _methods(table: dict[str, dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for per_method in table.values():
        for method in per_method:
            if method not in seen:
                seen.append(method)
    controls = [m for m in CONTROLS if m in seen]
    return controls + [m for m in seen if m not in CONTROLS]


def _means(table: dict[str, dict[str, Any]], metric: str) -> dict[str, tuple[float, float]]:
    """``{method: (mean over categories, mean std)}`` for the methods measured in every category."""
    out = {}
    for method in _methods(table):
        cells = [table[c].get(method, {}).get(metric) for c in table]
        if cells and all(cells):
            out[method] = (statistics.fmean(c["mean"] for c in cells), statistics.fmean(c["std"] for c in cells))
    return out


def _verdict(values: dict[str, tuple[float, float]]) -> str | None:
    """Best of our synthesizers against every reference row (controls and anomalib's own generator)."""
    ours = {m: v for m, v in values.items() if m not in (*CONTROLS, BASELINE, "none")}
    references = {m: v for m, v in values.items() if m in CONTROLS or m == BASELINE}
    if not ours or not references:
        return None
    best = max(ours, key=lambda m: ours[m][0])
    value, spread = ours[best]
    parts = []
    for ref, (ref_value, _) in references.items():
        margin = value - ref_value
        word = "beats" if margin > 0 else "does NOT beat"
        close = " (by less than the seed spread)" if abs(margin) < spread else ""
        parts.append(f"{word} `{ref}` ({ref_value:.3f}){close}")
    return f"best: `{best}` ({value:.3f}) " + "; ".join(parts)


def verdicts(table: dict[str, dict[str, Any]], metric: str = "pixel_AP") -> dict[str, str]:
    """Per category, and over the category means (``"mean"``): does our best synthesizer beat each reference?"""
    out = {}
    for category, per_method in table.items():
        values = {m: (v[metric]["mean"], v[metric]["std"]) for m, v in per_method.items() if metric in v}
        text = _verdict(values)
        if text:
            out[category] = text
    if len(table) > 1:
        text = _verdict(_means(table, metric))
        if text:
            out["mean over categories"] = text
    return out


def ranking(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """How well each synthetic validation design ranks the candidates that runs chose between, against the real
    test ranking: ``{design: {category: {"tau", "regret", "candidates", "seeds"}}}``.

    Per category and seed the candidates of every run that recorded some (``info["candidates"]``: refiner steps per
    synthesizer, fusion weights, PatchCore layer sets) are pooled, Kendall's tau and the regret of the design's top
    choice computed, then averaged over seeds.
    """
    from .selection import ranking_quality

    pooled: dict[tuple[str, int], dict[str, dict[str, float]]] = {}
    for r in records:
        for name, row in (r.get("info") or {}).get("candidates", {}).items():
            pooled.setdefault((r["category"], r["seed"]), {})[f"{r['protocol']}/{r['method']}/{name}"] = row
    out: dict[str, dict[str, dict[str, float]]] = {}
    per: dict[tuple[str, str], list[dict[str, float]]] = {}
    for (category, _), candidates in pooled.items():
        designs = sorted({k[4:] for row in candidates.values() for k in row if k.startswith("val:")})
        for design in designs:
            val = {n: row[f"val:{design}"] for n, row in candidates.items() if _finite(row.get(f"val:{design}"))}
            test = {n: row["test"] for n, row in candidates.items() if n in val and _finite(row.get("test"))}
            if len(test) > 1:
                per.setdefault((design, category), []).append(ranking_quality({n: val[n] for n in test}, test))
    for (design, category), qualities in sorted(per.items()):
        taus = [q["tau"] for q in qualities if _finite(q["tau"])]
        out.setdefault(design, {})[category] = {
            "tau": statistics.fmean(taus) if taus else float("nan"),
            "regret": statistics.fmean(q["regret"] for q in qualities),
            "candidates": statistics.fmean(q["candidates"] for q in qualities),
            "seeds": len(qualities),
        }
    return out


def ranking_markdown(quality: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| design | category | Kendall tau | regret (pixel AP) | candidates | seeds |", "|---|---|---|---|---|---|"]
    for design, per_category in quality.items():
        for category, q in per_category.items():
            lines.append(f"| {design} | {category} | {q['tau']:.3f} | {q['regret']:.3f} | {q['candidates']:.0f} | "
                         f"{q['seeds']} |")  # fmt: skip
        taus = [q["tau"] for q in per_category.values() if _finite(q["tau"])]
        if len(per_category) > 1 and taus:
            regret = statistics.fmean(q["regret"] for q in per_category.values())
            lines.append(f"| {design} | mean | {statistics.fmean(taus):.3f} | {regret:.3f} | | |")
    return "\n".join(lines)


def target(tables: dict[str, Any], control: str = "control-patchcore", metric: str = "pixel_AP",
           tolerance: float = 0.02) -> list[str]:  # fmt: skip
    """Per learned row: its mean over categories against ``control``'s, and its worst category gap (a row meets
    the target when it beats the control's mean and no category falls more than ``tolerance`` below)."""
    lines = []
    for protocol, table in tables.items():
        means = _means(table, metric)
        if control not in means:
            continue
        for method, (value, _) in means.items():
            if method in (*CONTROLS, BASELINE):
                continue
            gaps = {c: table[c][method][metric]["mean"] - table[c][control][metric]["mean"] for c in table
                    if metric in table[c].get(method, {}) and metric in table[c].get(control, {})}  # fmt: skip
            worst = min(gaps, key=gaps.get)
            met = value > means[control][0] and gaps[worst] >= -tolerance
            lines.append(f"- `{protocol}` / `{method}`: {value:.3f} against {means[control][0]:.3f} "
                         f"({value - means[control][0]:+.3f}); worst category {worst} ({gaps[worst]:+.3f}): "
                         f"{'MEETS' if met else 'does not meet'} the target")  # fmt: skip
    return lines


def markdown_table(table: dict[str, dict[str, Any]], metric: str) -> str:
    categories = list(table)
    lines = [
        "| method | " + " | ".join(categories) + " | mean |",
        "|---|" + "---|" * (len(categories) + 1),
    ]
    for method in _methods(table):
        cells, means = [], []
        for category in categories:
            stats = table[category].get(method, {}).get(metric)
            if stats is None:
                cells.append("-")
                continue
            means.append(stats["mean"])
            cells.append(f"{stats['mean']:.3f} ± {stats['std']:.3f}")
        if not means:
            continue  # a row that does not report this metric
        mean = f"{statistics.fmean(means):.3f}" if len(means) == len(categories) else "-"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def _reported(table: dict[str, dict[str, Any]], metric: str) -> bool:
    return any(metric in stats for per_method in table.values() for stats in per_method.values())


def write_report(config: Any, records: list[dict[str, Any]], output: Path, machine: str) -> dict[str, Any]:
    """Write ``results.json``, ``results.md`` and the plots; return the results dict."""
    tables = aggregate(records)
    results = {"config": asdict(config), "machine": machine, "aggregate": tables, "ranking": ranking(records),
               "runs": records}
    write_text(output / "results.json", json.dumps(results, indent=1))
    write_text(output / "results.md", render_markdown(config, records, machine))
    plot_bars(tables, output)
    plot_strips(records, output, Path(config.data_root))
    return results


METRICS_ONLY = ("protocol", "category", "method", "seed", "metrics", "shots", "shots_from_test", "n_test",
                "n_anomalous", "image_size", "seconds", "cpu_seconds", "first_loss", "final_loss")  # fmt: skip
"""What a committed ``results.json`` keeps of a run (with ``info``'s choices and candidates): no maps or paths of
previews."""


def metrics_only(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` with each run cut to :data:`METRICS_ONLY` plus the choices it made (enough for
    :func:`render_markdown`)."""
    runs = []
    for r in results["runs"]:
        run = {k: r[k] for k in METRICS_ONLY if k in r}
        info = r.get("info") or {}
        run["info"] = {k: info[k] for k in ("chosen", "candidates", "design", "threshold", "extra_normals") if k in info}
        runs.append(run)
    return {**{k: v for k, v in results.items() if k != "runs"}, "runs": runs}


def render_markdown(config: Any, records: list[dict[str, Any]], machine: str) -> str:
    """The report's markdown (tables, verdicts, ranking quality, target) from the run records."""
    tables = aggregate(records)
    shots_from_test = sorted({r["category"] for r in records if r["shots_from_test"]})
    sizes = sorted({r.get("image_size", config.image_size) for r in records})
    backbone = "none"
    if config.backbone:
        patchcore, others = ",".join(config.layers_for("patchcore")), ",".join(config.layers_for("glass"))
        backbone = f"`{config.backbone}`, layers `{patchcore}`"
        if others != patchcore:
            backbone += f" (PatchCore) and `{others}` (SuperSimpleNet, GLASS)"
    textures = (f"`{config.texture_dir}` (given to every synthesizer that takes an anomaly source)"
                if config.texture_dir else "none (each synthesizer's own fallback source)")  # fmt: skip
    legend = (
        "Cells are mean ± std over seeds. Reference rows, trained on no synthetic anomalies: `control-untrained` "
        "(the protocol's network without training), `control-shot-diff` (blurred absolute difference to the nearest "
        "shot), `control-patchcore` (anomalib's PatchCore with the shots as memory bank, same backbone and size), "
        "`ssn-default` (stock unsupervised SuperSimpleNet), `threshold-default` / `threshold-views` / "
        "`threshold-oracle` (PatchCore's image threshold from anomalib's fallback on the shots, without anomalous "
        "validation / the highest score of augmented views of the shots / the best one on the test set); "
        f"`{BASELINE}` is anomalib's own generator. A synthesizer helps only where it beats them. Do not read gaps "
        "smaller than the std as a ranking."
    )
    lines = [
        f"# k-shot evaluation ({config.shots}-shot, {len(config.seeds)} seeds, {'/'.join(map(str, sizes))} px)",
        "",
        (
            f"Machine: {machine}. Data: `{config.data_root}`. Backbone of the anomalib detectors: {backbone}. "
            f"Textures: {textures}"
        ),
        "",
        legend,
    ]
    strict = getattr(config, "extra_normals", 0) == 0
    lines += ["", (f"Strict {config.shots}-shot: every row sees its {config.shots} normal image(s) and nothing else; "
                   "validation splits are made of augmented views of the shots." if strict else
                   f"**Not strict {config.shots}-shot:** validation splits (PatchCore's thresholds) use up to "
                   f"{config.extra_normals} extra normal training images besides the shots (`extra_normals`); the "
                   "other rows do not.")]  # fmt: skip
    if shots_from_test:
        lines += ["", (f"No `train/good` in {', '.join(shots_from_test)}: shots drawn from `test/good` and removed "
                       "from the test set.")]  # fmt: skip
    for name, table in tables.items():
        protocol = get_protocol(name)
        budget = config.budget(name)
        size = config.size(name)[0]
        lines += ["", f"## Protocol `{name}`", "", f"{protocol.description}. {size} px.", "",
                  f"Budget: {protocol.budget_text(budget)}.", ""]  # fmt: skip
        order = [protocol.verdict_metric] + [m for m in TITLES if m != protocol.verdict_metric]
        for metric in order:
            if not _reported(table, metric):
                continue
            title = TITLES[metric] + (" (primary)" if metric == protocol.verdict_metric else "")
            lines += [f"### {title}", "", markdown_table(table, metric), ""]
        lines += [f"### Verdict ({TITLES[protocol.verdict_metric]})", ""]
        lines += [f"- {category}: {text}" for category, text in verdicts(table, protocol.verdict_metric).items()]
    quality = ranking(records)
    if quality:
        lines += ["", "## How well synthetic validation ranks the candidates", "",
                  "Per category and seed, the candidates the runs chose between (refiner steps, fusion weights, "
                  "PatchCore layer sets) are ranked by pixel AP on each synthetic validation design and on the real "
                  "test set; Kendall's tau between the two rankings and the regret of the design's top choice (test "
                  "pixel AP of the best candidate minus that of the chosen one) are averaged over seeds. Choices use "
                  f"the design `{DEFAULT_DESIGN}`; the others are measured only.", "", ranking_markdown(quality)]  # fmt: skip
    checks = target(tables)
    if checks:
        lines += ["", "## Target: a learned row above `control-patchcore` (pixel AP)", "", *checks]
    return "\n".join(lines) + "\n"


def plot_bars(tables: dict[str, Any], output: Path) -> None:
    """One bar chart per protocol: pixel AUROC and pixel AP per category and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for protocol, table in tables.items():
        categories, methods = list(table), _methods(table)
        verdict = get_protocol(protocol).verdict_metric
        metrics = ("pixel_AUROC", "pixel_AP") if verdict == "pixel_AP" else ("pixel_AP", verdict)
        fig, axes = plt.subplots(1, 2, figsize=(max(6, 2.2 * len(categories)) * 2, 3.6))
        width = 0.8 / max(1, len(methods))
        for ax, metric in zip(axes, metrics, strict=True):
            for j, method in enumerate(methods):
                means = [table[c].get(method, {}).get(metric, {}).get("mean", 0) for c in categories]
                stds = [table[c].get(method, {}).get(metric, {}).get("std", 0) for c in categories]
                xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(categories))]
                ax.bar(xs, means, width, yerr=stds, label=method, hatch="//" if method in CONTROLS else None)
            ax.set_xticks(range(len(categories)), categories)
            ax.set_ylim(0, 1)
            ax.set_title(f"{protocol}: {metric}")
        axes[0].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(output / f"bars_{protocol}.png", dpi=80)
        plt.close(fig)


def plot_strips(records: list[dict[str, Any]], output: Path, data_root: Path) -> None:
    """Per protocol and category: real test images, their ground truth and each method's maps (first seed)."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from ..io import read_image, resize, to_uint8
    from .data import load_category, read_mask

    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("preview"):
            by_key.setdefault((r["protocol"], r["category"]), []).append(r)
    for (protocol, category), runs in by_key.items():
        runs.sort(key=lambda r: (r["method"] not in CONTROLS, r["method"]))
        images = runs[0]["preview_images"]
        samples = {str(s.image): s for s in load_category(data_root, category).test}
        row_images = torch.cat([resize(read_image(p), (64, 64)) for p in images], dim=2)
        row_masks = torch.cat(
            [read_mask(samples[p].masks, (64, 64)).float()[None].expand(3, -1, -1) for p in images], 2
        )
        rows = [("image", to_uint8(row_images)), ("ground truth", to_uint8(row_masks))]
        for r in runs:
            with Image.open(output / r["preview"]) as img:
                rows.append((r["method"], np.asarray(img.convert("RGB"))))
        label_w, h = 120, 64
        canvas = Image.new("RGB", (label_w + 64 * len(images), h * len(rows)), "white")
        draw = ImageDraw.Draw(canvas)
        for i, (label, array) in enumerate(rows):
            canvas.paste(Image.fromarray(array), (label_w, i * h))
            draw.text((4, i * h + 26), label, fill=(0, 0, 0))
        canvas.save(output / f"strip_{protocol}_{category.strip('/').replace('/', '_')}.png")
