// chunkd upload page: a queue of files, each uploaded in chunks by /static/chunkd.js, then
// followed over the WebSocket to its end (saved in the folder, or transcribed).
// No build step, no inline code (the page's CSP allows scripts from this server only).

import * as chunkd from '/static/chunkd.js';

const TOKEN_KEY = 'chunkd.page.token';
const ACTIVE = new Set(['uploading', 'paused']);        // states that hold a queue slot
const FINISHED = new Set(['done', 'failed', 'cancelled']);

const STAGE_LABELS = {
  upload: 'Upload',
  queued: 'Queued',
  transcribing: 'Transcribing',
  aligning: 'Aligning',
  diarizing: 'Diarizing',
  complete: 'Complete',
  saved: 'Saved',
};
const TRANSCRIPTION_STAGES = ['upload', 'queued', 'transcribing', 'aligning', 'diarizing', 'complete'];
const FOLDER_STAGES = ['upload', 'saved'];

const $ = (selector, root = document) => root.querySelector(selector);

const ui = {
  serverError: $('#server-error'),
  options: $('#options'),
  language: $('#language'),
  model: $('#model'),
  parallel: $('#parallel'),
  tokenField: $('#token-field'),
  token: $('#token'),
  input: $('#file-input'),
  drop: $('#picker'),
  hint: $('#drop-hint'),
  queue: $('#queue'),
  empty: $('#empty'),
  clearDone: $('#clear-done'),
  announcer: $('#announcer'),
  serverInfo: $('#server-info'),
  optionsNote: $('#options-note'),
  template: $('#card-template'),
};

const app = {
  limits: null,
  items: [],
  nextId: 1,
};

// ---------------------------------------------------------------------------------------------
// formatting

const UNITS = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB'];

function formatBytes(n) {
  if (!Number.isFinite(n) || n < 0) return '–';
  if (n < 1024) return `${n} ${n === 1 ? 'byte' : 'bytes'}`;
  let unit = 0;
  let value = n;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = value >= 100 ? 0 : value >= 10 ? 1 : 2;
  return `${value.toFixed(digits).replace(/\.?0+$/, '')} ${UNITS[unit]}`;
}

function formatDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return '';
  const s = Math.round(seconds);
  if (s < 60) return `${Math.max(1, s)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(s % 60).padStart(2, '0')} s`;
  const h = Math.floor(m / 60);
  return `${h} h ${String(m % 60).padStart(2, '0')} min`;
}

function formatClock(seconds) {
  const s = Math.max(0, Math.floor(Number(seconds) || 0));
  const m = Math.floor(s / 60);
  const h = Math.floor(m / 60);
  const mm = String(m % 60).padStart(h ? 2 : 1, '0');
  const ss = String(s % 60).padStart(2, '0');
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

function extensionOf(name) {
  const dot = name.lastIndexOf('.');
  return dot > 0 ? name.slice(dot + 1).toLowerCase() : '';
}

// ---------------------------------------------------------------------------------------------
// announcements (aria-live="polite"): milestones only, never every progress tick

function announce(text) {
  // one node per sentence: two changes in the same moment (a failure, then the next file's
  // start) are both read, where replacing the text would drop the first
  const line = document.createElement('p');
  line.textContent = text;
  ui.announcer.append(line);
  while (ui.announcer.childElementCount > 5) ui.announcer.firstElementChild.remove();
}

// ---------------------------------------------------------------------------------------------
// errors in words people can act on

function errorText(err, item) {
  const code = err?.code ?? err?.error_code ?? '';
  const status = err?.status ?? 0;
  const details = err?.details ?? {};
  const limits = app.limits ?? {};
  switch (code) {
    case 'unsupported_content': {
      const type = details.detected_type || details.technical_detail || 'an unknown type';
      return `Refused: the server looked inside this file and it is not audio or video ` +
        `(it is ${type}). Nothing of it was kept.`;
    }
    case 'extension_not_allowed':
    case 'invalid_filename':
    case 'filename_too_long':
      return `Refused: ${err.message || 'the server does not take this file name.'}`;
    case 'file_too_large':
      return `Too large: this file is ${formatBytes(item?.file.size)} and the server takes at ` +
        `most ${formatBytes(limits.max_file_size)} per file.`;
    case 'session_expired':
      return 'This upload expired on the server (no piece arrived for too long), so the ' +
        'pieces it had were removed. Try again to upload the file from the start.';
    case 'session_aborted':
      return 'This upload was cancelled and the server removed its pieces.';
    case 'session_not_found':
      return 'The server no longer knows this upload. Try again to upload the file from the start.';
    case 'insufficient_storage':
      return "The server's disk is full, so it cannot take this file now. Nothing on your " +
        'side is lost: try again later, or tell whoever runs the server.';
    case 'storage_unavailable':
      return 'The server cannot write to its storage right now. Try again in a minute.';
    case 'missing_token':
      return 'This server needs an access token. Paste yours under “Access token” above, ' +
        'then try again.';
    case 'invalid_token':
      return 'The server did not accept the access token. Check that you pasted the whole ' +
        'token, then try again.';
    case 'token_expired':
      return 'Your access token has expired. Get a fresh one, paste it above, then try again.';
    case 'forbidden':
      return 'Not allowed: this upload belongs to another account. Use your own access token.';
    case 'credential_required':
      return 'The transcription service needs your own sign-in for this upload. Sign in to ' +
        'the transcription app, then try again.';
    case 'session_quota':
      return 'You have too many unfinished uploads on this server. Let one finish or cancel ' +
        'one, then try again.';
    case 'storage_quota':
      return 'Your unfinished uploads already reserve as much space as the server allows you. ' +
        'Let one finish or cancel one, then try again.';
    case 'rate_limited':
      return 'The server asked to slow down (too many requests). Try again in a moment.';
    case 'chunks_missing':
      return 'Some pieces never reached the server. Try again: only the missing ones are sent.';
    default:
      break;
  }
  if (status === 401) return 'The server did not accept the access token. Check it, then try again.';
  if (status === 403) return 'Not allowed: this upload belongs to another account.';
  if (status === 410) return 'This upload is gone from the server. Try again to upload it from the start.';
  if (status === 413) return `Too large for this server: ${err.message || ''}`.trim();
  if (status === 507) return "The server's disk is full, so it cannot take this file now.";
  if (code === 'read_error') {
    return 'The browser can no longer read this file (was it changed, moved or deleted?). ' +
      'Pick it again to go on.';
  }
  if (err instanceof TypeError || code === 'network_error' || code === 'timeout') {
    if (!navigator.onLine) return 'You are offline, so the upload stopped. Reconnect, then try again: it goes on where it stopped.';
    return 'The server could not be reached, even after several tries. Check your connection, ' +
      'then try again: the upload goes on where it stopped.';
  }
  return err?.user_message || err?.message || String(err);
}

function isUserAbort(err) {
  return err?.name === 'AbortError' || err?.code === 'aborted' || err?.code === 'cancelled';
}

// ---------------------------------------------------------------------------------------------
// one card per file

function stagesFor() {
  return app.limits?.handoff === 'folder' ? FOLDER_STAGES : TRANSCRIPTION_STAGES;
}

function makeCard(item) {
  const li = ui.template.content.firstElementChild.cloneNode(true);
  const name = item.file.name;
  li.id = `upload-${item.id}`;
  li.dataset.file = name;
  $('.file-name', li).textContent = name;
  $('.file-size', li).textContent = formatBytes(item.file.size);
  $('.file-name', li).id = `upload-${item.id}-name`;
  li.setAttribute('aria-labelledby', `upload-${item.id}-name`);
  const bar = $('.bar', li);
  bar.setAttribute('aria-label', `Upload of ${name}`);
  const buttons = {
    pause: $('.act-pause', li),
    resume: $('.act-resume', li),
    cancel: $('.act-cancel', li),
    retry: $('.act-retry', li),
    remove: $('.act-remove', li),
  };
  buttons.pause.setAttribute('aria-label', `Pause ${name}`);
  buttons.resume.setAttribute('aria-label', `Resume ${name}`);
  buttons.cancel.setAttribute('aria-label', `Cancel ${name}`);
  buttons.retry.setAttribute('aria-label', `Try ${name} again`);
  buttons.remove.setAttribute('aria-label', `Remove ${name} from the list`);
  buttons.pause.addEventListener('click', () => pause(item));
  buttons.resume.addEventListener('click', () => resume(item));
  buttons.cancel.addEventListener('click', () => cancel(item));
  buttons.retry.addEventListener('click', () => retry(item));
  buttons.remove.addEventListener('click', () => remove(item));
  item.el = {
    card: li,
    badge: $('.badge', li),
    bar,
    bytes: $('.bytes', li),
    rate: $('.rate', li),
    stages: $('.stages', li),
    message: $('.message', li),
    result: $('.result', li),
    buttons,
  };
  renderStages(item);
  return li;
}

function renderStages(item) {
  const list = item.el.stages;
  list.replaceChildren();
  for (const stage of stagesFor()) {
    const li = document.createElement('li');
    li.className = 'stage';
    li.dataset.stage = stage;
    li.dataset.state = 'pending';
    li.textContent = STAGE_LABELS[stage] ?? stage;
    list.append(li);
  }
}

/** Mark ``stage`` active (or done, when final) and every stage before it done. */
function setStage(item, stage, { failed = false } = {}) {
  const order = stagesFor();
  let index = order.indexOf(stage);
  if (index < 0) {
    // a stage this list does not name (a command hand-off's own): keep the furthest one known
    index = item.stageIndex ?? 0;
  }
  if (index < (item.stageIndex ?? -1) && !failed) return; // never backwards
  item.stageIndex = Math.max(index, item.stageIndex ?? -1);
  const last = order.length - 1;
  for (const li of item.el.stages.children) {
    const i = order.indexOf(li.dataset.stage);
    let state = 'pending';
    if (i < item.stageIndex || (i === item.stageIndex && i === last && !failed)) state = 'done';
    else if (i === item.stageIndex) state = failed ? 'failed' : 'active';
    li.dataset.state = state;
    if (state === 'active') li.setAttribute('aria-current', 'step');
    else li.removeAttribute('aria-current');
  }
}

const BADGES = {
  waiting: 'Waiting',
  uploading: 'Uploading',
  paused: 'Paused',
  processing: 'Processing',
  done: 'Done',
  failed: 'Failed',
  cancelled: 'Cancelled',
};

function setState(item, state, badge) {
  const focused = document.activeElement;
  const hadFocus = focused !== document.body && item.el.card.contains(focused);
  item.state = state;
  item.el.card.dataset.state = state;
  item.el.badge.textContent = badge ?? BADGES[state];
  const b = item.el.buttons;
  b.pause.hidden = state !== 'uploading';
  b.resume.hidden = state !== 'paused';
  b.cancel.hidden = !(state === 'uploading' || state === 'paused' || state === 'waiting');
  b.retry.hidden = !(state === 'failed' && item.retryable);
  b.remove.hidden = !FINISHED.has(state);
  // the button that had the focus may have gone (Pause -> Resume): keep it on the card
  if (hadFocus && focused.hidden) {
    const next = [b.resume, b.pause, b.retry, b.remove, b.cancel].find((x) => !x.hidden);
    next?.focus();
  }
  updateQueueChrome();
}

function setMessage(item, text, tone = '') {
  const el = item.el.message;
  el.hidden = !text;
  el.textContent = text || '';
  if (tone) el.dataset.tone = tone;
  else delete el.dataset.tone;
}

function showProgress(item, uploaded, total) {
  const pct = total > 0 ? Math.floor((uploaded * 100) / total) : 0;
  item.el.bar.value = Math.min(100, pct);
  item.el.bytes.textContent = `${formatBytes(uploaded)} of ${formatBytes(total)} (${pct} %)`;
}

function showRate(item) {
  const el = item.el.rate;
  if (item.state === 'paused') {
    el.textContent = 'Paused';
    return;
  }
  if (item.state !== 'uploading') {
    el.textContent = '';
    return;
  }
  const speed = item.speed;
  if (!(speed > 0)) {
    el.textContent = 'Starting…';
    return;
  }
  const left = (item.totalBytes - item.uploadedBytes) / speed;
  const eta = left > 0.5 ? ` · about ${formatDuration(left)} left` : '';
  el.textContent = `${formatBytes(speed)}/s${eta}`;
}

function updateQueueChrome() {
  ui.empty.hidden = app.items.length > 0;
  ui.clearDone.hidden = !app.items.some((i) => FINISHED.has(i.state));
}

// ---------------------------------------------------------------------------------------------
// the queue

function addFiles(files) {
  if (!app.limits) return;
  const added = [];
  for (const file of files) {
    const item = {
      id: app.nextId++,
      file,
      state: 'waiting',
      retryable: false,
      uploadedBytes: 0,
      totalBytes: file.size,
      speed: 0,
      // the options as they were when the file was added, also for "Try again"
      language: ui.language.value || undefined,
      model: ui.model.value || undefined,
    };
    ui.queue.append(makeCard(item));
    app.items.push(item);
    reset(item);
    const refusal = refuseBeforeUpload(file);
    if (refusal) {
      item.el.card.dataset.refused = 'true';
      fail(item, refusal, { retryable: false });
    } else {
      added.push(item);
    }
  }
  if (added.length) {
    announce(added.length === 1 ? `${added[0].file.name} added to the queue.`
      : `${added.length} files added to the queue.`);
  }
  updateQueueChrome();
  pump();
}

/** What the server would refuse anyway, said before a byte is sent. */
function refuseBeforeUpload(file) {
  const limits = app.limits;
  const ext = extensionOf(file.name);
  const allowed = limits.allowed_extensions ?? [];
  if (allowed.length && !allowed.includes(ext)) {
    const shown = ext ? `“.${ext}” files are` : 'Files without an extension are';
    return `Refused: ${shown} not accepted here. This server takes audio and video: ` +
      `${allowed.join(', ')}.`;
  }
  if (file.size === 0) return 'Refused: this file is empty.';
  if (limits.max_file_size && file.size > limits.max_file_size) {
    return `Too large: this file is ${formatBytes(file.size)} and the server takes at most ` +
      `${formatBytes(limits.max_file_size)} per file. Nothing was sent.`;
  }
  return null;
}

function slots() {
  return Math.max(1, Number(ui.parallel.value) || 1);
}

/** Start waiting files while a slot is free (start() settles each one's state at once). */
function pump() {
  for (const item of app.items) {
    if (app.items.filter((i) => ACTIVE.has(i.state)).length >= slots()) break;
    if (item.state === 'waiting') start(item);
  }
}

function reset(item) {
  item.controller = null;
  item.sessionId = null;
  item.taskId = null;
  item.stageIndex = -1;
  item.finished = false;
  item.cancelling = false;
  item.retrying = false;
  item.identifier = null;
  item.resumedNoted = false;
  item.resumed = false;
  item.uploadedBytes = 0;
  item.speed = 0;
  item.samples = [];
  item.followAbort?.abort();
  item.followAbort = null;
  item.el.result.hidden = true;
  item.el.result.replaceChildren();
  delete item.el.card.dataset.sessionId;
  delete item.el.card.dataset.taskId;
  delete item.el.card.dataset.location;
  delete item.el.card.dataset.refused;
  renderStages(item);
  showProgress(item, 0, item.file.size);
  item.el.rate.textContent = '';
  setMessage(item, '');
  setState(item, 'waiting');
}

function currentToken() {
  const value = ui.token.value.trim();
  return value || undefined;
}

function start(item) {
  if (app.limits.auth && !currentToken()) {
    fail(item, errorText({ code: 'missing_token' }, item), { retryable: true });
    ui.token.focus();
    return;
  }
  setState(item, 'uploading');
  setStage(item, 'upload');
  item.el.rate.textContent = 'Starting…';
  announce(`Uploading ${item.file.name}.`);
  const options = {
    file: item.file,
    language: item.language,
    model: item.model,
    token: currentToken,
    onProgress: (p) => onProgress(item, p),
    onSessionCreated: (id, info) => onSession(item, id, info),
    onRetry: (info) => onRetry(item, info),
    onStateChange: (state) => onUploadState(item, state),
  };
  let controller;
  try {
    controller = chunkd.createUpload(options);
  } catch (err) {
    fail(item, errorText(err, item), { retryable: false });
    return;
  }
  item.controller = controller;
  let promise;
  try {
    promise = controller.start();
  } catch (err) {
    promise = Promise.reject(err);
  }
  Promise.resolve(promise ?? controller.promise).then(
    (result) => uploaded(item, controller, result),
    (err) => uploadFailed(item, controller, err),
  );
}

function onSession(item, id, info) {
  if (!id) return;
  item.sessionId = id;
  item.el.card.dataset.sessionId = id;
  if (info?.resumed) item.resumed = true;
}

function onUploadState(item, state) {
  if (state === 'finalizing' && item.state === 'uploading' && !item.cancelling) {
    item.el.rate.textContent = '';
    // Too late to cancel: the server may already have taken the file for processing.
    item.el.buttons.cancel.hidden = true;
    item.el.buttons.pause.hidden = true;
    setMessage(item, 'All pieces are on the server. It is checking the file…');
  }
}

function onProgress(item, p) {
  if (item.controller && item.controller.sessionId && !item.sessionId) {
    onSession(item, item.controller.sessionId);
  }
  const uploaded = p.uploadedBytes ?? 0;
  const total = p.totalBytes ?? item.file.size;
  const now = performance.now();
  if (item.resumed && !item.resumedNoted && uploaded > 0) {
    // the server had part of this file from an earlier try (this tab, or before a reload)
    item.resumedNoted = true;
    setMessage(item, `Picked up where it stopped: ${formatBytes(uploaded)} were already on the server.`);
  }
  item.samples.push([now, uploaded]);
  while (item.samples.length > 2 && now - item.samples[0][0] > 5000) item.samples.shift();
  item.uploadedBytes = uploaded;
  item.totalBytes = total;
  if (Number.isFinite(p.currentSpeed) && p.currentSpeed > 0) {
    item.speed = p.currentSpeed;
  } else if (item.samples.length > 1) {
    const [t0, b0] = item.samples[0];
    item.speed = now > t0 ? ((uploaded - b0) * 1000) / (now - t0) : 0;
  }
  showProgress(item, uploaded, total);
  if (item.retrying && item.state === 'uploading') {
    item.retrying = false;
    setMessage(item, '');
  }
  showRate(item);
}

function onRetry(item, info) {
  if (item.state !== 'uploading') return;
  item.retrying = true;
  const wait = Number(info?.delay ?? 0) / 1000; // ms
  const after = wait >= 1 ? ` in ${formatDuration(wait)}` : '';
  const code = info?.error?.code ?? '';
  let cause = 'The connection to the server was lost';
  if (!navigator.onLine) cause = 'You are offline';
  else if (code === 'server_busy' || code === 'rate_limited' || code === 'shutting_down') {
    cause = 'The server is busy';
  } else if (code === 'checksum_mismatch') cause = 'A piece arrived damaged';
  else if (info?.error?.status >= 500) cause = 'The server had a problem';
  setMessage(item, `${cause}: retrying${after}…`, 'warn');
}

function uploaded(item, controller, result) {
  if (item.controller !== controller || FINISHED.has(item.state) || item.cancelling) return;
  item.retrying = false;
  const sessionId = result?.sessionId ?? controller.sessionId ?? item.sessionId;
  onSession(item, sessionId);
  item.taskId = result?.taskId ?? result?.task_id ?? null;
  if (item.taskId) item.el.card.dataset.taskId = item.taskId;
  showProgress(item, item.file.size, item.file.size);
  item.el.rate.textContent = '';
  setMessage(item, '');
  const folder = app.limits.handoff === 'folder';
  setState(item, 'processing', folder ? 'Saving' : 'Processing');
  setStage(item, folder ? 'saved' : 'queued');
  announce(folder ? `${item.file.name} uploaded, saving on the server.`
    : `${item.file.name} uploaded. Waiting for transcription.`);
  pump();
  follow(item, result);
}

function uploadFailed(item, controller, err) {
  if (item.controller !== controller) return;
  if (item.cancelling) return; // cancel() finishes the card once the server answered
  if (item.state === 'cancelled' || isUserAbort(err)) {
    if (item.state !== 'cancelled') cancelled(item);
    pump();
    return;
  }
  const code = err?.code ?? '';
  const refused = ['unsupported_content', 'extension_not_allowed', 'file_too_large',
    'invalid_filename', 'filename_too_long', 'too_many_chunks'].includes(code)
    || err?.status === 413 || err?.status === 415;
  fail(item, errorText(err, item), { retryable: !refused });
  pump();
}

function fail(item, text, { retryable }) {
  item.finished = true;
  item.retryable = retryable;
  item.retrying = false;
  item.followAbort?.abort();
  if (item.stageIndex >= 0) setStage(item, stagesFor()[item.stageIndex], { failed: true });
  item.el.rate.textContent = '';
  setMessage(item, text, 'error');
  setState(item, 'failed');
  announce(`${item.file.name} failed. ${text}`);
}

function cancelled(item) {
  item.finished = true;
  item.followAbort?.abort();
  item.el.rate.textContent = '';
  setMessage(item, item.sessionId ? 'Cancelled. The server removed what it had of this file.'
    : 'Cancelled before it started.');
  setState(item, 'cancelled');
  if (item.refocus && (document.activeElement === document.body || !document.activeElement)) {
    item.el.buttons.remove.focus();
  }
  item.refocus = false;
  announce(`${item.file.name} cancelled.`);
}

// ---------------------------------------------------------------------------------------------
// after the upload: the hand-off's stages and result

function follow(item, uploadResult) {
  const id = item.taskId ?? item.sessionId;
  const abort = new AbortController();
  item.followAbort = abort;
  const onMessage = (msg) => onTaskMessage(item, msg);
  let promise;
  try {
    promise = chunkd.followTask(id, { onMessage, signal: abort.signal, token: currentToken });
  } catch (err) {
    promise = Promise.reject(err);
  }
  Promise.resolve(promise).then(
    (final) => { if (final) onTaskMessage(item, final); },
    (err) => {
      if (abort.signal.aborted || item.finished) return;
      followLost(item, err, uploadResult);
    },
  );
}

function onTaskMessage(item, msg) {
  if (!msg || item.finished) return;
  const folder = app.limits.handoff === 'folder';
  if (msg.type === 'progress') {
    if (msg.identifier) item.identifier = msg.identifier;
    if (msg.stage === 'complete') {
      completed(item, msg);
      return;
    }
    setStage(item, msg.stage);
    if (!folder) {
      const pct = Number(msg.percentage) || 0;
      item.el.bar.value = pct;
      item.el.bar.setAttribute('aria-label', `Processing of ${item.file.name}`);
      const label = STAGE_LABELS[msg.stage] ?? msg.stage;
      item.el.bytes.textContent = `${label} · ${pct} %`;
      item.el.rate.textContent = msg.message && msg.message !== label ? msg.message : '';
      const badge = msg.stage === 'queued' ? 'Queued' : label;
      if (item.el.badge.textContent !== badge) {
        setState(item, 'processing', badge);
        announce(`${item.file.name}: ${label.toLowerCase()}.`);
      }
    }
  } else if (msg.type === 'error') {
    const err = { code: msg.error_code, user_message: msg.user_message,
      details: { detected_type: msg.technical_detail } };
    const code = msg.error_code;
    let text = code === 'unsupported_content' ? errorText(err, item)
      : (msg.user_message || errorText(err, item));
    if (msg.technical_detail && code !== 'unsupported_content') {
      text += ` (${msg.technical_detail})`;
    }
    fail(item, text, { retryable: false });
  }
}

function completed(item, msg) {
  item.finished = true;
  const folder = app.limits.handoff === 'folder';
  setStage(item, folder ? 'saved' : 'complete');
  item.el.bar.value = 100;
  item.el.rate.textContent = '';
  const location = msg.location ?? null;
  if (location) item.el.card.dataset.location = location;
  const box = item.el.result;
  box.replaceChildren();
  const text = transcriptText(msg.result);
  if (text) {
    item.el.bytes.textContent = `${formatBytes(item.file.size)} · transcribed`;
    renderTranscript(box, msg.result, item);
    setMessage(item, '');
    setState(item, 'done', 'Transcribed');
    announce(`${item.file.name}: transcript ready.`);
  } else {
    item.el.bytes.textContent = `${formatBytes(item.file.size)} · uploaded`;
    setMessage(item, folder ? 'Saved on the server.' : (msg.message || 'Done.'), 'ok');
    if (location) {
      const line = document.createElement('p');
      line.className = 'location-line';
      line.append('Location in the data folder:');
      const code = document.createElement('code');
      code.className = 'location';
      code.textContent = location;
      line.append(code);
      box.append(line);
    }
    setState(item, 'done', folder ? 'Saved' : 'Done');
    announce(`${item.file.name} saved. ${location ? `Location: ${location}.` : ''}`.trim());
  }
  if (item.identifier || msg.identifier) {
    const ref = document.createElement('p');
    ref.className = 'result-ref';
    ref.textContent = `Transcription service task: ${msg.identifier ?? item.identifier}`;
    box.append(ref);
  }
  box.hidden = box.childElementCount === 0;
}

function transcriptText(result) {
  if (!result) return '';
  if (typeof result === 'string') return result.trim();
  if (typeof result.text === 'string' && result.text.trim()) return result.text.trim();
  const segments = Array.isArray(result.segments) ? result.segments
    : Array.isArray(result.result?.segments) ? result.result.segments : null;
  if (segments) return segments.map((s) => String(s.text ?? '').trim()).filter(Boolean).join(' ');
  return '';
}

function renderTranscript(box, result, item) {
  const h = document.createElement('h3');
  h.textContent = 'Transcript';
  box.append(h);
  const segments = Array.isArray(result?.segments) ? result.segments
    : Array.isArray(result?.result?.segments) ? result.result.segments : null;
  if (segments && segments.length) {
    const list = document.createElement('ol');
    list.className = 'transcript';
    const speakers = new Set(segments.map((s) => s.speaker).filter(Boolean));
    for (const seg of segments) {
      const li = document.createElement('li');
      const t = document.createElement('span');
      t.className = 't';
      t.textContent = formatClock(seg.start);
      const body = document.createElement('span');
      body.className = 'text';
      if (seg.speaker && speakers.size > 1) {
        const who = document.createElement('span');
        who.className = 'who';
        who.textContent = `${seg.speaker}:`;
        body.append(who);
      }
      body.append(String(seg.text ?? '').trim());
      li.append(t, body);
      list.append(li);
    }
    box.append(list);
  } else {
    const p = document.createElement('p');
    p.className = 'transcript';
    p.textContent = transcriptText(result);
    box.append(p);
  }
  const link = document.createElement('a');
  link.className = 'result-ref';
  link.textContent = 'Download the transcript (.txt)';
  link.download = `${item.file.name.replace(/\.[^.]+$/, '')}.txt`;
  link.href = URL.createObjectURL(new Blob([`${transcriptText(result)}\n`], { type: 'text/plain' }));
  const wrap = document.createElement('p');
  wrap.className = 'result-ref';
  wrap.append(link);
  box.append(wrap);
}

/** The WebSocket could not be followed to its end: ask /status once for what is known. */
async function followLost(item, err, uploadResult) {
  const id = item.sessionId;
  try {
    if (id) {
      const headers = {};
      const token = currentToken();
      if (token) headers.Authorization = `Bearer ${token}`;
      const resp = await fetch(`/upload/chunked/${encodeURIComponent(id)}/status`, { headers });
      if (resp.ok) {
        const status = await resp.json();
        const task = status.task ?? {};
        if (task.stage === 'complete') {
          completed(item, { location: task.location ?? uploadResult?.location, message: task.message });
          return;
        }
        if (status.status === 'failed' && status.error) {
          onTaskMessage(item, { type: 'error', error_code: status.error.code,
            user_message: status.error.message, technical_detail: task.error?.technical_detail });
          return;
        }
      }
    }
  } catch {
    // fall through to the message below
  }
  if (item.finished) return;
  fail(item, `The file was uploaded, but the page lost track of its processing: ` +
    `${errorText(err, item)}`, { retryable: false });
}

// ---------------------------------------------------------------------------------------------
// buttons

function pause(item) {
  if (item.state !== 'uploading' || !item.controller) return;
  item.controller.pause();
  setState(item, 'paused');
  showRate(item);
  setMessage(item, 'Paused. What has arrived stays on the server; resume whenever you like.');
  announce(`${item.file.name} paused.`);
}

function resume(item) {
  if (item.state !== 'paused' || !item.controller) return;
  setState(item, 'uploading');
  setMessage(item, '');
  item.samples = [];
  item.speed = 0;
  showRate(item);
  item.controller.resume();
  announce(`${item.file.name} resumed.`);
}

function cancel(item) {
  if (item.state === 'waiting') {
    cancelled(item);
    pump();
    return;
  }
  if (!ACTIVE.has(item.state) || !item.controller) return;
  const controller = item.controller;
  item.refocus = item.el.card.contains(document.activeElement);
  item.cancelling = true;
  setState(item, 'cancelling', 'Cancelling…');
  setMessage(item, 'Cancelling…');
  Promise.resolve()
    .then(() => controller.cancel())
    .catch(() => {})
    .then(() => {
      item.cancelling = false;
      if (item.controller === controller) cancelled(item);
      pump();
    });
}

function retry(item) {
  if (item.state !== 'failed') return;
  reset(item);
  announce(`${item.file.name} queued again.`);
  pump();
}

function remove(item) {
  if (!FINISHED.has(item.state)) return;
  const index = app.items.indexOf(item);
  if (index >= 0) app.items.splice(index, 1);
  const next = item.el.card.nextElementSibling ?? item.el.card.previousElementSibling;
  item.el.card.remove();
  updateQueueChrome();
  (next?.querySelector('button:not([hidden])') ?? ui.drop).focus();
}

// ---------------------------------------------------------------------------------------------
// picking and dropping files

function wirePicker() {
  ui.drop.addEventListener('click', () => ui.input.click());
  ui.input.addEventListener('change', () => {
    const files = [...ui.input.files];
    ui.input.value = '';
    if (files.length) addFiles(files);
  });
  let depth = 0;
  const over = (on) => ui.drop.classList.toggle('is-over', on);
  ui.drop.addEventListener('dragenter', (e) => {
    e.preventDefault();
    depth += 1;
    over(true);
  });
  ui.drop.addEventListener('dragover', (e) => {
    e.preventDefault();
    if (e.dataTransfer) e.dataTransfer.dropEffect = 'copy';
  });
  ui.drop.addEventListener('dragleave', () => {
    depth = Math.max(0, depth - 1);
    if (!depth) over(false);
  });
  ui.drop.addEventListener('drop', (e) => {
    e.preventDefault();
    depth = 0;
    over(false);
    const files = [...(e.dataTransfer?.files ?? [])];
    if (files.length) addFiles(files);
  });
  // a file dropped beside the zone must not make the browser open it instead of the page
  for (const type of ['dragover', 'drop']) {
    window.addEventListener(type, (e) => {
      if (!e.defaultPrevented) e.preventDefault();
    });
  }
  ui.clearDone.addEventListener('click', () => {
    for (const item of app.items.filter((i) => FINISHED.has(i.state))) {
      item.el.card.remove();
    }
    app.items = app.items.filter((i) => !FINISHED.has(i.state));
    updateQueueChrome();
    ui.drop.focus();
  });
  ui.parallel.addEventListener('change', pump);
  ui.options.addEventListener('submit', (e) => e.preventDefault());
  window.addEventListener('offline', () => {
    for (const item of app.items) {
      if (item.state === 'uploading') {
        item.retrying = true;
        setMessage(item, 'Network lost: retrying when it is back…', 'warn');
      }
    }
    announce('Network lost. Uploads retry when it is back.');
  });
  window.addEventListener('online', () => announce('Back online.'));
  window.addEventListener('beforeunload', (e) => {
    if (app.items.some((i) => i.state === 'uploading')) {
      e.preventDefault();
      e.returnValue = '';
    }
  });
}

function wireToken() {
  try {
    ui.token.value = sessionStorage.getItem(TOKEN_KEY) ?? '';
  } catch {
    // storage may be off; the field still works for this page
  }
  ui.token.addEventListener('input', () => {
    try {
      const value = ui.token.value.trim();
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      // ignore
    }
  });
}

// ---------------------------------------------------------------------------------------------
// start: learn the server's limits first (chunk size, extensions, auth, hand-off)

async function init() {
  wirePicker();
  wireToken();
  updateQueueChrome();
  ui.drop.disabled = true;
  let limits;
  try {
    const resp = await fetch('/upload/chunked/limits', { headers: { Accept: 'application/json' } });
    if (!resp.ok) throw new Error(`the server answered ${resp.status}`);
    limits = await resp.json();
  } catch (err) {
    ui.serverError.hidden = false;
    ui.serverError.textContent = `Cannot reach the upload server (${err.message}). Reload the ` +
      'page to try again.';
    ui.hint.textContent = 'Uploads are unavailable until the server answers.';
    announce('The upload server cannot be reached.');
    return;
  }
  app.limits = limits;
  const allowed = limits.allowed_extensions ?? [];
  if (allowed.length) ui.input.accept = allowed.map((e) => `.${e}`).join(',');
  ui.tokenField.hidden = !limits.auth;
  if (limits.handoff === 'folder') {
    ui.optionsNote.hidden = false;
    ui.optionsNote.textContent = 'This server saves files without transcribing them; the ' +
      'language and model are stored with each file.';
  }
  const folder = limits.handoff === 'folder';
  const chunk = formatBytes(limits.chunk_size);
  ui.hint.textContent = `Audio or video (${allowed.join(', ')}), up to ` +
    `${formatBytes(limits.max_file_size)} per file, sent in ${chunk} pieces.`;
  ui.serverInfo.textContent = folder
    ? 'This server keeps finished files in its data folder (no transcription here).'
    : limits.handoff === 'whisperx'
      ? 'This server sends finished files to a WhisperX transcription service.'
      : 'This server hands finished files to its processing command.';
  for (const item of app.items) renderStages(item);
  ui.drop.disabled = false;
  document.body.dataset.ready = 'true';
}

init();
