// The console dashboard: live and recent figures from GET /api/dashboard (Postgres and the Redis registry),
// charted with uPlot (vendored: /static/vendor/uPlot.iife.min.js, a global loaded before this module).
const $ = (id) => document.getElementById(id);
const charts = {};
const view = { timer: 0, get: null, showError: null, last: null };
window.consoleDashboard = view; // for tests

const BLUE = "#2a5db0", RED = "#b0332a", ORANGE = "#d98324", GREEN = "#2f6f4f";

function ms(s) { return s == null ? "–" : `${Math.round(s * 1000)} ms`; }

function tile(label, value, note, warn = false) {
  const div = document.createElement("div");
  div.className = `tile${warn ? " warn" : ""}`;
  const v = document.createElement("div");
  v.className = "tile-value";
  v.textContent = value;
  const l = document.createElement("div");
  l.className = "tile-label";
  l.textContent = label;
  div.append(v, l);
  if (note) {
    const n = document.createElement("div");
    n.className = "tile-note";
    n.textContent = note;
    div.append(n);
  }
  return div;
}

function renderTiles(d) {
  const t = d.totals, live = d.active_calls;
  const states = Object.entries(live.by_state).map(([k, v]) => `${v} ${k}`).join(", ");
  const findings = d.dlp_findings.reduce((n, f) => n + f.transcript + f.audio, 0);
  $("tiles").replaceChildren(
    tile("active calls", live.available ? String(live.total) : "?", live.available ? states : "registry unavailable"),
    tile(`calls, last ${d.hours} h`, String(t.calls), `${t.ended} ended`),
    tile("voice-to-voice p50", ms(t.voice_to_voice_p50_s), `${t.latency_turns} replies`),
    tile("voice-to-voice p95", ms(t.voice_to_voice_p95_s), "end of speech → first audio sent"),
    tile("barge-ins", String(t.barge_ins), `of ${t.agent_turns} agent turns`),
    tile("errors", String(d.errors.total), `${d.errors.ended_in_error} ended in error, ${d.errors.lost} lost`,
      d.errors.total > 0),
    tile("DLP findings", String(findings), `${d.dlp_findings.length} type${d.dlp_findings.length === 1 ? "" : "s"}`),
  );
  $("dash-reasons").textContent = "End reasons: " +
    (Object.entries(d.end_reasons).map(([k, v]) => `${k || "not ended"} ${v}`).join(" · ") || "none");
}

function bars(label, colour, size, align = 0) {
  return { label, fill: colour, stroke: colour, points: { show: false },
    paths: uPlot.paths.bars({ size: [size, 48], align }) };
}

function chart(id, opts, data) {
  const root = $(id);
  const width = Math.max(280, root.clientWidth || 480);
  if (charts[id]) charts[id].destroy();
  charts[id] = new uPlot({ width, height: 200, legend: { show: true }, cursor: { drag: { x: false } }, ...opts },
    data, root);
}

function renderCharts(d) {
  const hours = d.hourly.map((h) => Date.parse(h.hour) / 1000);
  const nullable = (v) => (v == null ? null : Math.round(v * 1000));
  chart("chart-calls", {
    series: [{}, bars("calls", BLUE, 0.7)],
    axes: [{}, { label: "calls", size: 50 }],
    scales: { y: { range: (u, lo, hi) => [0, Math.max(1, hi)] } },
  }, [hours, d.hourly.map((h) => h.calls)]);
  chart("chart-latency", {
    series: [{},
      { label: "p50 ms", stroke: BLUE, width: 2, points: { show: true, size: 9, fill: BLUE }, spanGaps: true },
      { label: "p95 ms", stroke: ORANGE, width: 2, points: { show: true, size: 9, fill: ORANGE }, spanGaps: true }],
    axes: [{}, { label: "ms", size: 56 }],
    scales: { y: { range: (u, lo, hi) => [0, Math.max(100, hi ?? 0)] } },
  }, [hours, d.hourly.map((h) => nullable(h.p50_s)), d.hourly.map((h) => nullable(h.p95_s))]);
  chart("chart-problems", {
    series: [{},
      bars("barge-ins", ORANGE, 0.35, -1), bars("errors", RED, 0.35, 1)],
    axes: [{}, { label: "per hour", size: 50 }],
    scales: { y: { range: (u, lo, hi) => [0, Math.max(1, hi)] } },
  }, [hours, d.hourly.map((h) => h.barge_ins), d.hourly.map((h) => h.errors)]);
  const types = d.dlp_findings.map((f) => f.entity_type);
  const xs = types.map((_, i) => i);
  chart("chart-dlp", {
    scales: { x: { time: false, range: () => [-0.5, Math.max(0.5, types.length - 0.5)] },
      y: { range: (u, lo, hi) => [0, Math.max(1, hi)] } },
    series: [{},
      bars("in transcripts", BLUE, 0.35, -1), bars("in recordings", GREEN, 0.35, 1)],
    axes: [{ splits: () => xs, values: (u, splits) => splits.map((i) => types[i] ?? "") },
      { label: "findings", size: 50 }],
  }, [xs, d.dlp_findings.map((f) => f.transcript), d.dlp_findings.map((f) => f.audio)]);
}

async function refresh(event) {
  event?.preventDefault();
  const params = new URLSearchParams({ hours: $("dash-hours").value });
  if ($("dash-persona").value.trim()) params.set("persona", $("dash-persona").value.trim());
  try {
    const d = await view.get(`/api/dashboard?${params}`);
    view.last = d;
    renderTiles(d);
    renderCharts(d);
    $("dash-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) { view.showError(err.message); }
}

// Show the dashboard and refresh it every 15 s while it is shown; `get(path)` fetches JSON with the login.
export function showDashboard(get, showError) {
  view.get = get;
  view.showError = showError;
  clearInterval(view.timer);
  view.timer = setInterval(() => { if (!$("dashboard").hidden) refresh(); }, 15000);
  return refresh();
}

export function hideDashboard() { clearInterval(view.timer); }

$("dash-form").addEventListener("submit", refresh);
$("dash-hours").addEventListener("change", refresh);
window.addEventListener("resize", () => { if (view.last && !$("dashboard").hidden) renderCharts(view.last); });
