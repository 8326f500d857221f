"""The field server: uploads, refusals, security headers, the token, privacy, and a real model.

Most tests use FakeModel (the real decoding of edge_runtime.preprocess, a fixed rule instead of
a network); `tiny_tflite` is a real .tflite with metadata, run through EdgeModel end to end.
Helpers here are shared by test_server_load.py and test_browser.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import logging
import math
import os
import re
import socket
import struct
import tempfile
import threading
import time
import zlib

import numpy as np
import pytest
import uvicorn
from PIL import Image
from starlette.testclient import TestClient

from edge_runtime import server
from edge_runtime.errors import ModelError, OncoliteError
from edge_runtime.preprocess import Preprocessing, open_image

LABELS = ["benign", "malignant", "normal"]
# Which colour channel drives which class, in both FakeModel and the tiny .tflite.
CHANNEL_OF = {"benign": 2, "malignant": 0, "normal": 1}
COLOR_OF = {"benign": (20, 30, 220), "malignant": (230, 20, 25), "normal": (25, 210, 30)}


class FakeModel:
    """The interface create_app needs, decoding with the real open_image (bombs, bad files)."""

    labels = LABELS
    prep = Preprocessing(32, 32)
    backend = "fake"
    threshold = None
    uncertain_margin = None
    sha256 = "0" * 64

    def __init__(self):
        self.calls = 0
        self.busy = False
        self.overlaps = 0

    def predict_file(self, data):
        if self.busy:
            self.overlaps += 1
        self.busy = True
        try:
            self.calls += 1
            mean = np.asarray(open_image(data), dtype=np.float64).mean(axis=(0, 1)) / 255.0
            scores = np.array([mean[CHANNEL_OF[label]] for label in self.labels]) * 8
            time.sleep(0.001)  # widen the window in which a missing lock would show as an overlap
            e = np.exp(scores - scores.max())
            return (e / e.sum()).astype(np.float32)
        finally:
            self.busy = False

    def decide(self, probs):
        return int(np.argmax(probs))


def image_bytes(color=(230, 20, 25), size=(24, 20), fmt="PNG", text: str | None = None) -> bytes:
    im = Image.new("RGB", size, color)
    buf = io.BytesIO()
    if text is not None:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("Comment", text)
        im.save(buf, fmt, pnginfo=info)
    else:
        im.save(buf, fmt)
    return buf.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid PNG header claiming width x height pixels, with one tiny compressed row."""

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


BAD_UPLOADS = {
    "zero bytes": b"",
    "text renamed .png": b"this is a clinic note, not an image\n",
    "truncated PNG": image_bytes(size=(64, 64))[:60],
    "truncated JPEG": image_bytes(size=(64, 64), fmt="JPEG")[:200],
    "bomb PNG 100000x100000": bomb_png(),
}


def build_tiny_tflite(folder) -> os.PathLike:
    """A real float32 .tflite with oncolite metadata: 32x32 RGB -> mean colour -> 3 classes.

    Its weights are set by hand so a red image is 'malignant', green 'normal', blue 'benign'.
    """
    import tensorflow as tf
    import tf_keras as keras

    from edge_runtime.atomic import write_bytes
    from edge_runtime.metadata import write_metadata

    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax", name="predictions")(pooled)
    model = keras.Model(inputs, outputs)
    kernel = np.zeros((3, len(LABELS)), np.float32)
    for column, label in enumerate(LABELS):
        kernel[CHANNEL_OF[label], column] = 4.0
    model.get_layer("predictions").set_weights([kernel, np.zeros(len(LABELS), np.float32)])
    flat = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    prep = Preprocessing(32, 32)
    data = write_metadata(flat, name="tiny test classifier", description="colour -> class, for tests",
                          labels=LABELS, prep=prep,
                          extra={"format": "oncolite-model/1", "variant": "fp32", "threshold": None})
    return write_bytes(os.path.join(folder, "tiny.tflite"), data)


@pytest.fixture(scope="session")
def tiny_tflite(tmp_path_factory):
    return build_tiny_tflite(tmp_path_factory.mktemp("tiny_model"))


@contextlib.contextmanager
def running_server(app, host="127.0.0.1", **config):
    """A real uvicorn server on a free loopback port in a background thread; yields its base URL.
    `config`: server.uvicorn_config's timeouts and limits."""
    sock = server.bind(host, 0)
    port = sock.getsockname()[1]
    uv = uvicorn.Server(server.uvicorn_config(app, quiet=True, **config))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=15)
        sock.close()


def raw_request(base_url: str, request: bytes, timeout=20.0) -> tuple[int, bytes]:
    """Send bytes exactly as given (no client-side URL normalization); return status and body."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        response = http.client.HTTPResponse(s)
        response.begin()
        return response.status, response.read()


def multipart(field: str, filename: str, data: bytes, boundary="b0undary") -> tuple[bytes, str]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.fixture
def fake():
    return FakeModel()


@pytest.fixture
def client(fake):
    with TestClient(server.create_app(fake, max_upload_bytes=64 * 1024), raise_server_exceptions=False) as c:
        yield c


# --- answers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("label", LABELS)
def test_multipart_upload_gets_label_probabilities_and_notice(client, label):
    r = client.post("/api/predict", files={"image": ("scan.png", image_bytes(COLOR_OF[label]), "image/png")})
    assert r.status_code == 200
    body = r.json()
    assert body["label"] == label
    assert list(body["probabilities"]) == LABELS
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert body["top"][0]["label"] == label
    assert [t["probability"] for t in body["top"]] == sorted(body["probabilities"].values(), reverse=True)
    assert isinstance(body["latency_ms"], float) and math.isfinite(body["latency_ms"])
    assert body["model"]["labels"] == LABELS
    assert "not a diagnosis" in body["notice"]
    assert body["decision_rule"] == "highest probability" and body["uncertain"] is None  # no band


def test_raw_body_upload_is_accepted(client):
    r = client.post("/api/predict", content=image_bytes(COLOR_OF["normal"], fmt="JPEG"),
                    headers={"content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["label"] == "normal"


def test_health_names_model_labels_and_backend(client):
    r = client.get("/api/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["labels"] == LABELS and body["backend"] == "fake"
    assert body["model"]["sha256"] == FakeModel.sha256


def test_page_is_offline_with_camera_capture_and_notice(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'accept="image/*"' in html and "capture" in html
    assert "not a diagnosis" in html
    for asset in ("/static/app.css", "/static/app.js"):
        assert asset in html
        assert client.get(asset).status_code == 200
    everything = html + client.get("/static/app.js").text + client.get("/static/app.css").text
    # Fully offline: nothing is fetched from another host.
    assert "http://" not in everything and "https://" not in everything and "//cdn" not in everything


# --- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(BAD_UPLOADS))
def test_bad_uploads_get_400_with_a_readable_message(client, fake, name):
    r = client.post("/api/predict", files={"image": ("x.png", BAD_UPLOADS[name], "image/png")})
    assert r.status_code == 400
    message = r.json()["error"]
    assert message and "Traceback" not in message and "File \"" not in message
    if name.startswith("bomb"):
        assert re.search("decompression.bomb", message)


def test_malformed_multipart_and_missing_field_get_400(client):
    body, content_type = multipart("photo", "x.png", image_bytes())
    r = client.post("/api/predict", content=body, headers={"content-type": content_type})
    assert r.status_code == 400 and "'image'" in r.json()["error"]
    r = client.post("/api/predict", content=b"--zzz\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400
    r = client.post("/api/predict", content=b"x", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and "boundary" in r.json()["error"]


def test_declared_oversized_upload_gets_413(client, fake):
    r = client.post("/api/predict", content=b"\0" * (64 * 1024 + 1))
    assert r.status_code == 413 and "MB" in r.json()["error"]
    assert fake.calls == 0


def test_streamed_oversized_upload_gets_413_without_reading_it_whole():
    """Drive the ASGI app directly with a 100 MB chunked body and count what it consumed."""
    limit, chunk, total = 256 * 1024, 64 * 1024, 100 * 2**20
    app = server.create_app(FakeModel(), max_upload_bytes=limit)
    consumed, sent = 0, []

    async def receive():
        nonlocal consumed
        consumed += chunk
        return {"type": "http.request", "body": b"\xff" * chunk, "more_body": consumed < total}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/api/predict", "raw_path": b"/api/predict", "query_string": b"",
             "headers": [(b"content-type", b"application/octet-stream"), (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert consumed <= limit + chunk < total


def test_declared_oversized_upload_is_refused_before_the_body_is_sent(fake):
    # A real server answers 413 from the headers alone: the client never sends the 50 MB.
    app = server.create_app(fake, max_upload_bytes=1024)
    with running_server(app) as url:
        status, body = raw_request(url, b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                        b"Content-Type: image/png\r\nContent-Length: 52428800\r\n\r\n")
    assert status == 413 and b"MB" in body
    assert fake.calls == 0


def test_slow_client_times_out_with_408(fake):
    app = server.create_app(fake, body_timeout_s=0.5)
    with running_server(app) as url:
        # Declares 1000 bytes, sends 10, then stalls.
        status, body = raw_request(url, b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                        b"Content-Type: image/png\r\nContent-Length: 1000\r\n\r\n0123456789")
    assert status == 408 and b"retry" in body
    assert fake.calls == 0


TRAVERSALS = ["/static/../server.py", "/static/..%2fserver.py", "/static/%2e%2e/server.py",
              "/static/%2e%2e%2fserver.py", "/static/..%5cserver.py", "/static/%252e%252e%252fserver.py",
              "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/../edge_runtime/server.py",
              "/static/app.js/..", "/static/.", "/static/", "/nope", "/api", "/api/nope", "/server.py"]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_unknown_and_traversal_paths_get_404(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert "import" not in r.text


def test_traversal_sent_verbatim_to_a_real_server_gets_404(fake):
    with running_server(server.create_app(fake)) as url:
        for path in TRAVERSALS:
            status, body = raw_request(url, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            assert status in (400, 404), path  # uvicorn itself may refuse a malformed target
            assert b"import" not in body and b"root:" not in body, path


@pytest.mark.parametrize("path,method", [("/", "GET"), ("/static/app.js", "GET"), ("/api/health", "GET"),
                                         ("/nope", "GET"), ("/api/predict", "GET"), ("/api/predict", "POST")])
def test_security_headers_on_every_response(client, path, method):
    r = client.request(method, path, content=b"not an image" if method == "POST" else None)
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "http:" not in csp and "https:" not in csp and "*" not in csp and "unsafe" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["cache-control"] == "no-store"


def test_unexpected_error_is_a_bare_500_and_logs_only_its_type(caplog):
    class Broken(FakeModel):
        def predict_file(self, data):
            raise RuntimeError(f"secret detail {data[:8]!r} /home/clinic/patient.png")

    with caplog.at_level(logging.DEBUG), TestClient(server.create_app(Broken()), raise_server_exceptions=False) as c:
        r = c.post("/api/predict", content=image_bytes())
    assert r.status_code == 500
    assert "secret" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "RuntimeError" in caplog.text
    assert "secret" not in caplog.text and "patient" not in caplog.text


def test_request_log_cannot_be_forged_through_the_path(client, caplog):
    with caplog.at_level(logging.INFO, logger="oncolite.server"):
        assert client.get("/api/%0a2026-01-01 INFO GET /forged 200").status_code == 404
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()


# --- the access token --------------------------------------------------------------------------

def test_token_required_when_set(fake):
    token = "s3cret-token"
    with TestClient(server.create_app(fake, token=token)) as c:
        for path in ("/api/health",):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"authorization": "Bearer wrong"}).status_code == 401
            assert c.get(path, headers={"authorization": f"Bearer {token}"}).status_code == 200
            assert c.get(f"{path}?token={token}").status_code == 200
        r = c.post("/api/predict", content=image_bytes())
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert fake.calls == 0
        r = c.post("/api/predict", content=image_bytes(), headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200
        # The page itself holds no data: it loads, then asks for the token.
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200


def test_token_is_compared_in_constant_time(fake, monkeypatch):
    seen = []
    real = server.hmac.compare_digest
    monkeypatch.setattr(server.hmac, "compare_digest", lambda a, b: seen.append((a, b)) or real(a, b))
    with TestClient(server.create_app(fake, token="abc")) as c:
        assert c.get("/api/health", headers={"authorization": "Bearer abd"}).status_code == 401
    assert seen == [(b"abd", b"abc")]


def test_unauthorized_oversized_upload_is_refused_as_401_first(fake):
    with TestClient(server.create_app(fake, token="t", max_upload_bytes=10)) as c:
        assert c.post("/api/predict", content=b"\0" * 100).status_code == 401


# --- concurrency --------------------------------------------------------------------------------

def test_concurrent_requests_never_overlap_in_the_model(fake):
    app = server.create_app(fake)
    with TestClient(app) as c:
        def post(i):
            label = LABELS[i % 3]
            r = c.post("/api/predict", content=image_bytes(COLOR_OF[label]))
            return r.status_code, r.json()["label"], label

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(post, range(48)))
    assert all(status == 200 and got == want for status, got, want in results)
    assert fake.calls == 48 and fake.overlaps == 0


# --- privacy: nothing of an upload reaches the disk or the logs --------------------------------

def _snapshot(*folders) -> dict:
    files = {}
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            dirs[:] = [d for d in dirs if d not in (".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis")]
            for name in names:
                path = os.path.join(root, name)
                with contextlib.suppress(OSError):
                    st = os.stat(path)
                    files[path] = (st.st_size, st.st_mtime_ns)
    return files


def test_uploads_never_reach_disk_or_logs(fake, monkeypatch, caplog, capfd):
    marker = "PATIENT-7f3a9c-MARKER"
    filename = "jane-doe-1962-scan.png"
    upload = image_bytes(size=(900, 700), text=marker)
    big_upload = image_bytes(size=(1400, 1100), fmt="BMP")  # > 1 MB: Starlette's form parser would spool it to disk
    assert len(big_upload) > 2**20

    writes = []

    def forbid(name):
        def refuse(*a, **k):
            writes.append(name)
            raise AssertionError(f"tempfile.{name} called while handling an upload")
        return refuse

    for name in ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryFile", "SpooledTemporaryFile"):
        monkeypatch.setattr(tempfile, name, forbid(name))
    real_open = open

    def watching_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            writes.append(os.fspath(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr("builtins.open", watching_open)
    folders = [tempfile.gettempdir(), os.getcwd(), os.path.dirname(server.__file__)]
    before = _snapshot(*folders)
    with caplog.at_level(logging.DEBUG), TestClient(server.create_app(fake, max_upload_bytes=8 * 2**20)) as c:
        for data in (upload, big_upload):
            r = c.post("/api/predict", files={"image": (filename, data, "image/png")})
            assert r.status_code == 200
        r = c.post("/api/predict", files={"image": (filename, b"not an image " + marker.encode(), "image/png")})
        assert r.status_code == 400
    after = _snapshot(*folders)
    out, err = capfd.readouterr()
    assert writes == []
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    # Other engineers' tests may write to the shared temp folder meanwhile: none of ours may hold the upload.
    for path in changed:
        with contextlib.suppress(OSError):
            if os.path.getsize(path) > 64 * 2**20:
                continue  # not ours: our uploads are a few MB
            with real_open(path, "rb") as f:
                content = f.read()
            assert marker.encode() not in content and upload[100:164] not in content, path
    everything_logged = caplog.text + out + err
    assert "/api/predict" in caplog.text  # the request log is on, and still says nothing of the image
    assert marker not in everything_logged and filename not in everything_logged
    assert "jane" not in everything_logged


# --- a real model, end to end ------------------------------------------------------------------

def test_real_tiny_tflite_end_to_end(tiny_tflite):
    from edge_runtime.model import EdgeModel

    model = EdgeModel.load(tiny_tflite)
    with TestClient(server.create_app(model)) as c:
        health = c.get("/api/health").json()
        assert health["labels"] == LABELS and health["model"]["name"] == "tiny.tflite"
        assert health["model"]["sha256"] == model.sha256
        for label in LABELS:
            r = c.post("/api/predict", files={"image": ("x.png", image_bytes(COLOR_OF[label]), "image/png")})
            assert r.status_code == 200
            body = r.json()
            assert body["label"] == label
            expected = model.predict_file(image_bytes(COLOR_OF[label]))
            assert [body["probabilities"][k] for k in LABELS] == pytest.approx(expected.tolist(), abs=1e-5)
        assert c.post("/api/predict", content=bomb_png()).status_code == 400


# --- the command --------------------------------------------------------------------------------

def test_serve_without_model_names_the_missing_shipped_model(monkeypatch, tmp_path):
    import edge_runtime.model as edge_model

    monkeypatch.setattr(edge_model, "SHIPPED_MODEL", tmp_path / "models" / "busi" / "int8.tflite")
    parser = __import__("argparse").ArgumentParser()
    server.add_arguments(parser)
    args = parser.parse_args([])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.max_upload_mb == 10
    with pytest.raises(ModelError, match="int8.tflite"):
        server.main(args)


def test_serve_token_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("ONCOLITE_TOKEN", "from-env")
    parser = __import__("argparse").ArgumentParser()
    server.add_arguments(parser)
    assert parser.parse_args([]).token == "from-env"
    assert parser.parse_args(["--token", "flag"]).token == "flag"


def test_urls_show_the_lan_address_and_token_when_bound_to_all():
    [local] = server.urls("127.0.0.1", 8000, None)
    assert local == "http://127.0.0.1:8000/"
    lan, loop = server.urls("0.0.0.0", 8123, "tok")
    assert lan.endswith(":8123/?token=tok") and loop == "http://127.0.0.1:8123/?token=tok"
    assert "0.0.0.0" not in lan


def test_bind_to_a_busy_port_is_a_one_line_error():
    sock = server.bind("127.0.0.1", 0)
    try:
        with pytest.raises(OncoliteError, match="--port"):
            server.bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
