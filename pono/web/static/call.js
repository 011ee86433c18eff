// Pono call page: WebRTC audio + a data channel for text and the call's event stream.
"use strict";

const $ = (id) => document.getElementById(id);
const MARKS = ["speech_end", "stt_final", "llm_first_token", "first_sentence", "tts_first_audio", "first_audio_sent"];

// Exposed for people poking in devtools and for the browser tests.
const pono = (window.pono = { events: [], micRms: 0, remoteRms: 0, remoteRmsMax: 0, callId: null, state: "idle" });

let pc = null, channel = null, token = null, localStream = null, audioCtx = null, meterTimer = null;
let userPartial = null;
const agentLines = new Map(); // turn → element

function setStatus(text) { pono.state = text; $("status").textContent = text; }
function showError(text) { $("error").textContent = text || ""; }

function line(kind, text, extra) {
  const el = document.createElement("div");
  el.className = `line ${kind}${extra ? " " + extra : ""}`;
  el.textContent = text;
  $("transcript").appendChild(el);
  $("transcript").scrollTop = $("transcript").scrollHeight;
  return el;
}

// A link to the call page may name a persona: /?persona=bistro
const persona = new URLSearchParams(location.search).get("persona") || undefined;

async function api(method, path, body) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.error || `${method} ${path} failed with ${res.status}`);
  return data;
}

function rms(analyser, buffer) {
  analyser.getFloatTimeDomainData(buffer);
  let sum = 0;
  for (const v of buffer) sum += v * v;
  return Math.sqrt(sum / buffer.length);
}

function watchLevels(remoteStream) {
  const micAnalyser = audioCtx.createAnalyser();
  audioCtx.createMediaStreamSource(localStream).connect(micAnalyser);
  const remoteAnalyser = audioCtx.createAnalyser();
  audioCtx.createMediaStreamSource(remoteStream).connect(remoteAnalyser);
  const buffer = new Float32Array(micAnalyser.fftSize);
  meterTimer = setInterval(() => {
    pono.micRms = rms(micAnalyser, buffer);
    pono.remoteRms = rms(remoteAnalyser, buffer);
    pono.remoteRmsMax = Math.max(pono.remoteRmsMax, pono.remoteRms);
    $("mic-level").style.width = `${Math.min(100, pono.micRms * 400)}%`;
  }, 50);
}

function onEvent(ev) {
  pono.events.push(ev);
  switch (ev.type) {
    case "transcript.partial":
      if (!userPartial) userPartial = line("user", "", "partial");
      userPartial.textContent = ev.text;
      break;
    case "transcript.final":
      if (userPartial) { userPartial.remove(); userPartial = null; }
      if (ev.text) line("user", ev.text);
      break;
    case "agent.delta": {
      let el = agentLines.get(ev.turn);
      if (!el) { el = line("agent", ""); agentLines.set(ev.turn, el); }
      el.textContent += ev.text;
      break;
    }
    case "agent.final": {
      const el = agentLines.get(ev.turn) || line("agent", "");
      el.textContent = ev.text;
      if (ev.interrupted) el.classList.add("interrupted");
      break;
    }
    case "call.state":
      $("state").textContent = ev.state.replace("_", " ");
      break;
    case "latency": {
      const row = document.createElement("tr");
      const cells = [ev.turn, ...MARKS.map((m) => (m in ev.marks ? Math.round(ev.marks[m] * 1000) : "–"))];
      for (const c of cells) { const td = document.createElement("td"); td.textContent = c; row.appendChild(td); }
      $("latency").querySelector("tbody").appendChild(row);
      break;
    }
    case "error":
      showError(ev.message);
      break;
    case "call.ended":
      hangUp(false);
      break;
  }
}

function waitForIce(connection) {
  if (connection.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (connection.iceGatheringState === "complete") resolve(); };
    connection.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 3000); // don't hang on a slow STUN server: host candidates are enough to start
  });
}

async function startCall() {
  showError("");
  setStatus("connecting");
  $("call").disabled = true;
  try {
    token = (await api("POST", `/api/call-tokens${persona ? `?persona=${encodeURIComponent(persona)}` : ""}`)).token;
    const { iceServers } = await api("GET", "/api/ice-servers");
    localStream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    audioCtx = new AudioContext();
    pc = new RTCPeerConnection({ iceServers });
    for (const track of localStream.getAudioTracks()) pc.addTrack(track, localStream);
    channel = pc.createDataChannel("pono");
    channel.onmessage = (m) => onEvent(JSON.parse(m.data));
    channel.onopen = () => { $("text").disabled = false; $("send").disabled = false; };
    pc.ontrack = (e) => {
      const remote = e.streams[0] || new MediaStream([e.track]);
      const player = new Audio();
      player.srcObject = remote; // Chrome feeds remote WebRTC audio to WebAudio only if an element plays it
      player.play().catch(() => {});
      pono.player = player;
      watchLevels(remote);
    };
    pc.onconnectionstatechange = () => {
      if (["failed", "closed"].includes(pc?.connectionState)) hangUp(false);
      else if (pc) setStatus(pc.connectionState);
    };
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIce(pc);
    const answer = await api("POST", "/api/calls", { sdp: pc.localDescription.sdp, type: "offer", persona });
    pono.callId = answer.call_id;
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    $("call").textContent = "End call";
    $("call").classList.add("active");
  } catch (err) {
    showError(err.message);
    hangUp(false);
  } finally {
    $("call").disabled = false;
  }
}

function hangUp(tellServer = true) {
  if (tellServer && pono.callId) api("DELETE", `/api/calls/${pono.callId}`).catch(() => {});
  clearInterval(meterTimer);
  if (pc) { pc.close(); pc = null; }
  if (localStream) localStream.getTracks().forEach((t) => t.stop());
  if (audioCtx) { audioCtx.close(); audioCtx = null; }
  channel = null;
  pono.callId = null;
  $("text").disabled = true;
  $("send").disabled = true;
  $("call").textContent = "Start call";
  $("call").classList.remove("active");
  $("mic-level").style.width = "0";
  setStatus("idle");
}

$("call").addEventListener("click", () => (pc ? hangUp() : startCall()));
$("text-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("text").value.trim();
  if (!text || !channel || channel.readyState !== "open") return;
  channel.send(JSON.stringify({ type: "text", text }));
  $("text").value = "";
});
