// The demo page: a picture in (drawn, uploaded, photographed, dropped or pasted), TF Serving's
// answer out. Pictures go to the serving_bytes signature exactly as they are (the drawing as
// PNG): decoding and making them MNIST-like is the model's job, as for any other client.

import { DrawPad } from "./drawpad.js";
import {
  OUTPUT_DIGIT, OUTPUT_MNIST_IMAGE, OUTPUT_PROBABILITIES, SIGNATURE_BYTES,
  ServingError, TFServingClient, blobToBase64, readSettings,
} from "./tfserving.js";

// Predict as the person draws: after the pointer rests this long, and at least this often
// while it keeps moving; a finished stroke asks at once. One request in flight at most.
const DEBOUNCE_MS = 120;
const MAX_WAIT_MS = 400;

const $ = (id) => document.getElementById(id);
const els = {
  modelLine: $("model-line"), dropzone: $("dropzone"), pad: $("pad"), picture: $("picture"),
  pictureName: $("picture-name"), undo: $("undo"), clear: $("clear"), predict: $("predict"),
  file: $("file"), camera: $("camera"), message: $("message"), result: $("result"),
  announce: $("announce"), digit: $("digit"), confidence: $("confidence"), timing: $("timing"), seen: $("seen"),
  seenCanvas: $("seen-canvas"), bars: $("bars"), serverInput: $("server-input"),
  modelInput: $("model-input"),
};

/** Runs `run` when asked, debounced, never twice at once; asks made meanwhile are merged. */
class Scheduler {
  constructor(run, delayMs, maxWaitMs) {
    Object.assign(this, { run, delayMs, maxWaitMs, wanted: false, busy: false, timer: null, firstAt: 0 });
  }

  later() {
    this.wanted = true;
    const now = performance.now();
    if (this.timer === null) {
      this.firstAt = now;
    }
    clearTimeout(this.timer);
    const wait = Math.max(0, Math.min(this.delayMs, this.firstAt + this.maxWaitMs - now));
    this.timer = setTimeout(() => {
      this.timer = null;
      this.kick();
    }, wait);
  }

  now() {
    this.wanted = true;
    clearTimeout(this.timer);
    this.timer = null;
    this.kick();
  }

  cancel() {
    this.wanted = false;
    clearTimeout(this.timer);
    this.timer = null;
  }

  async kick() {
    if (this.busy || !this.wanted) {
      return;
    }
    this.wanted = false;
    this.busy = true;
    try {
      await this.run();
    } finally {
      this.busy = false;
    }
    if (this.wanted && this.timer === null) {
      this.kick();
    }
  }
}

const pad = new DrawPad(els.pad);
let settings = null;
let client = null;
// Bumped by every change of the picture; the shown answer carries the revision it is about
// (#result[data-revision]), the current one is #dropzone[data-revision].
let revision = 0;
let source = { kind: "drawing" }; // or {kind: "file", file, url}
const scheduler = new Scheduler(predictNow, DEBOUNCE_MS, MAX_WAIT_MS);

function bump() {
  revision += 1;
  els.dropzone.dataset.revision = String(revision);
}

function updateButtons() {
  const picture = source.kind === "file";
  els.undo.disabled = picture || pad.isEmpty;
  els.clear.disabled = !picture && pad.isEmpty;
  els.predict.disabled = client === null;
}

// --- showing answers -----------------------------------------------------------------------

function setState(state, rev) {
  els.result.dataset.state = state;
  els.result.dataset.revision = String(rev);
  els.result.setAttribute("aria-busy", String(state === "waiting"));
}

function resetResult() {
  els.announce.textContent = "";
  els.message.hidden = true;
  els.message.replaceChildren();
  els.digit.textContent = "?";
  els.confidence.textContent = "";
  els.timing.textContent = "";
  els.seen.hidden = true;
  els.bars.replaceChildren();
  setState("idle", revision);
}

function showModel(version) {
  els.modelLine.textContent =
    `${settings.model} · version ${version} · ${SIGNATURE_BYTES} · ${settings.server}` +
    (settings.label ? ` · label ${settings.label}` : "");
}

function drawSeen(image) {
  const rows = image.length;
  const cols = rows ? image[0].length : 0;
  if (!rows || !cols) {
    els.seen.hidden = true;
    return;
  }
  els.seenCanvas.width = cols;
  els.seenCanvas.height = rows;
  const ctx = els.seenCanvas.getContext("2d");
  const pixels = ctx.createImageData(cols, rows);
  for (let y = 0; y < rows; y++) {
    for (let x = 0; x < cols; x++) {
      const i = 4 * (y * cols + x);
      const v = Number(image[y][x]);
      pixels.data.set([v, v, v, 255], i);
    }
  }
  ctx.putImageData(pixels, 0, 0);
  els.seen.hidden = false;
}

function showAnswer({ version, outputs, roundTripMs }, rev) {
  const probabilities = outputs[OUTPUT_PROBABILITIES].map(Number);
  const best = probabilities.indexOf(Math.max(...probabilities));
  const digit = OUTPUT_DIGIT in outputs ? Number(outputs[OUTPUT_DIGIT]) : best;
  els.message.hidden = true;
  els.message.replaceChildren();
  els.digit.textContent = String(digit);
  els.confidence.textContent = `${(100 * probabilities[digit]).toFixed(1)} % sure`;
  // What a screen reader says (a polite live region: updates while drawing are merged).
  els.announce.textContent = `TF Serving reads ${digit}, ${Math.round(100 * probabilities[digit])} percent sure`;
  els.timing.textContent = `${Math.round(roundTripMs)} ms round trip`;
  els.bars.replaceChildren(...probabilities.map((p, i) => {
    const item = document.createElement("li");
    item.className = i === digit ? "bar top" : "bar";
    const label = document.createElement("span");
    label.className = "bar-label";
    label.textContent = String(i);
    const track = document.createElement("span");
    track.className = "bar-track";
    track.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.width = `${(100 * p).toFixed(2)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = `${(100 * p).toFixed(1)} %`;
    item.append(label, track, value);
    return item;
  }));
  if (Array.isArray(outputs[OUTPUT_MNIST_IMAGE])) {
    drawSeen(outputs[OUTPUT_MNIST_IMAGE]);
  } else {
    els.seen.hidden = true;
  }
  showModel(version);
  setState("done", rev);
}

/** An error in the message box. TF Serving's own message is shown as it sent it. */
function showError(err, rev) {
  resetResult();
  const title = document.createElement("strong");
  const detail = document.createElement("p");
  detail.className = "message-detail";
  detail.textContent = err.message;
  if (err instanceof ServingError && err.kind === "server") {
    // No status: the page read it from TF Serving's status or metadata (no version loaded,
    // no serving_bytes signature).
    title.textContent = err.status ? `TF Serving answered HTTP ${err.status}:` : "TF Serving reports:";
    els.message.dataset.kind = "server";
  } else if (err instanceof ServingError && err.kind === "unreachable") {
    title.textContent = "No answer.";
    els.message.dataset.kind = "unreachable";
  } else {
    title.textContent = "Something went wrong:";
    els.message.dataset.kind = err instanceof ServingError ? err.kind : "page";
  }
  els.message.replaceChildren(title, detail);
  els.message.hidden = false;
  setState("error", rev);
}

// --- asking TF Serving ---------------------------------------------------------------------

async function predictNow() {
  const rev = revision;
  const current = source;
  setState("waiting", rev);
  // Show an answer only while it is still about the current picture, or while a newer one
  // is on its way (it replaces this one shortly); after Clear, a late answer is dropped.
  const stillWanted = () => rev === revision || scheduler.wanted;
  try {
    const blob = current.kind === "file" ? current.file : await pad.toBlob();
    const answer = await client.predict(await blobToBase64(blob));
    if (stillWanted()) {
      showAnswer(answer, rev);
    }
  } catch (err) {
    if (stillWanted()) {
      showError(err, rev);
    }
  }
}

async function connect() {
  try {
    const version = await client.version({ refresh: true });
    await client.signature(version);
    showModel(version);
  } catch (err) {
    els.modelLine.textContent = `${settings.model} at ${settings.server}: not available`;
    showError(err, revision);
  }
}

// --- pictures in ---------------------------------------------------------------------------

function leavePicture() {
  if (source.kind === "file") {
    URL.revokeObjectURL(source.url);
  }
  source = { kind: "drawing" };
  els.picture.hidden = true;
  els.picture.removeAttribute("src");
  els.pictureName.hidden = true;
  els.dropzone.dataset.mode = "drawing";
}

function useFile(file) {
  leavePicture();
  pad.reset();
  source = { kind: "file", file, url: URL.createObjectURL(file) };
  els.picture.src = source.url;
  els.picture.alt = `The picture sent: ${file.name || "pasted picture"}`;
  els.picture.hidden = false;
  els.pictureName.textContent = `${file.name || "pasted picture"} · ${formatBytes(file.size)}`;
  els.pictureName.hidden = false;
  els.dropzone.dataset.mode = "picture";
  bump();
  updateButtons();
  if (client) {
    scheduler.now();
  }
}

function formatBytes(n) {
  return n < 1024 ? `${n} B` : n < 1024 * 1024 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1048576).toFixed(1)} MB`;
}

function firstFile(list) {
  return list && list.length ? list[0] : null;
}

function wireInputs() {
  // A file the browser cannot show (not a picture, or a format it lacks) is still sent: the
  // model decides. Only its name stays on screen.
  els.picture.addEventListener("error", () => {
    els.picture.hidden = true;
  });
  pad.addEventListener("change", (event) => {
    bump();
    updateButtons();
    if (pad.isEmpty) {
      scheduler.cancel();
      resetResult();
    } else if (client && event.detail.done) {
      scheduler.now();
    } else if (client) {
      scheduler.later();
    }
  });
  // Drawing on an uploaded picture starts a new drawing (capture phase: before the pad sees
  // the pointer).
  els.dropzone.addEventListener("pointerdown", () => {
    if (source.kind === "file") {
      leavePicture();
      updateButtons();
    }
  }, { capture: true });

  els.undo.addEventListener("click", () => pad.undo());
  els.clear.addEventListener("click", () => {
    if (source.kind === "file") {
      leavePicture();
      bump();
      scheduler.cancel();
      resetResult();
      updateButtons();
    } else {
      pad.clear();
    }
  });
  els.predict.addEventListener("click", () => scheduler.now());

  for (const input of [els.file, els.camera]) {
    input.addEventListener("change", () => {
      const file = firstFile(input.files);
      input.value = ""; // the same file chosen again is a new upload
      if (file) {
        useFile(file);
      }
    });
  }

  document.addEventListener("keydown", (event) => {
    const typing = event.target instanceof HTMLInputElement && event.target.type !== "file";
    if (!typing && (event.ctrlKey || event.metaKey) && !event.shiftKey && event.key.toLowerCase() === "z") {
      event.preventDefault();
      if (source.kind === "drawing") {
        pad.undo();
      }
    }
  });

  // Drag and drop anywhere on the page (a drop beside the pad must not open the file).
  let dragDepth = 0;
  document.addEventListener("dragenter", (event) => {
    event.preventDefault();
    dragDepth += 1;
    els.dropzone.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) {
      els.dropzone.classList.remove("dragging");
    }
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    els.dropzone.classList.remove("dragging");
    const file = firstFile(event.dataTransfer?.files);
    if (file) {
      useFile(file);
    } else {
      showError(new Error("The drop held no file: drop a picture file (PNG, JPEG, GIF or BMP)."), revision);
    }
  });

  document.addEventListener("paste", (event) => {
    if (event.target instanceof HTMLInputElement && event.target.type !== "file") {
      return; // pasting text into the settings
    }
    const file = firstFile(event.clipboardData?.files);
    if (file) {
      event.preventDefault();
      useFile(file);
    } else {
      showError(new Error("The clipboard holds no picture to paste (copy an image, then Ctrl+V)."), revision);
    }
  });
}

function start() {
  wireInputs();
  try {
    settings = readSettings(window.location.search);
  } catch (err) {
    els.modelLine.textContent = "Settings error";
    showError(err, revision);
    updateButtons();
    return;
  }
  els.serverInput.value = settings.server;
  els.modelInput.value = settings.model;
  client = new TFServingClient(settings);
  updateButtons();
  connect();
}

start();
