// The console's Workflows tab: every workflow's runs (newest first) with their status and steps; a failed or
// cancelled run can be retried, a queued or running one cancelled (operators). The console gives its authenticated get/post.
const $ = (id) => document.getElementById(id);

export function showRuns(get, post, showError) {
  async function load(event) {
    event?.preventDefault();
    const params = new URLSearchParams({ limit: "50" });
    if ($("runs-status").value) params.set("status", $("runs-status").value);
    try {
      const { runs } = await get(`/api/workflow-runs?${params}`);
      const body = $("runs").tBodies[0];
      body.textContent = "";
      for (const run of runs) {
        const row = body.insertRow();
        row.dataset.runId = run.id;
        row.className = `run-${run.status}`;
        const done = run.steps.filter((s) => s.execution === run.execution && s.phase === "do");
        const steps = done.map((s) => `${s.name}: ${s.status}${s.attempts > 1 ? ` ×${s.attempts}` : ""}`).join(", ");
        for (const v of [new Date(run.created_at).toLocaleString(), run.workflow, run.trigger,
          run.call_id ? run.call_id.slice(0, 8) : "", run.status, steps, run.error || ""]) row.insertCell().textContent = v;
        const cell = row.insertCell();
        const action = (label, path) => {
          const button = document.createElement("button");
          button.type = "button";
          button.textContent = label;
          button.addEventListener("click", async () => {
            button.disabled = true;
            try { await post(path, {}); await load(); }
            catch (err) { showError(err.message); button.disabled = false; }
          });
          cell.append(button);
        };
        if ((run.status === "failed" || run.status === "cancelled") && !run.workflow_deleted) {
          action("Retry", `/api/workflows/${run.workflow_id}/runs/${run.id}/retry`);
        } else if ((run.status === "queued" || run.status === "running") && !run.cancel_reason) {
          action("Cancel", `/api/workflow-runs/${run.id}/cancel`);
        }
      }
    } catch (err) { showError(err.message); }
  }
  $("runs-filter").onsubmit = load;
  return load();
}

// A call's summary (from a workflow's summarize step) above its transcript, when it has one.
export function showSummary(call) {
  const box = $("summary");
  box.hidden = !call.summary;
  if (!call.summary) return;
  $("summary-text").textContent = call.summary.summary;
  $("summary-disposition").textContent = call.summary.disposition || "";
  const items = $("summary-items");
  items.textContent = "";
  for (const item of call.summary.action_items) items.append(Object.assign(document.createElement("li"), { textContent: item }));
}
