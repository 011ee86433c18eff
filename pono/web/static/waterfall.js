// The per-turn latency waterfall: one bar per stage of a reply, on one time scale for the whole call, so a slow
// turn and a slow stage both stand out. Marks are seconds after the caller stopped speaking (see README, latency).
export const STAGES = [
  { mark: "speech_end", label: "end of speech" },      // the end-of-turn wait (hangover, end-of-turn model)
  { mark: "stt_final", label: "STT final" },
  { mark: "llm_first_token", label: "LLM first token" },
  { mark: "first_sentence", label: "first sentence" },
  { mark: "tts_first_audio", label: "TTS first audio" },
  { mark: "first_audio_sent", label: "first audio sent" },
];

// Stages overlap (STT starts in the pause, a preemptive reply before the turn is sure to have ended): a stage's
// bar starts where the last stage that finished before it finished (0 when none did), and ends at its mark.
export function stageBars(marks) {
  const bars = [];
  const done = [];
  for (const { mark, label } of STAGES) {
    const end = marks[mark];
    if (typeof end !== "number") continue;
    const start = Math.max(0, ...done.filter((t) => t <= end));
    bars.push({ mark, label, start, end: Math.max(end, 0), ms: Math.round((Math.max(end, 0) - start) * 1000) });
    done.push(end);
  }
  return bars;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// A waterfall in `root`: add(turn, marks) for each reply, in any order; clear() empties it.
export function createWaterfall(root) {
  const turns = new Map();
  function render() {
    root.textContent = "";
    const rows = [...turns.entries()].sort((a, b) => a[0] - b[0]);
    root.hidden = rows.length === 0;
    const scale = Math.max(0.5, ...rows.flatMap(([, bars]) => bars.map((b) => b.end)));
    for (const [turn, bars] of rows) {
      const block = el("div", "wf-turn");
      block.dataset.turn = turn;
      const total = bars.find((b) => b.mark === "first_audio_sent");
      block.append(el("div", "wf-title", `Turn ${turn}` + (total ? ` · ${Math.round(total.end * 1000)} ms to first audio` : "")));
      const slowest = bars.reduce((a, b) => (b.ms > (a ? a.ms : -1) ? b : a), null);
      for (const bar of bars) {
        const row = el("div", "wf-row");
        row.dataset.stage = bar.mark;
        row.append(el("span", "wf-label", bar.label));
        const track = el("span", "wf-track");
        const fill = el("span", `wf-bar wf-${bar.mark}` + (bar === slowest ? " wf-slowest" : ""));
        fill.style.left = `${(bar.start / scale) * 100}%`;
        fill.style.width = `${Math.max(0.4, ((bar.end - bar.start) / scale) * 100)}%`;
        fill.title = `${bar.label}: ${bar.ms} ms (${Math.round(bar.start * 1000)}–${Math.round(bar.end * 1000)} ms)`;
        track.append(fill);
        row.append(track, el("span", "wf-ms", `${bar.ms} ms`));
        block.append(row);
      }
      root.append(block);
    }
  }
  return {
    add(turn, marks) {
      const bars = stageBars(marks || {});
      if (bars.length) { turns.set(Number(turn), bars); render(); }
    },
    clear() { turns.clear(); render(); },
  };
}
