// A recorded call in the console: the recording in an <audio> element, its two-channel waveform (caller above,
// agent below; peaks computed by the server, so the browser never decodes the file to draw it), the spans
// redacted in the audio drawn in their channel's lane, and the transcript aligned to it: a click on a turn seeks
// there, and the turn being heard is highlighted while it plays.
const $ = (id) => document.getElementById(id);
const LANES = ["caller", "agent"];
const COLORS = { caller: "#2f6f4f", agent: "#2a5db0" };
// A spoken caller turn starts (is stored from) when the VAD was sure of speech, a moment after the first word
// began: it is played from this much earlier.
export const CALLER_LEAD_S = 0.5;

const state = { url: null, peaks: null, zero: 0, turns: [], current: null, raf: 0, callId: null };
window.consolePlayer = state; // for tests

function seconds(iso) { return Date.parse(iso) / 1000; }
function clock(s) { return `${Math.floor(s / 60)}:${String(Math.floor(s % 60)).padStart(2, "0")}`; }

function draw() {
  const canvas = $("waveform-canvas");
  const peaks = state.peaks;
  const dpr = window.devicePixelRatio || 1;
  const width = Math.max(1, Math.round(canvas.clientWidth * dpr));
  const height = Math.max(1, Math.round(canvas.clientHeight * dpr));
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  if (!peaks || !peaks.buckets) return;
  const lane = height / 2;
  let loudest = 0.05; // one scale for both lanes, so their loudness compares; quiet calls still show
  for (const name of LANES) for (const v of [...peaks.channels[name].max, ...peaks.channels[name].min]) loudest = Math.max(loudest, Math.abs(v));
  const gain = (lane / 2 - 2) / loudest;
  LANES.forEach((name, i) => {
    const mid = lane * i + lane / 2;
    ctx.fillStyle = i ? "#f1f5fd" : "#f1f8f4";
    ctx.fillRect(0, lane * i, width, lane);
    ctx.fillStyle = COLORS[name];
    const { min, max } = peaks.channels[name];
    const step = width / peaks.buckets;
    for (let b = 0; b < peaks.buckets; b++) {
      const top = mid - max[b] * gain;
      const bottom = mid - min[b] * gain;
      ctx.fillRect(b * step, top, Math.max(1, step), Math.max(1, bottom - top));
    }
  });
  ctx.fillStyle = "#c9cfdb";
  ctx.fillRect(0, lane - dpr / 2, width, Math.max(1, dpr));
}

function markRedactions(findings) {
  const marks = $("waveform-marks");
  marks.textContent = "";
  const duration = state.peaks.duration_s;
  for (const f of findings) {
    if (!f.channel || f.audio_start_ms == null || !duration) continue;
    const div = document.createElement("div");
    div.className = `redaction ${f.channel}`;
    div.dataset.channel = f.channel;
    div.dataset.startMs = f.audio_start_ms;
    div.dataset.endMs = f.audio_end_ms;
    div.style.left = `${Math.min(100, (f.audio_start_ms / 1000 / duration) * 100)}%`;
    div.style.width = `${Math.max(0.3, ((f.audio_end_ms - f.audio_start_ms) / 1000 / duration) * 100)}%`;
    div.title = `${f.entity_type} replaced by ${f.action} (${clock(f.audio_start_ms / 1000)}–${clock(f.audio_end_ms / 1000)})`;
    div.textContent = f.entity_type;
    marks.append(div);
  }
}

function align(call) {
  state.turns = [];
  for (const t of call.turns) {
    const line = document.querySelector(`#transcript .line[data-turn="${t.index}"]`);
    if (!t.started_at || !line) continue;
    const lead = t.role === "user" && t.source === "voice" ? CALLER_LEAD_S : 0;
    const start = Math.max(0, seconds(t.started_at) - state.zero - lead);
    const end = t.ended_at ? Math.max(start, seconds(t.ended_at) - state.zero) : start + 1;
    const turn = { index: t.index, role: t.role, start, end, line };
    line.classList.add("seekable");
    line.dataset.offset = start.toFixed(3);
    line.title = `play from ${clock(start)}`;
    line.addEventListener("click", () => seek(turn.start));
    state.turns.push(turn);
  }
}

function seek(t) {
  const audio = $("player");
  audio.currentTime = Math.max(0, Math.min(t, state.peaks ? state.peaks.duration_s : t));
  follow();
}

// The playhead and the turn being heard, from the audio element's position.
function follow() {
  const audio = $("player");
  const t = audio.currentTime;
  const duration = state.peaks ? state.peaks.duration_s : 0;
  $("playhead").style.left = `${duration ? Math.min(100, (t / duration) * 100) : 0}%`;
  $("recording-time").textContent = `${clock(t)} / ${clock(duration)}`;
  let now = null;
  for (const turn of state.turns) if (turn.start <= t + 0.05 && t < turn.end + 0.3) now = turn;
  if (now !== state.current) {
    state.current?.line.classList.remove("current");
    now?.line.classList.add("current");
    if (now && !audio.paused) now.line.scrollIntoView({ block: "nearest" });
    state.current = now;
  }
  cancelAnimationFrame(state.raf);
  if (!audio.paused) state.raf = requestAnimationFrame(follow);
}

export function hideRecording() {
  const audio = $("player");
  audio.pause();
  if (state.url) { URL.revokeObjectURL(state.url); state.url = null; }
  audio.removeAttribute("src");
  state.peaks = null;
  state.turns = [];
  state.current = null;
  state.callId = null;
  $("recording").hidden = true;
}

// Show the recording of `call` (GET /api/calls/{id}), if it has one; `fetchAuthed(path)` GETs with the login
// (console.js's: the response, or an Error).
export async function showRecording(call, fetchAuthed) {
  hideRecording();
  if (!call.recording) return;
  state.callId = call.id;
  $("recording").hidden = false;
  $("recording-info").textContent = "loading…";
  const canvas = $("waveform-canvas");
  const buckets = Math.min(5000, Math.max(100, Math.round(canvas.clientWidth * (window.devicePixelRatio || 1))));
  const base = `/api/calls/${encodeURIComponent(call.id)}/recording`;
  const [peaks, audio] = await Promise.all([
    fetchAuthed(`${base}/peaks?buckets=${buckets}`).then((r) => r.json()),
    // The file is fetched with the login's token (an <audio src> cannot send it) and played from memory.
    fetchAuthed(base).then((r) => r.blob()),
  ]);
  if (state.callId !== call.id) return; // another call was opened meanwhile
  state.peaks = peaks;
  state.zero = seconds(peaks.time_zero);
  state.url = URL.createObjectURL(audio);
  $("player").src = state.url;
  const redacted = call.dlp_findings.filter((f) => f.channel).length;
  $("recording-info").textContent = `${clock(peaks.duration_s)} · ${call.recording.codec}, ` +
    `${Math.round((call.recording.size || audio.size) / 1024)} KB` + (redacted ? ` · ${redacted} span(s) redacted` : "");
  draw();
  markRedactions(call.dlp_findings);
  align(call);
  follow();
}

function clickWaveform(event) {
  if (!state.peaks) return;
  const box = $("waveform-canvas").getBoundingClientRect();
  seek(((event.clientX - box.left) / box.width) * state.peaks.duration_s);
}

const audio = $("player");
for (const kind of ["play", "pause", "seeked", "timeupdate", "ended"]) audio.addEventListener(kind, follow);
$("waveform").addEventListener("click", clickWaveform);
window.addEventListener("resize", () => { if (state.peaks) draw(); });
