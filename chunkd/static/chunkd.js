// chunkd.js: the browser client of chunkd's chunked-upload contract (docs/API.md).
// A dependency-free ES module, kept as source (no build step); types in chunkd.d.ts.
//
//   import { chooseUpload, uploadChunked, followTask } from "/static/chunkd.js";
//   if (chooseUpload(file) === "chunked") {
//     const { sessionId, taskId } = await uploadChunked({ file, language: "en", onProgress });
//     const final = await followTask(taskId, { onMessage });
//   }
//
// Chunks are File.slice()s (never the whole file in memory), `parallel` in flight, each with
// its SHA-256 (WebCrypto) in X-Chunk-Checksum. What can pass is retried with exponential
// backoff and full jitter (Retry-After honoured); what cannot fails at once with the server's
// code and message. The session id is kept in localStorage per (server, name, size,
// lastModified), so the same file given again (after a reload or a browser restart) resumes
// from /status instead of starting over.

const MiB = 1024 * 1024;

/** Error codes worth sending the same request again for (chunkd/client/core.py's list and the
 * 503s / 429 that come with a Retry-After). */
export const RETRY_CODES = Object.freeze([
  "checksum_mismatch", "chunk_incomplete", "client_disconnected", "shutting_down",
  "chunk_busy", "body_timeout", "body_too_slow", "server_busy", "storage_unavailable",
  "rate_limited", "network_error", "timeout",
]);
const RETRY = new Set(RETRY_CODES);
/** 429s that wait for the user (finish or abort another upload), not for time. */
const QUOTA_CODES = new Set(["session_quota", "storage_quota"]);

/** What chunkd (or the network) answered. `status` 0: no HTTP answer at all. */
export class ChunkdError extends Error {
  constructor(status, code, message, details = {}, retryAfter = null) {
    super(message);
    this.name = code === "aborted" ? "AbortError" : "ChunkdError";
    this.status = status;
    this.code = code;
    this.details = details || {};
    this.retryAfter = retryAfter;
  }

  /** Would the same request, sent again later, possibly succeed? */
  get retryable() {
    if (this.code === "aborted") return false;
    if (RETRY.has(this.code)) return true;
    if (this.status === 408) return true;
    if (this.status === 429) return !QUOTA_CODES.has(this.code);
    return this.status >= 500 && this.status !== 501 && this.status !== 507;
  }
}

function abortError(message = "the upload was cancelled") {
  return new ChunkdError(0, "aborted", message);
}

const sleep = (ms, signal) => new Promise((resolve, reject) => {
  if (signal?.aborted) { reject(signal.reason); return; }
  const timer = setTimeout(() => { signal?.removeEventListener("abort", onAbort); resolve(); }, ms);
  function onAbort() { clearTimeout(timer); reject(signal.reason); }
  signal?.addEventListener("abort", onAbort, { once: true });
});

/** An AbortSignal that fires when any of `parents` does, or after `timeout` ms (0: never). */
function linked(parents, timeout) {
  const ctl = new AbortController();
  const listeners = [];
  for (const parent of parents) {
    if (!parent) continue;
    if (parent.aborted) { ctl.abort(parent.reason); break; }
    const onAbort = () => ctl.abort(parent.reason);
    parent.addEventListener("abort", onAbort, { once: true });
    listeners.push([parent, onAbort]);
  }
  const timer = timeout > 0 ? setTimeout(() => ctl.abort(
    new ChunkdError(0, "timeout", `no answer within ${Math.round(timeout / 1000)} s`)), timeout) : null;
  return {
    signal: ctl.signal,
    done() {
      clearTimeout(timer);
      for (const [parent, onAbort] of listeners) parent.removeEventListener("abort", onAbort);
    },
  };
}

/** Exponential backoff with full jitter; a server's Retry-After (seconds) is a floor. */
function backoff(attempt, base, cap, retryAfter) {
  const ceiling = Math.min(cap, base * 2 ** (attempt - 1));
  const jittered = Math.random() * ceiling;
  if (retryAfter != null && retryAfter >= 0) {
    return retryAfter * 1000 + Math.random() * Math.min(1000, base);
  }
  return jittered;
}

function parseRetryAfter(headers, details) {
  const raw = headers?.get?.("Retry-After");
  if (raw != null && raw !== "") {
    const secs = Number(raw);
    if (Number.isFinite(secs)) return secs;
    const when = Date.parse(raw);
    if (!Number.isNaN(when)) return Math.max(0, (when - Date.now()) / 1000);
  }
  // Cross-origin, Retry-After is not readable without Access-Control-Expose-Headers; chunkd
  // puts the same number in the error body.
  const fromBody = Number(details?.retry_after);
  return Number.isFinite(fromBody) && details?.retry_after != null ? fromBody : null;
}

function trimBase(baseUrl) {
  return String(baseUrl || "").replace(/\/+$/, "");
}

async function resolveToken(token) {
  if (token == null) return null;
  const value = typeof token === "function" ? await token() : token;
  return value ? String(value) : null;
}

async function requestHeaders(token, extra) {
  const headers = { ...(extra || {}) };
  const value = await resolveToken(token);
  if (value) headers.Authorization = `Bearer ${value}`;
  return headers;
}

/** One HTTP request to chunkd, no retry. Resolves `{status, doc, headers}` for 1xx-3xx;
 * rejects with a ChunkdError for an error answer, `network_error` when there is none. */
async function call(base, method, path, { token, headers, body, signal, timeout = 0,
  credentials } = {}) {
  const link = linked(Array.isArray(signal) ? signal : [signal], timeout);
  try {
    let resp;
    try {
      resp = await fetch(base + path, {
        method, body, signal: link.signal, credentials,
        headers: await requestHeaders(token, headers),
      });
    } catch (err) {
      if (link.signal.aborted) throw link.signal.reason ?? err;
      throw new ChunkdError(0, "network_error",
        `cannot reach chunkd at ${base || "this origin"}: ${err?.message || err}`);
    }
    let text = "";
    try {
      text = await resp.text();
    } catch (err) {
      if (link.signal.aborted) throw link.signal.reason ?? err;
      throw new ChunkdError(0, "network_error", `the answer was cut off: ${err?.message || err}`);
    }
    let doc = null;
    try { doc = text ? JSON.parse(text) : null; } catch { doc = null; }
    if (resp.status >= 400) {
      const err = doc && typeof doc === "object" ? doc.error : null;
      if (err && typeof err === "object") {
        const { code, message, ...details } = err;
        throw new ChunkdError(resp.status, String(code), String(message ?? code), details,
          parseRetryAfter(resp.headers, details));
      }
      throw new ChunkdError(resp.status, `http_${resp.status}`,
        text.slice(0, 200) || `HTTP ${resp.status}`, {}, parseRetryAfter(resp.headers, null));
    }
    return { status: resp.status, doc, headers: resp.headers };
  } finally {
    link.done();
  }
}

/** `GET {baseUrl}/upload/chunked/limits`: the chunk sizes and limits, before a session. */
export async function fetchLimits({ baseUrl = "", token, headers, signal, credentials } = {}) {
  const { doc } = await call(trimBase(baseUrl), "GET", "/upload/chunked/limits",
    { token, headers, signal, credentials, timeout: 30_000 });
  return doc;
}

/** The chunk size for a file of `fileSize` bytes: `requested` or the server's `chunk_size`,
 * clamped to [min_chunk_size (or the whole file if smaller), max_chunk_size], grown so the
 * file has at most `max_chunks` chunks, and never beyond the file itself. */
export function pickChunkSize(fileSize, limits, requested) {
  const size = Math.max(0, Math.floor(fileSize));
  const max = Number(limits?.max_chunk_size) || 95 * MiB;
  const min = Math.min(Number(limits?.min_chunk_size) || MiB, Math.max(size, 1));
  const maxChunks = Number(limits?.max_chunks) || 10_000;
  let chunk = Math.floor(Number(requested) || Number(limits?.chunk_size) || 50 * MiB);
  chunk = Math.min(Math.max(chunk, min), max);
  if (Math.ceil(size / chunk) > maxChunks) chunk = Math.min(max, Math.ceil(size / maxChunks));
  return Math.max(1, Math.min(chunk, Math.max(size, 1)));
}

/** `'single'` (the service's one-request upload) below `threshold` bytes, else `'chunked'`. */
export function chooseUpload(file, { threshold = 100_000_000 } = {}) {
  return file.size < threshold ? "single" : "chunked";
}

// -- remembered sessions ------------------------------------------------------------------

const KEY_PREFIX = "chunkd:upload:";

function absoluteBase(base) {
  try {
    const here = globalThis.location?.href;
    return trimBase(new URL(base || "/", here).href);
  } catch {
    return base;
  }
}

/** The localStorage key of a file's session on a server. */
export function resumeKey(file, baseUrl = "") {
  return KEY_PREFIX + JSON.stringify([absoluteBase(trimBase(baseUrl)), file.name, file.size,
    file.lastModified ?? 0]);
}

function storageOf(choice) {
  if (choice === null || choice === false) return null;
  if (choice && typeof choice === "object") return choice;
  try { return globalThis.localStorage ?? null; } catch { return null; }
}

function remembered(storage, key) {
  if (!storage) return null;
  try {
    const doc = JSON.parse(storage.getItem(key) || "null");
    return doc && typeof doc.sessionId === "string" ? doc : null;
  } catch { return null; }
}

function remember(storage, key, doc) {
  try { storage?.setItem(key, JSON.stringify(doc)); } catch { /* full or disabled: no resume */ }
}

function forget(storage, key) {
  try { storage?.removeItem(key); } catch { /* nothing to forget */ }
}

// -- checksums ------------------------------------------------------------------------------

function hex(buffer) {
  const bytes = new Uint8Array(buffer);
  let out = "";
  for (let i = 0; i < bytes.length; i++) out += bytes[i].toString(16).padStart(2, "0");
  return out;
}

/** SHA-256 of a Blob as hex, or null where WebCrypto is missing (not a secure context). */
async function blobSha256(blob) {
  const subtle = globalThis.crypto?.subtle;
  if (!subtle) return null;
  return hex(await subtle.digest("SHA-256", await blob.arrayBuffer()));
}

// -- the upload -----------------------------------------------------------------------------

const PAUSED = Symbol("paused");
const SPEED_WINDOW_MS = 8000;

class Upload {
  constructor(options) {
    if (!options || !options.file) throw new TypeError("createUpload: `file` is required");
    this.o = {
      parallel: 3, baseUrl: "", retries: 10, retryDelay: 500, maxRetryDelay: 30_000,
      finalize: true, checksum: true, timeout: 600_000, resume: true, ...options,
    };
    this.o.parallel = Math.max(1, Math.floor(this.o.parallel) || 1);
    this.o.retries = Math.max(1, Math.floor(this.o.retries) || 1);
    this.file = options.file;
    this.base = trimBase(this.o.baseUrl);
    this.storage = this.o.resume ? storageOf(this.o.storage) : null;
    this.key = resumeKey(this.file, this.base);
    this.sessionId = null;
    this.state = "idle";
    this.retryCount = 0;
    this.cancelled = false;
    this.cancelCtl = new AbortController(); // the whole upload
    this.phaseCtl = new AbortController(); // the chunks in flight (a pause ends them)
    this.resumeWaiter = null;
    this.promise = new Promise((resolve, reject) => { this._resolve = resolve; this._reject = reject; });
    this.promise.catch(() => {}); // rejections reach the caller through start() / .promise
    this.started = false;
    const signal = this.o.signal;
    if (signal) {
      if (signal.aborted) this.cancel();
      else signal.addEventListener("abort", () => this.cancel(), { once: true });
    }
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    try { this.o.onStateChange?.(state); } catch (err) { console.error(err); }
  }

  start() {
    if (!this.started) {
      this.started = true;
      if (this.cancelled) {
        this._reject(abortError());
      } else {
        this._run().then(this._resolve, this._reject);
      }
    }
    return this.promise;
  }

  /** Stop sending chunks; the session stays. `abortInFlight: false` lets the chunks being sent
   * finish. Resolves once nothing is in flight (or at once before the chunks started). */
  pause({ abortInFlight = true } = {}) {
    if (this.cancelled || ["done", "failed", "cancelled", "finalizing"].includes(this.state)) {
      return Promise.resolve();
    }
    if (!this.paused) {
      this.paused = true;
      this.resumeWaiter = deferred();
      this.pausedDone = deferred();
      if (abortInFlight) this.phaseCtl.abort(PAUSED);
      if (!this.sending) { this._setState("paused"); this.pausedDone.resolve(); }
    }
    return this.pausedDone.promise;
  }

  /** Go on after pause(): asks /status and sends what is missing. */
  resume() {
    if (!this.paused) return;
    this.paused = false;
    this.pausedDone?.resolve(); // a pause() still settling is over: nothing waits for it
    this.resumeWaiter?.resolve();
    this.resumeWaiter = null;
  }

  /** Stop for good: in-flight requests end, the session is deleted on the server
   * (`DELETE /abort`) and forgotten; the upload's promise rejects with an AbortError. */
  cancel() {
    if (this.cancelled || this.state === "done" || this.state === "failed") {
      return this.cancelDone?.promise ?? Promise.resolve();
    }
    this.cancelled = true;
    this.cancelDone = deferred();
    this.cancelCtl.abort(abortError());
    this.phaseCtl.abort(abortError());
    this.resumeWaiter?.resolve();
    this.pausedDone?.resolve();
    if (!this.started) {
      this._setState("cancelled");
      this.cancelDone.resolve();
    }
    return this.cancelDone.promise;
  }

  _req(method, path, { signal, ...extra } = {}) {
    return call(this.base, method, path, {
      token: this.o.token, headers: this.o.headers, credentials: this.o.credentials,
      timeout: this.o.timeout, ...extra, signal: [this.cancelCtl.signal, signal],
    });
  }

  /** `fn` again while its failure can pass, with backoff; `signal` ends the waiting. */
  async _retrying(what, fn, signal = this.cancelCtl.signal) {
    for (let attempt = 1; ; attempt++) {
      try {
        return await fn();
      } catch (err) {
        if (signal.aborted) throw signal.reason;
        if (!(err instanceof ChunkdError) || !err.retryable || attempt >= this.o.retries) throw err;
        const delay = backoff(attempt, this.o.retryDelay, this.o.maxRetryDelay, err.retryAfter);
        this.retryCount += 1;
        try { this.o.onRetry?.({ what, attempt, delay, error: err }); } catch (e) { console.error(e); }
        await sleep(delay, signal);
      }
    }
  }

  async _run() {
    try {
      return await this._upload();
    } catch (err) {
      if (err instanceof ChunkdError && (err.status === 404 || err.status === 410)) {
        forget(this.storage, this.key); // expired, aborted or gone: never picked up again
      }
      if (this.cancelled) {
        await this._abortOnServer();
        this._setState("cancelled");
        this.cancelDone?.resolve();
        throw abortError();
      }
      this._setState("failed");
      throw err;
    } finally {
      this.pausedDone?.resolve(); // whoever waits for a pause to settle is not left waiting
    }
  }

  async _abortOnServer() {
    forget(this.storage, this.key);
    if (!this.sessionId) return;
    for (let attempt = 1; attempt <= 3; attempt++) {
      try {
        await call(this.base, "DELETE", `/upload/chunked/${this.sessionId}/abort`, {
          token: this.o.token, headers: this.o.headers, credentials: this.o.credentials,
          timeout: 15_000,
        });
        return;
      } catch (err) {
        if (!(err instanceof ChunkdError) || !err.retryable) return; // 409 finalized, 410 gone
        await sleep(backoff(attempt, 200, 2000, null));
      }
    }
  }

  async _status() {
    const { doc } = await this._retrying("status",
      () => this._req("GET", `/upload/chunked/${this.sessionId}/status`));
    return doc;
  }

  async _resumeOrCreate() {
    const saved = this.o.resume ? remembered(this.storage, this.key) : null;
    if (saved) {
      this.sessionId = saved.sessionId;
      try {
        const st = await this._status();
        if (st.total_bytes === this.file.size && st.filename === this.file.name) {
          this.resumed = true;
          return st;
        }
      } catch (err) {
        if (this.cancelled) throw err;
        // gone (404/410) or not this user's (403: another account on this browser)
        if (!(err instanceof ChunkdError) || ![403, 404, 410].includes(err.status)) throw err;
      }
      forget(this.storage, this.key);
      this.sessionId = null;
    }
    return this._create();
  }

  async _create() {
    const limits = await this._retrying("limits",
      () => this._req("GET", "/upload/chunked/limits").then((r) => r.doc));
    this.limits = limits;
    const chunkSize = pickChunkSize(this.file.size, limits, this.o.chunkSize);
    const body = {
      filename: this.file.name, total_size: this.file.size, chunk_size: chunkSize,
      total_chunks: Math.ceil(this.file.size / chunkSize),
    };
    if (this.o.language != null) body.language = this.o.language;
    if (this.o.model != null) body.model = this.o.model;
    if (this.o.taskParams != null) body.task_params = this.o.taskParams;
    const { doc } = await this._retrying("session", () => this._req("POST",
      "/upload/chunked/session", {
        body: JSON.stringify(body), headers: { ...this.o.headers, "Content-Type": "application/json" },
      }));
    this.sessionId = doc.session_id;
    this.resumed = false;
    if (this.cancelled) throw abortError();
    remember(this.storage, this.key, {
      sessionId: doc.session_id, chunkSize: doc.chunk_size, totalChunks: doc.total_chunks,
      savedAt: Date.now(),
    });
    const missing = [];
    for (let i = 0; i < doc.total_chunks; i++) missing.push(i);
    return { session_id: doc.session_id, status: "uploading", chunk_size: doc.chunk_size,
      total_chunks: doc.total_chunks, missing_chunks: missing, total_bytes: doc.total_size };
  }

  _length(i) {
    return Math.min(this.chunkSize, this.file.size - i * this.chunkSize);
  }

  _adopt(st) {
    this.chunkSize = st.chunk_size;
    this.totalChunks = st.total_chunks;
    this.missing = new Set(st.missing_chunks || []);
    this.finalized = Boolean(st.task_id) ||
      ["finalizing", "processing", "completed", "failed"].includes(st.status);
  }

  _progress() {
    let missingBytes = 0;
    for (const i of this.missing) missingBytes += this._length(i);
    const uploadedBytes = this.file.size - missingBytes;
    const now = performance.now();
    const samples = this.samples;
    samples.push([now, this.sentBytes]);
    while (samples.length > 2 && now - samples[1][0] > SPEED_WINDOW_MS) samples.shift();
    const [t0, b0] = samples[0];
    const currentSpeed = now > t0 ? ((this.sentBytes - b0) * 1000) / (now - t0) : 0;
    const info = {
      uploadedChunks: this.totalChunks - this.missing.size, totalChunks: this.totalChunks,
      uploadedBytes, totalBytes: this.file.size,
      percentage: this.file.size ? Math.floor((uploadedBytes * 1000) / this.file.size) / 10 : 100,
      currentSpeed: Math.round(currentSpeed),
      eta: currentSpeed > 0 ? (this.file.size - uploadedBytes) / currentSpeed : null,
      sessionId: this.sessionId,
    };
    try { this.o.onProgress?.(info); } catch (err) { console.error(err); }
  }

  async _sendChunk(i, signal) {
    const start = i * this.chunkSize;
    const blob = this.file.slice(start, start + this._length(i), "application/octet-stream");
    const headers = { ...this.o.headers, "Content-Type": "application/octet-stream" };
    if (this.o.checksum) {
      let digest;
      try {
        digest = await blobSha256(blob);
      } catch (err) {
        throw new ChunkdError(0, "read_error",
          `cannot read ${this.file.name} (changed or removed?): ${err?.message || err}`);
      }
      if (digest) headers["X-Chunk-Checksum"] = `sha256=${digest}`;
    }
    // The Blob, not the bytes hashed above: the browser streams it from the file.
    return this._req("POST", `/upload/chunked/${this.sessionId}/chunk?index=${i}`,
      { body: blob, headers, signal });
  }

  /** Send every missing chunk, `parallel` at a time, until done, paused or failed. */
  async _sendMissing() {
    const queue = [...this.missing].sort((a, b) => a - b);
    if (!queue.length) return;
    this.phaseCtl = new AbortController();
    const phase = this.phaseCtl;
    if (this.cancelled) phase.abort(abortError());
    let failure = null;
    const worker = async () => {
      while (queue.length && !failure && !this.paused && !phase.signal.aborted) {
        const i = queue.shift();
        try {
          const { doc } = await this._retrying(`chunk ${i}`,
            () => this._sendChunk(i, phase.signal), phase.signal);
          this.missing.delete(i);
          if (!doc?.already_received) this.sentBytes += this._length(i);
          this.sentChunks += 1;
          this._progress();
        } catch (err) {
          if (phase.signal.aborted && phase.signal.reason === PAUSED) return;
          if (err instanceof ChunkdError && err.code === "session_finalized") {
            this.finalized = true; // another tab (or run) finished it: finalize gives its task
          } else if (!failure) {
            failure = err;
          }
          phase.abort(err);
          return;
        }
      }
    };
    this.sending = true;
    try {
      await Promise.all(Array.from({ length: Math.min(this.o.parallel, queue.length) }, worker));
    } finally {
      this.sending = false;
    }
    if (this.cancelled) throw abortError();
    if (failure) throw failure;
  }

  async _finalize() {
    const path = `/upload/chunked/${this.sessionId}/finalize`;
    const deadline = Date.now() + 3_600_000;
    for (;;) {
      const { status, doc } = await this._retrying("finalize", () => this._req("POST", path));
      if (status !== 202) return doc;
      // Another finalize (same or other process) is still checking the file: the task id
      // stays; wait until /status moves past "finalizing", then ask again.
      for (let wait = 1; ; wait++) {
        if (Date.now() > deadline) {
          throw new ChunkdError(202, "still_finalizing",
            "the server is still checking the file; ask again later", { task_id: doc?.task_id });
        }
        await sleep(Math.min(5000, 250 * 2 ** Math.min(wait, 5)), this.cancelCtl.signal);
        const st = await this._status();
        if (!["finalizing", "complete"].includes(st.status)) break;
      }
    }
  }

  async _upload() {
    this._setState("starting");
    this._adopt(await this._resumeOrCreate());
    this.sentBytes = 0;
    this.sentChunks = 0;
    this.samples = [[performance.now(), 0]];
    this._announce();
    this._progress();
    for (let rounds = 0; ;) {
      if (!this.finalized) {
        if (!this.paused) {
          this._setState("uploading");
          await this._sendMissing();
          if (!this.paused) this.pausedDone?.resolve(); // resumed (or done) before it settled
        }
        if (this.paused || (this.missing.size && !this.finalized)) {
          // paused (or paused and resumed before the chunks in flight had stopped)
          if (this.paused) {
            this._setState("paused");
            this.pausedDone?.resolve();
            await this.resumeWaiter?.promise;
          }
          if (this.cancelled) throw abortError();
          await this._refresh();
          continue;
        }
      }
      if (!this.o.finalize && !this.finalized) {
        this._setState("done");
        return { sessionId: this.sessionId, taskId: null, resumed: Boolean(this.resumed),
          sentChunks: this.sentChunks, retries: this.retryCount };
      }
      this._setState("finalizing");
      let reply;
      try {
        reply = await this._finalize();
      } catch (err) {
        if (err instanceof ChunkdError && err.code === "chunks_missing" && rounds < 3) {
          rounds += 1;
          this.finalized = false;
          this.missing = new Set(err.details.missing_chunks || []);
          continue;
        }
        if (err instanceof ChunkdError && [404, 410, 415].includes(err.status)) {
          forget(this.storage, this.key); // this session will never take the file
        }
        throw err;
      }
      forget(this.storage, this.key);
      this._setState("done");
      return { ...reply, sessionId: this.sessionId, taskId: reply?.task_id ?? null,
        location: reply?.location, resumed: Boolean(this.resumed), sentChunks: this.sentChunks,
        retries: this.retryCount };
    }
  }

  _announce() {
    try {
      this.o.onSessionCreated?.(this.sessionId, { resumed: Boolean(this.resumed),
        chunkSize: this.chunkSize, totalChunks: this.totalChunks });
    } catch (err) { console.error(err); }
  }

  /** After a pause: what the server has now (/status); a session that expired meanwhile (idle
   * TTL) is replaced by a new one, an aborted one ends the upload. */
  async _refresh() {
    let st;
    let created = false;
    try {
      st = await this._status();
    } catch (err) {
      if (!(err instanceof ChunkdError) || err.code === "session_aborted" ||
          ![404, 410].includes(err.status)) throw err;
      forget(this.storage, this.key);
      st = await this._create();
      created = true;
    }
    this._adopt(st);
    if (created) this._announce();
    this.samples = [[performance.now(), this.sentBytes]];
    this._progress();
  }
}

function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  return { promise, resolve, reject };
}

/** An upload you can pause, resume and cancel. Nothing happens until `start()`. */
export function createUpload(options) {
  const upload = new Upload(options);
  return {
    start: () => upload.start(),
    pause: (opts) => upload.pause(opts),
    resume: () => upload.resume(),
    cancel: () => upload.cancel(),
    promise: upload.promise,
    get sessionId() { return upload.sessionId; },
    get state() { return upload.state; },
  };
}

/** Upload `file` in chunks and finalize it: `createUpload(options).start()`. */
export function uploadChunked(options) {
  return createUpload(options).start();
}

// -- the progress WebSocket -----------------------------------------------------------------

function socketUrl(base, id, token) {
  const here = globalThis.location?.href;
  const url = new URL(`${base}/ws/tasks/${encodeURIComponent(id)}`, here || undefined);
  if (url.protocol === "http:") url.protocol = "ws:";
  else if (url.protocol === "https:") url.protocol = "wss:";
  if (token) url.searchParams.set("access_token", token);
  return url.href;
}

function isFinal(msg) {
  return msg?.type === "error" || (msg?.type === "progress" && msg.stage === "complete");
}

/** HTTP statuses of the codes a final `error` message may carry (0: a task's own failure). */
const MESSAGE_STATUS = {
  unsupported_content: 415, session_expired: 410, session_aborted: 410, session_not_found: 404,
};

const CLOSE_CODES = {
  4404: [404, "session_not_found", "unknown session or task"],
  4410: [410, "session_gone", "the session expired or was aborted"],
};

/** Follow `/ws/tasks/{id}` (a session id or a task id) to its final message: `progress` with
 * `stage: "complete"` resolves, an `error` message rejects with a ChunkdError. A socket that
 * drops before the end is opened again with backoff (the snapshot catches up). */
export function followTask(id, { onMessage, signal, token, baseUrl = "", reconnects = 10,
  retryDelay = 500, maxRetryDelay = 15_000, idleTimeout = 90_000, headers, credentials } = {}) {
  const base = trimBase(baseUrl);
  return new Promise((resolve, reject) => {
    let ws = null;
    let failures = 0;
    let settled = false;
    let idleTimer = null;
    let retryTimer = null;

    const finish = (fn, value) => {
      if (settled) return;
      settled = true;
      clearTimeout(idleTimer);
      clearTimeout(retryTimer);
      signal?.removeEventListener("abort", onAbort);
      if (ws && ws.readyState <= 1) { try { ws.close(1000); } catch { /* closed */ } }
      fn(value);
    };
    function onAbort() { finish(reject, abortError("following the task was cancelled")); }
    if (signal?.aborted) { onAbort(); return; }
    signal?.addEventListener("abort", onAbort, { once: true });

    const again = (why) => {
      if (settled) return;
      failures += 1;
      if (failures > reconnects) {
        finish(reject, why instanceof ChunkdError ? why
          : new ChunkdError(0, "network_error", `the progress stream of ${id} keeps dropping`));
        return;
      }
      retryTimer = setTimeout(connect, backoff(failures, retryDelay, maxRetryDelay, null));
    };

    // A browser does not see why a handshake was refused (401 / 403 are a plain close 1006):
    // ask the same URL over plain HTTP, which chunkd refuses with the real code and message
    // (and answers 400, not a WebSocket, when the handshake would have been taken).
    const probe = async (value) => {
      const query = value ? `?access_token=${encodeURIComponent(value)}` : "";
      try {
        await call(base, "GET", `/ws/tasks/${encodeURIComponent(id)}${query}`,
          { headers, credentials, signal, timeout: 15_000 });
      } catch (err) {
        if (err instanceof ChunkdError && [401, 403, 404].includes(err.status)) return err;
      }
      return null;
    };

    async function connect() {
      if (settled) return;
      let value;
      try { value = await resolveToken(token); } catch (err) { finish(reject, err); return; }
      if (settled) return;
      let opened = false;
      let sawFinal = false;
      const sock = new WebSocket(socketUrl(base, id, value));
      ws = sock;
      const armIdle = () => {
        clearTimeout(idleTimer);
        if (idleTimeout > 0) idleTimer = setTimeout(() => { try { sock.close(4000); } catch { /* */ } }, idleTimeout);
      };
      sock.onopen = () => { opened = true; armIdle(); };
      sock.onmessage = (event) => {
        armIdle();
        if (typeof event.data !== "string") return;
        let msg;
        try { msg = JSON.parse(event.data); } catch { return; }
        failures = 0;
        try { onMessage?.(msg); } catch (err) { console.error(err); }
        if (isFinal(msg)) {
          sawFinal = true;
          if (msg.type === "error") {
            const code = String(msg.error_code || "task_failed");
            finish(reject, new ChunkdError(MESSAGE_STATUS[code] ?? 0, code,
              String(msg.user_message || msg.error_code || "the task failed"),
              { ...msg, final: msg }));
          } else {
            finish(resolve, msg);
          }
        }
      };
      sock.onclose = async (event) => {
        clearTimeout(idleTimer);
        if (settled || sawFinal || ws !== sock) return;
        const known = CLOSE_CODES[event.code];
        if (known) {
          const [status, fallback, text] = known;
          const m = /^([a-z_]+): (.*)$/s.exec(event.reason || "");
          finish(reject, new ChunkdError(status, m ? m[1] : fallback, m ? m[2] : text,
            { close_code: event.code }));
          return;
        }
        if (!opened) {
          const refused = await probe(value);
          if (refused) { finish(reject, refused); return; }
        }
        again(null);
      };
    }
    connect();
  });
}
