"""The field server under load and under fuzzing, with a real tiny .tflite.

The load test runs `python -m edge_runtime serve` as its own process on loopback and prints its
figures; with ONCOLITE_WRITE_REPORTS=1 it also writes them to reports/reliability/server_load.json
(for docs/RELIABILITY.md), otherwise to the test's tmp folder so a test run never dirties the tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from edge_runtime import server
from edge_runtime.atomic import write_json
from test_server import BAD_UPLOADS, COLOR_OF, LABELS, bomb_png, image_bytes, tiny_tflite  # noqa: F401 (fixture)

REPO_ROOT = Path(__file__).resolve().parent.parent
REPORT = REPO_ROOT / "reports" / "reliability" / "server_load.json"

REQUESTS = 1000
CONCURRENCY = 16
WARM_UP = 200
MAX_UPLOAD_MB = 1
# RSS may grow while allocators settle; keeping every upload (80 x 1.2 MB refused bodies alone)
# or every decoded image would blow far past this.
RSS_GROWTH_BOUND_MB = 40


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def served_model(tiny_tflite, tmp_path):
    """`python -m edge_runtime serve` on a free loopback port; yields (base_url, pid, stderr path)."""
    command = [sys.executable, "-m", "edge_runtime", "serve", os.fspath(tiny_tflite), "--port", "0",
               "--json", "--max-upload-mb", str(MAX_UPLOAD_MB), "--threads", "1"]
    stderr = tmp_path / "server.log"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=err)
    try:
        text = ""
        for line in proc.stdout:  # --json prints the addresses as one indented JSON document
            text += line.decode()
            if line.rstrip() == b"}":
                break
        assert text, f"server printed nothing: {stderr.read_text()}"
        base = json.loads(text)["urls"][0].rstrip("/")
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.1)
        yield base, proc.pid, stderr, command
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def mixed_uploads(n: int) -> list[tuple[str, bytes, int, str | None]]:
    """(kind, body, expected status, expected label): 60 % good images, the rest each kind of bad."""
    oversized = b"\x89PNG" + b"\0" * int(1.2 * MAX_UPLOAD_MB * 2**20)
    bad = [("not an image", BAD_UPLOADS["text renamed .png"], 400), ("truncated", BAD_UPLOADS["truncated PNG"], 400),
           ("oversized", oversized, 413), ("bomb", bomb_png(), 400)]
    uploads = []
    for i in range(n):
        slot = i % 10
        if slot < 6:
            label = LABELS[i % len(LABELS)]
            size = (16 + (i * 7) % 200, 16 + (i * 13) % 150)
            fmt = "JPEG" if i % 2 else "PNG"
            uploads.append((f"good {fmt}", image_bytes(COLOR_OF[label], size, fmt), 200, label))
        else:
            kind, body, status = bad[slot - 6]
            uploads.append((kind, body, status, None))
    return uploads


@pytest.mark.slow
def test_load_mixed_uploads_no_5xx_flat_memory(served_model, tmp_path):
    base, pid, stderr, command = served_model
    uploads = mixed_uploads(REQUESTS)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    with httpx.Client(base_url=base, limits=limits, timeout=60) as client:

        def send(upload):
            kind, body, want_status, want_label = upload
            start = time.perf_counter()
            try:
                r = client.post("/api/predict", files={"image": ("upload.png", body, "image/png")})
            except httpx.HTTPError as e:
                return kind, f"client error {type(e).__name__}", None, (time.perf_counter() - start) * 1000, want_status, want_label
            label = r.json().get("label") if r.status_code == 200 else None
            return kind, r.status_code, label, (time.perf_counter() - start) * 1000, want_status, want_label

        started = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(send, uploads[:WARM_UP]))
            rss_warm = rss_mb(pid)
            results += list(pool.map(send, uploads[WARM_UP:]))
        duration = time.perf_counter() - started
    rss_end = rss_mb(pid)

    statuses = Counter(str(status) for _, status, *_ in results)
    wrong = [(kind, status, want) for kind, status, _, _, want, _ in results if status != want]
    mislabeled = [(kind, label, want) for kind, status, label, _, _, want in results if status == 200 and label != want]
    latencies = np.array([ms for _, _, _, ms, _, _ in results])
    good = np.array([ms for _, _, _, ms, want, _ in results if want == 200])
    report = {
        "command": "ONCOLITE_WRITE_REPORTS=1 pytest tests/test_server_load.py -k mixed_uploads -s",
        "server": " ".join(["python", "-m", "edge_runtime", "serve", "TINY.tflite", *command[5:]]),
        "model": "tiny 32x32 fp32 test classifier (tests/test_server.py: build_tiny_tflite)",
        "requests": len(results),
        "concurrency": CONCURRENCY,
        "mix": dict(Counter(kind for kind, *_ in uploads)),
        "statuses": dict(sorted(statuses.items())),
        "server_errors_5xx": sum(1 for s in statuses.elements() if s.startswith("5")),
        "client_errors": sum(1 for s in statuses.elements() if s.startswith("client")),
        "unexpected_status": len(wrong),
        "wrong_label": len(mislabeled),
        "latency_ms": {"p50": round(float(np.percentile(latencies, 50)), 2),
                       "p99": round(float(np.percentile(latencies, 99)), 2),
                       "good_p50": round(float(np.percentile(good, 50)), 2),
                       "good_p99": round(float(np.percentile(good, 99)), 2)},
        "duration_s": round(duration, 2),
        "requests_per_s": round(len(results) / duration, 1),
        "rss_mb": {"after_warm_up": round(rss_warm, 1), "end": round(rss_end, 1),
                   "growth": round(rss_end - rss_warm, 1), "bound": RSS_GROWTH_BOUND_MB},
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    write_json(REPORT if os.environ.get("ONCOLITE_WRITE_REPORTS") == "1" else tmp_path / REPORT.name, report)

    assert report["server_errors_5xx"] == 0 and report["client_errors"] == 0
    assert wrong == [] and mislabeled == []
    assert rss_end - rss_warm < RSS_GROWTH_BOUND_MB, report["rss_mb"]
    # The server's log has one line per request and nothing of the uploads.
    log = stderr.read_bytes()
    assert log.count(b"POST /api/predict") == REQUESTS
    assert b"upload.png" not in log and b"Traceback" not in log


# --- fuzzing -----------------------------------------------------------------------------------

VALID = [image_bytes(COLOR_OF[label], (9 + 5 * i, 7 + 3 * i), fmt)
         for i, (label, fmt) in enumerate(zip(LABELS, ["PNG", "JPEG", "GIF"]))]

header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)


@st.composite
def damaged_images(draw):
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@st.composite
def multipart_bodies(draw):
    boundary = draw(st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters='";'),
                            min_size=1, max_size=20))
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["image", "photo", "", 'im"age']))
        payload = draw(st.one_of(damaged_images(), st.binary(max_size=300)))
        headers = draw(st.sampled_from([f'Content-Disposition: form-data; name="{name}"; filename="a.png"',
                                        f"Content-Disposition: form-data; name={name}",
                                        "Content-Type: image/png", draw(header_text)]))
        parts.append(f"--{boundary}\r\n{headers}\r\n\r\n".encode() + payload + b"\r\n")
    ending = draw(st.sampled_from([f"--{boundary}--\r\n".encode(), b"", f"--{boundary}".encode()]))
    declared = draw(st.sampled_from([boundary, "", "other", f'"{boundary}"']))
    return f"multipart/form-data; boundary={declared}", b"".join(parts) + ending


requests_ = st.one_of(
    st.tuples(st.sampled_from(["image/png", "application/octet-stream", "", "text/plain", "application/json"])
              | header_text, st.one_of(st.binary(max_size=2048), damaged_images())),
    multipart_bodies(),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(request=requests_,
       method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "OPTIONS", "PATCH"]),
       path=st.sampled_from(["/api/predict", "/api/predict", "/api/health", "/"])
       | header_text.map(lambda p: "/" + p.lstrip("/")),
       authorization=st.none() | header_text)
def test_fuzzed_api_requests_never_crash(fuzz_client, request, method, path, authorization):
    content_type, body = request
    headers = {"content-type": content_type}
    if authorization is not None:
        headers["authorization"] = authorization
    r = fuzz_client.request(method, path, content=body, headers=headers)
    assert r.status_code < 500, (r.status_code, r.text)
    assert r.headers["x-content-type-options"] == "nosniff"
    if path.startswith("/api/") and r.status_code != 200:
        assert set(r.json()) == {"error"}
    if path == "/api/predict" and r.status_code == 200:
        assert r.json()["label"] in LABELS


@pytest.fixture(scope="module")
def fuzz_client(tiny_tflite):
    from edge_runtime.model import EdgeModel

    app = server.create_app(EdgeModel.load(tiny_tflite), max_upload_bytes=4096)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
