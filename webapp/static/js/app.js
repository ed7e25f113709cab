// The page's flow: the service's description, the source (waveform, tempo and key), the settings.
import { call, callJson, forgetKey, onKeyNeeded, storedKey } from "./api.js";
import { startJob } from "./job.js";
import { SyncPlayer, decodeAudio } from "./player.js";
import { WaveformView } from "./waveform.js";

const $ = (id) => document.getElementById(id);
const NOTES_MAJOR = ["C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"];
const NOTES_MINOR = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B"];
const TRACK_LABELS = { vocals: "Vocals", backing_vocals: "Backing vocals", drums: "Drums" };

const state = {
  service: null, file: null, duration: 0, captions: {}, track: "vocals",
  edited: { bpm: false, key: false, caption: false }, analysis: null, generation: 0, busy: false,
};
const player = new SyncPlayer();
const views = {
  source: new WaveformView($("wave-source"), { color: "#6ee7b7", selectable: true }),
  stem: new WaveformView($("wave-stem"), { color: "#93c5fd" }),
};

export const page = { state, player, views, $, formatTime, setMessage, trackLabel: (t) => TRACK_LABELS[t] || t };

export function formatTime(seconds) {
  const s = Math.max(0, seconds || 0);
  return `${Math.floor(s / 60)}:${(s % 60).toFixed(1).padStart(4, "0")}`;
}

export function setMessage(text, kind = "") {
  const el = $("form-message");
  el.textContent = text;
  el.className = "message " + kind;
}

// ---- the API key, asked for once (a 401 from any call opens the dialog) ------------------------
onKeyNeeded((reason) => new Promise((resolve) => {
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason;
  $("key-input").value = "";
  dialog.returnValue = "";
  dialog.onclose = () => {
    const key = dialog.returnValue === "ok" ? $("key-input").value.trim() : "";
    $("forget-key").hidden = !key;
    resolve(key || null);
  };
  dialog.showModal();
}));
$("forget-key").hidden = !storedKey();
$("forget-key").addEventListener("click", () => { forgetKey(); $("forget-key").hidden = true; });

// ---- what the service is: model label, tracks and their captions, limits ------------------------
async function describeService() {
  const resp = await call("/", { accept: "application/json" });
  const info = await resp.json();
  state.service = info;
  const badge = $("model-badge");
  if (info.model === "demo: random weights") {
    badge.textContent = "Demo model: random weights, its stems are noise (not ACE-Step)";
    badge.className = "badge demo";
  } else {
    badge.textContent = "Model: " + (resp.headers.get("X-ACEStep-Model") || info.model);
    badge.className = "badge real";
  }
  state.captions = info.track_captions || {};
  const tracks = $("tracks");
  for (const track of info.track_types) {
    const label = document.createElement("label");
    const input = Object.assign(document.createElement("input"), { type: "radio", name: "track_type", value: track });
    input.dataset.testid = "track-" + track;
    const text = document.createElement("span");
    text.textContent = TRACK_LABELS[track] || track;
    label.append(input, text);
    tracks.append(label);
  }
  tracks.querySelector("input").checked = true;
  state.track = info.track_types[0];
  $("caption").value = state.captions[state.track] || "";
  const steps = info.limits.steps;
  Object.assign($("steps"), { value: steps.default, min: steps.min, max: steps.max });
  $("drop-limits").textContent =
    `WAV, MP3, FLAC, OGG, M4A · up to ${info.limits.max_upload_mb} MB and ${info.limits.max_duration_s} s`;
  const list = $("keys");
  for (const mode of ["major", "minor"]) {
    for (const note of mode === "major" ? NOTES_MAJOR : NOTES_MINOR) {
      const option = document.createElement("option");
      option.value = `${note} ${mode}`;
      list.append(option);
    }
  }
}

// ---- the source: waveform at once (decoded here), tempo and key from POST /analyze --------------
async function takeFile(file) {
  if (!file) return;
  if (state.busy) {
    setMessage("A generation is running: wait for it or cancel it before taking another source.", "error");
    return;
  }
  const limits = state.service ? state.service.limits : null;
  if (limits && file.size > limits.max_upload_mb * 1048576) {
    setMessage(`${file.name} is ${(file.size / 1048576).toFixed(1)} MB; the service takes at most ${limits.max_upload_mb} MB.`, "error");
    return;
  }
  const generation = ++state.generation;
  state.file = file;
  state.analysis = null;
  state.edited = { bpm: false, key: false, caption: state.edited.caption };
  player.pause();
  player.removeTrack("stem");
  $("lane-stem").hidden = true;
  $("job-card").hidden = true;
  $("lanes").hidden = false;
  $("drop").classList.add("loaded");
  $("drop").querySelector(".drop-title").textContent = file.name;
  $("drop-limits").textContent = "drop or click to take another file";
  $("source-info").textContent = `${(file.size / 1048576).toFixed(2)} MB · decoding…`;
  $("stem-name").textContent = "Stem";
  showWindow(null);
  $("repaint-start").value = $("repaint-end").value = "";
  setMessage("");
  const bytes = await file.arrayBuffer();
  const analysis = analyse(file, generation);
  try {
    const buffer = await decodeAudio(bytes);
    if (generation !== state.generation) return;
    state.duration = buffer.duration;
    player.setTrack("source", buffer);
    views.source.setBuffer(buffer, buffer.duration);
    views.stem.setBuffer(null, buffer.duration);
    $("source-info").textContent = `${formatTime(buffer.duration)} · ${buffer.numberOfChannels === 1 ? "mono" : "stereo"} · ${(file.size / 1048576).toFixed(2)} MB`;
    $("play").disabled = $("rewind").disabled = false;
  } catch {
    if (generation !== state.generation) return;
    $("source-info").textContent = "this browser cannot decode the file to draw it; the service may still take it";
  }
  updateClock();
  await analysis;
  updateGenerate();
}

async function analyse(file, generation) {
  $("analysis-status").textContent = "finding tempo and key…";
  $("bpm-hint").textContent = $("key-hint").textContent = "";
  const body = new FormData();
  body.append("audio_file", file);
  try {
    const result = await callJson("/analyze", { method: "POST", body });
    if (generation !== state.generation) return;
    state.analysis = result;
    if (!state.duration) { state.duration = result.duration; views.source.setBuffer(null, result.duration); }
    showAnalysis(result);
  } catch (err) {
    if (generation !== state.generation) return;
    $("analysis-status").textContent = "";
    $("bpm-hint").innerHTML = `<span class="warn"></span>`;
    $("bpm-hint").firstChild.textContent = `Could not analyse the file: ${err.message}`;
  }
}

function showAnalysis(result) {
  $("analysis-status").textContent = "tempo and key found: check them, and change them if they are wrong";
  if (result.bpm && !state.edited.bpm) $("bpm").value = result.bpm;
  if (result.key_scale && !state.edited.key) $("key").value = result.key_scale;
  const bpmHint = $("bpm-hint");
  bpmHint.textContent = "";
  if (!result.bpm) {
    bpmHint.textContent = "No steady beat found: type the tempo.";
  } else {
    bpmHint.append(`found ${result.bpm_precise} BPM · confidence ${Math.round(result.bpm_confidence * 100)}%`);
    if (result.bpm_ambiguous) {
      const alt = document.createElement("button");
      alt.type = "button";
      alt.className = "chip suggest";
      alt.dataset.testid = "bpm-alternative";
      const kind = result.bpm_alternative > result.bpm ? "double time" : "half time";
      alt.textContent = `or ${result.bpm_alternative} (${kind})?`;
      alt.addEventListener("click", () => { $("bpm").value = result.bpm_alternative; state.edited.bpm = true; updateGenerate(); });
      bpmHint.append(" ", alt);
    }
  }
  $("key-hint").textContent = result.key_scale
    ? `found ${result.key_scale} · confidence ${Math.round(result.key_confidence * 100)}% · runner-up ${result.key_alternative}`
    : "No key found (no pitched sound?): leave it blank or type it.";
}

// ---- the transport and the lanes ---------------------------------------------------------------
function updateClock() {
  const now = player.currentTime();
  $("clock").textContent = `${formatTime(now)} / ${formatTime(state.duration)}`;
  views.source.setPlayhead(now);
  views.stem.setPlayhead(now);
  document.querySelector(".transport").dataset.state = player.playing ? "playing" : "stopped";
  document.querySelector(".transport").dataset.sources = String(player.activeSources);
}

function tick() {
  updateClock();
  if (player.playing) requestAnimationFrame(tick);
}

player.onEnded = updateClock;
$("play").addEventListener("click", async () => {
  if (player.playing) player.pause();
  else await player.play();
  tick();
});
$("rewind").addEventListener("click", async () => { await player.seek(0); tick(); });
for (const view of Object.values(views)) view.onSeek = async (t) => { await player.seek(t); tick(); };
function showWindow(range) {
  views.source.setSelection(range);
  views.stem.setSelection(range); // the stem's lane shows the same window, aligned
}
views.source.onSelect = ([a, b]) => {
  $("repaint-start").value = a.toFixed(2);
  $("repaint-end").value = b.toFixed(2);
  views.stem.setSelection([a, b]);
};
for (const el of document.querySelectorAll(".mute")) {
  el.addEventListener("click", () => {
    const muted = el.getAttribute("aria-pressed") !== "true";
    el.setAttribute("aria-pressed", String(muted));
    player.setMuted(el.dataset.track, muted);
  });
}
for (const el of document.querySelectorAll(".volume")) {
  el.addEventListener("input", () => player.setVolume(el.dataset.track, Number(el.value)));
}

// ---- the settings ------------------------------------------------------------------------------
function updateGenerate() {
  $("generate").disabled = !state.file || !$("bpm").value;
}

$("bpm").addEventListener("input", () => { state.edited.bpm = true; updateGenerate(); });
$("key").addEventListener("input", () => { state.edited.key = true; });
for (const [id, factor] of [["bpm-half", 0.5], ["bpm-double", 2]]) {
  $(id).addEventListener("click", () => {
    const bpm = Number($("bpm").value);
    if (!bpm) return;
    $("bpm").value = Math.min(300, Math.max(30, Math.round(bpm * factor)));
    state.edited.bpm = true;
    updateGenerate();
  });
}
$("tracks").addEventListener("change", (e) => {
  state.track = e.target.value;
  if (!state.edited.caption) $("caption").value = state.captions[state.track] || "";
  $("caption-reset").hidden = !state.edited.caption;
});
$("caption").addEventListener("input", () => {
  state.edited.caption = $("caption").value.trim() !== (state.captions[state.track] || "");
  $("caption-reset").hidden = !state.edited.caption;
});
$("caption-reset").addEventListener("click", () => {
  $("caption").value = state.captions[state.track] || "";
  state.edited.caption = false;
  $("caption-reset").hidden = true;
});
for (const id of ["repaint-start", "repaint-end"]) {
  $(id).addEventListener("input", () => {
    const a = parseFloat($("repaint-start").value), b = parseFloat($("repaint-end").value);
    showWindow(Number.isFinite(a) && Number.isFinite(b) && b > a ? [a, b] : null);
  });
}
$("repaint-clear").addEventListener("click", () => {
  $("repaint-start").value = $("repaint-end").value = "";
  showWindow(null);
});

const drop = $("drop");
$("file").addEventListener("change", () => takeFile($("file").files[0]));
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  takeFile(e.dataTransfer.files[0]);
});

$("settings").addEventListener("submit", (e) => {
  e.preventDefault();
  startJob(page, tick);
});

describeService().then(() => { document.body.dataset.ready = "true"; }).catch((err) => {
  setMessage(`The service could not be reached: ${err.message}`, "error");
});
