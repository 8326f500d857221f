"""The in-browser field page: an installable, offline web app that runs the model on the phone.

`python -m edge_runtime webapp MODEL --out DIR` writes a self-contained static folder: the page,
the model, its facts (`model.json`: labels, preprocessing, input/output quantization, threshold,
`uncertain_margin`), a web app manifest, a service worker, and the LiteRT.js runtime (WebAssembly,
XNNPACK) copied from the npm package installed at build time under `web/node_modules`
(`npm ci --prefix web`); nothing is fetched from a CDN at run time. Serve the folder over HTTPS
(or open it on localhost): after one visit the page, the runtime and the model work offline.

The page preprocesses exactly as edge_runtime.preprocess does (a port of Pillow's resampling,
bit for bit), quantizes with the input tensor's scale and zero point, and answers in the server
page's shape (label, probability, colour code, decision rule, disclaimer).

LiteRT.js takes float32, int32 or uint8 tensors and a static batch: the builder refuses int8-I/O
models and dynamic batch dimensions, naming the export that fixes it (`int8_uint8`).

Also here: `serve_folder` (a loopback static server for previews and tests), `mount_webapp` (the
hook that lets `serve` host a built folder under /field/) and `browser_latency` (in-browser
inference latency, measured in headless Chromium, for the benchmark).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from edge_runtime.errors import EXIT_OK, ModelError, OncoliteError
from edge_runtime.resources import WORKSPACE

ASSETS_DIR = Path(__file__).resolve().parent / "webapp_static"
# Shared with the server page: its stylesheet and the answer's rendering.
SERVER_PAGE_FILES = {name: Path(__file__).resolve().parent / "static" / name for name in ("app.css", "answer.js")}
FORMAT = "oncolite-webapp/1"
CHROMIUM = "/usr/bin/chromium"
# Headless Debian Chromium at a phone's size, touch and user agent (never a downloaded browser).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True, "device_scale_factor": 2,
         "user_agent": ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
                        "Chrome/126.0.0.0 Mobile Safari/537.36")}

# Files of the npm packages (under node_modules/@litertjs) -> where the page loads them.
# Both WebAssembly builds that need no cross-origin isolation: relaxed SIMD, and plain SIMD
# ("compat") for browsers without relaxed SIMD (Safari, older Firefox); LiteRT.js picks one.
RUNTIME_FILES = {
    "core/dist/index.js": "runtime/core/index.js",
    "core/package.json": "runtime/core/package.json",
    "wasm-utils/dist/index.js": "runtime/wasm-utils/index.js",
    "wasm-utils/package.json": "runtime/wasm-utils/package.json",
    "core/wasm/litert_wasm_internal.js": "runtime/wasm/litert_wasm_internal.js",
    "core/wasm/litert_wasm_internal.wasm": "runtime/wasm/litert_wasm_internal.wasm",
    "core/wasm/litert_wasm_compat_internal.js": "runtime/wasm/litert_wasm_compat_internal.js",
    "core/wasm/litert_wasm_compat_internal.wasm": "runtime/wasm/litert_wasm_compat_internal.wasm",
}
# The page's own files, copied as they are (index.html and sw.js are templates).
PAGE_FILES = ("field.js", "preprocess.js", "field.css")
# Tensor types LiteRT.js can feed and read (its DATATYPES).
BROWSER_DTYPES = ("float32", "int32", "uint8")
FIX = ("build from the int8_uint8 variant (full-int8, uint8 input/output, static batch 1), which "
       "`oncolite export RUN` writes to RUN/models/int8_uint8.tflite")

MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".json": "application/json",
               ".webmanifest": "application/manifest+json", ".png": "image/png",
               ".wasm": "application/wasm", ".tflite": "application/octet-stream"}


# ---------------------------------------------------------------------------------------------
# Checks


def browser_problem(path: Path, model, data: bytes) -> str | None:
    """Why LiteRT.js in a browser cannot run this model (one line naming the fix), or None."""
    for role, tensor in (("input", model.input), ("output", model.output)):
        dtype = tensor.to_dict()["dtype"]
        if dtype not in BROWSER_DTYPES:
            return (f"{path}: {role} tensor is {dtype}; LiteRT.js in the browser takes only "
                    f"{', '.join(BROWSER_DTYPES)} tensors: {FIX}")
    for role, signature in io_shape_signatures(data).items():
        if signature and any(d < 0 for d in signature):
            return (f"{path}: {role} has a dynamic dimension (signature {signature}); LiteRT.js needs "
                    f"a static batch of 1: {FIX}")
    return None


def io_shape_signatures(data: bytes) -> dict[str, list[int] | None]:
    """The shape signature (-1 = dynamic) of the main subgraph's input and output tensors."""
    from flatbuffers import number_types as N

    from edge_runtime import flatbuf as fb

    shape_signature = 7  # schema.fbs Tensor field slot
    graph = fb.tables(fb.root(data), fb.MODEL["subgraphs"])[0]
    tensors = fb.tables(graph, fb.SUBGRAPH["tensors"])
    out = {}
    for role, slot in (("input", fb.SUBGRAPH["inputs"]), ("output", fb.SUBGRAPH["outputs"])):
        index = int(fb.numbers(graph, slot, N.Int32Flags)[0])
        values = fb.numbers(tensors[index], shape_signature, N.Int32Flags)
        out[role] = [int(v) for v in values] if len(values) else None
    return out


def default_runtime_dir() -> Path:
    """`node_modules` of the repo's web/ folder (`npm ci --prefix web`), or $ONCOLITE_LITERTJS."""
    env = os.environ.get("ONCOLITE_LITERTJS")
    return Path(env) if env else WORKSPACE / "web" / "node_modules"


def find_runtime(folder: Path | None = None) -> dict:
    """The LiteRT.js files to copy: {"dir", "version", "wasm_utils_version"}; OncoliteError if missing."""
    folder = Path(folder) if folder else default_runtime_dir()
    base = folder / "@litertjs" if (folder / "@litertjs").is_dir() else folder
    missing = [name for name in RUNTIME_FILES if not (base / name).is_file()]
    if missing:
        raise OncoliteError(f"{base}: LiteRT.js runtime files missing ({missing[0]}{' and more' if len(missing) > 1 else ''}); "
                            f"install them with `npm ci --prefix web` in the oncolite checkout, or pass --runtime NODE_MODULES")

    def version(package):
        try:
            return json.loads((base / package / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            return None

    return {"dir": base, "version": version("core"), "wasm_utils_version": version("wasm-utils")}


# ---------------------------------------------------------------------------------------------
# Building


def build(model_path, out, runtime_dir=None) -> dict:
    """Write the web app for `model_path` into `out`; return a summary (files, sizes, version)."""
    from edge_runtime.model import EdgeModel, decision_rule
    from edge_runtime.server import NOTICE

    model_path, out = Path(model_path), Path(out)
    model = EdgeModel.load(model_path)
    data = model_path.read_bytes()
    problem = browser_problem(model_path, model, data)
    if problem:
        raise ModelError(problem)
    runtime = find_runtime(runtime_dir)
    _check_out(out)

    model_file = f"model-{model.sha256[:16]}.tflite"
    files: dict[str, bytes] = {name: (ASSETS_DIR / name).read_bytes() for name in PAGE_FILES}
    files.update({name: path.read_bytes() for name, path in SERVER_PAGE_FILES.items()})
    files[model_file] = data
    for source, target in RUNTIME_FILES.items():
        files[target] = (runtime["dir"] / source).read_bytes()
    files["icon-192.png"], files["icon-512.png"] = _icon(192), _icon(512)
    files["manifest.webmanifest"] = _json_bytes(_manifest(model))
    importmap = json.dumps({"imports": {"@litertjs/wasm-utils": "./runtime/wasm-utils/index.js"}})
    template = (ASSETS_DIR / "index.html").read_text(encoding="utf-8")
    files["index.html"] = (template.replace("{{CSP}}", content_security_policy(importmap, meta=True))
                           .replace("{{IMPORTMAP}}", importmap).encode("utf-8"))
    # What the service worker precaches: everything but the runtime builds (the page adds the one
    # this browser loads) and the worker itself.
    precache = ["./", *sorted(n for n in files if not n.startswith("runtime/wasm/")), "model.json"]
    facts = {
        "format": FORMAT,
        "model": {"file": model_file, "name": model_path.name, "variant": model.facts.get("variant"),
                  "kind": model.kind, "sha256": model.sha256, "size_bytes": model.size_bytes},
        "labels": list(model.labels),
        "preprocessing": model.prep.to_dict(),
        "input": model.input.to_dict(),
        "output": model.output.to_dict(),
        "threshold": model.threshold,
        "decision_rule": decision_rule(list(model.labels), model.threshold),
        # Checked by EdgeModel.load (0..1; with a threshold, binary models only).
        "uncertain_margin": model.uncertain_margin,
        "notice": NOTICE,
        "runtime": {"package": "@litertjs/core", "version": runtime["version"],
                    "wasm_utils_version": runtime["wasm_utils_version"]},
        "precache": precache,
    }
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    digest.update(_json_bytes(facts))
    # The cache key: the model's sha256, then everything else (a page fix is a new version too).
    facts["version"] = f"{model.sha256}-{digest.hexdigest()[:12]}"
    files["model.json"] = _json_bytes(facts)
    worker = (ASSETS_DIR / "sw.js").read_text(encoding="utf-8")
    files["sw.js"] = (worker.replace("{{VERSION}}", facts["version"])
                      .replace("{{PRECACHE}}", json.dumps(precache)).encode("utf-8"))
    _write_folder(out, files)
    return {"out": os.fsdecode(out), "version": facts["version"], "model": facts["model"],
            "files": len(files), "size_bytes": sum(map(len, files.values())),
            "runtime": facts["runtime"], "uncertain_margin": model.uncertain_margin}


def content_security_policy(importmap: str, meta: bool = False) -> str:
    """Only this folder's files; WebAssembly compilation allowed; the one inline script is the
    import map, allowed by its hash. (frame-ancestors only works as a header, not in a meta tag.)"""
    digest = base64.b64encode(hashlib.sha256(importmap.encode("utf-8")).digest()).decode()
    policy = (f"default-src 'self'; script-src 'self' 'wasm-unsafe-eval' 'sha256-{digest}'; style-src 'self'; "
              "img-src 'self' blob: data:; connect-src 'self'; worker-src 'self'; manifest-src 'self'; "
              "object-src 'none'; base-uri 'none'; form-action 'none'")
    return policy if meta else policy + "; frame-ancestors 'none'"


def _manifest(model) -> dict:
    return {"id": "./", "name": "oncolite field classifier", "short_name": "oncolite",
            "description": f"Classifies {' / '.join(model.labels)} images on this device, offline. "
                           "Research tool, not a diagnosis.",
            "start_url": "./", "scope": "./", "display": "standalone", "orientation": "portrait",
            "background_color": "#f5f6f8", "theme_color": "#2a5bd7",
            "icons": [{"src": "icon-192.png", "sizes": "192x192", "type": "image/png", "purpose": "any"},
                      {"src": "icon-512.png", "sizes": "512x512", "type": "image/png", "purpose": "any maskable"}]}


def _icon(size: int) -> bytes:
    """The app icon, drawn here (no binary asset in the repo): a scan fan with a dark lesion."""
    import io

    from PIL import Image, ImageDraw

    scale = 4  # draw large, downsample: smooth edges
    s = size * scale
    im = Image.new("RGB", (s, s), (42, 91, 215))
    draw = ImageDraw.Draw(im)
    draw.pieslice((int(s * .12), int(-s * .30), int(s * .88), int(s * .88)), 55, 125, fill=(232, 238, 252))
    draw.ellipse((int(s * .42), int(s * .50), int(s * .62), int(s * .64)), fill=(42, 91, 215))
    buf = io.BytesIO()
    im.resize((size, size), Image.Resampling.LANCZOS).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _json_bytes(obj) -> bytes:
    from edge_runtime.atomic import json_default

    return (json.dumps(obj, indent=2, default=json_default) + "\n").encode("utf-8")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OncoliteError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        try:
            ours = json.loads((out / "model.json").read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise OncoliteError(f"{out}: folder is not empty and not an oncolite web app; choose an empty or new --out")


def _write_folder(out: Path, files: dict[str, bytes]) -> None:
    """Write every file into a staging folder beside `out`, then swap it in: a crash leaves the
    previous build or none, never half of one."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, content in files.items():
            target = stage / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        for folder in (p for p in [stage, *stage.rglob("*")] if p.is_dir()):
            folder.chmod(0o755)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "previous")
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# Serving


class _StaticHandler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **MEDIA_TYPES}

    def end_headers(self):
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        super().end_headers()

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A browser that goes away mid-download (a closed tab, a cancelled precache) is not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve_folder(folder, host: str = "127.0.0.1", port: int = 0):
    """Serve a built folder over HTTP in a background thread; yields its URL (ending in /).

    127.0.0.1 is a secure context for the browser (service worker, crypto) without TLS; a phone
    reaching this machine over the network needs HTTPS for offline use.
    """
    handler = functools.partial(_StaticHandler, directory=os.fspath(folder))
    try:
        httpd = _QuietServer((host, port), handler)
    except OSError as e:
        raise OncoliteError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host") from None
    thread = threading.Thread(target=httpd.serve_forever, name="webapp-static", daemon=True)
    thread.start()
    shown = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{shown}:{httpd.server_port}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def mount_webapp(app, folder, prefix: str = "/field"):
    """An ASGI app: `folder` (a built web app) under `prefix`/, everything else to `app`.

    The files are read once into memory (no request touches the file system, so no path can
    escape). Responses carry the page's own security headers: its CSP must allow WebAssembly
    compilation, which the server page's CSP does not, so mount this outside the server's
    SecurityHeaders middleware.
    """
    folder = Path(folder)
    try:
        facts = json.loads((folder / "model.json").read_text())
    except (OSError, ValueError):
        facts = None
    if not isinstance(facts, dict) or facts.get("format") != FORMAT:
        raise OncoliteError(f"{folder}: not a web app built by `python -m edge_runtime webapp`; build one first")
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
             if p.is_file() and p.suffix in MEDIA_TYPES}
    importmap = json.dumps({"imports": {"@litertjs/wasm-utils": "./runtime/wasm-utils/index.js"}})
    common = [(b"content-security-policy", content_security_policy(importmap).encode()),
              (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
              (b"cross-origin-opener-policy", b"same-origin"), (b"cross-origin-resource-policy", b"same-origin"),
              (b"x-frame-options", b"DENY"), (b"cache-control", b"no-cache")]
    prefix = prefix.rstrip("/")

    async def respond(send, status, body, headers):
        await send({"type": "http.response.start", "status": status, "headers": [*headers, *common]})
        await send({"type": "http.response.body", "body": body})

    async def asgi(scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == prefix or path.startswith(prefix + "/")):
            return await app(scope, receive, send)
        if path == prefix:  # relative URLs in the page need the trailing slash
            return await respond(send, 308, b"", [(b"location", (prefix + "/").encode())])
        if scope["method"] not in ("GET", "HEAD"):
            return await respond(send, 405, b'{"error": "method not allowed"}', [(b"content-type", b"application/json")])
        name = path[len(prefix) + 1:] or "index.html"
        if name not in files:
            return await respond(send, 404, b'{"error": "not found"}', [(b"content-type", b"application/json")])
        body = files[name]
        headers = [(b"content-type", MEDIA_TYPES[Path(name).suffix].encode()),
                   (b"content-length", str(len(body)).encode())]
        await respond(send, 200, b"" if scope["method"] == "HEAD" else body, headers)

    return asgi


# ---------------------------------------------------------------------------------------------
# In-browser latency (WASM), for the benchmark


def browser_unavailable(chromium: str = CHROMIUM, runtime_dir=None) -> str | None:
    """Why in-browser timing cannot run on this machine (one line naming the fix), or None:
    it needs Debian's Chromium, pip playwright and the LiteRT.js files."""
    import importlib.util

    if not Path(chromium).exists():
        return f"{chromium} not found: install Debian's chromium (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "pip playwright not installed (the test extra: pip install -e '.[test]')"
    try:
        find_runtime(runtime_dir)
    except OncoliteError as e:
        return str(e)
    return None


def browser_latency(model_or_folder, runs: int = 50, warmup: int = 5, images=(), chromium: str = CHROMIUM,
                    runtime_dir=None, browser=None) -> dict:
    """Inference latency of the model inside headless Chromium (LiteRT.js, WebAssembly, one thread).

    `model_or_folder`: a .tflite (built into a temporary web app) or a built folder. Returns the
    model-only latency (tensor in, run, probabilities out: what EdgeModel.run times in Python)
    over `runs` timed runs after `warmup`, as `latency_ms` in the edge bench's statistics, every
    run (`times_ms`), and, for each of `images` (classified first; the timed runs then reuse the
    last one's input), the page's own figures for one classification (preprocessing and
    inference). A figure of this machine's Chromium, not of a phone. Needs what
    `browser_unavailable` checks, or an already launched Playwright `browser`; raises
    OncoliteError without them.
    """
    from edge_runtime.bench import latency_stats

    with contextlib.ExitStack() as stack:
        if browser is None:
            problem = browser_unavailable(chromium, runtime_dir)
            if problem:
                raise OncoliteError(problem)
            from playwright.sync_api import sync_playwright

            p = stack.enter_context(sync_playwright())
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            stack.callback(browser.close)
        folder = Path(model_or_folder)
        if folder.is_file():
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="oncolite-webapp-")))
            build(folder, tmp / "app", runtime_dir=runtime_dir)
            folder = tmp / "app"
        url = stack.enter_context(serve_folder(folder))
        context = browser.new_context(**PHONE)
        stack.callback(context.close)
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("body[data-state=ready]", timeout=60_000)
        per_image = [classify_in_page(page, image) for image in images]
        figures = page.evaluate("o => window.oncoliteField.benchmark(o)", {"runs": runs, "warmup": warmup})
        version = browser.version
    return {"runs": runs, "warmup": warmup, "latency_ms": latency_stats(figures["times_ms"]),
            "times_ms": figures["times_ms"], "threads": 1, "browser": f"Chromium {version}", "wasm": figures["wasm"],
            "runtime": figures["runtime"], "user_agent": figures["user_agent"],
            "model_sha256": figures["model_sha256"], "images": per_image}


def classify_in_page(page, image, timeout_ms: int = 60_000) -> dict:
    """Pick `image` (a path, or bytes) in an open field page, as a user would; return the answer shown."""
    before = int(page.get_attribute("#result", "data-seq") or 0)
    if isinstance(image, (bytes, bytearray)):
        page.set_input_files("#file", files=[{"name": "image.png", "mimeType": "image/png", "buffer": bytes(image)}])
    else:
        page.set_input_files("#file", files=[os.fspath(image)])
    page.wait_for_selector(f"#result[data-seq='{before + 1}'], #error:not([hidden])", timeout=timeout_ms)
    if page.is_visible("#error"):
        return {"error": page.inner_text("#error")}
    return page.eval_on_selector("#result", """section => ({
        label: section.querySelector('#prediction').dataset.label,
        probabilities: Object.fromEntries([...section.querySelectorAll('#bars li')]
            .map(li => [li.dataset.label, Number(li.dataset.probability)])),
        uncertain: !section.querySelector('#uncertain').hidden,
        input_digest: section.dataset.inputDigest,
        latency_ms: Number(section.dataset.latencyMs),
        preprocess_ms: Number(section.dataset.preprocessMs),
        downscaled: section.dataset.downscaled === 'true',
        meta: section.querySelector('#meta').textContent})""")


# ---------------------------------------------------------------------------------------------
# `webapp` command


def add_arguments(parser) -> None:
    from edge_runtime.console import add_output_flags

    parser.add_argument("model", help="the .tflite model: uint8 or float32 input/output, static batch 1 "
                                      "(the int8_uint8 export)")
    parser.add_argument("--out", required=True, help="folder to write the web app into (created or replaced)")
    parser.add_argument("--runtime", default=None,
                        help="node_modules holding @litertjs/core and @litertjs/wasm-utils "
                             "(default: web/node_modules of this checkout, from `npm ci --prefix web`)")
    parser.add_argument("--serve", action="store_true",
                        help="after building, serve the folder on --host/--port until Ctrl+C (for a preview)")
    parser.add_argument("--host", default="127.0.0.1", help="address for --serve (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port for --serve (default 8080; 0 picks one)")
    add_output_flags(parser)


def main(args) -> int:
    from edge_runtime.console import print_json, result, say

    if not 0 <= args.port <= 65535:
        raise OncoliteError(f"--port {args.port}: must be 0..65535 (0 picks a free port)")
    summary = build(args.model, args.out, runtime_dir=args.runtime)
    model = summary["model"]
    wrote = (f"{summary['out']}: web app of {model['name']} ({model['variant'] or model['kind']}), {summary['files']} "
             f"files, {summary['size_bytes'] / 2**20:.1f} MB, LiteRT.js {summary['runtime']['version']}")
    say(args,
        f"model        {model['name']} ({model['variant'] or model['kind']}, sha256 {model['sha256'][:16]}...)",
        f"runtime      LiteRT.js {summary['runtime']['version']} (WebAssembly), copied into runtime/",
        f"uncertain    {'flagged below a top-2 gap of ' + format(summary['uncertain_margin'], 'g') if summary['uncertain_margin'] is not None else 'not flagged (no uncertain_margin in the model facts)'}",
        "serve the folder over HTTPS (or on localhost) and open it once: it then works offline")
    if not args.serve:
        print_json(summary) if args.json else result(args, wrote)
    else:
        with serve_folder(summary["out"], args.host, args.port) as url:
            # Serving, the result is the folder and where it is served, in one line.
            print_json({**summary, "url": url}) if args.json else result(args, f"{wrote}; serving at {url} (Ctrl+C stops)")
            sys.stdout.flush()
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass
    return EXIT_OK
