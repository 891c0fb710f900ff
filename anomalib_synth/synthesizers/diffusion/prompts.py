"""Prompts for text-conditioned defect synthesis: object names, defect types and detailed descriptions.

AnomalyAny (arXiv 2406.01078, Sec. 3.3) uses three prompts per image: an anomaly prompt "a photo of a {object} with
a {defect} on it", the normal prompt "a photo of a {object}" and a detailed description of the defect written by
GPT-4. We ship a curated table for the MVTec AD and VisA categories instead of calling an LLM; users can pass their
own :class:`AnomalyPrompt` list, and MVTec-Caption-style JSON (``{category: {defect: [caption, ...]}}``, see
:func:`load_captions`) replaces the descriptions with human-written ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["VOCABULARY", "AnomalyPrompt", "load_captions", "prompts_for"]


@dataclass(frozen=True)
class AnomalyPrompt:
    """One defect of one object.

    Attributes:
        object (str): the object or material, e.g. ``"bottle"``.
        defect (str): the defect words whose cross-attention is guided, e.g. ``"crack"``.
        description (str): a detailed description of the defect (AnomalyAny's "detailed prompt").
    """

    object: str
    defect: str
    description: str

    @property
    def anomaly_text(self) -> str:
        return f"a photo of a {self.object} with a {self.defect} on it"

    @property
    def normal_text(self) -> str:
        return f"a photo of a {self.object}"

    @property
    def detailed_text(self) -> str:
        return self.description or self.anomaly_text


def _table(obj: str, *defects: tuple[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return obj, defects


VOCABULARY: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    # MVTec AD
    "bottle": _table("bottle",
        ("crack", "a glass bottle seen from above with a broken, chipped rim and a jagged crack"),
        ("contamination", "a glass bottle seen from above with dirt and a dark foreign particle inside")),
    "cable": _table("cable",
        ("cut", "a cable cross-section with a cut in the insulation exposing copper wires"),
        ("bent wire", "a cable cross-section with bent and displaced copper wires"),
        ("hole", "a cable with a small poke hole in its coloured insulation")),
    "capsule": _table("capsule",
        ("crack", "a pill capsule with a thin crack in its shell"),
        ("scratch", "a pill capsule with a long scratch on its glossy surface"),
        ("dent", "a pill capsule with a squeezed, dented shell"),
        ("faulty imprint", "a pill capsule with a smeared, incomplete printed label")),
    "carpet": _table("carpet",
        ("hole", "a woven carpet with a frayed hole in the fabric"),
        ("stain", "a woven carpet with a coloured stain"),
        ("thread", "a woven carpet with a loose thread lying on it")),
    "grid": _table("metal grid",
        ("bent wire", "a metal mesh grid with a bent, deformed wire"),
        ("broken wire", "a metal mesh grid with a broken wire"),
        ("glue", "a metal mesh grid with a blob of glue stuck on it")),
    "hazelnut": _table("hazelnut",
        ("crack", "a hazelnut with a deep crack in its brown shell"),
        ("hole", "a hazelnut with a small bored hole in its shell"),
        ("print", "a hazelnut with printed text on its shell")),
    "leather": _table("leather",
        ("cut", "a leather surface with a clean cut"),
        ("fold", "a leather surface with a fold crease"),
        ("stain", "a leather surface with a dark liquid stain")),
    "metal_nut": _table("metal nut",
        ("scratch", "a metal nut with a scratch on its surface"),
        ("bent", "a metal nut with a bent, deformed edge"),
        ("paint", "a metal nut with a patch of colour paint on it")),
    "pill": _table("pill",
        ("crack", "a white pill with a crack across it"),
        ("contamination", "a white pill with a dark contamination spot"),
        ("color spot", "a white pill with a coloured spot")),
    "screw": _table("screw",
        ("scratch", "a metal screw with a scratched thread"),
        ("damaged tip", "a metal screw with a damaged, blunt tip"),
        ("damaged head", "a metal screw with a damaged slotted head")),
    "tile": _table("tile",
        ("crack", "a ceramic tile with a crack through it"),
        ("stain", "a ceramic tile with an oily stain"),
        ("glue", "a ceramic tile with a strip of glue on it")),
    "toothbrush": _table("toothbrush",
        ("defective bristles", "a toothbrush head with missing and bent bristles"),),
    "transistor": _table("transistor",
        ("bent lead", "a transistor with a bent metal lead"),
        ("damaged case", "a transistor with a chipped plastic case")),
    "wood": _table("wood",
        ("scratch", "a wooden surface with a scratch"),
        ("hole", "a wooden surface with a drilled hole"),
        ("stain", "a wooden surface with a liquid stain")),
    "zipper": _table("zipper",
        ("broken teeth", "a zipper with broken and missing teeth"),
        ("rough", "a zipper with a rough, frayed fabric edge")),
    # VisA
    "candle": _table("candle",
        ("wax melt", "a white candle with melted, dripping wax"),
        ("spot", "a white candle with a dark spot")),
    "capsules": _table("green capsule",
        ("bubble", "a green soft capsule with an air bubble"),
        ("dent", "a green soft capsule with a dent")),
    "cashew": _table("cashew",
        ("burnt", "a cashew nut with a burnt dark patch"),
        ("crack", "a cashew nut with a crack")),
    "chewinggum": _table("chewing gum",
        ("scratch", "a piece of chewing gum with a scratch"),
        ("spot", "a piece of chewing gum with a dark spot")),
    "fryum": _table("fryum",
        ("crack", "a wheel-shaped fryum snack with a crack"),
        ("burnt", "a wheel-shaped fryum snack with a burnt patch")),
    "macaroni1": _table("macaroni",
        ("crack", "a piece of macaroni with a crack"),
        ("spot", "a piece of macaroni with a dark spot")),
    "macaroni2": _table("macaroni",
        ("scratch", "a piece of macaroni with a scratch"),
        ("spot", "a piece of macaroni with a coloured spot")),
    "pcb1": _table("printed circuit board",
        ("scratch", "a printed circuit board with a scratch"),
        ("melt", "a printed circuit board with a melted component")),
    "pcb2": _table("printed circuit board",
        ("bent pin", "a printed circuit board with a bent pin"),
        ("missing component", "a printed circuit board with a missing component")),
    "pcb3": _table("printed circuit board",
        ("scratch", "a printed circuit board with a scratch"),
        ("burn", "a printed circuit board with a burn mark")),
    "pcb4": _table("printed circuit board",
        ("burn", "a printed circuit board with a burn mark"),
        ("damage", "a printed circuit board with a damaged component")),
    "pipe_fryum": _table("pipe fryum",
        ("crack", "a pipe-shaped fryum snack with a crack"),
        ("burnt", "a pipe-shaped fryum snack with a burnt patch")),
}  # fmt: skip
"""``{category: (object name, ((defect words, detailed description), ...))}`` for MVTec AD and VisA."""

GENERIC_DEFECTS = (
    ("crack", "a thin dark crack on the surface"),
    ("scratch", "a long scratch on the surface"),
    ("hole", "a small hole in the surface"),
    ("stain", "a dark stain on the surface"),
)


def load_captions(path: str | Path) -> dict[str, dict[str, list[str]]]:
    """Read MVTec-Caption-style JSON ``{category: {defect: [caption of test image 000, 001, ...]}}``.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is not of that form.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"caption file {str(path)!r} does not exist"
        raise FileNotFoundError(msg)
    data = json.loads(path.read_text(encoding="utf-8"))
    ok = isinstance(data, dict) and all(
        isinstance(d, dict) and all(isinstance(c, list) and all(isinstance(s, str) for s in c) for c in d.values())
        for d in data.values()
    )
    if not ok:
        msg = f"{str(path)!r} is not caption JSON of the form {{category: {{defect: [caption, ...]}}}}"
        raise ValueError(msg)
    return data


def prompts_for(
    category: str | None = None,
    object_name: str | None = None,
    defects: list[str] | None = None,
    captions: str | Path | dict[str, dict[str, list[str]]] | None = None,
) -> list[AnomalyPrompt]:
    """The prompts of one category.

    Args:
        category (str | None, optional): an MVTec AD / VisA category (``"bottle"``, ``"pcb1"`` ...) or any name.
            Defaults to ``None`` (generic object).
        object_name (str | None, optional): overrides the object's name. Defaults to the table's, or ``category``.
        defects (list[str] | None, optional): defect words to use instead of the table's. Defaults to ``None``.
        captions (str | Path | dict | None, optional): MVTec-Caption-style JSON (path or loaded). When it has the
            category, its defect folders (``broken_large`` -> ``"broken large"``) and captions are used.
            Defaults to ``None``.

    Returns:
        list[AnomalyPrompt]: at least one prompt.
    """
    table_object, table_defects = VOCABULARY.get(category or "", (None, GENERIC_DEFECTS))
    obj = object_name or table_object or (category or "object").replace("_", " ")
    if captions is not None:
        data = load_captions(captions) if isinstance(captions, (str, Path)) else captions
        by_defect = data.get(category or "", {})
        chosen = [d for d in by_defect if d != "good" and by_defect[d]]
        if defects:
            chosen = [d for d in chosen if d.replace("_", " ") in defects]
        if chosen:
            return [AnomalyPrompt(obj, d.replace("_", " "), text) for d in chosen for text in by_defect[d]]
    if defects:
        known = dict(table_defects)
        return [AnomalyPrompt(obj, d, known.get(d, f"a {obj} with a {d}")) for d in defects]
    return [AnomalyPrompt(obj, d, text) for d, text in table_defects]
