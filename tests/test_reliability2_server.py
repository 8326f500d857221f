"""Issue 19, classes 4 and 6 (server side): no lock-out without a token, no event loop blocked by a
multipart body, no DNS rebinding, and the `serve` command's edges.

The lock-out test runs a real uvicorn server on 127.0.0.1 only, with bounded counts (16 held
connections against a limit of 8) and bounded time (1 s head timeout, a 10 s deadline); every
socket is closed when it ends. With ONCOLITE_WRITE_REPORTS=1 its figures go to
reports/reliability/lockout.json.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import select
import socket
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from edge_runtime import server
from edge_runtime.errors import OncoliteError
from test_server import FakeModel, image_bytes, multipart, raw_request, running_server

REPO_ROOT = Path(__file__).resolve().parent.parent
REPORT = REPO_ROOT / "reports" / "reliability" / "lockout.json"
LIMIT = 8
HEAD_S = 1.0
KEEP_ALIVE_S = 1
HELD = {"kept-alive after a request": 2, "trickling its headers": 4, "idle, nothing sent": 10}
DEADLINE_S = 10.0


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _get(url: str, path: str = "/api/health") -> int:
    status, _ = raw_request(url, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode(), timeout=10)
    return status


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


# --------------------------------------------------------------------- 4. lock-out

def test_idle_and_slow_connections_cannot_lock_the_server_out():
    held: list[tuple[str, socket.socket]] = []
    with running_server(server.create_app(FakeModel()), header_timeout_s=HEAD_S, keep_alive_s=KEEP_ALIVE_S,
                        max_connections=LIMIT) as url:
        try:
            for _ in range(HELD["kept-alive after a request"]):  # first, while the limit leaves room
                sock = _connect(url)
                sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                response = http.client.HTTPResponse(sock)
                response.begin()
                assert response.status == 200 and response.read()
                held.append(("kept-alive after a request", sock))
            for _ in range(HELD["trickling its headers"]):
                sock = _connect(url)
                sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                held.append(("trickling its headers", sock))
            for _ in range(HELD["idle, nothing sent"]):
                held.append(("idle, nothing sent", _connect(url)))
            during = _get(url)  # 16 connections held, limit 8: the lock-out itself

            open_ = dict(enumerate(held))
            deadline = time.monotonic() + DEADLINE_S
            while open_ and time.monotonic() < deadline:
                readable, _, _ = select.select([sock for _, sock in open_.values()], [], [], 0.25)
                for key, (kind, sock) in list(open_.items()):
                    if sock in readable and _closed_by_peer(sock):
                        del open_[key]
                    elif kind == "trickling its headers":
                        try:
                            sock.send(b"x")  # one more byte of a header that never ends
                        except (BrokenPipeError, ConnectionResetError):
                            del open_[key]
            after = _get(url)
        finally:
            for _, sock in held:
                sock.close()
    figures = {"command": "ONCOLITE_WRITE_REPORTS=1 pytest tests/test_reliability2_server.py -k lock_the_server_out",
               "server": f"uvicorn_config(header_timeout_s={HEAD_S}, keep_alive_s={KEEP_ALIVE_S}, max_connections={LIMIT}) "
                         "on 127.0.0.1",
               "held": HELD, "status_while_held": during,
               "dropped_by_the_server": len(held) - len(open_), "still_open_after_deadline": len(open_),
               "deadline_s": DEADLINE_S, "status_after": after}
    print(json.dumps(figures, indent=2))
    if os.environ.get("ONCOLITE_WRITE_REPORTS") == "1":
        from edge_runtime.atomic import write_json

        write_json(REPORT, figures)
    assert during == 503  # the limit is real...
    assert not open_, [kind for kind, _ in open_.values()]  # ...but nobody can sit on it
    assert after == 200


def test_the_field_defaults_time_out_heads_and_idle_connections():
    config = server.uvicorn_config(server.create_app(FakeModel()))
    assert issubclass(config.http, server.HeadTimeoutProtocol)
    assert config.http.header_timeout_s == server.HEADER_TIMEOUT_S <= 30
    assert config.timeout_keep_alive == server.KEEP_ALIVE_S <= 30
    assert config.limit_concurrency == server.MAX_CONNECTIONS
    assert config.h11_max_incomplete_event_size == server.MAX_HEAD_BYTES
    assert config.ws == "none"


def test_an_oversized_request_head_is_refused():
    """h11 buffers at most MAX_HEAD_BYTES of a head still incomplete (one read may bring more).
    The head sent is never finished, so the server has read all of it when it answers."""
    with running_server(server.create_app(FakeModel())) as url:
        status, _ = raw_request(url, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
                                     + b"a" * (server.MAX_HEAD_BYTES + 4096))
    assert status == 400


def test_a_multipart_body_of_many_parts_is_refused_at_the_first_part_too_many():
    part = b'--b0undary\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n'
    # 17 parts, then garbage a full parse would stumble on: refused as soon as part 17 begins.
    body = part * (server.MAX_PARTS + 1) + b"\x00garbage" * 100_000
    with pytest.raises(server.UploadRefused, match=f"more than {server.MAX_PARTS} parts"):
        server.multipart_field("multipart/form-data; boundary=b0undary", body, "image")
    with TestClient(server.create_app(FakeModel(), max_upload_bytes=8 * 2**20)) as client:
        r = client.post("/api/predict", content=part * 100_000 + b"--b0undary--\r\n",
                        headers={"content-type": "multipart/form-data; boundary=b0undary"})
    assert r.status_code == 400 and "parts" in r.json()["error"]


def test_an_image_among_a_few_other_fields_is_found():
    body, content_type = multipart("image", "scan.png", image_bytes((230, 20, 25)))
    other = b'--b0undary\r\nContent-Disposition: form-data; name="note"\r\n\r\nleft breast\r\n'
    assert server.multipart_field(content_type, other + body, "image") == image_bytes((230, 20, 25))


def test_multipart_parsing_runs_off_the_event_loop(monkeypatch):
    on_loop = []
    real = server.multipart_field

    def spy(*args):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop in this thread: a worker thread
            on_loop.append(False)
        return real(*args)

    monkeypatch.setattr(server, "multipart_field", spy)
    body, content_type = multipart("image", "scan.png", image_bytes())
    with TestClient(server.create_app(FakeModel())) as client:
        assert client.post("/api/predict", content=body, headers={"content-type": content_type}).status_code == 200
    assert on_loop == [False]


# --------------------------------------------------------------------- every new probe: 4xx, never 5xx

def probes() -> dict[str, tuple[dict, int]]:
    """name -> (request keyword arguments, expected status)."""
    import badinputs

    part = b'--b0undary\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n'
    form = {"content-type": "multipart/form-data; boundary=b0undary"}
    return {
        "memory bomb: 130 KB PNG, 8192x8192 16-bit": ({"content": badinputs.sixteen_bit_memory_bomb()}, 400),
        "TIFF whose decoder raises TypeError": ({"content": badinputs.tiff_with_rational_strip_offsets()}, 400),
        "EPS (Ghostscript format)": ({"content": badinputs.other_format("EPS")}, 400),
        "PPM (outside the allow-list)": ({"content": badinputs.other_format("PPM")}, 400),
        "multipart body of 100000 parts": ({"content": part * 100_000 + b"--b0undary--\r\n", "headers": form}, 400),
        "multipart part header of 1 MB": ({"content": b'--b0undary\r\nContent-Disposition: form-data; name="'
                                           + b"a" * 2**20 + b'"\r\n\r\n1\r\n--b0undary--\r\n', "headers": form}, 400),
        "Host header of another site (DNS rebinding)": ({"content": image_bytes(), "headers": {"host": "attacker.example"}}, 400),
        "good PNG": ({"content": image_bytes()}, 200),
        "good phone photo (MPO)": ({"content": badinputs.mpo_photo()}, 200),
    }


def test_every_new_probe_is_refused_with_4xx_never_5xx(tmp_path):
    from edge_models import model_file
    from edge_runtime.model import EdgeModel

    app = server.create_app(EdgeModel.load(model_file(tmp_path, "int8")), max_upload_bytes=10 * 2**20)
    statuses = {}
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        for name, (request, expected) in probes().items():
            r = client.post("/api/predict", **request)
            statuses[name] = r.status_code
            assert r.status_code == expected, (name, r.status_code, r.text[:300])
            if expected == 400:
                assert set(r.json()) == {"error"} and "\n" not in r.json()["error"]
    if os.environ.get("ONCOLITE_WRITE_REPORTS") == "1":
        from edge_runtime.atomic import write_json

        write_json(REPO_ROOT / "reports" / "reliability" / "server_probes.json",
                   {"command": "ONCOLITE_WRITE_REPORTS=1 pytest tests/test_reliability2_server.py -k every_new_probe",
                    "app": "create_app(EdgeModel tiny int8 test model), no token, --max-upload-mb 10",
                    "statuses": statuses, "server_errors_5xx": sum(s >= 500 for s in statuses.values())})


# --------------------------------------------------------------------- 6. DNS rebinding

@pytest.mark.parametrize("host, allowed", [("127.0.0.1", True), ("127.0.0.1:8000", True), ("localhost:8000", True),
                                           ("[::1]:8000", True), ("LOCALHOST.", True), ("127.8.9.10", True),
                                           ("attacker.example", False), ("attacker.example:8000", False),
                                           ("localhost.attacker.example", False), ("10.1.2.3", False), ("", False)])
def test_without_a_token_only_this_machines_names_are_answered(host, allowed):
    with TestClient(server.create_app(FakeModel()), base_url="http://127.0.0.1") as client:
        for path in ("/", "/api/health"):
            r = client.get(path, headers={"host": host})
            assert (r.status_code == 200) == allowed, (host, path, r.status_code)
            if not allowed:
                assert r.status_code == 400 and "--token" in r.json()["error"]
                assert r.headers["x-content-type-options"] == "nosniff"


def test_this_machines_host_name_and_the_bound_address_are_answered():
    name = socket.gethostname()
    app = server.create_app(FakeModel(), hosts=("field-box.lan",))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for host in (name, f"{name}.local:8000", "field-box.lan:8000"):
            assert client.get("/api/health", headers={"host": host}).status_code == 200, host


def test_the_address_the_connection_reached_is_answered():
    """Bound to 0.0.0.0, a phone opens http://<LAN address>:port/: the Host is that address."""
    app = server.create_app(FakeModel())
    with TestClient(app, base_url="http://192.168.7.20:8000") as client:  # scope["server"] = the address reached
        assert client.get("/api/health").status_code == 200
        assert client.get("/api/health", headers={"host": "192.168.7.21:8000"}).status_code == 400


def test_a_token_protected_server_accepts_any_host():
    with TestClient(server.create_app(FakeModel(), token="t0k"), base_url="http://127.0.0.1") as client:
        r = client.get("/api/health", headers={"host": "attacker.example", "authorization": "Bearer t0k"})
    assert r.status_code == 200


def test_a_rebinding_request_to_a_real_server_is_refused():
    with running_server(server.create_app(FakeModel())) as url:
        port = url.rsplit(":", 1)[1]
        for host, expected in ((f"attacker.example:{port}", 400), (f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200)):
            status, _ = raw_request(url, f"GET /api/health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            assert status == expected, host


# --------------------------------------------------------------------- 6. the serve command's edges

def serve_args(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def never_serve(monkeypatch):
    """A `serve` that gets past its checks fails the test instead of serving forever."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(server.uvicorn.Server, "run", refuse)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999", "0", "-1", "257"])
def test_max_upload_mb_out_of_range_is_a_one_line_error(value, tmp_path, capsys, never_serve):
    from edge_models import model_file
    from edge_runtime.cli import main

    model = model_file(tmp_path, "fp32")
    assert main(["serve", str(model), "--port", "0", f"--max-upload-mb={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--max-upload-mb {float(value):g}" in err[0] and "at most 256" in err[0], err


@pytest.mark.parametrize("command", ["serve", "predict"])
def test_threads_0_says_threads_not_re_export(command, tmp_path, capsys, never_serve):
    from edge_models import model_file, write_images
    from edge_runtime.cli import main

    model = model_file(tmp_path, "int8")
    extra = [str(write_images(tmp_path / "images", n=1)[0])] if command == "predict" else ["--port", "0"]
    assert main([command, str(model), *extra, "--threads", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads 0: give 1 or more" in err[0] and "re-export" not in err[0], err


@pytest.mark.parametrize("mode", [[], ["--json"], ["--quiet"], ["--json", "--quiet"]])
def test_listing_beyond_this_machine_without_a_token_warns_on_stderr_in_every_mode(mode, capsys):
    args = serve_args("--host", "0.0.0.0", *mode)
    server.announce(args, Path("m.tflite"), ["http://192.168.1.2:8000/"])
    out, err = capsys.readouterr()
    assert "warning: listening on 0.0.0.0 without --token" in err
    assert "warning" not in out
    if "--json" in mode:
        assert json.loads(out)["token_required"] is False


def test_no_warning_with_a_token_or_on_loopback(capsys):
    for argv in (["--host", "0.0.0.0", "--token", "t"], ["--host", "127.0.0.1"]):
        server.announce(serve_args(*argv, "--json"), Path("m.tflite"), [])
        assert "warning" not in capsys.readouterr().err


def test_bind_to_an_unknown_host_is_a_one_line_error():
    with pytest.raises(OncoliteError, match="--host"):
        server.bind("no-such-host.invalid", 0)
