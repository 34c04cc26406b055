// The launcher's dashboard: plain JavaScript against the launcher's own API, no build step.
// Instances come live from the watch stream (no polling of the list); a log is followed by
// Range requests from the last offset, as `launcherctl logs -f` does.
"use strict";

const TOKEN_KEY = "vllm-launcher-token"; // kept in this tab's session storage only
const $ = (selector) => document.querySelector(selector);
const instances = new Map(); // id -> state, from the watch stream
const starts = new Map(); // id -> start_seconds of the last 20 instances that became ready
let following = null; // the instance whose log the detail page follows
let followGeneration = 0; // one log loop at a time, however the page is navigated
const deleted = new Set(); // ids the watch stream reported deleted: their logs are gone

// ------------------------------------------------------------------ API with the bearer token

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
  if (response.status === 401) {
    await askForToken();
    return api(path, options);
  }
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.detail || (body.error && body.error.message) || JSON.stringify(body);
  } catch (error) {
    return `${response.status} ${response.statusText}`;
  }
}

let tokenPrompt = null;
function askForToken() {
  // Every request that got a 401 waits for the same answer.
  if (!tokenPrompt) {
    tokenPrompt = new Promise((resolve) => {
      const dialog = $("#token-dialog");
      const form = $("#token-form");
      dialog.oncancel = (event) => event.preventDefault(); // Escape would leave every request waiting
      form.onsubmit = async (event) => {
        event.preventDefault();
        const token = form.token.value.trim();
        const check = await fetch("/v2/vllm/instances?detail=False", { headers: { Authorization: `Bearer ${token}` } });
        if (check.status === 401) {
          $("#token-error").textContent = "That token is not the launcher's.";
          return;
        }
        sessionStorage.setItem(TOKEN_KEY, token);
        dialog.close();
        tokenPrompt = null;
        resolve();
      };
      dialog.showModal();
    });
  }
  return tokenPrompt;
}

// ------------------------------------------------------------------ the watch stream

async function watch() {
  for (;;) {
    try {
      const response = await api("/v2/vllm/instances/watch");
      if (!response.ok) throw new Error(await errorText(response));
      instances.clear(); // a stream without `since` starts with a CREATED for every instance
      renderInstances();
      $("#connection").textContent = "live";
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffered = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffered += decoder.decode(value, { stream: true });
        const lines = buffered.split("\n");
        buffered = lines.pop();
        for (const line of lines) if (line.trim()) applyEvent(JSON.parse(line));
        renderInstances();
      }
    } catch (error) {
      console.warn("watch stream:", error);
    }
    $("#connection").textContent = "reconnecting…";
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function applyEvent(event) {
  const state = event.object;
  if (event.type === "ERROR") return; // the stream ends next; the reconnect lists everything again
  if (event.type === "DELETED") {
    instances.delete(state.instance_id);
    deleted.add(state.instance_id);
  } else {
    instances.set(state.instance_id, state);
    deleted.delete(state.instance_id);
  }
  if (state.start_seconds != null && !starts.has(state.instance_id)) {
    starts.set(state.instance_id, state.start_seconds);
    if (starts.size > 20) starts.delete(starts.keys().next().value);
  }
  if (following === state.instance_id) renderState(event.type === "DELETED" ? null : state);
}

// ------------------------------------------------------------------ rendering

function phase(state) {
  if (state.status === "stopped") return "stopped";
  if (state.sleeping) return "sleeping";
  return state.ready ? "ready" : "starting";
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text == null ? "–" : String(text);
  if (className) td.className = className;
  return td;
}

function renderInstances() {
  const body = $("#instances tbody");
  body.replaceChildren();
  for (const state of instances.values()) {
    const row = document.createElement("tr");
    row.dataset.id = state.instance_id;
    const id = document.createElement("td");
    const link = document.createElement("a");
    link.href = `#/instance/${encodeURIComponent(state.instance_id)}`;
    link.textContent = state.instance_id;
    id.append(link);
    const status = document.createElement("td");
    const badge = document.createElement("span");
    badge.className = `status ${phase(state)}`;
    badge.textContent = phase(state);
    status.append(badge);
    const actions = document.createElement("td");
    const remove = document.createElement("button");
    remove.className = "danger small";
    remove.textContent = "Delete";
    remove.onclick = () => deleteInstance(state.instance_id);
    actions.append(remove);
    const memory = state.status === "running" && state.memory ? mib(state.memory.host_bytes) : null;
    row.append(id, cell(state.model, "model"), status, cell(state.start_seconds), cell(state.port),
      cell((state.gpu_uuids || []).join(", ") || null), cell(memory, "memory"), cell(state.exit_code), actions);
    body.append(row);
  }
  $("#no-instances").hidden = instances.size > 0;
  renderChart();
  scheduleGpus();
}

function renderChart() {
  const svg = $("#chart");
  const width = Number(svg.getAttribute("width"));
  const height = Number(svg.getAttribute("height"));
  const entries = [...starts];
  const top = Math.max(1, ...entries.map(([, seconds]) => seconds));
  const bar = width / 20;
  const shapes = entries.map(([id, seconds], index) => {
    const h = Math.max(2, (seconds / top) * (height - 16));
    return `<rect x="${index * bar + 2}" y="${height - h}" width="${bar - 4}" height="${h}" fill="#3b5bdb">` +
      `<title>${escapeHtml(id)}: ${seconds} s</title></rect>`;
  });
  svg.innerHTML = `<text x="2" y="12" font-size="11" fill="#8a94a6">max ${top.toFixed(2)} s</text>${shapes.join("")}`;
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

let gpuTimer = null;
function scheduleGpus() {
  clearTimeout(gpuTimer);
  gpuTimer = setTimeout(renderGpus, 300);
}

async function renderGpus() {
  const response = await api("/v2/vllm/gpus");
  if (!response.ok) return;
  const { gpus, mock } = await response.json();
  const list = $("#gpus");
  list.replaceChildren(...gpus.map((gpu) => {
    const item = document.createElement("li");
    item.textContent = `${gpu.index}: ${gpu.uuid} (${gpu.name}${mock ? ", mock" : ""}) — ` +
      (gpu.instances.length ? gpu.instances.join(", ") : "free");
    return item;
  }));
  if (!gpus.length) list.innerHTML = '<li class="muted">no GPUs</li>';
}

async function renderModels() {
  const response = await api("/v2/vllm/models");
  if (!response.ok) return;
  const { models, memory, file_error: fileError } = await response.json();
  renderBudgets(memory);
  const banner = $("#file-error");
  banner.textContent = fileError ? `The models file was not reloaded (the running models stay): ${fileError}` : "";
  banner.hidden = !fileError;
  const body = $("#models tbody");
  body.replaceChildren(...models.map((model) => {
    const row = document.createElement("tr");
    row.dataset.name = model.name;
    const state = document.createElement("td");
    const badge = document.createElement("span");
    badge.className = `status ${model.state}`;
    badge.textContent = model.state;
    state.append(badge);
    const actions = document.createElement("td");
    actions.className = "actions";
    for (const action of ["start", "stop"]) {
      const button = document.createElement("button");
      button.className = "plain small";
      button.textContent = action;
      button.onclick = () => api(`/v2/vllm/models/${encodeURIComponent(model.name)}/${action}`, { method: "POST" })
        .then(renderModels);
      actions.append(button);
    }
    if (model.state === "invalid") badge.title = model.last_error || "";
    const used = model.last_used ? new Date(model.last_used * 1000).toLocaleTimeString() : null;
    const idle = model.idle_timeout ? `${model.idle_timeout} s` : "never";
    const expected = model.memory_estimate ? `~${mib(model.memory_estimate.host_bytes)}` : null;
    row.append(cell(model.name), cell((model.aliases || []).join(", ") || null, "aliases"), state,
      cell(model.instance_id), cell(model.in_flight), cell(used), cell(idle, "idle"), cell(expected, "memory"), actions);
    return row;
  }));
  $("#no-models").hidden = models.length > 0;
}

function mib(bytes) {
  return bytes >= 2 ** 30 ? `${(bytes / 2 ** 30).toFixed(2)} GiB` : `${Math.round(bytes / 2 ** 20)} MiB`;
}

// A bar per memory budget: what the running instances hold against it (none for no budget).
function renderBudgets(memory) {
  const rows = [];
  if (memory.host.budget_bytes) rows.push(["host", memory.host]);
  for (const [uuid, use] of Object.entries(memory.gpus)) if (use.budget_bytes) rows.push([uuid, use]);
  $("#budgets").replaceChildren(...rows.map(([name, use]) => {
    const line = document.createElement("p");
    line.className = "budget";
    line.dataset.budget = name;
    const meter = document.createElement("meter");
    meter.min = 0;
    meter.max = use.budget_bytes;
    meter.value = use.used_bytes;
    meter.high = use.budget_bytes * 0.9;
    const label = document.createElement("span");
    label.textContent = `${name}: ${mib(use.used_bytes)} of ${mib(use.budget_bytes)}`;
    line.append(meter, label);
    return line;
  }));
}

// ------------------------------------------------------------------ actions

async function createInstance(event) {
  event.preventDefault();
  const form = event.target;
  const error = $("#create-error");
  error.textContent = "";
  const body = { options: form.options.value.trim() };
  const env = form.env.value.split("\n").map((line) => line.trim()).filter(Boolean);
  if (env.length) {
    body.env_vars = {};
    for (const line of env) {
      const at = line.indexOf("=");
      if (at < 1) { error.textContent = `environment line "${line}" is not KEY=value`; return; }
      body.env_vars[line.slice(0, at)] = line.slice(at + 1);
    }
  }
  const gpus = form.gpus.value.split(",").map((uuid) => uuid.trim()).filter(Boolean);
  if (gpus.length) body.gpu_uuids = gpus;
  const id = form.id.value.trim();
  const response = await api(id ? `/v2/vllm/instances/${encodeURIComponent(id)}` : "/v2/vllm/instances", {
    method: id ? "PUT" : "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) {
    error.textContent = `${response.status}: ${await errorText(response)}`;
    return;
  }
  form.id.value = "";
}

async function deleteInstance(id) {
  if (!confirm(`Delete instance ${id}? Its processes are stopped and its log removed.`)) return;
  const response = await api(`/v2/vllm/instances/${encodeURIComponent(id)}`, { method: "DELETE" });
  if (!response.ok && response.status !== 404) alert(await errorText(response));
}

async function deleteAll() {
  if (!confirm("Delete every instance?")) return;
  await api("/v2/vllm/instances", { method: "DELETE" });
}

// ------------------------------------------------------------------ the instance page

function when(seconds) {
  return seconds == null ? null : new Date(seconds * 1000).toLocaleString();
}

// The instance's state in words (times local, sizes in MiB/GiB); the raw JSON below it.
function renderState(state) {
  $("#state").textContent = state ? JSON.stringify(state, null, 2) : "deleted";
  const facts = state ? [
    ["Status", phase(state) + (state.status === "stopped" ? ` (exit ${state.exit_code})` : "")],
    ["Model", state.model], ["Port", state.port], ["PID", state.pid],
    ["Created", when(state.created_at)], ["Ready", when(state.ready_at)],
    ["Start", state.start_seconds == null ? null : `${state.start_seconds} s`],
    ["Memory", state.memory ? mib(state.memory.host_bytes) : null],
    ["Peak memory", state.memory_peak ? mib(state.memory_peak.host_bytes) : null],
    ["GPUs", (state.gpu_uuids || []).join(", ") || null],
    ["Stopped", when(state.stopped_at)], ["Why", state.stop_reason],
    ["Options", state.options],
  ] : [["Status", "deleted"]];
  $("#facts").replaceChildren(...facts.filter(([, value]) => value != null && value !== "").flatMap(([name, value]) => {
    const term = document.createElement("dt");
    term.textContent = name;
    const detail = document.createElement("dd");
    detail.textContent = String(value);
    detail.dataset.fact = name;
    return [term, detail];
  }));
}

async function followLog(id) {
  // Asks from one byte before the end it has: the range always exists (206, never a 416 for
  // "nothing new"), and the repeated byte is dropped.
  const generation = ++followGeneration;
  const log = $("#log");
  log.textContent = "";
  const decoder = new TextDecoder();
  let offset = 0;
  let rounds = 0;
  while (generation === followGeneration && following === id && !deleted.has(id)) {
    if (++rounds % 2 === 0) refreshState(id); // its memory is sampled in the background: no event says so
    const headers = offset > 0 ? { Range: `bytes=${offset - 1}-` } : {};
    const response = await api(`/v2/vllm/instances/${encodeURIComponent(id)}/log`, { headers });
    if (generation !== followGeneration || following !== id) return;
    if (response.status === 404) { renderState(null); return; } // deleted meanwhile
    if (!response.ok) { await new Promise((resolve) => setTimeout(resolve, 1000)); continue; }
    const bytes = new Uint8Array(await response.arrayBuffer()).subarray(offset > 0 ? 1 : 0);
    if (bytes.length) {
      offset += bytes.length;
      const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.textContent += decoder.decode(bytes, { stream: true });
      if (atBottom) log.scrollTop = log.scrollHeight;
      $("#log-size").textContent = `${offset} bytes`;
      if (bytes.length >= 1048575) continue; // a full MiB: there is more right away
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

async function refreshState(id) {
  const response = await api(`/v2/vllm/instances/${encodeURIComponent(id)}`);
  if (response.ok && following === id) renderState(await response.json());
}

async function route() {
  const match = location.hash.match(/^#\/instance\/(.+)$/);
  following = match ? decodeURIComponent(match[1]) : null;
  $("#overview").hidden = Boolean(match);
  $("#detail").hidden = !match;
  if (!match) return;
  $("#detail-title").textContent = `Instance ${following}`;
  const response = await api(`/v2/vllm/instances/${encodeURIComponent(following)}`);
  renderState(response.ok ? await response.json() : null);
  followLog(following);
}

// ------------------------------------------------------------------ start

$("#create").addEventListener("submit", createInstance);
$("#delete-all").addEventListener("click", deleteAll);
window.addEventListener("hashchange", route);
route();
watch();
renderModels();
setInterval(renderModels, 2000);
