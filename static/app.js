// webvirt dashboard: live VM state from /api/0/events (no polling), actions by POST.
"use strict";

const STATE_LABELS = {
  running: "running", paused: "paused", shutoff: "shut off", shutdown: "shutting down",
  crashed: "crashed", pmsuspended: "suspended", blocked: "blocked", nostate: "unknown",
};
const $ = (id) => document.getElementById(id);
const domains = new Map(); // name -> {name, uuid, state}
let templates = [];

// A token comes from #token=... (kept out of server logs) or from an earlier visit.
let token = new URLSearchParams(location.hash.slice(1)).get("token")
  || localStorage.getItem("webvirt-token") || "";
if (token) localStorage.setItem("webvirt-token", token);
if (location.hash.includes("token=")) history.replaceState(null, "", location.pathname);

function authHeaders() {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function askForToken() {
  const dialog = $("token-dialog");
  if (!dialog.open) dialog.showModal();
}

$("token-form").addEventListener("submit", () => {
  token = $("token-input").value.trim();
  localStorage.setItem("webvirt-token", token);
  connect();
  loadTemplates();
});

function log(text, kind = "info") {
  const item = document.createElement("li");
  item.className = `log-${kind}`;
  const time = new Date().toLocaleTimeString();
  item.textContent = `${time}  ${text}`;
  $("log").prepend(item);
  while ($("log").children.length > 30) $("log").lastChild.remove();
}

function setConnection(text, kind) {
  const badge = $("connection");
  badge.textContent = text;
  badge.className = `badge badge-${kind}`;
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options, headers: { ...authHeaders(), ...(options.headers || {}) },
  });
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  if (response.status === 401) askForToken();
  if (!response.ok) throw new Error(body && body.detail ? body.detail : response.statusText);
  return body;
}

// --- Virtual machines -------------------------------------------------------

const ACTIONS = [
  // [action, label, states it applies to, style]
  ["start", "Start", ["shutoff", "crashed"], "primary"],
  ["resume", "Resume", ["paused", "pmsuspended"], "primary"],
  ["shutdown", "Shut down", ["running"], "secondary"],
  ["destroy", "Force off", ["running", "paused", "shutdown", "pmsuspended", "blocked"], "danger"],
];

function renderDomain(domain) {
  let card = document.querySelector(`[data-domain="${CSS.escape(domain.name)}"]`);
  if (!card) {
    card = document.createElement("li");
    card.className = "card";
    card.dataset.domain = domain.name;
    card.innerHTML = `<div class="card-head"><h3></h3><span class="state"></span></div>
      <div class="buttons"></div>`;
    card.querySelector("h3").textContent = domain.name;
    for (const [action, label, , style] of ACTIONS) {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.action = action;
      button.className = style;
      button.textContent = label;
      button.addEventListener("click", () => act(action, domain.name, button));
      card.querySelector(".buttons").append(button);
    }
    const list = $("domains");
    const after = [...list.children].find((c) => c.dataset.domain > domain.name);
    list.insertBefore(card, after || null);
  }
  const state = card.querySelector(".state");
  state.textContent = STATE_LABELS[domain.state] || domain.state;
  state.className = `state state-${domain.state}`;
  card.dataset.state = domain.state;
  for (const [action, , states] of ACTIONS) {
    card.querySelector(`[data-action="${action}"]`).hidden = !states.includes(domain.state);
  }
}

function renderAll() {
  const names = new Set(domains.keys());
  for (const card of [...$("domains").children]) {
    if (!names.has(card.dataset.domain)) card.remove();
  }
  for (const domain of domains.values()) renderDomain(domain);
  $("no-vms").hidden = domains.size > 0;
  renderDomainChoices();
}

async function act(action, name, button) {
  button.disabled = true;
  try {
    const result = await api(`/api/0/${action}/${encodeURIComponent(name)}`, { method: "POST" });
    log(`${name}: ${result}`);
  } catch (error) {
    log(`${name}: ${action} failed: ${error.message}`, "error");
  } finally {
    button.disabled = false;
  }
}

// --- Device templates -------------------------------------------------------

function renderDomainChoices() {
  const select = $("device-domain");
  const chosen = select.value;
  select.replaceChildren(...[...domains.keys()].sort().map((name) => new Option(name, name)));
  if (domains.has(chosen)) select.value = chosen;
}

function renderVariables() {
  const template = templates.find((t) => t.name === $("device-template").value);
  const box = $("device-variables");
  box.replaceChildren();
  for (const variable of template ? template.variables : []) {
    const label = document.createElement("label");
    label.textContent = variable + " ";
    const input = document.createElement("input");
    input.name = variable;
    input.required = true;
    input.autocomplete = "off";
    label.append(input);
    box.append(label);
  }
}

async function loadTemplates() {
  try {
    templates = (await api("/api/0/templates")).filter((t) => !t.error);
  } catch (error) {
    log(`cannot list device templates: ${error.message}`, "error");
    return;
  }
  $("device-template").replaceChildren(...templates.map((t) => new Option(t.name, t.name)));
  renderVariables();
}

$("device-template").addEventListener("change", renderVariables);

$("device-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const action = event.submitter ? event.submitter.value : "attach";
  const form = new FormData(event.target);
  const domain = form.get("domain");
  const template = form.get("template");
  const query = new URLSearchParams();
  for (const input of $("device-variables").querySelectorAll("input")) {
    query.set(input.name, input.value);
  }
  const path = `/api/0/${action}/${encodeURIComponent(domain)}/${encodeURIComponent(template)}`;
  try {
    const result = await api(`${path}?${query}`, { method: "POST" });
    log(`${domain}: ${template} ${result.device}`);
  } catch (error) {
    log(`${domain}: ${action} ${template} failed: ${error.message}`, "error");
  }
});

// --- Live events ------------------------------------------------------------

let socket = null;
let retryDelay = 500;
let lastEventId = null; // resume from here after a reconnect: no event is missed
let retryTimer = null;

function connect() {
  clearTimeout(retryTimer); // a reconnect by hand (new token) replaces a pending one
  retryTimer = null;
  if (socket) socket.close();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const params = new URLSearchParams();
  if (token) params.set("token", token);
  if (lastEventId) params.set("last_event_id", lastEventId);
  const query = params.size ? `?${params}` : "";
  socket = new WebSocket(`${scheme}://${location.host}/api/0/events${query}`);
  const current = socket;
  socket.addEventListener("message", (message) => {
    let parsed;
    try {
      parsed = JSON.parse(message.data);
    } catch {
      log("the server sent a message that is not JSON; ignored", "error");
      return;
    }
    if (parsed.id) lastEventId = parsed.id; // "lagging" has none: resume before it
    handle(parsed);
  });
  socket.addEventListener("open", () => { retryDelay = 500; });
  socket.addEventListener("close", () => {
    if (current !== socket) return;
    setConnection("server unreachable — reconnecting…", "bad");
    retryTimer = setTimeout(connect, retryDelay);
    retryDelay = Math.min(retryDelay * 2, 10000);
  });
}

function handle(message) {
  switch (message.type) {
    case "snapshot":
      domains.clear();
      for (const domain of message.domains) domains.set(domain.name, domain);
      renderAll();
      setConnection(message.connected ? "live" : "libvirt unreachable", message.connected ? "ok" : "bad");
      break;
    case "lifecycle":
    case "state": {
      // "state": a re-read found what no lifecycle event said (e.g. while libvirt was away).
      if (message.state === "undefined") domains.delete(message.domain);
      else domains.set(message.domain, { name: message.domain, uuid: message.uuid, state: message.state });
      renderAll();
      if (message.type === "lifecycle") log(`${message.domain}: ${message.event} (${message.detail})`);
      else log(`${message.domain}: now ${message.state} (was ${message.previous})`);
      break;
    }
    case "connection":
      if (message.state === "lost") {
        setConnection("libvirt connection lost", "bad");
        log(`libvirt connection lost: ${message.reason}`, "error");
      } else {
        setConnection("live", "ok");
        log("libvirt connection restored");
      }
      break;
    case "device-added":
    case "device-removed":
      log(`${message.domain}: ${message.type.replace("-", " ")} ${message.device}`);
      break;
    case "node-device-added":
    case "node-device-removed":
      log(`host: ${message.type.replace("node-device-", "device ")} ${message.device}`);
      break;
    case "lagging":
      log("fell behind the event stream; reconnecting", "error");
      break;
    default:
      break; // heartbeat and anything newer
  }
}

connect();
loadTemplates();
