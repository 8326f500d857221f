"""The field server: a phone-friendly page and a JSON API around one .tflite model.

`python -m edge_runtime serve [MODEL]`. Uploaded images live only in memory: the body is read
into bytes (never through Starlette's form parser, which spools files over 1 MB to disk),
decoded by the one preprocessing, classified, and dropped. Nothing about an upload is logged
but the method, path, status and time.

No client can hold the server: a connection must send its request head within
HEADER_TIMEOUT_S and its body within BODY_TIMEOUT_S, an idle keep-alive connection is closed
after KEEP_ALIVE_S, and multipart bodies are parsed in a worker thread with at most MAX_PARTS
parts. Without a token, only requests naming this machine (Host header) are answered.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path

import anyio
import h11
import uvicorn
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from edge_runtime.backends import BACKENDS
from edge_runtime.console import add_output_flags, print_json
from edge_runtime.errors import EXIT_OK, ImageError, OncoliteError
from edge_runtime.model import SHIPPED_MODEL, EdgeModel, decision_rule, default_model_path, prediction_record
from edge_runtime.preprocess import FORMATS_TEXT

STATIC_DIR = Path(__file__).resolve().parent / "static"

DEFAULT_MAX_UPLOAD_MB = 10
# A larger file would not decode within edge_runtime.preprocess.MAX_DECODE_BYTES anyway: an
# uncompressed image is about as large as its decoded pixels.
MAX_UPLOAD_MB = 256
# A phone on poor Wi-Fi uploads a 10 MB photo in well under this; a client that trickles
# its body slower than that is holding a connection open for nothing.
BODY_TIMEOUT_S = 30.0
# A request head (request line and headers) comes in one packet or two; a connection that
# sends nothing, or trickles its head, is closed after this. Of a head still incomplete, h11
# buffers at most MAX_HEAD_BYTES (one read of the socket may bring more).
HEADER_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 16 * 1024
# An idle keep-alive connection between two requests is closed after this.
KEEP_ALIVE_S = 5
# Uvicorn answers 503 beyond this many open connections instead of queueing without bound; the
# timeouts above make sure idle and slow ones leave.
MAX_CONNECTIONS = 64
# A browser's form sends one part; thousands of tiny parts would only cost parsing time.
MAX_PARTS = 16
MAX_PART_HEADER_BYTES = 8 * 1024

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
    """The first `field` of a multipart/form-data body, parsed entirely in memory (call it from a
    worker thread: parsing is CPU work). Only that field's data is kept; more than MAX_PARTS
    parts, or a part header over MAX_PART_HEADER_BYTES, is refused as soon as it is seen."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadRefused(400, "multipart upload without a boundary; let the browser or client set Content-Type")
    wanted = field.encode()
    state = {"parts": 0, "name": b"", "value": b"", "chunks": None, "found": None}

    def on_part_begin():
        state["parts"] += 1
        if state["parts"] > MAX_PARTS:
            raise UploadRefused(400, f"multipart upload with more than {MAX_PARTS} parts; "
                                     f"send only the image, as form field '{field}'")
        state["chunks"] = None

    def on_header_field(data, start, end):
        state["name"] += data[start:end]
        _check_header_size(state)

    def on_header_value(data, start, end):
        state["value"] += data[start:end]
        _check_header_size(state)

    def on_header_end():
        if state["name"].lower() == b"content-disposition" and state["found"] is None:
            _, options = parse_options_header(state["value"])
            state["chunks"] = [] if options.get(b"name") == wanted else None
        state["name"] = state["value"] = b""

    def on_part_data(data, start, end):
        if state["chunks"] is not None:
            state["chunks"].append(data[start:end])

    def on_part_end():
        if state["chunks"] is not None:
            state["found"], state["chunks"] = b"".join(state["chunks"]), None

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data, "on_part_end": on_part_end}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError):
        raise UploadRefused(400, "malformed multipart upload; send the image as form field 'image'") from None
    if state["found"] is None:
        raise UploadRefused(400, f"no '{field}' field in the form; send the image as form field '{field}' or as the raw body")
    return state["found"]


def _check_header_size(state: dict) -> None:
    if len(state["name"]) + len(state["value"]) > MAX_PART_HEADER_BYTES:
        raise UploadRefused(400, "multipart part header too long; send the image as form field 'image'")


# ---------------------------------------------------------------------------------------------
# The app


def describe_model(model) -> dict:
    """What the page and /api/health say about the model: enough to tell which one is running,
    and how it decides."""
    path = getattr(model, "path", None)
    return {"name": Path(path).name if path else None,
            "sha256": getattr(model, "sha256", None),
            "labels": list(model.labels),
            "input": {"height": model.prep.height, "width": model.prep.width},
            "backend": str(getattr(model, "backend", None)),
            "threshold": model.threshold,
            "decision_rule": decision_rule(list(model.labels), model.threshold),
            "uncertain_margin": model.uncertain_margin}


def classify(model, lock: threading.Lock, data: bytes, info: dict) -> dict:
    """One image's answer (edge_runtime.model.prediction_record, as predict prints it); runs in a
    worker thread.

    `lock` bounds memory, not the interpreter (EdgeModel serializes inference itself): it
    holds one upload's decode and inference at a time, because a decoded upload can take up to
    MAX_DECODE_BYTES, which a handheld-sized server must not multiply by its connections.
    """
    with lock:
        start = time.perf_counter()  # the model's time, not the wait for the lock
        probs = model.predict_file(data)
        latency_ms = (time.perf_counter() - start) * 1000.0
    return {**prediction_record(model, probs), "latency_ms": round(latency_ms, 3), "model": info, "notice": NOTICE}


def load_static(folder: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """The page's files, read once: requests never touch the file system, so no path can escape."""
    return {p.name: (p.read_bytes(), _MEDIA_TYPES[p.suffix])
            for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in _MEDIA_TYPES}


def create_app(model, token: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20,
               body_timeout_s: float = BODY_TIMEOUT_S, hosts: tuple[str, ...] = ()):
    """The ASGI app around `model` (anything with .labels, .prep, .threshold, .uncertain_margin,
    .predict_file(bytes), .decide(probs)). Without a token only requests whose Host names this
    machine are answered (see AllowedHosts); `hosts` adds names, e.g. the address it is bound to."""
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
        # Parsing a multipart body is CPU work: off the event loop, which other clients share.
        data = await run_in_threadpool(image_bytes, request.headers.get("content-type", ""), body)
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
    if token is None:
        app = AllowedHosts(app, hosts)
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


class AllowedHosts:
    """ASGI middleware for a server without a token: answer only requests whose Host header names
    this machine: localhost, a loopback address, the address the connection reached, this
    machine's host name (also as NAME.local), or one of `extra`.

    Against DNS rebinding: a page on another site can point its own name at this server's
    address, and the visitor's browser would then talk to the API as if it were that site;
    its requests still carry the other site's name as Host. A token-protected server needs no
    such check: the page's requests lack the token.
    """

    def __init__(self, app, extra=()):
        self.app = app
        host = socket.gethostname().lower()
        self.names = {"localhost", host, f"{host}.local", *(_host_name(h) for h in extra)}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.allowed(scope):
            return await self.app(scope, receive, send)
        response = JSONResponse({"error": "this server answers only requests to this machine's own address or name; "
                                          "open the address it printed, or start it with --token to accept any host name"},
                                status_code=400)
        await response(scope, receive, send)

    def allowed(self, scope) -> bool:
        given = next((value for key, value in scope["headers"] if key == b"host"), None)
        if given is None:  # HTTP/1.0 without Host: not a browser, so not a rebinding page
            return True
        name = _host_name(given.decode("latin-1"))
        server = _host_name(str((scope.get("server") or ("",))[0]))
        if name in self.names or name == server:
            return True
        address = _ip(name)
        return address is not None and (address.is_loopback or address == _ip(server))


def _host_name(host: str) -> str:
    """'Example.org:8000' -> 'example.org', '[::1]:8000' -> '::1'; lower case, no trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _ip(name: str):
    """An IP address (IPv4-mapped IPv6 as IPv4), or None for a name."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address


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


class HeadTimeoutProtocol(H11Protocol):
    """Uvicorn's h11 protocol with a deadline for every request head.

    Uvicorn times out only idle keep-alive connections after a response: a connection that sends
    nothing, or trickles its request line and headers, stays open forever and counts against
    limit_concurrency, so a few dozen of them make every client get 503. Here a connection must
    complete each request head within HEADER_TIMEOUT_S of connecting, or of the first byte of the
    next request on a kept-alive connection, or it is closed.
    """

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request head begun, not complete
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)
        else:
            self._cancel_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, quiet: bool = False, header_timeout_s: float = HEADER_TIMEOUT_S,
                   keep_alive_s: int = KEEP_ALIVE_S, max_connections: int = MAX_CONNECTIONS) -> uvicorn.Config:
    """Uvicorn settings for the field: no access log (our own one-line log has no query string),
    no proxy headers trusted, no WebSocket upgrades, request heads bounded in size and time,
    idle keep-alive connections closed, bounded concurrency."""
    protocol = type("FieldHttpProtocol", (HeadTimeoutProtocol,), {"header_timeout_s": header_timeout_s})
    return uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=False,
                          proxy_headers=False, server_header=False, http=protocol, ws="none",
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES, timeout_keep_alive=keep_alive_s,
                          limit_concurrency=max_connections, timeout_graceful_shutdown=5,
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
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (f"Images: {FORMATS_TEXT} (animated: the first frame); anything else is refused\n"
                     "with a one-line reason (HTTP 400).\n"
                     "Uploads stay in memory, never on disk. Without --token, only requests that name\n"
                     "this machine by its address or host name are answered (no DNS rebinding).")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; "
                             "0.0.0.0 lets a handheld on the same network connect)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--token", default=os.environ.get("ONCOLITE_TOKEN") or None,
                        help="access token required by the API (default: $ONCOLITE_TOKEN); "
                             "the page passes it on when opened with ?token=...")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest upload accepted, in MB (default {DEFAULT_MAX_UPLOAD_MB}, at most {MAX_UPLOAD_MB})")
    parser.add_argument("--threads", type=int, default=None, help="interpreter threads (default: the backend's)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="force an interpreter backend (default: the first installed)")
    parser.add_argument("--webapp", metavar="DIR", default=None,
                        help="also serve a folder built by `python -m edge_runtime webapp` at /field/ "
                             "(the page that runs the model in the phone's browser)")
    add_output_flags(parser)


def main(args) -> int:
    if not 0 <= args.port <= 65535:
        raise OncoliteError(f"--port {args.port}: must be 0..65535 (0 picks a free port)")
    if not (math.isfinite(args.max_upload_mb) and 0 < args.max_upload_mb <= MAX_UPLOAD_MB):
        raise OncoliteError(f"--max-upload-mb {args.max_upload_mb:g}: give a number of MB above 0 and at most {MAX_UPLOAD_MB}")
    path = Path(args.model) if args.model else default_model_path()
    model = EdgeModel.load(path, backend=args.backend, threads=args.threads)
    for warning in model.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    app = create_app(model, token=args.token, max_upload_bytes=max(1, int(args.max_upload_mb * 2**20)),
                     hosts=(args.host,))
    if args.webapp:
        from edge_runtime.webapp import mount_webapp

        app = mount_webapp(app, args.webapp)
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    announce(args, path, urls(args.host, port, args.token))
    # --json is about stdout; the request log stays on stderr unless --quiet.
    _configure_logging(quiet=args.quiet)
    uvicorn.Server(uvicorn_config(app, quiet=args.quiet)).run(sockets=[sock])
    return EXIT_OK


def announce(args, path: Path, addresses: list[str]) -> None:
    # The warning goes to stderr in every mode: --json and --quiet are about stdout.
    if args.host not in ("127.0.0.1", "::1", "localhost") and not args.token:
        print(f"warning: listening on {args.host} without --token: anyone on the network can use it; "
              "pass --token (or set ONCOLITE_TOKEN) to require one", file=sys.stderr, flush=True)
    if args.json:
        print_json({"urls": addresses, "model": str(path), "token_required": bool(args.token)})
        sys.stdout.flush()
        return
    if args.quiet:  # its result: where it serves, in one line
        print(f"{path}: serving at {', '.join(addresses)} (Ctrl+C stops)", flush=True)
        return
    print(f"Serving {path} — open on the device:")
    for address in addresses:
        print(f"  {address}")
    print("Ctrl+C stops the server.", flush=True)


def _configure_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
