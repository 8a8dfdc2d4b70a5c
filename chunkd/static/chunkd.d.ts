// Types of chunkd.js, the browser client of chunkd's chunked-upload contract (docs/API.md).
// Served by chunkd at /static/chunkd.d.ts beside /static/chunkd.js.

/** A token, or a function returning one (called before every request, so a refreshed token
 * is used). No token (or an empty one): no `Authorization` header. */
export type TokenSource =
  | string
  | null
  | undefined
  | (() => string | null | undefined | Promise<string | null | undefined>);

/** Error codes the module sends again (with backoff) besides 5xx, 408 and 429. */
export const RETRY_CODES: readonly string[];

/** What chunkd (or the network) answered: `status` 0 means no HTTP answer at all
 * (`network_error`, `timeout`, `read_error`, `aborted`, or a task's own failure from
 * followTask). `details` holds the error's other fields (e.g. `detected_type` for 415
 * `unsupported_content`, `missing_chunks`, `retry_after`). Cancelling rejects with one whose
 * `name` is `"AbortError"` and `code` is `"aborted"`. */
export class ChunkdError extends Error {
  constructor(status: number, code: string, message: string,
              details?: Record<string, unknown>, retryAfter?: number | null);
  name: "ChunkdError" | "AbortError";
  status: number;
  code: string;
  message: string;
  details: Record<string, unknown>;
  /** Seconds from `Retry-After` (or the body's `retry_after`), when the server gave one. */
  retryAfter: number | null;
  /** Would the same request, sent again later, possibly succeed? */
  readonly retryable: boolean;
}

/** `GET /upload/chunked/limits`. */
export interface Limits {
  chunk_size: number;
  min_chunk_size: number;
  max_chunk_size: number;
  max_chunks: number;
  max_file_size: number;
  allowed_extensions: string[];
  auth: boolean;
  handoff: "folder" | "whisperx" | "command" | string;
}

/** What `onProgress` gets: after the session is known, and after each chunk. */
export interface UploadProgress {
  uploadedChunks: number;
  totalChunks: number;
  uploadedBytes: number;
  totalBytes: number;
  /** 0 … 100, one decimal, 100 only once every byte is there. */
  percentage: number;
  /** Bytes a second sent by this run, over the last few seconds. */
  currentSpeed: number;
  /** Seconds left at `currentSpeed`, or null before there is a speed. */
  eta: number | null;
  sessionId: string | null;
}

export interface RetryInfo {
  /** `"limits"`, `"session"`, `"status"`, `"finalize"` or `"chunk <index>"`. */
  what: string;
  attempt: number;
  /** Milliseconds until the next attempt. */
  delay: number;
  error: ChunkdError;
}

export interface SessionInfo {
  /** An existing session picked up again (localStorage), not a new one. */
  resumed: boolean;
  chunkSize: number;
  totalChunks: number;
}

export type UploadState =
  | "idle" | "starting" | "uploading" | "paused" | "finalizing" | "done" | "failed"
  | "cancelled";

export interface UploadOptions {
  file: File;
  /** Wanted chunk size in bytes; default the server's `chunk_size`. Always clamped to the
   * server's limits (see pickChunkSize). */
  chunkSize?: number;
  language?: string;
  model?: string;
  taskParams?: Record<string, unknown>;
  onProgress?: (progress: UploadProgress) => void;
  /** Aborting cancels the upload (as `cancel()`). */
  signal?: AbortSignal;
  /** Chunks in flight at once (default 3). */
  parallel?: number;
  token?: TokenSource;
  /** chunkd's origin (and path prefix), e.g. `"https://upload.example.org"`; default `""`,
   * the page's own origin. Another origin needs `--cors-origins` on the server. */
  baseUrl?: string;
  /** Attempts per request for failures that can pass (default 10). */
  retries?: number;
  /** Backoff base in ms (default 500): attempt n waits random(0, min(maxRetryDelay,
   * retryDelay·2^(n-1))), or the server's Retry-After. */
  retryDelay?: number;
  /** Backoff cap in ms (default 30 000). */
  maxRetryDelay?: number;
  /** Per-request timeout in ms (default 600 000; 0: none). */
  timeout?: number;
  /** Finalize once every chunk is there (default true). With false the session stays
   * remembered, so a later call with the same file finalizes it without sending again. */
  finalize?: boolean;
  /** Send `X-Chunk-Checksum: sha256=…` (default true; skipped where WebCrypto is missing). */
  checksum?: boolean;
  /** Remember the session for the file and pick it up again (default true). */
  resume?: boolean;
  /** Where sessions are remembered (default `localStorage`; null: nowhere). */
  storage?: Pick<Storage, "getItem" | "setItem" | "removeItem"> | null;
  /** Extra headers for every request (e.g. `X-WhisperX-Authorization` for finalize with
   * `--whisperx-credentials user`). */
  headers?: Record<string, string>;
  /** fetch's `credentials` (cookies on another origin need chunkd to list it by name). */
  credentials?: RequestCredentials;
  /** Called once the session is known (created, or resumed: `info.resumed`), before the
   * chunks: the moment to `followTask(sessionId)`. Called again if a session that expired
   * during a pause is replaced. */
  onSessionCreated?: (sessionId: string, info: SessionInfo) => void;
  onRetry?: (info: RetryInfo) => void;
  onStateChange?: (state: UploadState) => void;
}

/** The finalize reply (`POST /upload/chunked/{id}/finalize`), plus the module's own fields. */
export interface UploadResult {
  sessionId: string;
  /** null when `finalize: false`. */
  taskId: string | null;
  /** Folder hand-off: the file's place relative to the data dir. */
  location?: string;
  /** The session was picked up again rather than created. */
  resumed: boolean;
  /** Chunks this run sent (not those the server had before). */
  sentChunks: number;
  /** Requests sent again. */
  retries: number;
  session_id?: string;
  task_id?: string;
  status?: string;
  message?: string;
  [field: string]: unknown;
}

export interface PauseOptions {
  /** End the chunks in flight now (default true; they are sent again on resume), or let
   * them finish (false). */
  abortInFlight?: boolean;
}

export interface UploadController {
  /** Begin (once; later calls return the same promise). */
  start(): Promise<UploadResult>;
  /** Stop sending chunks, keep the session. Resolves once nothing is in flight. */
  pause(options?: PauseOptions): Promise<void>;
  /** Go on after pause(): asks /status and sends only what is missing. */
  resume(): void;
  /** Stop for good: `DELETE /abort`, the session forgotten, the promise rejected with an
   * AbortError. Resolves once done. */
  cancel(): Promise<void>;
  readonly promise: Promise<UploadResult>;
  readonly sessionId: string | null;
  readonly state: UploadState;
}

export function createUpload(options: UploadOptions): UploadController;

/** `createUpload(options).start()`. */
export function uploadChunked(options: UploadOptions): Promise<UploadResult>;

export interface FetchOptions {
  baseUrl?: string;
  token?: TokenSource;
  headers?: Record<string, string>;
  signal?: AbortSignal;
  credentials?: RequestCredentials;
}

export function fetchLimits(options?: FetchOptions): Promise<Limits>;

/** The chunk size for a file: `requested` or the server's `chunk_size`, clamped to
 * [min_chunk_size (or the whole file if smaller), max_chunk_size], grown so the file has at
 * most `max_chunks` chunks, never beyond the file. */
export function pickChunkSize(fileSize: number, limits: Partial<Limits>,
                              requested?: number | null): number;

/** `"single"` (the service's one-request upload) below `threshold` bytes (default
 * 100 000 000, the seed's rule; the WhisperX fork uses 80 MiB), else `"chunked"`. */
export function chooseUpload(file: { size: number }, options?: { threshold?: number }):
  "single" | "chunked";

/** The localStorage key under which a file's session on a server is remembered. */
export function resumeKey(file: { name: string; size: number; lastModified?: number },
                          baseUrl?: string): string;

// -- the progress WebSocket (/ws/tasks/{id}) ----------------------------------------------

export interface UploadProgressMessage {
  type: "upload_progress";
  session_id: string;
  uploaded_chunks: number;
  total_chunks: number;
  percentage: number;
  uploaded_bytes: number;
  total_bytes: number;
  timestamp: string;
}

export type TaskStage = "queued" | "transcribing" | "aligning" | "diarizing" | "complete";

export interface TaskProgressMessage {
  type: "progress";
  task_id: string;
  stage: TaskStage | string;
  percentage: number;
  message: string;
  /** The WhisperX service's own id, once it gave one. */
  identifier?: string;
  /** The final message of a hand-off that reports one (e.g. the transcript's `segments`). */
  result?: unknown;
  /** Folder hand-off: the file's place relative to the data dir. */
  location?: string;
  timestamp: string;
}

export interface TaskErrorMessage {
  type: "error";
  task_id: string | null;
  error_code: string;
  user_message: string;
  technical_detail: string;
  identifier?: string;
  timestamp: string;
}

export interface HeartbeatMessage { type: "heartbeat"; timestamp: string; }
export interface PongMessage { type: "pong"; timestamp: string; }

export type TaskMessage =
  | UploadProgressMessage | TaskProgressMessage | TaskErrorMessage | HeartbeatMessage
  | PongMessage;

/** The final message `followTask` resolves with: `stage` is `"complete"`. */
export type TaskCompleteMessage = TaskProgressMessage & { stage: "complete" };

export interface FollowOptions {
  onMessage?: (message: TaskMessage) => void;
  signal?: AbortSignal;
  /** Sent as `?access_token=` (browsers cannot set headers on a WebSocket). */
  token?: TokenSource;
  baseUrl?: string;
  /** Reconnects in a row without a message before giving up (default 10). */
  reconnects?: number;
  /** Reconnect backoff base and cap in ms (defaults 500, 15 000). */
  retryDelay?: number;
  maxRetryDelay?: number;
  /** Reconnect when nothing (not even a heartbeat) came for this long, ms (default 90 000;
   * 0: never). */
  idleTimeout?: number;
  /** For the HTTP look-up of a refused handshake (its real status and code). */
  headers?: Record<string, string>;
  credentials?: RequestCredentials;
}

/** Follow a session (or its task) to the final message. Resolves with `progress` /
 * `complete`; rejects with a ChunkdError for an `error` message (its `error_code` and
 * `user_message`; the message itself in `details`), for close 4404 / 4410, for a refused
 * handshake (401 / 403 with the server's code) and with an AbortError when `signal` fires. */
export function followTask(id: string, options?: FollowOptions): Promise<TaskCompleteMessage>;
