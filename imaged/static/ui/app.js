// imaged lab page: ranged PUT uploads and fetch() downloads against the
// images API of a host or a proxy (docs/proxy.md). No dependencies.
"use strict";

const MiB = 1024 * 1024;
const $ = (id) => document.getElementById(id);

let current = null;   // the running transfer: {abort()}

// The images URL: a full URL as given, or a session id on this server.
function imageUrl() {
  const value = $("url").value.trim();
  if (!value) throw new Error("Give a session URL or id.");
  if (value.includes("://")) return new URL(value).href;
  if (value.startsWith("/")) return new URL(value, location.origin).href;
  return new URL("/images/" + encodeURIComponent(value), location.origin).href;
}

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { "Authorization": "Bearer " + token } : {};
}

function withQuery(url, query) {
  const u = new URL(url);
  for (const [k, v] of Object.entries(query)) u.searchParams.set(k, v);
  return u.href;
}

class HttpError extends Error {
  constructor(status, statusText, body) {
    const text = (body || "").trim().slice(0, 500);
    super(`${status} ${statusText}${text ? ": " + text : ""}`);
    this.status = status;
  }
}

function showError(what, err) {
  let msg = err && err.message ? err.message : String(err);
  if (err instanceof TypeError) {
    // fetch/XHR give no detail for network and CORS failures.
    msg = "network error: the server is unreachable, refused the connection, " +
          "or its certificate is not trusted by this browser";
  }
  $("error").textContent = `${what} failed: ${msg}`;
  $("error").hidden = false;
  setStatus("error", `${what} failed.`);
}

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function rate(bytes, seconds) {
  return seconds > 0 ? (bytes / seconds / 1e6).toFixed(1) + " MB/s" : "-";
}

function showProgress(what, done, total, started) {
  const seconds = (performance.now() - started) / 1000;
  $("progress").max = total || 1;
  $("progress").value = done;
  const pct = total ? ((100 * done) / total).toFixed(1) : "100.0";
  setStatus("running", `${what}: ${(done / MiB).toFixed(1)} of ${(total / MiB).toFixed(1)} MiB ` +
                       `(${pct}%), ${rate(done, seconds)}`);
}

function busy(on) {
  $("upload").disabled = on;
  $("download").disabled = on;
  $("cancel").disabled = !on;
}

// One PUT with XMLHttpRequest: unlike fetch, it reports upload progress.
function put(url, headers, body, onProgress, state) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    state.xhr = xhr;
    xhr.open("PUT", url);
    for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => onProgress(e.loaded);
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve();
      else reject(new HttpError(xhr.status, xhr.statusText, xhr.responseText));
    };
    xhr.onerror = () => reject(new TypeError("network error"));
    xhr.onabort = () => reject(new Error("canceled"));
    xhr.send(body);
  });
}

async function upload() {
  const file = $("file").files[0];
  const state = { canceled: false, xhr: null };
  current = { abort() { state.canceled = true; if (state.xhr) state.xhr.abort(); } };
  busy(true);
  $("error").hidden = true;
  setStatus("running", "Starting the upload...");
  try {
    if (!file) throw new Error("Pick a local file first.");
    const url = imageUrl();
    const chunk = Math.max(1, Math.min(64, Number($("chunk").value) || 8)) * MiB;
    const size = file.size;
    const started = performance.now();
    showProgress("Uploading", 0, size, started);
    if (size === 0) {
      await put(withQuery(url, { flush: "y" }), authHeaders(), new Blob([]), () => {}, state);
    }
    for (let offset = 0; offset < size; offset += chunk) {
      if (state.canceled) throw new Error("canceled");
      const end = Math.min(offset + chunk, size);
      const headers = Object.assign(authHeaders(), {
        "Content-Type": "application/octet-stream",
        "Content-Range": `bytes ${offset}-${end - 1}/*`,
      });
      // Flush once, with the last request: the data is on disk when it succeeds.
      const last = end === size;
      await put(withQuery(url, { flush: last ? "y" : "n" }), headers, file.slice(offset, end),
                (loaded) => showProgress("Uploading", offset + loaded, size, started), state);
      showProgress("Uploading", end, size, started);
    }
    const seconds = (performance.now() - started) / 1000;
    setStatus("done", `Upload complete: ${size} bytes of ${file.name} in ` +
                      `${seconds.toFixed(2)} s (${rate(size, seconds)}).`);
  } catch (err) {
    showError("Upload", err);
  } finally {
    busy(false);
    current = null;
  }
}

function downloadName(response, url) {
  const cd = response.headers.get("Content-Disposition") || "";
  const star = /filename\*=UTF-8''([^;]+)/i.exec(cd);
  if (star) return decodeURIComponent(star[1]);
  const plain = /filename="?([^";]+)"?/i.exec(cd);
  if (plain) return plain[1];
  const id = new URL(url).pathname.split("/").pop();
  return (id || "image") + ".raw";
}

// A link cannot carry the Authorization header: fetch with it, then save.
async function download() {
  const controller = new AbortController();
  current = { abort() { controller.abort(); } };
  busy(true);
  $("error").hidden = true;
  setStatus("running", "Starting the download...");
  try {
    const url = imageUrl();
    const started = performance.now();
    const response = await fetch(url, { headers: authHeaders(), signal: controller.signal });
    if (!response.ok) {
      throw new HttpError(response.status, response.statusText, await response.text());
    }
    const total = Number(response.headers.get("Content-Length")) || 0;
    const reader = response.body.getReader();
    const parts = [];
    let done = 0;
    showProgress("Downloading", 0, total, started);
    for (;;) {
      const { value, done: end } = await reader.read();
      if (end) break;
      parts.push(value);
      done += value.length;
      showProgress("Downloading", done, total, started);
    }
    if (total && done !== total) throw new Error(`got ${done} of ${total} bytes`);
    const blob = new Blob(parts, { type: "application/octet-stream" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = downloadName(response, url);
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
    const seconds = (performance.now() - started) / 1000;
    setStatus("done", `Download complete: ${done} bytes saved as ${a.download} in ` +
                      `${seconds.toFixed(2)} s (${rate(done, seconds)}).`);
  } catch (err) {
    showError("Download", err.name === "AbortError" ? new Error("canceled") : err);
  } finally {
    busy(false);
    current = null;
  }
}

$("upload").addEventListener("click", upload);
$("download").addEventListener("click", download);
$("cancel").addEventListener("click", () => current && current.abort());
// A session id may come in the page's fragment: /ui/#SESSION-ID
if (location.hash.length > 1) $("url").value = decodeURIComponent(location.hash.slice(1));
