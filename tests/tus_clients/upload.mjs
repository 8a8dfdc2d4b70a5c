// One tus-js-client 4.3.1 upload under Node.js, driven by tests/test_tus_clients.py.
//
//   node tests/tus_clients/upload.mjs '<json options>'
//
// Options (JSON): endpoint, file (a path: uploaded as an fs.ReadStream, so the fingerprint is
// tus-js-client's own "node-file-<path>-<size>-<mtime>-<endpoint>"), and optionally chunkSize,
// parallelUploads, metadata (a taskId of "random" becomes crypto.randomUUID()), urlStorage (a path:
// tus.FileUrlStorage, storeFingerprintForResuming), resume (findPreviousUploads() +
// resumeFromPreviousUpload(previous[0]) before start()), throttle (body bytes per second),
// abortAfter (abort(true) once the server has accepted this many bytes), retryDelays (null: fail at
// the first error; default tus-js-client's own), removeFingerprintOnSuccess, timeoutMs.
//
// Every line on stdout is one JSON object with an "event": "start", "url" (onUploadUrlAvailable),
// "progress" (onProgress), "chunk" (onChunkComplete), "request" (each request as the client sent
// it and the answer it got, or its error) and last "result" ({ok, url, error, status, bytesSent,
// taskId, ...}). The process then exits 0; a failed upload is reported in the result, not by the
// exit status, so that the test can show what happened.

import { createReadStream } from 'node:fs'
import { randomUUID } from 'node:crypto'
import { Transform } from 'node:stream'
import * as tus from 'tus-js-client'

const opts = JSON.parse(process.argv[2] ?? '{}')
const t0 = Date.now()
let bytesSent = 0 // PATCH (or creation-with-upload) body bytes handed to the network
let finished = false

function emit(obj) {
  process.stdout.write(`${JSON.stringify({ ms: Date.now() - t0, ...obj })}\n`)
}

function finish(result) {
  if (finished) return
  finished = true
  emit({ event: 'result', bytesSent, ...result })
  // stdout is a pipe: let it drain before leaving.
  process.stdout.write('', () => process.exit(0))
}

// Counts (and optionally slows down) a request body on its way to the socket.
class Meter extends Transform {
  constructor(rate) {
    super()
    this.rate = rate
    this.start = Date.now()
    this.n = 0
  }

  _transform(chunk, _encoding, callback) {
    this.n += chunk.length
    bytesSent += chunk.length
    if (!this.rate) {
      callback(null, chunk)
      return
    }
    const wait = this.start + (this.n / this.rate) * 1000 - Date.now()
    if (wait > 0) setTimeout(() => callback(null, chunk), wait)
    else callback(null, chunk)
  }
}

const REQ_HEADERS = ['Upload-Offset', 'Upload-Length', 'Upload-Concat', 'Upload-Metadata',
  'Upload-Defer-Length', 'Content-Type']
const RES_HEADERS = ['Location', 'Upload-Offset', 'Upload-Length', 'Upload-Concat', 'Cache-Control',
  'Upload-Expires', 'Tus-Resumable']

// The real Node HTTP stack, wrapped: every request is logged, and bodies go through a Meter.
class LoggingStack {
  constructor(rate) {
    this.inner = new tus.DefaultHttpStack()
    this.rate = rate
  }

  createRequest(method, url) {
    return new LoggedRequest(this.inner.createRequest(method, url), this.rate)
  }

  getName() {
    return 'LoggingStack'
  }
}

class LoggedRequest {
  constructor(inner, rate) {
    this.inner = inner
    this.rate = rate
  }

  getMethod() { return this.inner.getMethod() }
  getURL() { return this.inner.getURL() }
  setHeader(name, value) { this.inner.setHeader(name, value) }
  getHeader(name) { return this.inner.getHeader(name) }
  setProgressHandler(handler) { this.inner.setProgressHandler(handler) }
  abort() { return this.inner.abort() }
  getUnderlyingObject() { return this.inner.getUnderlyingObject() }

  async send(body = null) {
    const req = {}
    for (const name of REQ_HEADERS) {
      const value = this.inner.getHeader(name)
      if (value !== undefined) req[name.toLowerCase()] = String(value)
    }
    let sent = body
    let meter = null
    if (body && typeof body.pipe === 'function') {
      meter = new Meter(this.rate)
      meter.size = body.size // the stack sets Content-Length from it
      body.on('error', (err) => meter.destroy(err))
      sent = body.pipe(meter)
    }
    const line = { event: 'request', method: this.getMethod(), url: this.getURL(), req }
    try {
      const res = await this.inner.send(sent)
      const headers = {}
      for (const name of RES_HEADERS) {
        const value = res.getHeader(name)
        if (value !== undefined) headers[name.toLowerCase()] = value
      }
      emit({ ...line, status: res.getStatus(), res: headers, bodyBytes: meter ? meter.n : 0,
        body: res.getStatus() >= 400 ? res.getBody().slice(0, 500) : undefined })
      return res
    } catch (err) {
      emit({ ...line, error: String(err?.message ?? err), bodyBytes: meter ? meter.n : 0 })
      throw err
    }
  }
}

function describe(err) {
  const res = err?.originalResponse
  return {
    error: String(err?.message ?? err),
    status: res ? res.getStatus() : null,
    body: res ? res.getBody().slice(0, 500) : null,
  }
}

let aborting = false
const metadata = { ...(opts.metadata ?? {}) }
if (metadata.taskId === 'random') metadata.taskId = randomUUID()

const options = {
  endpoint: opts.endpoint,
  metadata,
  httpStack: new LoggingStack(opts.throttle ?? 0),
  removeFingerprintOnSuccess: Boolean(opts.removeFingerprintOnSuccess),
  onProgress: (sent, total) => emit({ event: 'progress', bytes: sent, total }),
  onChunkComplete: (size, accepted, total) => {
    emit({ event: 'chunk', size, accepted, total })
    if (opts.abortAfter != null && accepted >= opts.abortAfter && !aborting) {
      aborting = true
      upload.abort(true).then(
        async () => {
          // abort() removes the stored URL after the DELETE's 204 without waiting for the write:
          // give it a moment, and report what a later findPreviousUploads() would find.
          let remembered = -1
          for (let i = 0; i < 40; i++) {
            remembered = opts.urlStorage ? (await upload.findPreviousUploads()).length : 0
            if (remembered === 0) break
            await new Promise((resolve) => setTimeout(resolve, 50))
          }
          finish({ ok: true, aborted: true, url: upload.url, taskId: metadata.taskId, remembered })
        },
        (err) => finish({ ok: false, aborted: true, url: upload.url, taskId: metadata.taskId,
          ...describe(err) }),
      )
    }
  },
  onUploadUrlAvailable: () => emit({ event: 'url', url: upload.url, taskId: metadata.taskId }),
  onSuccess: () => finish({ ok: true, url: upload.url, taskId: metadata.taskId }),
  onError: (err) => finish({ ok: false, url: upload.url, taskId: metadata.taskId, ...describe(err) }),
}
if (opts.retryDelays !== undefined) options.retryDelays = opts.retryDelays // else [0, 1000, 3000, 5000]
if (opts.chunkSize) options.chunkSize = opts.chunkSize
if (opts.parallelUploads) options.parallelUploads = opts.parallelUploads
if (opts.urlStorage) {
  options.urlStorage = new tus.FileUrlStorage(opts.urlStorage)
  options.storeFingerprintForResuming = true
}

const upload = new tus.Upload(createReadStream(opts.file), options)

setTimeout(() => {
  finish({ ok: false, error: `timeout after ${opts.timeoutMs ?? 45000} ms`, url: upload.url })
}, opts.timeoutMs ?? 45000)

let previous = []
if (opts.resume) {
  previous = await upload.findPreviousUploads()
  if (previous.length > 0) upload.resumeFromPreviousUpload(previous[0])
}
emit({
  event: 'start',
  taskId: metadata.taskId ?? null,
  previous: previous.map((p) => p.uploadUrl ?? p.parallelUploadUrls ?? null),
})
upload.start()
