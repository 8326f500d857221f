"""The field server: a phone-friendly page and a JSON API around one .tflite model.

`python -m edge_runtime serve [MODEL]`. Uploaded images live only in memory: the body is read
into bytes (never through Starlette's form parser, which spools files over 1 MB to disk),
decoded by the one preprocessing, classified, and dropped. Nothing about an upload is logged
but the method, path, status and time.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import anyio
import numpy as np
import uvicorn
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge_runtime.backends import BACKENDS
from edge_runtime.console import add_output_flags, print_json
from edge_runtime.errors import EXIT_OK, ImageError, OncoliteError
from edge_runtime.model import SHIPPED_MODEL, EdgeModel, default_model_path

STATIC_DIR = Path(__file__).resolve().parent / "static"

DEFAULT_MAX_UPLOAD_MB = 10
# A phone on poor Wi-Fi uploads a 10 MB photo in well under this; a client that trickles
# its body slower than that is holding a connection open for nothing.
BODY_TIMEOUT_S = 30.0
# Uvicorn answers 503 beyond this many open connections instead of queueing without bound.
MAX_CONNECTIONS = 64

NOTICE = ("Research tool, not a diagnosis: this model has not been validated for clinical use. "
          "Do not base any medical decision on its output.")

# No source outside this server, no inline script or style, never inside a frame.
SECURITY_HEADERS = {
    "content-security-policy": ("default-src 'self'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' blob: data:; connect-src 'self'; object-src 'none'; "
                                "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "geolocation=(), microphone=()",
    # Results are about a patient's image: no cache, shared or private, keeps them.
    "cache-control": "no-store",
}

_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}

log = logging.getLogger("oncolite.server")


class UploadRefused(Exception):
    """An upload the server will not classify: carries the HTTP status and a readable reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------------
# Reading an upload into memory


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body as bytes; 413 as soon as it is known to exceed `limit`, 408 if too slow.

    A declared Content-Length over the limit is refused before a byte is read; a chunked or
    lying body is counted while it streams and dropped the moment it passes the limit.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise UploadRefused(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise UploadRefused(413, _too_large(limit))
    chunks, size = [], 0
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise UploadRefused(413, _too_large(limit))
                chunks.append(chunk)
    except TimeoutError:
        raise UploadRefused(408, f"upload not received within {timeout_s:g} s; check the connection and retry") from None
    return b"".join(chunks)


def _too_large(limit: int) -> str:
    return f"upload larger than {limit / 2**20:g} MB; send a smaller image"


def image_bytes(content_type: str, body: bytes, field: str = "image") -> bytes:
    """The image inside a request: the multipart field `field`, or else the raw body."""
    media_type, _ = parse_options_header(content_type)
    data = multipart_field(content_type, body, field) if media_type == b"multipart/form-data" else body
    if not data:
        raise UploadRefused(400, "empty upload: send an image file (PNG or JPEG)")
    return data


def multipart_field(content_type: str, body: bytes, field: str) -> bytes:
    """One field of a multipart/form-data body, parsed entirely in memory."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadRefused(400, "multipart upload without a boundary; let the browser or client set Content-Type")
    parts: list[dict] = []
    header = {"name": b"", "value": b""}

    def on_part_begin():
        parts.append({"disposition": b"", "data": bytearray()})

    def on_header_field(data, start, end):
        header["name"] += data[start:end]

    def on_header_value(data, start, end):
        header["value"] += data[start:end]

    def on_header_end():
        if header["name"].lower() == b"content-disposition":
            parts[-1]["disposition"] = header["value"]
        header["name"] = header["value"] = b""

    def on_part_data(data, start, end):
        parts[-1]["data"] += data[start:end]

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError):
        raise UploadRefused(400, "malformed multipart upload; send the image as form field 'image'") from None
    for part in parts:
        _, options = parse_options_header(part["disposition"])
        if options.get(b"name") == field.encode():
            return bytes(part["data"])
    raise UploadRefused(400, f"no '{field}' field in the form; send the image as form field '{field}' or as the raw body")


# ---------------------------------------------------------------------------------------------
# The app


def describe_model(model) -> dict:
    """What the page and /api/health say about the model: enough to tell which one is running."""
    path = getattr(model, "path", None)
    return {"name": Path(path).name if path else None,
            "sha256": getattr(model, "sha256", None),
            "labels": list(model.labels),
            "input": {"height": model.prep.height, "width": model.prep.width},
            "backend": str(getattr(model, "backend", None)),
            "threshold": getattr(model, "threshold", None)}


def classify(model, lock: threading.Lock, data: bytes, info: dict) -> dict:
    """One image's answer; runs in a worker thread.

    `lock` bounds memory, not the interpreter (EdgeModel serializes inference itself): it
    holds one upload's decode and inference at a time, because a decoded upload can take a
    few hundred MB, which a handheld-sized server must not multiply by its connections.
    """
    with lock:
        start = time.perf_counter()  # the model's time, not the wait for the lock
        probs = np.asarray(model.predict_file(data), dtype=np.float64).reshape(-1)
        chosen = int(model.decide(probs))
        latency_ms = (time.perf_counter() - start) * 1000.0
    labels = list(model.labels)
    probabilities = {label: round(float(p), 6) for label, p in zip(labels, probs)}
    top = sorted(({"label": k, "probability": v} for k, v in probabilities.items()),
                 key=lambda row: row["probability"], reverse=True)
    return {"label": labels[chosen], "probabilities": probabilities, "top": top,
            "latency_ms": round(latency_ms, 3), "model": info, "notice": NOTICE}


def load_static(folder: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """The page's files, read once: requests never touch the file system, so no path can escape."""
    return {p.name: (p.read_bytes(), _MEDIA_TYPES[p.suffix])
            for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in _MEDIA_TYPES}


def create_app(model, token: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20,
               body_timeout_s: float = BODY_TIMEOUT_S):
    """The ASGI app around `model` (anything with .labels, .prep, .predict_file(bytes), .decide(probs))."""
    info = describe_model(model)
    lock = threading.Lock()  # one decode at a time: see classify
    static = load_static()
    token_bytes = token.encode() if token else None

    def authorized(request: Request) -> bool:
        if token_bytes is None:
            return True
        given = request.headers.get("authorization", "")
        given = given[7:] if given[:7].lower() == "bearer " else request.query_params.get("token", "")
        return hmac.compare_digest(given.encode(), token_bytes)

    def refuse_unauthorized(request: Request):
        if not authorized(request):
            raise UploadRefused(401, "access token required: open the page with ?token=... or send 'Authorization: Bearer ...'")

    async def page(request: Request) -> Response:
        return _static_response(static, "index.html")

    async def static_file(request: Request) -> Response:
        return _static_response(static, request.path_params["name"])

    async def health(request: Request) -> Response:
        refuse_unauthorized(request)
        return JSONResponse({"status": "ok", "model": info, "labels": info["labels"], "backend": info["backend"]})

    async def predict(request: Request) -> Response:
        refuse_unauthorized(request)
        body = await read_body(request, max_upload_bytes, body_timeout_s)
        data = image_bytes(request.headers.get("content-type", ""), body)
        del body
        try:
            result = await run_in_threadpool(classify, model, lock, data, info)
        except ImageError as e:
            raise UploadRefused(400, str(e)) from None
        return JSONResponse(result)

    routes = [Route("/", page), Route("/static/{name}", static_file),
              Route("/api/health", health), Route("/api/predict", predict, methods=["POST"])]
    handlers = {UploadRefused: _refused, HTTPException: _http_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    # Outermost first: every response, errors included, carries the security headers.
    return SecurityHeaders(NoTracebacks(app))


def _static_response(static: dict, name: str) -> Response:
    if name not in static:
        raise HTTPException(404)
    content, media_type = static[name]
    return Response(content, media_type=media_type)


async def _refused(request: Request, exc: UploadRefused) -> Response:
    headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
    # A client too slow to send its body loses the connection. An oversized one keeps it: uvicorn
    # discards the rest of the body unread, and a client still sending would otherwise get a
    # connection reset instead of this answer.
    if exc.status == 408:
        headers = {"connection": "close"}
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    messages = {404: "not found", 405: "method not allowed"}
    return JSONResponse({"error": messages.get(exc.status_code, exc.detail)}, status_code=exc.status_code,
                        headers=exc.headers)


class SecurityHeaders:
    """ASGI middleware adding SECURITY_HEADERS to every HTTP response."""

    def __init__(self, app):
        self.app = app
        self.headers = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class NoTracebacks:
    """ASGI middleware: an unexpected error becomes a bare 500 and one log line with its type only.

    The exception's message and traceback can hold request data, so neither goes to the client
    or the log. Also logs each request as method, path (never the query: it may hold the
    token), status and time.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), None

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except Exception as e:  # noqa: BLE001 - the point is to catch everything
            log.error("internal error: %s", type(e).__name__)
            if status is None:
                status = 500
                body = json.dumps({"error": "internal error; the server log names its type"}).encode()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
        # The raw, still percent-encoded path: a decoded %0a could forge log lines.
        path = scope.get("raw_path", b"").decode("ascii", "replace") or "?"
        log.info("%s %s %s %.1f ms", scope["method"], path, status, (time.perf_counter() - start) * 1000)


# ---------------------------------------------------------------------------------------------
# Running it


def uvicorn_config(app, quiet: bool = False) -> uvicorn.Config:
    """Uvicorn settings for the field: no access log (our own one-line log has no query string),
    no proxy headers trusted, idle keep-alive connections closed, bounded concurrency."""
    return uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=False,
                          proxy_headers=False, server_header=False, timeout_keep_alive=5,
                          limit_concurrency=MAX_CONNECTIONS, timeout_graceful_shutdown=5,
                          lifespan="off")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OncoliteError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def urls(host: str, port: int, token: str | None) -> list[str]:
    """The addresses to open: the LAN address too when bound to every interface."""
    hosts = [host]
    if host in ("0.0.0.0", "::"):
        hosts = [lan_address(), "127.0.0.1"]
    query = f"?token={token}" if token else ""
    return [f"http://{f'[{h}]' if ':' in h else h}:{port}/{query}" for h in hosts]


def lan_address() -> str:
    """This machine's address on the default route (a UDP connect sends no packet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def add_arguments(parser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help=f"the .tflite model to serve (default: the shipped models/{SHIPPED_MODEL.parent.name}/{SHIPPED_MODEL.name})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; "
                             "0.0.0.0 lets a handheld on the same network connect)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--token", default=os.environ.get("ONCOLITE_TOKEN") or None,
                        help="access token required by the API (default: $ONCOLITE_TOKEN); "
                             "the page passes it on when opened with ?token=...")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest upload accepted, in MB (default {DEFAULT_MAX_UPLOAD_MB})")
    parser.add_argument("--threads", type=int, default=None, help="interpreter threads (default: the backend's)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="force an interpreter backend (default: the first installed)")
    add_output_flags(parser)


def main(args) -> int:
    if not 0 <= args.port <= 65535:
        raise OncoliteError(f"--port {args.port}: must be 0..65535 (0 picks a free port)")
    if args.max_upload_mb <= 0:
        raise OncoliteError(f"--max-upload-mb {args.max_upload_mb:g}: must be positive")
    path = Path(args.model) if args.model else default_model_path()
    model = EdgeModel.load(path, backend=args.backend, threads=args.threads)
    app = create_app(model, token=args.token, max_upload_bytes=int(args.max_upload_mb * 2**20))
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    announce(args, path, urls(args.host, port, args.token))
    # --json is about stdout; the request log stays on stderr unless --quiet.
    _configure_logging(quiet=args.quiet)
    uvicorn.Server(uvicorn_config(app, quiet=args.quiet)).run(sockets=[sock])
    return EXIT_OK


def announce(args, path: Path, addresses: list[str]) -> None:
    if args.json:
        print_json({"urls": addresses, "model": str(path), "token_required": bool(args.token)})
        sys.stdout.flush()
        return
    if not args.quiet:
        print(f"Serving {path} — open on the device:")
        for address in addresses:
            print(f"  {address}")
        print("Ctrl+C stops the server.", flush=True)
    if args.host not in ("127.0.0.1", "::1", "localhost") and not args.token:
        print("warning: listening beyond this machine without --token: anyone on the network can use it",
              file=sys.stderr)


def _configure_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
