// The operator console: log in, watch live calls on every replica, open one, act on it, search history.
import { showRuns, showSummary } from "./workflows.js";
import { hideRecording, showRecording } from "./player.js";
import { createWaterfall } from "./waterfall.js";
import { hideDashboard, showDashboard } from "./dashboard.js";
const $ = (id) => document.getElementById(id);
const state = { access: null, refresh: null, socket: null, calls: new Map(), open: null, iceServers: [],
  listenPeak: 0, listenPc: null, talkPc: null, refs: 0, pending: new Map(), agentLines: new Map(),
  userLines: new Map() };
window.consoleState = state; // for tests and curious operators
const waterfall = createWaterfall(document.getElementById("waterfall"));

function showError(message) { $("error").textContent = message || ""; }

// -- auth ------------------------------------------------------------------------------------
async function post(path, body, auth = true) {
  const headers = { "Content-Type": "application/json" };
  if (auth && state.access) headers.Authorization = `Bearer ${state.access}`;
  const res = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
  const data = res.status === 204 ? {} : await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.error || `${path} failed with ${res.status}`);
  return data;
}

// A GET with the login's token (renewed once on a 401): the response; an Error with the API's message otherwise.
async function fetchAuthed(path) {
  const res = await fetch(path, { headers: { Authorization: `Bearer ${state.access}` } });
  if (res.status === 401 && state.refresh) { await refresh(); return fetchAuthed(path); }
  if (!res.ok) {
    const data = await res.json().catch(() => ({}));
    throw new Error(data.error || `${path} failed with ${res.status}`);
  }
  return res;
}

async function get(path) {
  return (await fetchAuthed(path)).json().catch(() => ({}));
}

function keepTokens(data) {
  state.access = data.access_token;
  state.refresh = data.refresh_token;
  state.mustChangePassword = Boolean(data.password_change_required);
  sessionStorage.setItem("pono.refresh", data.refresh_token);
  clearTimeout(state.refreshTimer);
  // Rotate a minute before the access token expires; the refresh token is single-use.
  state.refreshTimer = setTimeout(() => refresh().catch(() => logout()), Math.max(10, data.expires_in - 60) * 1000);
  $("who").textContent = `${data.user.name} (${data.user.role})`;
}

async function refresh() {
  keepTokens(await post("/api/auth/refresh", { refresh_token: state.refresh }, false));
  if (state.socket && state.socket.readyState === WebSocket.OPEN) send({ type: "auth", token: state.access });
}

async function login(event) {
  event.preventDefault();
  $("login-error").textContent = "";
  try {
    const session = await post("/api/auth/login", { name: $("login-name").value, password: $("login-password").value }, false);
    keepTokens(session);
    $("new-password-current").value = $("login-password").value;
    enterOrChangePassword();
  } catch (err) {
    $("login-error").textContent = err.message;
  }
}

async function logout() {
  if (state.refresh) await post("/api/auth/logout", { refresh_token: state.refresh }, false).catch(() => {});
  sessionStorage.removeItem("pono.refresh");
  location.reload();
}

async function changePassword(event) {
  event.preventDefault();
  $("new-password-error").textContent = "";
  try {
    keepTokens(await post("/api/auth/password", { current_password: $("new-password-current").value,
      new_password: $("new-password-value").value }));
    $("new-password").hidden = true;
    enter();
  } catch (err) {
    $("new-password-error").textContent = err.message;
  }
}

function enterOrChangePassword() {
  if (!state.mustChangePassword) return enter();
  $("login").hidden = true;  // a one-time password: nothing else is allowed until it is changed
  $("new-password").hidden = false;
}

function enter() {
  $("login").hidden = true;
  $("app").hidden = false;
  connect();
}

// -- live feed -------------------------------------------------------------------------------
function send(message) { state.socket.send(JSON.stringify(message)); }

function connect() {
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/console/ws`);
  state.socket = socket;
  socket.onopen = () => send({ type: "auth", token: state.access });
  socket.onmessage = (m) => onMessage(JSON.parse(m.data));
  socket.onclose = (e) => {
    $("feed-status").textContent = `disconnected${e.reason ? `: ${e.reason}` : ""}; reconnecting…`;
    setTimeout(() => { if (state.socket === socket) connect(); }, 2000);
  };
}

function onMessage(m) {
  switch (m.type) {
    case "hello":
      $("feed-status").textContent = "live";
      state.iceServers = m.ice_servers || [];
      if (state.open) send({ type: "watch", call_id: state.open });
      break;
    case "calls":
      state.calls = new Map(m.calls.map((c) => [c.call_id, c]));
      renderCalls();
      break;
    case "call.added": case "call.updated":
      state.calls.set(m.call.call_id, m.call);
      renderCalls();
      break;
    case "call.removed":
      state.calls.delete(m.call_id);
      renderCalls();
      if (state.open === m.call_id) note("the call ended");
      break;
    case "watching":
      $("transcript").textContent = "";
      $("latency").tBodies[0].textContent = "";
      waterfall.clear();
      for (const t of m.turns) line(t.role, t.text);
      break;
    case "event":
      if (m.call_id === state.open) onEvent(m.event);
      break;
    case "action.result": case "action.error":
      state.pending.get(m.ref)?.(m);
      state.pending.delete(m.ref);
      break;
    case "error":
      showError(m.error);
      break;
  }
}

function duration(call) {
  const s = Math.max(0, Math.round(Date.now() / 1000 - Number(call.started)));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function renderCalls() {
  const body = $("calls").tBodies[0];
  body.textContent = "";
  const calls = [...state.calls.values()].sort((a, b) => Number(b.started) - Number(a.started));
  $("no-calls").hidden = calls.length > 0;
  for (const call of calls) {
    const row = body.insertRow();
    row.dataset.callId = call.call_id;
    row.className = call.call_id === state.open ? "selected" : "";
    let state_ = call.operator_requested ? `${call.state} · wants an operator` : call.state;
    if (call.replica_draining) state_ += " · replica draining";
    for (const value of [call.caller || "anonymous", call.transport, call.persona, duration(call), state_,
      call.last_latency_ms ? `${call.last_latency_ms} ms` : "–", call.replica]) {
      row.insertCell().textContent = value;
    }
    row.addEventListener("click", () => openCall(call.call_id));
  }
  if (state.open && state.calls.has(state.open)) $("call-state").textContent = state.calls.get(state.open).state;
}
setInterval(() => { if (state.calls.size) renderCalls(); }, 1000);

// -- one call --------------------------------------------------------------------------------
function openCall(callId) {
  stopMedia();
  hideRecording();
  state.open = callId;
  state.agentLines.clear();
  state.userLines.clear();
  $("call").hidden = false;
  $("call-id").textContent = callId.slice(0, 8);
  $("actions").hidden = false;
  $("say").hidden = false;
  send({ type: "watch", call_id: callId });
  renderCalls();
}

function line(role, text, extra = "") {
  const div = document.createElement("div");
  div.className = `line ${role} ${extra}`.trim();
  div.textContent = text;
  $("transcript").append(div);
  $("transcript").scrollTop = $("transcript").scrollHeight;
  return div;
}

function note(text, kind = "note") { line(kind, text); }

function dlpBadge(div, types, where = "") {
  if (!types || !types.length) return;
  const badge = document.createElement("span");
  badge.className = "dlp";
  badge.textContent = `redacted${where ? ` ${where}` : ""}: ${types.join(", ")}`;
  div.append(badge);
}

function onEvent(e) {
  const partial = $("transcript").querySelector(".line.partial");
  switch (e.type) {
    case "transcript.partial":
      (partial || line("user", "", "partial")).textContent = e.text;
      break;
    case "transcript.final":
      partial?.remove();
      if (e.text) {
        const div = line("user", e.text);
        state.userLines.set(e.turn, div);
        dlpBadge(div, e.dlp);
      }
      break;
    case "dlp.redacted":  // personal data that came in pieces: the earlier turns are shown redacted too
      for (const [turn, text] of Object.entries(e.turns)) {
        const div = state.userLines.get(Number(turn));
        if (div) { div.textContent = text; dlpBadge(div, [...new Set(e.findings.map((f) => f.entity_type))]); }
      }
      break;
    case "agent.delta": {
      const div = state.agentLines.get(e.turn) || line("agent", "");
      state.agentLines.set(e.turn, div);
      div.textContent = e.cumulative ? e.text : div.textContent + e.text;
      break;
    }
    case "agent.final": {
      const div = state.agentLines.get(e.turn) || line("agent", "");
      state.agentLines.set(e.turn, div);
      div.textContent = e.text;
      if (e.interrupted) div.classList.add("interrupted");
      dlpBadge(div, e.dlp);
      break;
    }
    case "tool.call":
      note(`→ tool ${e.name}(${JSON.stringify(e.arguments)})`, "tool");
      break;
    case "tool.result":
      note(`← ${e.name}: ${e.error ? `error: ${e.error}` : JSON.stringify(e.result)}`, "tool");
      break;
    case "knowledge.used":
      note(`knowledge: ${e.documents.map((d) => d.title || d.document).join(", ")}`, "knowledge");
      break;
    case "operator.action":
      note(`operator ${e.actor}: ${e.action.replace("_", " ")}`, "operator");
      break;
    case "call.transfer_requested":
      note(`the agent asks for an operator: ${e.reason || ""}`, "operator");
      break;
    case "call.state":
      $("call-state").textContent = e.state;
      break;
    case "latency":
      latencyRow(e.turn, e.marks);
      break;
    case "call.ended":
      note(`call ended (${e.reason})`);
      stopMedia();
      break;
  }
}

function latencyRow(turn, marks) {
  const row = $("latency").tBodies[0].insertRow();
  const ms = (k) => (marks[k] === undefined ? "–" : Math.round(marks[k] * 1000));
  for (const v of [turn, ms("stt_final"), ms("llm_first_token"), ms("first_sentence"), ms("tts_first_audio"),
    ms("first_audio_sent")]) row.insertCell().textContent = v;
  waterfall.add(turn, marks);
}

function action(name, extra = {}) {
  const ref = ++state.refs;
  return new Promise((resolve, reject) => {
    state.pending.set(ref, (m) => (m.type === "action.result" ? resolve(m) : reject(new Error(m.error))));
    send({ type: "action", action: name, call_id: state.open, ref, ...extra });
  });
}

async function offerFor(pc) {
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && resolve());
    setTimeout(resolve, 3000);
  });
  return pc.localDescription.sdp;
}

function play(pc) {
  pc.ontrack = (e) => {
    const stream = e.streams[0] || new MediaStream([e.track]);
    const player = new Audio();
    player.srcObject = stream;
    player.play().catch(() => {});
    const ctx = new AudioContext();
    const analyser = ctx.createAnalyser();
    ctx.createMediaStreamSource(stream).connect(analyser);
    const buf = new Float32Array(analyser.fftSize);
    const tick = () => {
      if (pc.connectionState === "closed") return;
      analyser.getFloatTimeDomainData(buf);
      const rms = Math.sqrt(buf.reduce((s, v) => s + v * v, 0) / buf.length);
      state.listenPeak = Math.max(state.listenPeak, rms);
      requestAnimationFrame(tick);
    };
    tick();
    state.players = [...(state.players || []), player, ctx];
  };
}

async function toggleListen() {
  if (state.listenPc) { stopMedia("listen"); return; }
  const pc = new RTCPeerConnection({ iceServers: state.iceServers });
  pc.addTransceiver("audio", { direction: "recvonly" });
  play(pc);
  state.listenPc = pc;
  try {
    const answer = await action("listen", { sdp: await offerFor(pc) });
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    $("listen").classList.add("active");
    $("listen").textContent = "Stop listening";
  } catch (err) { stopMedia("listen"); showError(err.message); }
}

async function toggleTakeOver() {
  if (state.talkPc) {
    stopMedia("talk");
    await action("hand_back").catch((err) => showError(err.message));
    return;
  }
  try {
    stopMedia("listen"); // the take-over connection carries the call's audio too
    const mic = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true } });
    const pc = new RTCPeerConnection({ iceServers: state.iceServers });
    for (const track of mic.getAudioTracks()) pc.addTrack(track, mic);
    play(pc);
    state.talkPc = pc;
    state.mic = mic;
    const answer = await action("take_over", { sdp: await offerFor(pc) });
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    $("take-over").classList.add("active");
    $("take-over").textContent = "Hand back to the agent";
  } catch (err) { stopMedia("talk"); showError(err.message); }
}

function stopMedia(which) {
  if (which !== "talk" && state.listenPc) {
    state.listenPc.close();
    state.listenPc = null;
    $("listen").classList.remove("active");
    $("listen").textContent = "Listen";
  }
  if (which !== "listen" && state.talkPc) {
    state.talkPc.close();
    state.talkPc = null;
    state.mic?.getTracks().forEach((t) => t.stop());
    $("take-over").classList.remove("active");
    $("take-over").textContent = "Take over";
  }
}

async function say(event) {
  event.preventDefault();
  const text = $("say-text").value.trim();
  if (!text) return;
  try {
    await action("say", { text });
    $("say-text").value = "";
  } catch (err) { showError(err.message); }
}

async function hangUp() {
  try { await action("hang_up"); } catch (err) { showError(err.message); }
}

// -- history ---------------------------------------------------------------------------------
async function search(event) {
  event?.preventDefault();
  const params = new URLSearchParams({ state: "ended", limit: "50" });
  if ($("search-q").value) params.set("q", $("search-q").value);
  if ($("search-persona").value) params.set("persona", $("search-persona").value);
  if ($("search-since").value) params.set("since", new Date($("search-since").value).toISOString());
  if ($("search-until").value) params.set("until", new Date($("search-until").value).toISOString());
  try {
    const { calls } = await get(`/api/calls?${params}`);
    const body = $("results").tBodies[0];
    body.textContent = "";
    for (const c of calls) {
      const row = body.insertRow();
      row.dataset.callId = c.id;
      for (const v of [new Date(c.started_at).toLocaleString(), c.caller || "", c.transport, c.persona || "",
        c.end_reason || ""]) row.insertCell().textContent = v;
      row.addEventListener("click", () => openHistory(c.id));
    }
  } catch (err) { showError(err.message); }
}

async function openHistory(callId) {
  stopMedia();
  state.open = null;
  send({ type: "unwatch" });
  try {
    const call = await get(`/api/calls/${encodeURIComponent(callId)}`);
    $("call").hidden = false;
    $("actions").hidden = true;
    $("say").hidden = true;
    $("call-id").textContent = callId.slice(0, 8);
    $("call-state").textContent = call.end_reason || "ended";
    showSummary(call);
    $("transcript").textContent = "";
    $("latency").tBodies[0].textContent = "";
    waterfall.clear();
    for (const t of call.turns) {
      const div = line(t.role, t.text, t.interrupted ? "interrupted" : "");
      div.dataset.turn = t.index;
      const types = call.dlp_findings.filter((f) => f.turn === t.index && !f.channel).map((f) => f.entity_type);
      dlpBadge(div, [...new Set(types)]);
      const audio = call.dlp_findings.filter((f) => f.turn === t.index && f.channel).map((f) => f.entity_type);
      dlpBadge(div, [...new Set(audio)], "in the recording");
      if (t.role === "agent" && Object.keys(t.latency).length) latencyRow(t.index, t.latency);
    }
    for (const tool of call.tool_calls) note(`tool ${tool.name} (turn ${tool.turn})`, "tool");
    $("transcript").scrollTop = 0;
    await showRecording(call, fetchAuthed);
  } catch (err) { showError(err.message); }
}

function tab(name) {
  $("live").hidden = name !== "live";
  $("history").hidden = name !== "history";
  $("workflows").hidden = name !== "workflows";
  $("dashboard").hidden = name !== "dashboard";
  $("app").dataset.tab = name; // the dashboard hides the open call (review.css)
  $("tab-live").classList.toggle("active", name === "live");
  $("tab-history").classList.toggle("active", name === "history");
  $("tab-workflows").classList.toggle("active", name === "workflows");
  $("tab-dashboard").classList.toggle("active", name === "dashboard");
  if (name === "history") search();
  if (name === "workflows") showRuns(get, post, showError);
  if (name === "dashboard") showDashboard(get, showError); else hideDashboard();
}

$("login").addEventListener("submit", login);
$("new-password").addEventListener("submit", changePassword);
$("logout").addEventListener("click", logout);
$("tab-live").addEventListener("click", () => tab("live"));
$("tab-history").addEventListener("click", () => tab("history"));
$("tab-workflows").addEventListener("click", () => tab("workflows"));
$("tab-dashboard").addEventListener("click", () => tab("dashboard"));
$("listen").addEventListener("click", toggleListen);
$("take-over").addEventListener("click", toggleTakeOver);
$("hang-up").addEventListener("click", hangUp);
$("say").addEventListener("submit", say);
$("search").addEventListener("submit", search);

// A reload keeps the session: the stored refresh token buys a new access token.
const saved = sessionStorage.getItem("pono.refresh");
if (saved) {
  state.refresh = saved;
  refresh().then(enterOrChangePassword).catch(() => sessionStorage.removeItem("pono.refresh"));
}
