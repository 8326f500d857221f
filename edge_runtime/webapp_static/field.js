// The in-browser field page: the model runs here, with LiteRT.js (WebAssembly, XNNPACK on the
// CPU). The image is decoded, preprocessed and classified on this device and never sent
// anywhere; the only requests are for this folder's own files, and after one visit the
// service worker answers those from its cache.
import { decode, resize, toInput, toProbabilities, decide, margin, digest, RESAMPLES } from "./preprocess.js";
import { renderAnswer } from "./answer.js";

const $ = (id) => document.getElementById(id);

// (module (func (result v128) i32.const 0 i8x16.splat i8x16.popcnt)): valid only with SIMD,
// which every LiteRT.js WebAssembly build needs.
const SIMD_PROBE = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10, 10,
  1, 8, 0, 65, 0, 253, 15, 253, 98, 11]);
const CACHE_PREFIX = "oncolite-field ";

const app = {
  facts: null,
  core: null,
  model: null,
  wasmBuild: null,
  busy: false,
  shown: false,
  hadController: false,
  lastInput: null,
  seq: 0,
};

let resolveReady, rejectReady;
const ready = new Promise((resolve, reject) => { resolveReady = resolve; rejectReady = reject; });
ready.catch(() => {});

// --- small view helpers -----------------------------------------------------------------------

function show(id, visible) {
  $(id).hidden = !visible;
}

function setState(state, message) {
  document.body.dataset.state = state;
  if (message !== undefined) $("status").textContent = message;
}

function enablePicking(enabled) {
  for (const id of ["camera", "file"]) {
    $(id).disabled = !enabled;
    $(id).closest("label").dataset.disabled = String(!enabled);
  }
}

function fail(message) {
  setState("failed");
  enablePicking(false);
  setOffline("Offline use: not available, the model cannot run here.", false);
  $("error").textContent = message;
  show("error", true);
  rejectReady(new Error(message));
}

// The rule in words comes from the builder (edge_runtime.model.decision_rule), as on the server page.
function decisionRule(facts) {
  let rule = "Decision rule: " + facts.decision_rule + ".";
  if (facts.uncertain_margin !== null && facts.uncertain_margin !== undefined) {
    rule += facts.threshold
      ? ` Flagged uncertain when p(${facts.threshold.positive}) is within ${facts.uncertain_margin} of ${facts.threshold.value}.`
      : ` Flagged uncertain when the two highest probabilities are less than ${facts.uncertain_margin} apart.`;
  }
  return rule;
}

// --- loading ----------------------------------------------------------------------------------

async function loadFacts() {
  const response = await fetch("model.json");
  if (!response.ok) throw new Error(`model.json: HTTP ${response.status}`);
  const facts = await response.json();
  if (facts.format !== "oncolite-webapp/1") throw new Error("model.json is not an oncolite web app description");
  if (!RESAMPLES.includes(facts.preprocessing.resample)) throw new Error("unknown resample " + facts.preprocessing.resample);
  return facts;
}

function checkBrowser() {
  if (typeof WebAssembly !== "object" || typeof WebAssembly.validate !== "function") {
    return "This browser cannot run WebAssembly, so the model cannot run on this device. " +
      "Use a current Chrome, Safari or Firefox, or the server page (oncolite serve).";
  }
  if (!WebAssembly.validate(SIMD_PROBE)) {
    return "This browser lacks WebAssembly SIMD, which the in-browser model runtime needs " +
      "(Chrome 91+, Safari 16.4+, Firefox 89+). Update the browser, or use the server page (oncolite serve).";
  }
  return null;
}

async function sha256Hex(bytes) {
  if (!(window.crypto && crypto.subtle)) return null; // not a secure context: size is checked instead
  const hash = await crypto.subtle.digest("SHA-256", bytes);
  return Array.from(new Uint8Array(hash), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function loadModel(facts) {
  let core;
  try {
    core = await import("./runtime/core/index.js");
  } catch (err) {
    throw new Error("the LiteRT.js runtime files did not load (" + err.message + ")");
  }
  const relaxed = await core.supportsFeature("relaxedSimd").catch(() => false);
  await core.loadLiteRt(new URL("runtime/wasm/", document.baseURI).href);
  const response = await fetch(facts.model.file);
  if (!response.ok) throw new Error(`${facts.model.file}: HTTP ${response.status}`);
  const bytes = new Uint8Array(await response.arrayBuffer());
  if (bytes.length !== facts.model.size_bytes) {
    throw new Error(`${facts.model.file} has ${bytes.length} bytes, model.json says ${facts.model.size_bytes}: the copy is incomplete; rebuild or reload`);
  }
  const sha = await sha256Hex(bytes);
  if (sha !== null && sha !== facts.model.sha256) {
    throw new Error(`${facts.model.file} does not match its sha256 in model.json: the copy is damaged or from another build; rebuild or reload`);
  }
  const model = await core.loadAndCompile(bytes, { accelerator: "wasm" });
  const input = model.getInputDetails()[0], output = model.getOutputDetails()[0];
  const want = [1, facts.preprocessing.height, facts.preprocessing.width, 3];
  if (input.dtype !== facts.input.dtype || Array.from(input.shape).join() !== want.join()) {
    throw new Error(`the model's input is ${input.dtype} [${Array.from(input.shape)}], model.json says ${facts.input.dtype} [${want}]`);
  }
  if (output.dtype !== facts.output.dtype || output.shape[output.shape.length - 1] !== facts.labels.length) {
    throw new Error(`the model's output is ${output.dtype} [${Array.from(output.shape)}], not ${facts.labels.length} ${facts.output.dtype} scores`);
  }
  app.core = core;
  app.model = model;
  app.wasmBuild = relaxed ? "WebAssembly, relaxed SIMD" : "WebAssembly, SIMD";
}

// --- offline: service worker and cache --------------------------------------------------------

function cacheName(scope) {
  return CACHE_PREFIX + scope + " " + app.facts.version;
}

function setOffline(text, isReady) {
  $("offline").textContent = text;
  $("offline").dataset.ready = String(isReady);
  document.body.dataset.offline = isReady ? "ready" : "no";
}

async function registerWorker() {
  if (!("serviceWorker" in navigator) || !window.isSecureContext) {
    setOffline("Offline use needs this page over HTTPS (or localhost): it will need the network next time.", false);
    return null;
  }
  app.hadController = Boolean(navigator.serviceWorker.controller);
  navigator.serviceWorker.addEventListener("controllerchange", onControllerChange);
  try {
    return await navigator.serviceWorker.register("sw.js", { scope: "./", updateViaCache: "none" });
  } catch (err) {
    setOffline("Offline use is not available here (" + err.message + ").", false);
    return null;
  }
}

function onControllerChange() {
  if (!app.hadController) {  // the first install took this page over
    app.hadController = true;
    refreshOffline();
    return;
  }
  // A new version (a new model or page) took over: reload to use it, unless an answer is on screen.
  if (!app.busy && !app.shown) {
    location.reload();
    return;
  }
  show("update", true);
}

// The service worker precaches the page and the model; the runtime's .js/.wasm are whichever
// build this browser loaded (relaxed SIMD or not), so the page adds exactly those.
async function refreshOffline() {
  if (!("serviceWorker" in navigator) || !window.isSecureContext || !app.model) return;
  const registration = await navigator.serviceWorker.ready;
  const cache = await caches.open(cacheName(registration.scope));
  const runtime = new URL("runtime/", document.baseURI).href;
  const used = performance.getEntriesByType("resource").map((e) => e.name.split("#")[0])
    .filter((url) => url.startsWith(runtime));
  const required = [...new Set([...app.facts.precache.map((u) => new URL(u, document.baseURI).href), ...used])];
  try {
    for (const url of used) {
      if (!(await cache.match(url))) await cache.add(url);
    }
    const missing = [];
    for (const url of required) if (!(await cache.match(url))) missing.push(url);
    if (missing.length) {
      setOffline("Saving for offline use…", false);
      return;
    }
  } catch (err) {
    setOffline("Could not save for offline use (" + err.message + ").", false);
    return;
  }
  setOffline("Available offline on this device (model " + app.facts.model.sha256.slice(0, 12) + ").", true);
}

// --- classifying ------------------------------------------------------------------------------

async function classifyBlob(blob) {
  const facts = app.facts, prep = facts.preprocessing;
  const start = performance.now();
  const image = await decode(blob);
  const resized = resize(image.rgba, image.width, image.height, prep.width, prep.height, prep.resample);
  const input = toInput(resized, prep.width * prep.height, prep, facts.input);
  const prepared = performance.now();
  const probabilities = await run(input);
  const done = performance.now();
  app.lastInput = input;
  // The answer in the shape of edge_runtime.model.prediction_record (predict, the server page).
  const chosen = decide(probabilities, facts.labels, facts.threshold);
  const band = facts.uncertain_margin;
  return {
    label: facts.labels[chosen],
    index: chosen,
    probability: probabilities[chosen],
    probabilities: Object.fromEntries(facts.labels.map((label, i) => [label, probabilities[i]])),
    top: facts.labels.map((label, i) => ({ label, probability: probabilities[i] }))
      .sort((a, b) => b.probability - a.probability),
    decision_rule: facts.decision_rule,
    uncertain: band === null || band === undefined ? null : margin(probabilities, facts.labels, facts.threshold) < band,
    latency_ms: done - prepared,
    preprocess_ms: prepared - start,
    input_digest: digest(input),
    image: { width: image.original.width, height: image.original.height, downscaled: image.downscaled,
             decoded: [image.width, image.height] },
  };
}

async function run(input) {
  const prep = app.facts.preprocessing;
  const tensor = new app.core.Tensor(input, [1, prep.height, prep.width, 3]);
  let outputs;
  try {
    outputs = await app.model.run(tensor);
  } finally {
    tensor.delete();
  }
  try {
    return toProbabilities(outputs[0].toTypedArray(), app.facts.output);
  } finally {
    for (const t of outputs) t.delete();
  }
}

function renderResult(result) {
  const facts = app.facts;
  const size = result.image.downscaled
    ? ` · photo ${result.image.width}×${result.image.height} downscaled on this device to ${result.image.decoded.join("×")} first`
    : "";
  renderAnswer($("answer"), result, facts.labels, {
    threshold: facts.threshold,
    uncertain: result.uncertain === true,
    rule: decisionRule(facts),
    meta: `${facts.model.name} · ${result.latency_ms.toFixed(1)} ms in this browser ` +
      `(LiteRT.js ${facts.runtime.version}, ${app.wasmBuild}) · preprocessing ${result.preprocess_ms.toFixed(0)} ms${size}`,
  });

  const section = $("result");
  section.dataset.seq = String(++app.seq);
  section.dataset.inputDigest = result.input_digest;
  section.dataset.latencyMs = result.latency_ms.toFixed(3);
  section.dataset.preprocessMs = result.preprocess_ms.toFixed(3);
  section.dataset.downscaled = String(result.image.downscaled);
  show("result", true);
  app.shown = true;
}

async function onPick(event) {
  const file = event.target.files && event.target.files[0];
  event.target.value = "";  // choosing the same file again still triggers a change
  if (!file || app.busy || !app.model) return;
  app.busy = true;
  enablePicking(false);
  show("error", false);
  show("busy", true);
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  try {
    renderResult(await classifyBlob(file));
  } catch (err) {
    show("result", false);
    app.shown = false;
    $("error").textContent = "Could not classify this image: " + err.message;
    show("error", true);
  } finally {
    show("busy", false);
    app.busy = false;
    enablePicking(true);
  }
}

// Latency of the model alone, for the benchmark: `runs` timed inferences after `warmup`, on the
// last classified input (or a mid-grey image).
async function benchmark({ runs = 50, warmup = 5 } = {}) {
  await ready;
  const prep = app.facts.preprocessing;
  const grey = new Uint8ClampedArray(prep.width * prep.height * 4).fill(128);
  const input = app.lastInput || toInput(grey, prep.width * prep.height, prep, app.facts.input);
  const times = [];
  for (let i = 0; i < warmup + runs; i++) {
    const start = performance.now();
    await run(input);
    if (i >= warmup) times.push(performance.now() - start);
  }
  return { times_ms: times, wasm: app.wasmBuild, runtime: app.facts.runtime, user_agent: navigator.userAgent,
           model_sha256: app.facts.model.sha256, cross_origin_isolated: self.crossOriginIsolated === true };
}

// --- start ------------------------------------------------------------------------------------

async function main() {
  $("camera").addEventListener("change", onPick);
  $("file").addEventListener("change", onPick);
  $("update-reload").addEventListener("click", () => location.reload());
  try {
    app.facts = await loadFacts();
  } catch (err) {
    fail("This page's model description could not be loaded (" + err.message + "). Rebuild the page with `python -m edge_runtime webapp`.");
    return;
  }
  const facts = app.facts;
  $("model-line").textContent = `${facts.model.name} · ${facts.labels.join(" / ")} · sha256 ${facts.model.sha256.slice(0, 12)}`;
  $("model-line").dataset.sha256 = facts.model.sha256;
  if (facts.notice) {
    const text = facts.notice.replace(/^Research tool, not a diagnosis:\s*/, "");
    $("notice-text").textContent = text.charAt(0).toUpperCase() + text.slice(1);
  }
  const registration = registerWorker();
  const problem = checkBrowser();
  if (problem) {
    fail(problem);
    return;
  }
  try {
    await loadModel(facts);
  } catch (err) {
    fail("The model could not be loaded in this browser: " + err.message + ". Use the server page (oncolite serve) instead.");
    return;
  }
  setState("ready", `Ready · the model runs in this browser (LiteRT.js ${facts.runtime.version}, ${app.wasmBuild}).`);
  enablePicking(true);
  resolveReady(facts);
  if (await registration) refreshOffline().catch((err) => setOffline("Could not save for offline use (" + err.message + ").", false));
}

// For automation and the latency benchmark (edge_runtime/webapp.py): no access to anything
// the page itself cannot do.
window.oncoliteField = { ready, benchmark, facts: () => app.facts };

main();
