"""The explorer's web page (Gradio), a thin layer over :class:`~anomalib_synth.explore.session.Explorer`.

Every control of every registered synthesizer is built once, in a group shown while that synthesizer is chosen; any
change re-synthesizes the batch. Nothing is fetched from the internet: analytics are off and the theme uses the
system's fonts.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..io import BUILTIN_PHOTOS, to_uint8
from .session import FOREGROUND_MODES, Explorer, Preview, Request
from .sources import DEFAULT_PHOTOS, builtin_source, mask_from_drawing, photo_thumbnail, save_upload

__all__ = ["build_app", "launch", "offline_theme"]

PHOTOS, FOLDER, UPLOAD = "scikit-image photos", "folder", "upload"
FIGURES = {
    "anomalous": "anomalous fraction",
    "mask_area": "mask area",
    "visibility": "visibility (mean change inside the mask)",
    "background_pasted": "background pasted onto the object",
    "mask_iou": "mask IoU (changed pixels vs mask)",
    "background_psnr": "background PSNR (dB)",
}


def offline_theme() -> Any:
    """Gradio's default theme with system fonts (the default one loads its font from Google Fonts)."""
    import gradio as gr

    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "Consolas", "monospace"]
    )


def element_id(*parts: str) -> str:
    """A CSS-safe ``elem_id`` (browser tests find controls by it): ``perlin-beta-min``."""
    return "-".join(parts).replace("_", "-").replace(".", "-")


def figures_markdown(preview: Preview) -> str:
    """The batch's figures from :func:`~anomalib_synth.metrics.summarize` and the time per image, as a table."""
    rows = ["| figure | value |", "|---|---|"]
    for key, label in FIGURES.items():
        value = preview.figures[key]
        rows.append(f"| {label} | {'inf' if math.isinf(value) else f'{value:.3f}'} |")
    rows.append(f"| time per image | {preview.ms_per_image:.1f} ms (batch of {len(preview.images)}, CPU) |")
    notes = "".join(f"\n\n*{note}*" for note in preview.notes)
    return "\n".join(rows) + notes


def build_app(explorer: Explorer | None = None, size: int = 256, batch_size: int = 4, synthesizer: str = "perlin") -> Any:
    """The explorer's ``gr.Blocks`` (launch it with :func:`launch`, or ``.launch(theme=offline_theme())``)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from ..errors import one_line

    explorer = explorer or Explorer()
    upload_folder = Path(tempfile.mkdtemp(prefix="anomalib_synth_explore_"))
    names = list(explorer.entries)
    labels = [(name if e.reason is None else f"{name} (unavailable)", name) for name, e in explorer.entries.items()]
    unavailable = [f"- **{n}**: {e.reason}" for n, e in explorer.entries.items() if e.reason]
    categories = sorted(explorer.layout.normal_folders) if explorer.layout else []
    mvtec = bool(explorer.layout and explorer.layout.is_mvtec)

    with gr.Blocks(title="anomalib-synth explore", analytics_enabled=False) as app:
        gr.Markdown("## anomalib-synth explore\nPick a synthesizer and its settings; the batch is synthesized again "
                    "on every change. The boxes below reproduce it: the YAML for `configs/data/*.yaml`, the command "
                    "for `anomalib-synth generate`.")  # fmt: skip
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                synth = gr.Dropdown(labels, value=synthesizer, label="synthesizer", elem_id="synthesizer")
                if unavailable:
                    gr.Markdown("Unavailable here:\n" + "\n".join(unavailable), elem_id="unavailable")
                kinds = [PHOTOS] + ([FOLDER] if explorer.layout else []) + [UPLOAD]
                source_kind = gr.Radio(kinds, value=FOLDER if explorer.layout else PHOTOS, label="images",
                                       elem_id="source")  # fmt: skip
                photos = gr.CheckboxGroup(list(BUILTIN_PHOTOS), value=list(DEFAULT_PHOTOS), label="photos",
                                          elem_id="photos")  # fmt: skip
                category = gr.Dropdown(categories, value=categories[0] if categories else None, label="category",
                                       visible=len(categories) > 1, elem_id="category")  # fmt: skip
                upload = gr.Image(type="numpy", label="upload an image", sources=["upload"], elem_id="upload")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                    batch = gr.Slider(1, 8, value=batch_size, step=1, label="batch size", elem_id="batch")
                    image_size = gr.Slider(64, 512, value=size, step=32, label="image size", elem_id="size")
                foreground = gr.Radio(list(FOREGROUND_MODES), value="auto", label="foreground", elem_id="foreground")
                drawing = gr.ImageEditor(label="draw the foreground (drawn mode)", visible=False, type="numpy",
                                         elem_id="drawing", sources=["upload"],
                                         brush=gr.Brush(colors=["#ff0000"], color_mode="fixed"))  # fmt: skip
                groups, control_inputs, control_specs = [], [], []
                for name, entry in explorer.entries.items():
                    with gr.Group(visible=name == synthesizer) as group:
                        gr.Markdown(f"**{name}**: {entry.description}")
                        for control in entry.controls:
                            components = _control_components(gr, name, control)
                            control_specs.append((name, control.name, len(components)))
                            control_inputs += components
                    groups.append(group)
            with gr.Column(scale=2):
                error = gr.Markdown(visible=False, elem_id="error")
                picture = gr.Image(label="input | result | mask overlay", type="numpy", interactive=False,
                                   elem_id="result", format="png")  # fmt: skip
                figures = gr.Markdown(elem_id="figures")
                yaml_box = gr.Textbox(label="copy config: the synthesizer: block of configs/data/*.yaml", lines=8,
                                      interactive=False, buttons=["copy"], elem_id="yaml")  # fmt: skip
                command_box = gr.Textbox(label="the same batch with anomalib-synth generate", lines=3,
                                         interactive=False, buttons=["copy"], elem_id="command")  # fmt: skip
                if mvtec:
                    with gr.Accordion("a real defect of this category", open=True):
                        real_index = gr.Slider(0, 200, value=0, step=1, label="real defect #", elem_id="real-index")
                        real = gr.Image(label="real defect | its mask", type="numpy", interactive=False,
                                        elem_id="real")  # fmt: skip

        def source_of(kind: str, chosen: list[str], cat: str | None, uploaded: np.ndarray | None) -> str:
            if kind == FOLDER:
                return explorer.folder_source(cat or "")
            if kind == UPLOAD:
                if uploaded is None:
                    msg = "upload an image first (or choose other images)"
                    raise ValueError(msg)
                return save_upload(uploaded, upload_folder)
            return builtin_source(chosen)

        def refresh(name, kind, chosen, cat, uploaded, seed_value, batch_value, size_value, mode, drawn, *raw):
            values = _control_values(control_specs, raw, name)
            try:
                request = Request(
                    synthesizer=name, values=values, source=source_of(kind, chosen, cat, uploaded),
                    size=int(size_value), batch_size=int(batch_value), seed=int(seed_value or 0), foreground=mode,
                    drawn_mask=mask_from_drawing(drawn, int(size_value)) if mode == "drawn" else None,
                )  # fmt: skip
                preview = explorer.preview(request)
            except (ValueError, OSError, TypeError) as err:
                return gr.update(value=f"**Error:** {one_line(err)}", visible=True), *(gr.update(),) * 4
            return (gr.update(value="", visible=False), preview.picture(), figures_markdown(preview), preview.yaml,
                    preview.command)  # fmt: skip

        inputs = [synth, source_kind, photos, category, upload, seed, batch, image_size, foreground, drawing]
        outputs = [error, picture, figures, yaml_box, command_box]
        for component in [*inputs, *control_inputs]:
            component.change(refresh, inputs + control_inputs, outputs, trigger_mode="always_last")
        app.load(refresh, inputs + control_inputs, outputs)
        synth.change(lambda n: [gr.update(visible=n == name) for name in names], synth, groups)

        def canvas(mode, kind, chosen, cat, uploaded, size_value):
            if mode != "drawn":
                return gr.update(visible=False)
            try:
                image = to_uint8(photo_thumbnail(source_of(kind, chosen, cat, uploaded), int(size_value)))
            except (ValueError, OSError):
                return gr.update(visible=True)
            return gr.update(value={"background": image, "layers": [], "composite": image}, visible=True)

        for component in (foreground, source_kind, photos, category, image_size):
            component.change(canvas, [foreground, source_kind, photos, category, upload, image_size], drawing)
        if mvtec:

            def show_real(cat, index, size_value):
                shown = explorer.real_defect(cat, int(index), int(size_value))
                return gr.update(value=None, label="no real defect found") if shown is None else gr.update(
                    value=shown[0], label=f"real defect {shown[1]} | its mask")  # fmt: skip

            for component in (category, real_index, image_size):
                component.change(show_real, [category, real_index, image_size], real)
            app.load(show_real, [category, real_index, image_size], real)
    return app


def _control_components(gr: Any, synthesizer: str, control: Any) -> list[Any]:
    """The input components of one control (two numbers for a range)."""
    default = control.ui_default()
    label = control.name + (" (empty: none)" if control.optional and control.kind != "flag" else "")
    eid = element_id(synthesizer, control.name)
    if control.kind == "range" and control.optional:  # an empty number field is not None in Gradio: text fields
        with gr.Row():
            return [gr.Textbox(str(default[0]), label=f"{label} min", elem_id=f"{eid}-min"),
                    gr.Textbox(str(default[1]), label=f"{control.name} max", elem_id=f"{eid}-max")]  # fmt: skip
    if control.kind == "range":
        precision = 0 if control.integer else None
        with gr.Row():
            return [gr.Number(default[0], label=f"{label} min", precision=precision, elem_id=f"{eid}-min"),
                    gr.Number(default[1], label=f"{control.name} max", precision=precision, elem_id=f"{eid}-max")]  # fmt: skip
    if control.kind == "choice":
        return [gr.Dropdown(list(control.choices), value=default, label=label, elem_id=eid)]
    if control.kind == "flag":
        return [gr.Checkbox(bool(default), label=label, elem_id=eid)]
    if control.kind in ("integer", "number") and control.optional:
        return [gr.Textbox("" if default is None else str(default), label=label, elem_id=eid)]
    if control.kind in ("integer", "number"):
        return [gr.Number(default, label=label, precision=0 if control.integer else None, elem_id=eid)]
    if control.kind == "folder":
        return [gr.Textbox(default, label=f"{control.name}: texture folder (empty: none)", elem_id=eid,
                           placeholder="path/to/dtd/images")]  # fmt: skip
    return [gr.Textbox(default, label=label + (" (YAML)" if control.kind == "yaml" else ""), elem_id=eid)]


def _control_values(specs: list[tuple[str, str, int]], raw: tuple, synthesizer: str) -> dict[str, Any]:
    """``{control name: raw value}`` of the chosen synthesizer's controls from the flat list of every component."""
    values, position = {}, 0
    for name, control, count in specs:
        if name == synthesizer:
            values[control] = tuple(raw[position : position + count]) if count > 1 else raw[position]
        position += count
    return values


def launch(
    images: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    prevent_thread_lock: bool = False,
    size: int = 256,
    batch_size: int = 4,
    quiet: bool = False,
) -> Any:
    """Start the explorer on ``host:port`` (no share link, no analytics, no server-side rendering)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    app = build_app(Explorer(images), size=size, batch_size=batch_size)
    app.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=prevent_thread_lock,
               theme=offline_theme(), ssr_mode=False, quiet=quiet, show_error=True, footer_links=[])  # fmt: skip
    return app
