// One generation: submit (POST /lego, async), poll /lego/status/<id>, cancel (DELETE), then the
// candidates: fetched from /lego/<id>/audio?index=i, drawn under the source, A/B, downloads.
import { call, callJson, fileName } from "./api.js";
import { decodeAudio } from "./player.js";

const POLL_MS = 1000;
const POLL_FAILURES_TOLERATED = 5; // a restart or a network blip is not the end of the job
let current = null; // {id, cancelled, urls: []}

function formData(page) {
  const { $, state } = page;
  const body = new FormData();
  body.append("audio_file", state.file);
  body.append("track_type", state.track);
  body.append("bpm", $("bpm").value.trim());
  const fields = { key_scale: $("key").value, inference_steps: $("steps").value, seed: $("seed").value,
    format: $("format").value, repaint_start: $("repaint-start").value, repaint_end: $("repaint-end").value };
  for (const [name, value] of Object.entries(fields)) if (String(value).trim()) body.append(name, String(value).trim());
  body.append("batch_size", document.querySelector('input[name="batch_size"]:checked').value);
  const caption = $("caption").value.trim();
  if (caption && caption !== (state.captions[state.track] || "")) body.append("caption", caption);
  body.append("async", "1");
  return body;
}

function showProgress(page, percent, text, mode) {
  const { $ } = page;
  $("progress").dataset.state = mode;
  $("progress").setAttribute("aria-valuenow", String(percent));
  $("progress-bar").style.width = `${percent}%`;
  $("job-percent").textContent = `${percent}%`;
  $("job-stage").textContent = text;
}

function describe(status) {
  if (status.status === "queued") {
    const q = status.queue_status || {};
    const wait = q.estimated_seconds ? ` · about ${Math.round(q.estimated_seconds)} s` : "";
    return `Queued, position ${q.position ?? "?"}: ${q.message || "waiting"}${wait}`;
  }
  const q = status.queue_status || {};
  const stage = status.stage || "processing";
  const left = q.estimated_seconds ? ` · about ${Math.round(q.estimated_seconds)} s left` : "";
  const detail = q.message && q.message !== stage ? `: ${q.message.replace(/^generating: /, "")}` : "";
  return `${stage[0].toUpperCase()}${stage.slice(1)}${detail}${left}`;
}

export async function startJob(page, tick) {
  const { $, setMessage, state, player } = page;
  if (current && !current.finished) return;
  $("generate").disabled = true;
  setMessage("Uploading…");
  let accepted;
  try {
    accepted = await callJson("/lego", { method: "POST", body: formData(page) });
  } catch (err) {
    setMessage(`${err.message} (${err.code})`, "error");
    $("generate").disabled = false;
    return;
  }
  setMessage("");
  const job = { id: accepted.task_id, cancelled: false, finished: false, track: state.track };
  current = job;
  state.busy = true;
  player.removeTrack("stem");
  $("lane-stem").hidden = true;
  $("downloads").hidden = true;
  $("downloads").textContent = "";
  $("job-card").hidden = false;
  $("job-card").dataset.state = "running";
  $("job-id").textContent = `task ${job.id.slice(0, 8)}`;
  $("cancel").disabled = false;
  $("cancel").onclick = () => cancel(page, job);
  showProgress(page, 0, "Queued", "queued");
  const warnings = accepted.warnings || [];
  if (warnings.length) setMessage(warnings.join(" "), "");
  await poll(page, job, tick);
}

async function poll(page, job, tick) {
  const { $, setMessage, state } = page;
  let failures = 0;
  for (;;) {
    let status;
    try {
      status = await callJson(`/lego/status/${job.id}`);
      failures = 0;
    } catch (err) {
      if (job.cancelled) return;
      const transient = !(err.status >= 400 && err.status < 500) || err.retryable;
      if (transient && ++failures <= POLL_FAILURES_TOLERATED) {
        $("job-stage").textContent = `Status unavailable (${err.message}); trying again…`;
        await new Promise((r) => setTimeout(r, POLL_MS * failures));
        continue;
      }
      showProgress(page, 0, `Status unavailable: ${err.message}`, "failed");
      break;
    }
    if (job.cancelled) return;
    if (status.status === "completed") {
      showProgress(page, 100, "Done: fetching the stem…", "done");
      $("cancel").disabled = true;
      job.finished = true;
      await showResult(page, job, status, tick);
      break;
    }
    if (status.status === "failed") {
      const cancelled = status.state === "cancelled";
      showProgress(page, status.progress || 100, cancelled ? "Cancelled." : `Failed: ${status.error} (${status.error_code})`, "failed");
      $("job-card").dataset.state = cancelled ? "cancelled" : "failed";
      break;
    }
    showProgress(page, status.progress || 0, describe(status), status.status === "queued" ? "queued" : "running");
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
  job.finished = true;
  state.busy = false;
  $("cancel").disabled = true;
  $("generate").disabled = false;
  setMessage($("form-message").textContent);
}

async function cancel(page, job) {
  const { $, state } = page;
  job.cancelled = true;
  $("cancel").disabled = true;
  $("job-stage").textContent = "Cancelling: stopping the generator and freeing the GPU…";
  try {
    const answer = await callJson(`/lego/${job.id}`, { method: "DELETE" });
    showProgress(page, Number($("progress").getAttribute("aria-valuenow")),
      answer.status === "cancelled" ? "Cancelled: the GPU is free." : `Cancel requested (${answer.status}).`, "failed");
    $("job-card").dataset.state = "cancelled";
  } catch (err) {
    $("job-stage").textContent = `Cancel failed: ${err.message}`;
  }
  job.finished = true;
  state.busy = false;
  $("generate").disabled = false;
}

async function showResult(page, job, status, tick) {
  const { $, player, views, state, trackLabel } = page;
  const candidates = [];
  for (const [i, url] of status.audio_urls.entries()) {
    const resp = await call(url, { accept: "audio/*" });
    const blob = await resp.blob();
    const name = fileName(resp, `lego-${job.track}-${job.id.slice(0, 8)}-${i}.${status.audio_format}`);
    let buffer = null;
    try { buffer = await decodeAudio(await blob.arrayBuffer()); } catch { /* MP3/FLAC the browser cannot decode: still downloadable */ }
    candidates.push({ blob, name, buffer, url: URL.createObjectURL(blob) });
  }
  const downloads = $("downloads");
  for (const [i, c] of candidates.entries()) {
    const a = document.createElement("a");
    a.href = c.url;
    a.download = c.name;
    a.className = "chip";
    a.dataset.testid = `download-${i}`;
    a.textContent = `Download ${candidates.length > 1 ? "ABCD"[i] + " " : ""}(${status.audio_format.toUpperCase()}, ${(c.blob.size / 1048576).toFixed(2)} MB)`;
    downloads.append(a);
  }
  downloads.hidden = false;
  const ab = $("ab");
  ab.textContent = "";
  const choose = (i) => {
    for (const [j, b] of [...ab.children].entries()) b.setAttribute("aria-pressed", String(i === j));
    const c = candidates[i];
    views.stem.setBuffer(c.buffer, state.duration || (c.buffer && c.buffer.duration));
    if (c.buffer) player.setTrack("stem", c.buffer);
    $("lane-stem").dataset.candidate = String(i);
    tick();
  };
  if (candidates.length > 1) {
    for (const i of candidates.keys()) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = "ABCD"[i];
      b.dataset.testid = `candidate-${i}`;
      b.addEventListener("click", () => choose(i));
      ab.append(b);
    }
  }
  ab.hidden = candidates.length < 2;
  $("stem-name").textContent = `${trackLabel(job.track)} · seed ${status.seed}`;
  $("lane-stem").hidden = false;
  choose(0);
  $("play").disabled = $("rewind").disabled = false;
  $("job-stage").textContent = `Done: ${candidates.length} candidate${candidates.length > 1 ? "s" : ""}, ${status.sample_rate} Hz, ${status.duration.toFixed(2)} s.`;
  $("job-card").dataset.state = "completed";
}
