"""The in-browser field page builder (`python -m edge_runtime webapp`), without a browser.

The page itself runs in tests/test_browser_webapp.py. Here: what the builder writes and
refuses, the serve hook, and the page's preprocessing (edge_runtime/webapp_static/preprocess.js)
against Pillow and edge_runtime.preprocess, run by node when it is installed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import shutil
import subprocess

import httpx
import numpy as np
import pytest
from PIL import Image

from edge_models import model_file
from edge_runtime import webapp
from edge_runtime.cli import main as edge_main
from edge_runtime.errors import ModelError, OncoliteError
from edge_runtime.preprocess import Preprocessing, normalize, quantize
from webapp_models import tiny_model


@pytest.fixture(scope="module")
def fake_runtime(tmp_path_factory):
    """Stand-ins for the npm files: the builder copies them without reading them."""
    root = tmp_path_factory.mktemp("node_modules")
    for name in webapp.RUNTIME_FILES:
        path = root / "@litertjs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"version": "9.9.9"}) if name.endswith("package.json") else f"// {name}\n")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny"), uncertain_margin=0.2)


def test_build_writes_a_self_contained_folder(tiny, fake_runtime, tmp_path):
    summary = webapp.build(tiny, tmp_path / "app", runtime_dir=fake_runtime)
    app = tmp_path / "app"
    facts = json.loads((app / "model.json").read_text())
    data = tiny.read_bytes()
    assert facts["format"] == "oncolite-webapp/1"
    assert facts["model"]["sha256"] == hashlib.sha256(data).hexdigest() == summary["model"]["sha256"]
    assert (app / facts["model"]["file"]).read_bytes() == data
    assert facts["labels"] == ["benign", "malignant", "normal"]
    assert facts["preprocessing"] == Preprocessing(16, 16).to_dict()
    assert facts["input"]["dtype"] == "uint8" and facts["input"]["shape"] == [1, 16, 16, 3]
    assert facts["threshold"] is None and facts["decision_rule"] == "highest probability"
    assert facts["uncertain_margin"] == 0.2
    assert "not a diagnosis" in facts["notice"]
    assert facts["runtime"]["version"] == "9.9.9"
    # The cache key starts with the model's sha256; the worker carries it and precaches the page.
    assert facts["version"].startswith(facts["model"]["sha256"] + "-")
    worker = (app / "sw.js").read_text()
    assert f'"{facts["version"]}"' in worker and "{{" not in worker
    for name in facts["precache"]:
        assert name == "./" or (app / name).is_file(), name
    for name in webapp.RUNTIME_FILES.values():
        assert (app / name).is_file()
    # The only inline script is the import map, allowed by its hash in the page's CSP.
    page = (app / "index.html").read_text()
    importmap = re.search(r'<script type="importmap">(.*?)</script>', page, re.S).group(1)
    assert json.loads(importmap) == {"imports": {"@litertjs/wasm-utils": "./runtime/wasm-utils/index.js"}}
    digest = base64.b64encode(hashlib.sha256(importmap.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in page and "'wasm-unsafe-eval'" in page and "{{" not in page
    manifest = json.loads((app / "manifest.webmanifest").read_text())
    assert manifest["display"] == "standalone" and manifest["start_url"] == "./"
    for icon in manifest["icons"]:
        with Image.open(app / icon["src"]) as im:
            assert f"{im.width}x{im.height}" == icon["sizes"]
    # Nothing of ours names another host: no CDN at run time.
    for name in ("index.html", "field.js", "preprocess.js", "sw.js", "field.css", "app.css", "manifest.webmanifest"):
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", (app / name).read_text()), name


def test_binary_model_carries_its_operating_point(fake_runtime, tmp_path):
    model = tiny_model(tmp_path, labels=("non-idc", "idc"), threshold={"positive": "idc", "value": 0.3},
                       uncertain_margin=0.1)
    webapp.build(model, tmp_path / "app", runtime_dir=fake_runtime)
    facts = json.loads((tmp_path / "app" / "model.json").read_text())
    assert facts["threshold"] == {"positive": "idc", "value": 0.3} and facts["uncertain_margin"] == 0.1
    assert facts["decision_rule"] == "idc if p(idc) >= 0.3, else non-idc"


def test_rebuild_replaces_the_folder_and_changes_the_version(tiny, fake_runtime, tmp_path):
    first = webapp.build(tiny, tmp_path / "app", runtime_dir=fake_runtime)
    other = tiny_model(tmp_path, name="other", seed=1)
    second = webapp.build(other, tmp_path / "app", runtime_dir=fake_runtime)
    assert first["version"] != second["version"]
    assert not (tmp_path / "app" / first["model"]["file"]).exists()  # no stale model left behind
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".app")] == []  # no staging left


def test_builds_are_reproducible(tiny, fake_runtime, tmp_path):
    a = webapp.build(tiny, tmp_path / "a", runtime_dir=fake_runtime)
    b = webapp.build(tiny, tmp_path / "b", runtime_dir=fake_runtime)
    assert a["version"] == b["version"]


@pytest.mark.parametrize("variant, says", [("int8", "input tensor is int8"),
                                           ("uint8", "dynamic dimension (signature [-1, 16, 16, 3])")])
def test_refuses_what_litert_js_cannot_run_and_names_the_fix(variant, says, fake_runtime, tmp_path):
    model = model_file(tmp_path, variant)
    with pytest.raises(ModelError) as e:
        webapp.build(model, tmp_path / "app", runtime_dir=fake_runtime)
    message = str(e.value)
    assert says in message and "int8_uint8" in message and "\n" not in message
    assert not (tmp_path / "app").exists()


def test_missing_runtime_files_name_the_install_command(tiny, tmp_path):
    with pytest.raises(OncoliteError, match=r"npm ci --prefix web"):
        webapp.build(tiny, tmp_path / "app", runtime_dir=tmp_path / "empty")


def test_invalid_uncertain_margin_is_refused(fake_runtime, tmp_path):
    model = tiny_model(tmp_path, uncertain_margin=1.5)
    with pytest.raises(ModelError, match="uncertain_margin 1.5"):
        webapp.build(model, tmp_path / "app", runtime_dir=fake_runtime)


def test_refuses_to_overwrite_a_folder_that_is_not_a_web_app(tiny, fake_runtime, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    with pytest.raises(OncoliteError, match="not an oncolite web app"):
        webapp.build(tiny, tmp_path / "docs", runtime_dir=fake_runtime)
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"


def test_cli(tiny, fake_runtime, tmp_path, capsys):
    code = edge_main(["webapp", str(tiny), "--out", str(tmp_path / "app"), "--runtime", str(fake_runtime), "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["model"]["name"] == tiny.name
    code = edge_main(["webapp", str(model_file(tmp_path, "int8")), "--out", str(tmp_path / "x"), "--runtime", str(fake_runtime)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "int8_uint8" in err[0]


def test_mount_webapp_serves_the_folder_under_field(tiny, fake_runtime, tmp_path):
    """The hook for `serve --webapp DIR`: the field server's own app, with the built folder at /field/."""
    from edge_runtime import server
    from edge_runtime.model import EdgeModel

    webapp.build(tiny, tmp_path / "app", runtime_dir=fake_runtime)
    inner = server.create_app(EdgeModel.load(tiny))
    app = webapp.mount_webapp(inner, tmp_path / "app")
    transport = httpx.ASGITransport(app=app)

    paths = ["/", "/field", "/field/", "/field/model.json", "/field/runtime/wasm/litert_wasm_internal.wasm",
             "/field/%2e%2e/pyproject.toml", "/field/runtime/../model.json"]

    async def requests():
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            answers = {path: await client.get(path) for path in paths}
            answers["health"] = await client.get("/api/health")
            answers["post"] = await client.post("/field/model.json")
            return answers

    r = asyncio.run(requests())
    assert r["/"].status_code == 200 and "In-browser mode" not in r["/"].text  # the server page, untouched
    assert r["health"].json()["status"] == "ok"
    assert "'wasm-unsafe-eval'" not in r["/"].headers["content-security-policy"]
    assert r["/field"].status_code == 308 and r["/field"].headers["location"] == "/field/"
    page = r["/field/"]
    assert page.status_code == 200 and "In-browser mode" in page.text
    assert "'wasm-unsafe-eval'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert r["/field/model.json"].json()["format"] == "oncolite-webapp/1"
    assert r["/field/runtime/wasm/litert_wasm_internal.wasm"].headers["content-type"] == "application/wasm"
    # Only the folder's own files, looked up by name: no path reaches the file system.
    assert r["/field/%2e%2e/pyproject.toml"].status_code == 404
    assert r["post"].status_code == 405
    assert r["/field/"].headers["content-security-policy"].count("default-src") == 1  # one policy, the page's own
    with pytest.raises(OncoliteError, match="not a web app"):
        webapp.mount_webapp(inner, tmp_path)


# --- preprocess.js against Pillow and edge_runtime.preprocess (node) ------------------------

NODE_CHECK = """
import fs from "fs";
import { resize, toInput, toProbabilities, decide, margin, roundHalfEven } from "./preprocess.mjs";
const cases = JSON.parse(fs.readFileSync("cases.json"));
const out = [];
for (const c of cases) {
  const rgba = new Uint8ClampedArray(fs.readFileSync(c.file));
  const resized = resize(rgba, c.w, c.h, c.ow, c.oh, c.resample);
  const rgb = [];
  for (let i = 0; i < c.ow * c.oh; i++) rgb.push(resized[i * 4], resized[i * 4 + 1], resized[i * 4 + 2]);
  const input = toInput(resized, c.ow * c.oh, c.prep, c.input);
  out.push({ rgb: Buffer.from(rgb).toString("base64"), input: Array.from(input) });
}
const extra = JSON.parse(fs.readFileSync("extra.json"));
out.push({
  halves: extra.halves.map(roundHalfEven),
  probs: extra.outputs.map(([data, output]) => toProbabilities(data, output)),
  decisions: extra.decide.map(([p, t, labels]) => decide(p, labels, t)),
  margins: extra.decide.map(([p, t, labels]) => margin(p, labels, t)),
});
console.log(JSON.stringify(out));
"""

RESAMPLES = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST, "area": Image.Resampling.BOX}


def test_preprocess_js_is_pillow_and_edge_runtime_bit_for_bit(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed: preprocess.js is checked in the browser test only")
    from edge_runtime.decision import margins
    from edge_runtime.model import EdgeModel, to_probabilities

    shutil.copy(webapp.ASSETS_DIR / "preprocess.js", tmp_path / "preprocess.mjs")
    rng = np.random.default_rng(0)
    uint8_in = {"dtype": "uint8", "scale": 2 / 255, "zero_point": 127}  # the half-step grid of the notes
    cases, expected = [], []
    shapes = [(256, 256, 224, 224), (640, 480, 224, 224), (300, 1000, 160, 160), (100, 80, 224, 224),
              (33, 35, 96, 96), (500, 500, 224, 100)]
    for i, (w, h, ow, oh) in enumerate(shapes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pixels[: h // 2] = (np.linspace(0, 255, w)[None, :, None] * np.ones((h // 2, 1, 3))).astype(np.uint8)
        np.concatenate([pixels, np.full((h, w, 1), 255, np.uint8)], -1).tofile(tmp_path / f"in{i}.raw")
        for resample in RESAMPLES:
            prep = Preprocessing(oh, ow, mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4), resample=resample) \
                if i % 2 else Preprocessing(oh, ow, resample=resample)
            io = uint8_in if i != 3 else {"dtype": "float32", "scale": 0.0, "zero_point": 0}
            cases.append({"file": f"in{i}.raw", "w": w, "h": h, "ow": ow, "oh": oh, "resample": resample,
                          "prep": prep.to_dict(), "input": io})
            resized = np.asarray(Image.fromarray(pixels).resize((ow, oh), RESAMPLES[resample]))
            x = normalize(resized, prep)
            tensor = x if io["dtype"] == "float32" else quantize(x, io["scale"], io["zero_point"], np.uint8)
            expected.append((resized, tensor))
    halves = [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 126.5, 127.5, 0.49999999, 2.5000001]
    outputs = [([255, 0, 0], {"dtype": "uint8", "scale": 1 / 256, "zero_point": 0}),
               ([3, 200, 52], {"dtype": "uint8", "scale": 1 / 256, "zero_point": 0}),
               ([0.2, 0.5, 0.3], {"dtype": "float32"}), ([2.0, -1.0, 0.5], {"dtype": "float32"})]
    three, two = ["benign", "malignant", "normal"], ["non-idc", "idc"]
    threshold = {"positive": "idc", "value": 0.3}
    decisions = [([0.69, 0.31], threshold, two), ([0.71, 0.29], threshold, two), ([0.7, 0.3], threshold, two),
                 ([0.2, 0.2, 0.6], None, three), ([0.4, 0.4, 0.2], None, three), ([0.1, 0.7, 0.2], None, three)]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "extra.json").write_text(json.dumps({"halves": halves, "outputs": outputs, "decide": decisions}))
    (tmp_path / "check.mjs").write_text(NODE_CHECK)
    done = subprocess.run([node, "check.mjs"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    *results, extra = json.loads(done.stdout)

    for case, result, (resized, tensor) in zip(cases, results, expected):
        got = np.frombuffer(base64.b64decode(result["rgb"]), np.uint8).reshape(resized.shape)
        assert np.array_equal(got, resized), (case["resample"], case["w"], case["h"], int(np.abs(got.astype(int) - resized).max()))
        assert np.array_equal(np.asarray(result["input"], tensor.dtype), tensor.reshape(-1)), case
    assert extra["halves"] == [float(v) for v in np.round(halves)]
    for (data, output), probs in zip(outputs, extra["probs"]):
        y = np.asarray(data, np.float64)
        if output["dtype"] == "uint8":
            y = ((y - output["zero_point"]) * output["scale"]).astype(np.float32)
        assert probs == to_probabilities(np.asarray(y, np.float32)).tolist()
    for (probs, t, labels), got, gap in zip(decisions, extra["decisions"], extra["margins"]):
        fake = type("M", (), {"threshold": t, "labels": labels})()
        assert got == EdgeModel.decide(fake, probs)
        assert gap == margins(np.asarray([probs]), t, labels)[0]
