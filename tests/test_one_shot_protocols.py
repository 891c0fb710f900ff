"""Strict one shot, no leakage, no choice on the test set: the evaluation's guarantees, on tiny data."""

from __future__ import annotations

import math
from pathlib import Path

import PIL.Image
import pytest
import torch

from anomalib_synth.evaluation import EvalConfig, evaluate, get_protocol
from anomalib_synth.evaluation import runner as runner_module
from anomalib_synth.evaluation.base import Budget, RunContext
from anomalib_synth.evaluation.report import ranking, target
from anomalib_synth.evaluation.selection import choose, kendall_tau, ranking_quality, regret
from anomalib_synth.toydata import make_toy_mvtec
from anomalib_synth.training.leakage import LeakageError

HEADLINE = ("patchcore", "supersimplenet", "glass", "refiner", "segmenter", "fusion")
"""Protocols whose runs read no file of the test set."""

BUDGETS = {"supersimplenet": {"steps": 2, "batch_size": 2}, "glass": {"steps": 2, "batch_size": 2},
           "refiner": {"steps": 3, "batch_size": 2}, "segmenter": {"steps": 2, "batch_size": 2}}  # fmt: skip


def _config(root: Path, protocols: tuple[str, ...], **changes) -> EvalConfig:
    settings = dict(data_root=str(root), categories=["gravel"], synthesizers=["cutpaste"], seeds=[0], image_size=128,
                    protocols=list(protocols), workers=1, budgets=BUDGETS)  # fmt: skip
    settings.update(changes)
    return EvalConfig(**settings)


def _spy_opens(monkeypatch) -> tuple[list[str], list[bool]]:
    """Record every file PIL opens while a protocol's ``run`` is on the stack."""
    opened: list[str] = []
    recording = [False]
    real_open = PIL.Image.open

    def spy(fp, *args, **kwargs):
        if recording[0]:
            opened.append(str(Path(fp).resolve()) if isinstance(fp, (str, Path)) else repr(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", spy)
    return opened, recording


def _record_runs(monkeypatch, names: tuple[str, ...], recording: list[bool]) -> None:
    for name in names:
        protocol = get_protocol(name)
        real_run = protocol.run

        def run(method, ctx, _real=real_run):
            recording[0] = True
            try:
                return _real(method, ctx)
            finally:
                recording[0] = False

        monkeypatch.setattr(protocol, "run", run)


@pytest.mark.slow
def test_headline_protocols_read_no_test_file_and_see_only_the_shot(tmp_path, monkeypatch) -> None:
    root = make_toy_mvtec(tmp_path / "data", size=64)
    opened, recording = _spy_opens(monkeypatch)
    _record_runs(monkeypatch, HEADLINE, recording)
    results = evaluate(_config(root, HEADLINE), tmp_path / "out", progress=False)
    controls = [r for r in results["runs"] if r["method"] in ("control-shot-diff", "control-patchcore")]
    # the shared controls run once (under patchcore) and are reported under every protocol
    assert len(controls) == 2 * len(HEADLINE)
    assert {r.get("computed_in", r["protocol"]) for r in controls} == {"patchcore"}
    category = root / "gravel"
    test_files = {str(p.resolve()) for p in (category / "test").rglob("*.png")}
    train_files = {str(p.resolve()) for p in (category / "train" / "good").glob("*.png")}
    assert opened, "the spy saw the shots being read"
    assert not test_files & set(opened), sorted(test_files & set(opened))
    # strict one shot: one training image per seed and nothing else (the synthetic validation uses views of it)
    assert len(train_files & set(opened)) == 1, sorted(train_files & set(opened))


def test_a_protocol_can_run_its_own_synthesizers(tmp_path) -> None:
    root = make_toy_mvtec(tmp_path / "data", size=64)
    config = _config(root, ("patchcore", "refiner"), synthesizers=["cutpaste", "nsa"],
                     protocol_synthesizers={"refiner": ["nsa+cutpaste"]})  # fmt: skip
    config.validate()
    rows = {(t["protocol"], t["method"]) for t in runner_module.plan(config)}
    assert ("refiner", "nsa+cutpaste") in rows and ("refiner", "nsa") not in rows and ("patchcore", "nsa") in rows
    with pytest.raises(ValueError, match="does not run"):
        _config(root, ("patchcore",), protocol_synthesizers={"refiner": ["nsa"]}).validate()


def test_a_run_whose_validation_or_shots_hold_a_test_image_is_refused(tmp_path) -> None:
    test_image = tmp_path / "gravel" / "test" / "crack" / "000.png"
    common = dict(config=None, category="gravel", seed=0, budget=Budget(), size=(8, 8), shots=torch.zeros(1, 3, 8, 8),
                  test_images=torch.zeros(1, 3, 8, 8), test_masks=torch.zeros(1, 8, 8, dtype=torch.bool),
                  test_labels=torch.ones(1, dtype=torch.bool), test_paths=[test_image])  # fmt: skip
    with pytest.raises(LeakageError, match="1 validation image"):
        RunContext(shot_paths=[tmp_path / "a.png"], val_paths=[test_image], **common)
    with pytest.raises(LeakageError, match="1 shots image"):
        RunContext(shot_paths=[test_image], **common)
    RunContext(shot_paths=[tmp_path / "a.png"], val_paths=[tmp_path / "b.png"], **common)  # disjoint: fine


def test_extra_normals_are_opt_in(tmp_path, monkeypatch) -> None:
    """Strict by default (no held-out normal image reaches a run); ``extra_normals`` gives that many."""
    seen: list[int] = []
    real = runner_module.held_out_normals

    def spy(data, shots, count, seed):
        paths = real(data, shots, count, seed)
        seen.append(len(paths))
        return paths

    monkeypatch.setattr(runner_module, "held_out_normals", spy)
    root = make_toy_mvtec(tmp_path / "data", size=64)
    runner_module.execute({"protocol": "patchcore", "category": "gravel", "method": "threshold-default", "seed": 0},
                          _config(root, ("patchcore",)), tmp_path / "out")  # fmt: skip
    record = runner_module.execute(
        {"protocol": "patchcore", "category": "gravel", "method": "cutpaste", "seed": 0},
        _config(root, ("patchcore",), extra_normals=5), tmp_path / "out",
    )
    assert seen == [0, 1]  # the toy set has 2 training normals: 1 shot + at most 1 extra
    assert record["info"]["extra_normals"] == 1 and record["info"]["val_normal"] == 1


def _run_with_test_set(monkeypatch, root: Path, out: Path, protocol: str, method: str, transform) -> dict:
    """One run whose test images and masks went through ``transform`` (what the run is scored on changes)."""
    real = runner_module.load_test_set

    def altered(samples, size):
        images, masks, labels = real(samples, size)
        return transform(images, masks, labels)

    monkeypatch.setattr(runner_module, "load_test_set", altered)
    config = _config(root, (protocol,), segmenter_dir=str(root.parent / "segmenters"))
    if get_protocol(protocol).needs_segmenter:
        runner_module.pretrain_segmenters(config, progress=False)
    try:
        return runner_module.execute({"protocol": protocol, "category": "gravel", "method": method, "seed": 0},
                                     config, out)  # fmt: skip
    finally:
        monkeypatch.setattr(runner_module, "load_test_set", real)


CHOICE_ROWS = [("patchcore", "cutpaste"), ("patchcore", "threshold-views"), ("patchcore", "threshold-default"),
               ("refiner", "cutpaste"), ("fusion", "fusion"), ("fusion", "patchcore-val-layers")]  # fmt: skip
"""Rows that choose something (a threshold, a step, a weight) and what they record of it."""


@pytest.mark.parametrize(("protocol", "method"), CHOICE_ROWS)
def test_choices_do_not_depend_on_the_test_set(tmp_path, monkeypatch, protocol: str, method: str) -> None:
    """The same run scored on other test images and masks makes the same choice."""
    root = make_toy_mvtec(tmp_path / "data", size=64)
    plain = _run_with_test_set(monkeypatch, root, tmp_path / "a", protocol, method, lambda i, m, l: (i, m, l))
    other = _run_with_test_set(monkeypatch, root, tmp_path / "b", protocol, method,
                               lambda i, m, l: (i.flip(-1).roll(7, -2), ~m, ~l))  # fmt: skip
    keys = [k for k in ("threshold", "chosen") if k in plain["info"]]
    assert keys and all(plain["info"][k] == other["info"][k] for k in keys), (plain["info"], other["info"])


def test_choose_reads_validation_only_and_prefers_the_first_on_ties() -> None:
    assert choose({"patchcore": 0.5, "head": 0.5}) == "patchcore"
    assert choose({"patchcore": 0.4, "head": 0.5}) == "head"
    assert choose({"a": math.nan, "b": 0.1}) == "b"
    assert regret({"a": 0.9, "b": 0.1}, {"a": 0.2, "b": 0.7}) == pytest.approx(0.5)
    assert kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(2 / 3)
    quality = ranking_quality({"a": 0.1, "b": 0.2, "c": 0.3}, {"a": 0.3, "b": 0.2, "c": 0.1})
    assert quality == {"tau": pytest.approx(-1.0), "regret": pytest.approx(0.2), "candidates": 3}


def test_ranking_pools_candidates_per_category_and_seed() -> None:
    def record(seed, method, candidates):
        return {"protocol": "fusion", "category": "c", "seed": seed, "method": method,
                "info": {"candidates": candidates}}  # fmt: skip

    records = [
        record(0, "fusion", {"w0": {"val:d": 0.1, "test": 0.5}, "w1": {"val:d": 0.2, "test": 0.6}}),
        record(0, "patchcore-val-layers", {"x": {"val:d": 0.3, "test": 0.4}}),
        record(1, "fusion", {"w0": {"val:d": 0.2, "test": 0.6}, "w1": {"val:d": 0.1, "test": 0.5}}),
    ]
    quality = ranking(records)["d"]["c"]
    # seed 0: three pooled candidates, val order x > w1 > w0 vs test w1 > w0 > x: tau -1/3, regret 0.6 - 0.4
    # seed 1: val and test agree: tau 1, regret 0
    assert quality["tau"] == pytest.approx((-1 / 3 + 1) / 2)
    assert quality["regret"] == pytest.approx(0.1)
    assert quality["candidates"] == pytest.approx(2.5) and quality["seeds"] == 2


def test_target_needs_the_mean_above_the_control_and_no_category_far_below() -> None:
    def cell(v):
        return {"pixel_AP": {"mean": v, "std": 0.0, "n": 3}}

    table = {"fusion": {"a": {"control-patchcore": cell(0.5), "fusion": cell(0.7)},
                        "b": {"control-patchcore": cell(0.5), "fusion": cell(0.49)}}}  # fmt: skip
    assert "MEETS" in target(table)[0]
    table["fusion"]["b"]["fusion"] = cell(0.45)  # mean still above, but b falls 0.05 below
    assert "does not meet" in target(table)[0]


def test_cli_records_no_empty_budgets_so_other_protocols_can_resume_the_folder(tmp_path, monkeypatch) -> None:
    """An evaluation resumed with other protocols must not be refused for budgets nobody set."""
    import anomalib_synth.evaluation as evaluation
    from anomalib_synth.cli import main

    seen = []

    def fake(config, output, progress=True):
        seen.append(config)
        Path(output).mkdir(parents=True, exist_ok=True)
        (Path(output) / "results.md").write_text("")

    monkeypatch.setattr(evaluation, "evaluate", fake)
    common = ["evaluate", "--data-root", str(tmp_path), "--categories", "c", "--output", str(tmp_path / "out"), "-q"]
    assert main([*common, "--protocol", "patchcore,refiner", "--synthesizers-for", "refiner=nsa+cutpaste"]) == 0
    assert main([*common, "--protocol", "fusion", "--budget", "fusion:val_images=4"]) == 0
    assert seen[0].budgets == {} and seen[0].protocol_synthesizers == {"refiner": ["nsa+cutpaste"]}
    assert seen[1].budgets == {"fusion": {"val_images": 4}}
