// The field page: send one image to /api/predict and show the answer. No library, no network
// beyond this server (the CSP forbids it anyway).
import { renderAnswer } from "./answer.js";

const $ = (id) => document.getElementById(id);

// The access token arrives once as ?token=...; keep it for this tab only and take it out of
// the address bar so it is not left in the history or shown over a shoulder.
function takeToken() {
  const url = new URL(window.location.href);
  const fromUrl = url.searchParams.get("token");
  if (fromUrl) {
    sessionStorage.setItem("oncolite-token", fromUrl);
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
  return sessionStorage.getItem("oncolite-token") || "";
}

let token = takeToken();

function authHeaders() {
  return token ? { Authorization: "Bearer " + token } : {};
}

function show(id, visible) {
  $(id).hidden = !visible;
}

function showError(message) {
  $("error").textContent = message;
  show("error", true);
}

async function loadHealth() {
  const response = await fetch("/api/health", { headers: authHeaders() });
  if (response.status === 401) {
    askForToken();
    $("model-line").textContent = "Access token required";
    return;
  }
  const health = await response.json();
  const model = health.model || {};
  $("model-line").textContent = (model.name || "model") + " · " + health.labels.join(" / ");
}

function askForToken() {
  show("token-form", true);
  $("token").focus();
}

function renderResult(result) {
  renderAnswer($("answer"), result, Object.keys(result.probabilities), {
    threshold: (result.model && result.model.threshold) || null,
    uncertain: result.uncertain === true,
    rule: "Decision rule: " + String(result.decision_rule).replace(">=", "≥"),
    meta: result.model.name + " · " + result.latency_ms.toFixed(1) + " ms on " + result.model.backend,
  });
  show("result", true);
}

async function classify(file) {
  show("error", false);
  show("busy", true);
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);

  const form = new FormData();
  form.append("image", file);
  try {
    const response = await fetch("/api/predict", { method: "POST", body: form, headers: authHeaders() });
    const body = await response.json().catch(() => ({}));
    if (response.status === 401) {
      askForToken();
      showError("This server needs an access token. Enter it below, then choose the image again.");
      return;
    }
    if (!response.ok) {
      show("result", false);
      showError(body.error || "The server could not classify this image (HTTP " + response.status + ").");
      return;
    }
    renderResult(body);
  } catch (err) {
    show("result", false);
    showError("Could not reach the server. Check the connection and try again.");
  } finally {
    show("busy", false);
  }
}

function onPick(event) {
  const file = event.target.files && event.target.files[0];
  if (file) classify(file);
  event.target.value = "";  // choosing the same file again still triggers a change
}

document.addEventListener("DOMContentLoaded", () => {
  $("camera").addEventListener("change", onPick);
  $("file").addEventListener("change", onPick);
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("oncolite-token", token);
    show("token-form", false);
    show("error", false);
    loadHealth();
  });
  loadHealth().catch(() => showError("Could not reach the server."));
});
