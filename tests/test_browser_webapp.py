"""The in-browser field page (`python -m edge_runtime webapp`) in a real browser: Debian's headless
Chromium at a phone's viewport, touch and user agent, via Playwright, against a loopback static
server. One browser for the module; each test its own browser context (its own service worker
and caches).

- BUSI images classified in the browser (LiteRT.js, WebAssembly) against the Python edge runtime,
  then the server stopped and the page reloaded: it still classifies, from its service worker.
- A new model version replaces the cached one; missing WebAssembly / SIMD and a model that fails
  to load are said plainly; large and EXIF-rotated photos.
Every request is recorded, and any to an address other than 127.0.0.1 is aborted and fails the test.

Needs /usr/bin/chromium, pip playwright and the LiteRT.js files (`npm ci --prefix web`); skips
and says which is missing otherwise. ONCOLITE_WRITE_REPORTS=1 writes the screenshot to
docs/field-page-browser.png (else the test's tmp folder).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from edge_runtime import webapp

pytestmark = pytest.mark.browser

if webapp.browser_unavailable():
    pytest.skip(webapp.browser_unavailable(), allow_module_level=True)
import playwright.sync_api as playwright_api  # noqa: E402 (after the skip: the test extra)

from webapp_models import browser_variant, tiny_model  # noqa: E402 (after the skips: imports TF lazily)

REPO_ROOT = Path(__file__).resolve().parent.parent
BUSI = REPO_ROOT / "data" / "busi"
SHIPPED_INT8 = REPO_ROOT / "models" / "busi" / "int8.tflite"
SCREENSHOT = REPO_ROOT / "docs" / "field-page-browser.png"
expect = playwright_api.expect


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=webapp.CHROMIUM, args=webapp.CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def busi_model(tmp_path_factory):
    """The shipped BUSI int8 model as the int8_uint8 export: uint8 I/O, batch 1."""
    if not SHIPPED_INT8.is_file():
        pytest.skip(f"{SHIPPED_INT8} not in this checkout")
    return browser_variant(SHIPPED_INT8, tmp_path_factory.mktemp("busi") / "int8_uint8.tflite")


@pytest.fixture(scope="module")
def busi_app(busi_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("busi-app") / "app"
    webapp.build(busi_model, folder)
    return folder


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-app")
    webapp.build(tiny_model(folder, uncertain_margin=0.5), folder / "app")
    return folder / "app"


def busi_images(n=20) -> list[Path]:
    """n images spread over the sorted BUSI folders (all three classes)."""
    files = sorted(BUSI.glob("*/*.png"))
    return files[:: len(files) // n][:n]


class Phone:
    """A browser context at a phone's size, touch and user agent, recording every request and
    aborting any that would leave 127.0.0.1."""

    def __init__(self, browser, init_script=None):
        self.context = browser.new_context(**webapp.PHONE)
        self.requests, self.outside, self.console = [], [], []
        self.context.on("request", lambda r: self.requests.append(r.url))
        self.context.route("**/*", self._guard)
        if init_script:
            self.context.add_init_script(init_script)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.console.append(m.text))

    def _guard(self, route):
        url = urlparse(route.request.url)
        if url.scheme in ("http", "https") and url.hostname == "127.0.0.1":
            route.continue_()
        else:
            self.outside.append(route.request.url)
            route.abort()

    def open(self, url, state="ready"):
        self.page.goto(url)
        self.page.wait_for_selector(f"body[data-state={state}]", timeout=90_000)

    def check_stayed_on_loopback(self):
        assert not self.outside, self.outside
        leaving = [u for u in self.requests if urlparse(u).scheme not in ("blob", "data")
                   and urlparse(u).hostname != "127.0.0.1"]
        assert not leaving, leaving
        assert not [m for m in self.console if "Content Security Policy" in m], self.console

    def close(self):
        self.context.close()


@pytest.fixture
def phone(browser):
    phones = []

    def make(init_script=None):
        phones.append(Phone(browser, init_script))
        return phones[-1]

    yield make
    for p in phones:
        p.close()


def fnv1a(data: bytes) -> str:
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return f"{h:08x}"


def python_answer(model, path) -> dict:
    x = model.prepare(path)
    probs = model.predict(x)[0]
    return {"label": model.labels[model.decide(probs)], "probabilities": dict(zip(model.labels, map(float, probs))),
            "input_digest": fnv1a(model.quantize_input(x[None]).tobytes())}


def test_busi_in_the_browser_agrees_with_the_python_runtime_and_works_offline(phone, busi_app, busi_model, tmp_path):
    from edge_runtime.model import EdgeModel

    model = EdgeModel.load(busi_model)
    images = busi_images()
    assert len(images) == 20 and {p.parent.name for p in images} == {"benign", "malignant", "normal"}
    with webapp.serve_folder(busi_app) as url:
        p = phone()
        p.open(url)
        page = p.page
        assert page.get_attribute("#mode", "data-mode") == "browser"
        assert "In-browser mode" in page.inner_text("#mode")
        assert "not a diagnosis" in page.inner_text("#notice")
        assert page.get_attribute("#camera", "capture") == "environment"
        assert page.get_attribute("#camera", "accept") == "image/*"
        assert "relaxed SIMD" in page.inner_text("#status") or "SIMD" in page.inner_text("#status")
        # Installable: the manifest parses, and headless Chromium's only objection is its incognito profile.
        cdp = p.context.new_cdp_session(page)
        assert cdp.send("Page.getAppManifest").get("errors") == []
        installability = [e["errorId"] for e in cdp.send("Page.getInstallabilityErrors")["installabilityErrors"]]
        assert set(installability) <= {"in-incognito"}, installability

        rows = []
        for path in images:
            shown = webapp.classify_in_page(page, path)
            assert "error" not in shown, shown
            rows.append((path, shown, python_answer(model, path)))
        malignant = next(shown for path, shown, ours in rows if shown["label"] == ours["label"] == "malignant")
        expect(page.locator("#offline")).to_have_attribute("data-ready", "true", timeout=60_000)
        # The screenshot: a malignant answer, as a phone shows it.
        webapp.classify_in_page(page, next(path for path, shown, _ in rows if shown is malignant))
        shot = SCREENSHOT if os.environ.get("ONCOLITE_WRITE_REPORTS") == "1" else tmp_path / SCREENSHOT.name
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        assert page.inner_text("#rule").startswith("Decision rule: highest probability")
        assert page.is_visible("#uncertain") is False  # this model has no uncertain band
    # The server is gone: the reload comes from the service worker, and so do the model and runtime.
    page.reload()
    page.wait_for_selector("body[data-state=ready]", timeout=90_000)
    again = webapp.classify_in_page(page, rows[0][0])
    p.check_stayed_on_loopback()

    agree = sum(shown["label"] == ours["label"] for _, shown, ours in rows)
    same_input = sum(shown["input_digest"] == ours["input_digest"] for _, shown, ours in rows)
    diffs = np.array([[abs(shown["probabilities"][label] - ours["probabilities"][label]) for label in model.labels]
                      for _, shown, ours in rows])
    figures = {"images": len(rows), "top1_agree": agree, "identical_input_tensors": same_input,
               "max_abs_prob_diff": float(diffs.max()), "mean_abs_prob_diff": float(diffs.mean()),
               "browser_ms_median": float(np.median([shown["latency_ms"] for _, shown, _ in rows[1:]])),
               "preprocess_ms_median": float(np.median([shown["preprocess_ms"] for _, shown, _ in rows]))}
    print("in-browser vs Python edge runtime:", json.dumps(figures))
    assert agree >= 19, figures
    assert again["label"] == rows[0][1]["label"] and again["probabilities"] == rows[0][1]["probabilities"]


def test_a_new_model_version_replaces_the_cached_one(phone, tmp_path):
    first = tiny_model(tmp_path, name="first", seed=0)
    second = tiny_model(tmp_path, name="second", seed=1)
    folder = tmp_path / "app"
    one = webapp.build(first, folder)
    with webapp.serve_folder(folder) as url:
        p = phone()
        p.open(url)
        page = p.page
        expect(page.locator("#offline")).to_have_attribute("data-ready", "true", timeout=60_000)
        assert page.get_attribute("#model-line", "data-sha256") == one["model"]["sha256"]
        two = webapp.build(second, folder)
        page.reload()  # the old worker answers; the browser finds the new one, which takes over
        expect(page.locator("#model-line")).to_have_attribute("data-sha256", two["model"]["sha256"], timeout=60_000)
        page.wait_for_selector("body[data-state=ready]", timeout=60_000)
        expect(page.locator("#offline")).to_have_attribute("data-ready", "true", timeout=60_000)
        keys = page.evaluate("caches.keys()")
        assert len(keys) == 1 and two["model"]["sha256"] in keys[0], keys
        assert "error" not in webapp.classify_in_page(page, busi_images()[0])
    p.check_stayed_on_loopback()


@pytest.mark.parametrize("init_script, says", [
    ("WebAssembly.validate = () => false;", "lacks WebAssembly SIMD"),
    ("delete globalThis.WebAssembly;", "cannot run WebAssembly"),
])
def test_a_browser_that_cannot_run_the_model_says_so(phone, tiny_app, init_script, says):
    with webapp.serve_folder(tiny_app) as url:
        p = phone(init_script)
        p.open(url, state="failed")
        assert says in p.page.inner_text("#error")
        assert "server page" in p.page.inner_text("#error")
        assert p.page.is_disabled("#camera") and p.page.is_disabled("#file")


def test_a_model_that_fails_to_load_is_reported(phone, tiny_app, tmp_path):
    folder = tmp_path / "app"
    shutil.copytree(tiny_app, folder)
    facts = json.loads((folder / "model.json").read_text())
    model = folder / facts["model"]["file"]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with webapp.serve_folder(folder) as url:
        p = phone()
        p.open(url, state="failed")
        error = p.page.inner_text("#error")
        assert "could not be loaded" in error and "sha256" in error, error
        assert p.page.is_disabled("#file")


def test_rotated_and_large_photos(phone, busi_app, busi_model, tmp_path):
    from edge_runtime.model import EdgeModel

    model = EdgeModel.load(busi_model)
    scan = np.asarray(Image.open(busi_images()[3]).convert("RGB"))
    rotated = Image.fromarray(np.ascontiguousarray(scan[:, ::-1].transpose(1, 0, 2)))  # as a phone held sideways stores it
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    buf = io.BytesIO()
    rotated.save(buf, "JPEG", quality=92, exif=exif)
    (tmp_path / "rotated.jpg").write_bytes(buf.getvalue())
    big = Image.fromarray(scan).resize((5000, 4000), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=85)
    (tmp_path / "big.jpg").write_bytes(buf.getvalue())
    with webapp.serve_folder(busi_app) as url:
        p = phone()
        p.open(url)
        shown = webapp.classify_in_page(p.page, tmp_path / "rotated.jpg")
        ours = python_answer(model, tmp_path / "rotated.jpg")
        # EXIF orientation applied, and Chromium's JPEG decoder gives Pillow's pixels.
        assert shown["input_digest"] == ours["input_digest"] and shown["label"] == ours["label"]
        shown = webapp.classify_in_page(p.page, tmp_path / "big.jpg")
        assert "error" not in shown and shown["downscaled"] is True
        assert "5000×4000 downscaled on this device" in shown["meta"]
    p.check_stayed_on_loopback()


def test_browser_latency_reports_figures(browser, tiny_app):
    figures = webapp.browser_latency(tiny_app, runs=5, warmup=1, images=[busi_images()[0]], browser=browser)
    assert len(figures["times_ms"]) == 5 and figures["latency_ms"]["p50"] > 0 and figures["threads"] == 1
    assert figures["latency_ms"]["min"] == round(min(figures["times_ms"]), 4) and figures["browser"].startswith("Chromium ")
    assert "SIMD" in figures["wasm"] and figures["runtime"]["version"]
    assert figures["images"][0]["latency_ms"] > 0
