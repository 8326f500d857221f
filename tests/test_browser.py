"""The field page in a real browser: Debian's headless Chromium at a phone viewport, via Playwright.

Needs `apt-get install chromium` (never `playwright install`: nothing is downloaded at run time).
ONCOLITE_WRITE_REPORTS=1 writes the screenshot to docs/field-page.png; otherwise it goes to
the test's tmp folder, so a test run never dirties the tree.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from edge_runtime import server
from test_server import LABELS, running_server, tiny_tflite  # noqa: F401 (fixture)

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)", allow_module_level=True)

playwright_api = pytest.importorskip("playwright.sync_api")

REPO_ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = REPO_ROOT / "docs" / "field-page.png"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True, "device_scale_factor": 2}


def ultrasound_like_png(seed=7) -> bytes:
    """Speckle, a darker oval lesion and a warm tint: looks like a scan, and the tiny model
    (which reads the mean colour) calls it 'malignant' with the others clearly below."""
    rng = np.random.default_rng(seed)
    h, w = 240, 320
    y, x = np.mgrid[0:h, 0:w]
    fan = np.clip(1.1 - np.hypot((x - w / 2) / w, y / h) * 0.9, 0, 1)
    speckle = rng.rayleigh(0.45, (h, w))
    lesion = ((x - 170) / 60) ** 2 + ((y - 120) / 38) ** 2 < 1
    gray = np.clip(fan * speckle * 200 * np.where(lesion, 0.35, 1.0), 0, 255)
    rgb = np.stack([gray * 1.45, gray * 0.9, gray * 0.75], axis=-1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def model(tiny_tflite):
    from edge_runtime.model import EdgeModel

    return EdgeModel.load(tiny_tflite)


def open_phone_page(browser, url):
    context = browser.new_context(**PHONE)
    page = context.new_page()
    seen = {"requests": [], "console": []}
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on("console", lambda m: seen["console"].append(m.text))
    page.goto(url)
    return context, page, seen


def wait_for_model_line(page):
    # Not page.wait_for_function: its string predicate is an eval, which the page's CSP refuses.
    playwright_api.expect(page.locator("#model-line")).to_contain_text("tiny.tflite", timeout=20_000)


def upload_and_read(page, data: bytes) -> dict:
    page.set_input_files("#camera", files=[{"name": "scan.png", "mimeType": "image/png", "buffer": data}])
    page.wait_for_selector("#prediction[data-label]:not([data-label=''])", timeout=20_000)
    bars = page.eval_on_selector_all(
        "#bars li", "items => items.map(li => [li.dataset.label, Number(li.dataset.probability), "
                    "li.querySelector('.fill').getBoundingClientRect().width, getComputedStyle(li.querySelector('.fill')).backgroundColor])")
    return {"label": page.get_attribute("#prediction", "data-label"), "shown": page.inner_text("#prediction"),
            "bars": bars}


def test_phone_upload_shows_the_api_answer(browser, model, tmp_path):
    scan = ultrasound_like_png()
    with running_server(server.create_app(model)) as url:
        api = httpx.post(f"{url}/api/predict", files={"image": ("scan.png", scan, "image/png")}).json()
        context, page, seen = open_phone_page(browser, url + "/")
        try:
            wait_for_model_line(page)
            assert "not a diagnosis" in page.inner_text("#notice")
            assert page.get_attribute("#camera", "capture") is not None
            assert not page.is_visible("#token-form") and not page.is_visible("#error")
            shown = upload_and_read(page, scan)
            path = SCREENSHOT if os.environ.get("ONCOLITE_WRITE_REPORTS") == "1" else tmp_path / "field-page.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(path), full_page=True)
        finally:
            context.close()

    assert shown["label"] == api["label"] == "malignant"
    assert shown["shown"].strip().lower() == api["label"]
    assert [label for label, *_ in shown["bars"]] == LABELS
    for label, probability, width, color in shown["bars"]:
        assert probability == pytest.approx(api["probabilities"][label], abs=1e-6)
    widths = {label: width for label, _, width, _ in shown["bars"]}
    assert widths["malignant"] > widths["benign"] and widths["malignant"] > widths["normal"]
    assert len({color for *_, color in shown["bars"]}) == len(LABELS)  # colour-coded per class
    # Fully offline, and the CSP let everything the page needs through.
    assert all(u.startswith((url, f"blob:{url}")) for u in seen["requests"]), seen["requests"]
    assert not [m for m in seen["console"] if "Content Security Policy" in m], seen["console"]
    assert path.stat().st_size > 10_000


def test_token_page_passes_the_token_and_hides_it_from_the_address_bar(browser, model):
    with running_server(server.create_app(model, token="field-token-123")) as url:
        context, page, _ = open_phone_page(browser, url + "/?token=field-token-123")
        try:
            wait_for_model_line(page)
            assert "token" not in page.url
            assert upload_and_read(page, ultrasound_like_png())["label"] == "malignant"
        finally:
            context.close()


def test_page_without_token_asks_for_it_and_shows_refusals(browser, model):
    with running_server(server.create_app(model, token="field-token-123")) as url:
        context, page, _ = open_phone_page(browser, url + "/")
        try:
            page.wait_for_selector("#token-form:not([hidden])")
            page.fill("#token", "field-token-123")
            page.click("#token-form button")
            wait_for_model_line(page)
            page.set_input_files("#file", files=[{"name": "note.png", "mimeType": "image/png", "buffer": b"not an image"}])
            page.wait_for_selector("#error:not([hidden])")
            assert "not an image" in page.inner_text("#error")
        finally:
            context.close()
