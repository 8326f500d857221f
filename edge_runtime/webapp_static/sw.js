// Service worker of the in-browser field page: after one visit the page, the model and the
// runtime come from this cache, so the page works with no network.
//
// One cache per build: its name holds the model's sha256 and a digest of every other file, so a
// new model (or page) is a new service worker that fills a new cache and, once active, deletes
// the old one. Only this folder's own files are cached; images are never fetched, so never cached.
"use strict";

const VERSION = "{{VERSION}}";
const PRECACHE = {{PRECACHE}};
const PREFIX = "oncolite-field " + self.registration.scope + " ";
const CACHE = PREFIX + VERSION;
const RUNTIME = new URL("runtime/", self.registration.scope).href;

self.addEventListener("install", (event) => {
  event.waitUntil((async () => {
    const cache = await caches.open(CACHE);
    // cache: "reload": never a stale copy from the HTTP cache in a new version's cache.
    await cache.addAll(PRECACHE.map((url) => new Request(url, { cache: "reload" })));
    await self.skipWaiting();
  })());
});

self.addEventListener("activate", (event) => {
  event.waitUntil((async () => {
    for (const key of await caches.keys()) {
      if (key.startsWith(PREFIX) && key !== CACHE) await caches.delete(key);
    }
    await self.clients.claim();
  })());
});

self.addEventListener("fetch", (event) => {
  const request = event.request;
  if (request.method !== "GET" || !request.url.startsWith(self.registration.scope)) return;
  event.respondWith((async () => {
    const cache = await caches.open(CACHE);
    const hit = await cache.match(request, { ignoreSearch: request.mode === "navigate" });
    if (hit) return hit;
    const response = await fetch(request);
    // The runtime build this browser picked (the page also adds it after loading).
    if (response.ok && request.url.startsWith(RUNTIME)) await cache.put(request, response.clone());
    return response;
  })());
});
