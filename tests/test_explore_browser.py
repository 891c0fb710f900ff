"""The explorer in a real browser: headless Chromium (Playwright) drives the page served on a loopback port.

Skipped when Chromium, Playwright or Gradio is missing (``.ci/run`` installs them). With
``ANOMALIB_SYNTH_SCREENSHOT=docs/images/explorer.png`` the run also writes README's screenshot (scikit-image photos).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("gradio", reason="the explorer needs gradio (pip install -e '.[explore]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")

from anomalib_synth.explore.app import launch  # noqa: E402
from anomalib_synth.explore.session import Explorer, Request  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
LOCAL = ("http://127.0.0.1", "data:", "blob:")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    readme = os.environ.get("ANOMALIB_SYNTH_SCREENSHOT")
    size, batch = (128, 3) if readme else (64, 2)
    port = free_port()
    app = launch(host="127.0.0.1", port=port, prevent_thread_lock=True, size=size, batch_size=batch, quiet=True)
    yield {"url": f"http://127.0.0.1:{port}/", "size": size, "batch": batch, "readme": readme}
    app.close()


@pytest.fixture
def page(server):
    external: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})

        def offline(route):  # the page must render without the internet: record and refuse anything else
            if route.request.url.startswith(LOCAL):
                route.continue_()
            else:
                external.append(route.request.url)
                route.abort()

        page.route("**/*", offline)
        page.goto(server["url"])
        page.wait_for_selector("#result img", timeout=30_000)
        yield page
        browser.close()
    assert external == [], f"the page fetched from the internet: {external}"


def result_src(page) -> str:
    return page.locator("#result img").get_attribute("src")


def wait_for_new_result(page, before: str) -> str:
    page.wait_for_function(
        "before => { const img = document.querySelector('#result img'); return img && img.src !== before }",
        arg=before, timeout=30_000,
    )  # fmt: skip
    return result_src(page)


def set_number(page, element_id: str, value: str) -> None:
    field = page.locator(f"#{element_id} input")
    field.fill(value)
    field.press("Enter")


def test_pick_a_synthesizer_change_a_control_and_copy_the_yaml(server, page, tmp_path) -> None:
    size, batch = server["size"], server["batch"]
    first = result_src(page)
    page.locator("#synthesizer input").click()
    page.get_by_role("option", name="cutpaste", exact=True).click()
    second = wait_for_new_result(page, first)
    page.wait_for_selector("#cutpaste-area-range-max", state="visible", timeout=30_000)
    page.wait_for_selector("#perlin-beta-min", state="hidden", timeout=30_000)

    set_number(page, "cutpaste-area-range-max", "0.3")
    third = wait_for_new_result(page, second)
    assert third != second
    expected = Explorer().preview(Request("cutpaste", {"area_range": (0.02, 0.3)}, size=size, batch_size=batch))
    page.wait_for_function("text => document.querySelector('#yaml textarea').value === text", arg=expected.yaml,
                           timeout=30_000)  # fmt: skip
    assert page.locator("#yaml textarea").input_value() == expected.yaml
    assert page.locator("#command textarea").input_value() == expected.command
    assert "time per image" in page.locator("#figures").inner_text()
    page.locator("#cutpaste-area-range-max input").blur()
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(tmp_path / "explorer.png"), full_page=False)
    assert (tmp_path / "explorer.png").stat().st_size > 10_000
    if server["readme"]:
        Path(server["readme"]).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=server["readme"], full_page=False)

    set_number(page, "cutpaste-area-range-min", "0.5")  # min > max: the synthesizer's one-line error, no crash
    page.wait_for_selector("#error", state="visible", timeout=30_000)
    assert page.locator("#error").inner_text().strip() == (
        "Error: area_range must satisfy 1e-06 <= min <= max <= 0.8, got (0.5, 0.3)")
    set_number(page, "cutpaste-area-range-min", "0.05")  # the page recovers
    wait_for_new_result(page, third)
    page.wait_for_selector("#error", state="hidden", timeout=30_000)
