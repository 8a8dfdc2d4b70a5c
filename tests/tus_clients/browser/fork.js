// tus-js-client configured as the logingrupa/whisperX-FastAPI fork's frontend does (its
// snapshot 91cb7c6, as read for issue 12's research notes on tus clients, §4): the values of
// frontend/src/lib/upload/constants.ts, the options of frontend/src/lib/upload/tusUpload.ts
// (credentials and the CSRF header on every request, its retry rule) and the metadata of
// frontend/src/hooks/useUploadOrchestration.ts. Written for these tests, not copied: only the
// endpoint differs, made absolute because chunkd is another origin than the page here.
import * as tus from "tus-js-client";

export const SIZE_THRESHOLD = 80 * 1024 * 1024; // files >= 80 MiB go to tus
export const TUS_CHUNK_SIZE = 50 * 1024 * 1024; // 52428800
export const TUS_ENDPOINT = "/uploads/files/";
export const TUS_RETRY_DELAYS = [1000, 2000, 4000];

const NEVER_RETRY = new Set([413, 415, 410, 403]);
const ALWAYS_RETRY = new Set([0, 408, 429, 502, 503, 504]);

export function readCookie(name) {
  for (const part of document.cookie.split(";")) {
    const [key, ...rest] = part.trim().split("=");
    if (key === name) return decodeURIComponent(rest.join("="));
  }
  return null;
}

// xhr.withCredentials and X-CSRF-Token from the csrf_token cookie, read again for each request
function credentialsAndCsrf(req) {
  req.getUnderlyingObject().withCredentials = true;
  const csrf = readCookie("csrf_token");
  if (csrf) req.setHeader("X-CSRF-Token", csrf);
}

export function forkMetadata(file, language) {
  return {
    filename: file.name,
    filetype: file.type || "application/octet-stream",
    language: language || "auto",
    taskId: crypto.randomUUID(),
  };
}

// origin: chunkd's, e.g. "http://127.0.0.1:8080"; extra: the test's own hooks (onAfterResponse,
// onUploadUrlAvailable), which the fork does not set
export function createForkUpload(file, metadata, callbacks, origin, extra = {}) {
  const upload = new tus.Upload(file, {
    endpoint: origin + TUS_ENDPOINT,
    chunkSize: TUS_CHUNK_SIZE,
    retryDelays: TUS_RETRY_DELAYS,
    metadata,
    storeFingerprintForResuming: true,
    removeFingerprintOnSuccess: true,
    onBeforeRequest: credentialsAndCsrf,
    onProgress: callbacks.onProgress,
    onSuccess: () => callbacks.onSuccess(upload.url ?? ""),
    onError: (error) => callbacks.onError(error instanceof Error ? error : new Error(String(error))),
    onShouldRetry: (err) => {
      const status = err.originalResponse?.getStatus() ?? 0;
      if (NEVER_RETRY.has(status)) return false;
      const retry = ALWAYS_RETRY.has(status)
        || !(status >= 400 && status < 500) || status === 409 || status === 423;
      if (retry) callbacks.onBeforeRetry?.();
      return retry;
    },
    ...extra,
  });
  return upload;
}

// useTusUpload.ts: resume from a remembered upload of the same file, if any, then start
export async function startForkUpload(upload) {
  const previous = await upload.findPreviousUploads();
  if (previous.length > 0) upload.resumeFromPreviousUpload(previous[0]);
  upload.start();
}

export const isTusSupported = () => tus.isSupported;
