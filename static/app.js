// webvirt dashboard: live VM state from /api/0/events (no polling), actions by POST.
"use strict";

const STATE_LABELS = {
  running: "running", paused: "paused", shutoff: "shut off", shutdown: "shutting down",
  crashed: "crashed", pmsuspended: "suspended", blocked: "blocked", nostate: "unknown",
};
const $ = (id) => document.getElementById(id);
// name -> {name, uuid, state}; with several hosts NAME@HOST -> {name, uuid, state, host}:
// the key is also how the API addresses the domain.
const domains = new Map();
const hostStates = new Map(); // several hosts only: host name -> connected
const refOf = (name, host) => (host ? `${name}@${host}` : name);
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
  if (!response.ok) {
    // webvirt's errors are {"detail", "code", "status"}; show the detail.
    const error = new Error(body && body.detail ? body.detail : response.statusText);
    error.status = response.status;
    error.code = body && body.code;
    throw error;
  }
  return body;
}

// One load at a time per thing: asks made while it runs become one more load after it, so an
// older answer never overwrites a newer one and a burst of events costs two requests.
function coalesced(load) {
  let running = null;
  let again = false;
  return function refresh() {
    if (running) {
      again = true;
      return running;
    }
    running = (async () => {
      try {
        do {
          again = false;
          await load();
        } while (again);
      } finally {
        running = null;
      }
    })();
    return running;
  };
}

const MESSAGE_KINDS = ["ok", "error", "wait"];

function showMessage(element, text, kind = "ok") {
  element.textContent = text;
  for (const other of MESSAGE_KINDS) element.classList.toggle(`message-${other}`, other === kind);
}

function el(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
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
  const ref = refOf(domain.name, domain.host);
  let card = cardOf(ref);
  if (!card) {
    card = document.createElement("li");
    card.className = "card";
    card.dataset.domain = ref;
    card.innerHTML = `<div class="card-head"><h3></h3><span class="state"></span></div>
      <div class="usage" hidden></div>
      <div class="buttons"></div><ul class="hostdevs" hidden></ul>
      <p class="message card-message" role="status" hidden></p>`;
    card.querySelector("h3").textContent = domain.name;
    for (const [action, label, , style] of ACTIONS) {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.action = action;
      button.className = style;
      button.textContent = label;
      button.addEventListener("click", () => act(action, ref, button));
      card.querySelector(".buttons").append(button);
    }
    const list = domain.host ? hostGroup(domain.host).querySelector(".cards") : $("domains");
    const after = [...list.children].find((c) => c.dataset.domain > ref);
    list.insertBefore(card, after || null);
    renderHeld(ref);
  }
  const state = card.querySelector(".state");
  state.textContent = STATE_LABELS[domain.state] || domain.state;
  state.className = `state state-${domain.state}`;
  card.dataset.state = domain.state;
  for (const [action, , states] of ACTIONS) {
    card.querySelector(`[data-action="${action}"]`).hidden = !states.includes(domain.state);
  }
  renderUsage(ref);
}

// --- Several hosts: the VMs grouped by host, each with its connection badge ----

function hostGroup(host) {
  let group = document.querySelector(`.host-group[data-host="${CSS.escape(host)}"]`);
  if (!group) {
    group = el("section", "host-group");
    group.dataset.host = host;
    const heading = el("h3", "host-name", host);
    heading.append(el("span", "badge badge-wait host-badge"));
    group.append(heading, el("ul", "cards"));
    $("hosts").append(group);
  }
  return group;
}

function renderHosts() {
  $("hosts").hidden = hostStates.size === 0;
  for (const [host, connected] of hostStates) {
    const badge = hostGroup(host).querySelector(".host-badge");
    badge.textContent = connected ? "connected" : "not connected";
    badge.className = `badge badge-${connected ? "ok" : "bad"} host-badge`;
  }
}

function renderAll() {
  const names = new Set(domains.keys());
  for (const card of document.querySelectorAll("#domains > .card, #hosts .card")) {
    if (!names.has(card.dataset.domain)) card.remove();
  }
  for (const domain of domains.values()) renderDomain(domain);
  $("no-vms").hidden = domains.size > 0;
  renderDomainChoices();
}

function cardOf(name) {
  return document.querySelector(`[data-domain="${CSS.escape(name)}"]`);
}

// The card's message line: the latest failure of an action on it, until one succeeds.
function cardMessage(name, text) {
  const line = cardOf(name) && cardOf(name).querySelector(".card-message");
  if (!line) return;
  showMessage(line, text, "error");
  line.hidden = !text;
}

async function act(action, name, button) {
  button.disabled = true;
  try {
    const result = await api(`/api/0/${action}/${encodeURIComponent(name)}`, { method: "POST" });
    log(`${name}: ${result}`);
    cardMessage(name, "");
  } catch (error) {
    log(`${name}: ${action} failed: ${error.message}`, "error");
    cardMessage(name, `${ACTIONS.find((a) => a[0] === action)[1]} failed: ${error.message}`);
  } finally {
    button.disabled = false;
  }
}

// --- Host devices a VM holds ------------------------------------------------

const held = new Map(); // VM name -> GET /api/0/devices/{name}
const heldRefreshers = new Map(); // VM name -> its coalesced refresh
const detaching = new Set(); // keys of the held devices being detached now

function refreshHeld(name) {
  if (!name || !domains.has(name)) return;
  if (!heldRefreshers.has(name)) heldRefreshers.set(name, coalesced(() => loadHeld(name)));
  heldRefreshers.get(name)();
}

async function loadHeld(name) {
  if (!domains.has(name)) return;
  try {
    held.set(name, await api(`/api/0/devices/${encodeURIComponent(name)}`));
  } catch (error) {
    if (error.status === 404) held.delete(name); // gone meanwhile
    else log(`${name}: cannot list its host devices: ${error.message}`, "error");
  }
  renderHeld(name);
}

function heldKey(name, hostdev) {
  return [name, hostdev.type, hostdev.alias, hostdev.address,
    hostdev.vendor_id, hostdev.product_id].join("|");
}

function renderHeld(name) {
  const card = cardOf(name);
  if (!card) return;
  const list = card.querySelector(".hostdevs");
  const hostdevs = held.get(name) || [];
  list.replaceChildren(...hostdevs.map((hostdev) => heldItem(name, hostdev)));
  list.hidden = hostdevs.length === 0;
}

function heldItem(name, hostdev) {
  const device = hostDeviceFor(hostdev);
  const item = el("li", "hostdev");
  const text = el("span", "hostdev-text");
  const title = device ? deviceTitle(device) : idsOf(hostdev) || hostdev.address || "host device";
  text.append(el("span", "hostdev-name", title),
    el("span", "muted", [hostdev.type.toUpperCase(), idsOf(hostdev), hostdev.address]
      .filter(Boolean).join(" · ")));
  const button = el("button", "secondary small", "Detach");
  button.type = "button";
  button.setAttribute("aria-label", `Detach ${title}`);
  const call = templateCall(hostdev);
  const key = heldKey(name, hostdev);
  button.disabled = !call || detaching.has(key);
  if (!call) button.title = "No template can name this device";
  else if (isShutOff(name)) button.title = `Removes it from ${name}'s saved definition`;
  button.addEventListener("click", () => detachHeld(name, hostdev, title));
  item.append(text, button);
  return item;
}

// Running or paused: the VMs that live usage is sent for.
function isActive(name) {
  return domains.has(name) && ["running", "paused"].includes(domains.get(name).state);
}

function isShutOff(name) {
  return domains.has(name) && domains.get(name).state === "shutoff";
}

async function detachHeld(name, hostdev, title) {
  const [template, query] = templateCall(hostdev);
  // A shut-off VM's list is its saved definition: that is where it can be detached from.
  if (isShutOff(name)) {
    query.set("live", "0");
    query.set("persistent", "1");
  }
  const key = heldKey(name, hostdev);
  detaching.add(key);
  renderHeld(name);
  try {
    await api(`/api/0/detach/${encodeURIComponent(name)}/${template}?${query}`,
      { method: "POST" });
    log(`${name}: detached ${title}`);
    cardMessage(name, "");
  } catch (error) {
    log(`${name}: detach ${title} failed: ${error.message}`, "error");
    cardMessage(name, `Detach ${title} failed: ${error.message}`);
  } finally {
    detaching.delete(key);
    renderHeld(name);
    refreshHeld(name);
  }
}

// --- Host devices: the picker ------------------------------------------------

let hostDevices = []; // GET /api/0/host/devices, without USB root hubs
let hostDevicesJson = "";
let chosenDevice = null; // the picked device's key (libvirt's node-device name[@HOST])
// Several hosts name their devices alike (usb_1_4 on each): NAME@HOST tells them apart.
const deviceKey = (device) => refOf(device.name, device.host);
let pickerBusy = false;
const PCI_ADDRESS = /^([0-9a-f]{4}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$/i;
const USB_ADDRESS = /^(\d+):(\d+)$/;  // bus:device, as the host device list gives it

// A root hub has no port (the kernel names it usb1, libvirt usb_usb1). The test driver's
// devices have no port either, as they have no sysfs path: no port alone is not enough.
function isRootHub(device) {
  return device.type === "usb" && !device.port
    && (device.vendor_id === "1d6b" || /^usb_usb\d+$/.test(device.name));
}

function idsOf(device) {
  return device.vendor_id && device.product_id ? `${device.vendor_id}:${device.product_id}` : "";
}

function deviceTitle(device) {
  return device.product || device.vendor || idsOf(device) || device.name;
}

// The template and query that name a device (a host device or a VM's hostdev), or null.
function templateCall(device) {
  if (device.type === "usb") {
    if (!device.vendor_id || !device.product_id) return null;
    const { vendor_id, product_id } = device;
    // Where it is plugged, when known: libvirt refuses ids that two plugged devices share.
    const at = USB_ADDRESS.exec(device.address || "");
    if (at) {
      return ["usb_address",
        new URLSearchParams({ vendor_id, product_id, bus: at[1], device: at[2] })];
    }
    return ["usb", new URLSearchParams({ vendor_id, product_id })];
  }
  const parts = PCI_ADDRESS.exec(device.address || "");
  if (device.type !== "pci" || !parts) return null;
  const [, domain, bus, slot, fn] = parts;
  return ["pci", new URLSearchParams({ domain, bus, slot, function: fn })];
}

// The host device a VM's hostdev is: a PCI one by address, a USB one by the address it took
// (when running) or else by its ids.
function hostDeviceFor(hostdev) {
  return hostDevices.find((device) => device.type === hostdev.type && (
    hostdev.type === "pci" || hostdev.address
      ? device.address === hostdev.address
      : idsOf(device) === idsOf(hostdev)));
}

function holdersText(device) {
  const parts = [];
  if (device.held_by.length) parts.push(`held by ${device.held_by.join(", ")}`);
  const saved = device.configured_in.filter((name) => !device.held_by.includes(name));
  if (saved.length) parts.push(`configured for ${saved.join(", ")}`);
  return parts.join(" · ") || "free";
}

const refreshHostDevices = coalesced(async () => {
  let listing;
  try {
    // Several hosts: each connected host's devices, each naming its host.
    const hosts = [...hostStates].filter(([, connected]) => connected).map(([host]) => host);
    listing = hostStates.size === 0 ? await api("/api/0/host/devices") : (await Promise.all(
      hosts.map(async (host) => (await api(`/api/0/host/devices?host=${encodeURIComponent(host)}`))
        .map((device) => ({ ...device, host }))))).flat();
  } catch (error) {
    log(`cannot list host devices: ${error.message}`, "error");
    return;
  }
  const json = JSON.stringify(listing);
  if (json === hostDevicesJson) return; // nothing changed: keep the page (and focus) as it is
  hostDevicesJson = json;
  hostDevices = listing.filter((device) => !isRootHub(device));
  renderPicker();
  renderRules();
  for (const name of domains.keys()) renderHeld(name);
});

function renderPicker() {
  const usb = hostDevices.filter((device) => device.type === "usb");
  const pci = hostDevices.filter((device) => device.type === "pci");
  if (!hostDevices.some((device) => deviceKey(device) === chosenDevice)) chosenDevice = null;
  $("usb-devices").replaceChildren(...usb.map(pickerItem));
  $("pci-devices").replaceChildren(...pci.map(pickerItem));
  $("no-usb-devices").hidden = usb.length > 0;
  $("pci-count").textContent = pci.length;
  renderPickerActions();
}

function pickerItem(device) {
  const item = el("li");
  item.dataset.device = deviceKey(device);
  const label = el("label", "pick");
  const radio = el("input");
  radio.type = "radio";
  radio.name = "host-device";
  radio.value = deviceKey(device);
  radio.checked = deviceKey(device) === chosenDevice;
  radio.addEventListener("change", () => {
    chosenDevice = deviceKey(device);
    showMessage($("picker-message"), "");
    renderPickerActions();
  });
  const where = device.type === "usb"
    ? device.port && `port ${device.port}`
    : device.iommu_group !== null && device.iommu_group !== undefined
      && `IOMMU group ${device.iommu_group}`;
  // A USB address changes at every plug: it only tells apart devices that have no port.
  const address = device.type === "pci" || !device.port ? device.address : "";
  const facts = [device.host && `host ${device.host}`, device.product ? device.vendor : "",
    idsOf(device), where, address]
    .filter(Boolean).join(" · ");
  const holders = holdersText(device);
  const text = el("span", "pick-text");
  text.append(el("span", "pick-name", deviceTitle(device)), el("span", "muted", facts),
    el("span", holders === "free" ? "holders muted" : "holders", holders));
  label.append(radio, text);
  item.append(label);
  return item;
}

function chosen() {
  return hostDevices.find((device) => deviceKey(device) === chosenDevice) || null;
}

function renderPickerActions() {
  const device = chosen();
  const domain = $("picker-domain").value;
  const kind = device && device.type.toUpperCase();
  // A device goes only to a VM on its own host.
  const elsewhere = device && device.host && domains.get(domain)?.host !== device.host;
  $("picker-chosen").textContent = !device ? "No device chosen."
    : `Chosen: ${deviceTitle(device)} (${kind} ${idsOf(device) || device.address})`
      + (elsewhere ? ` — on host ${device.host}: choose a VM there` : "");
  $("attach-now").disabled = pickerBusy || !device || !domain || elsewhere
    || !templateCall(device);
  const usb = device && device.type === "usb";
  $("give-always").hidden = !usb;
  $("give-always").disabled = pickerBusy || !domain || elsewhere || !idsOf(device || {});
  $("give-port").hidden = !(usb && device.port);
  $("give-port").disabled = pickerBusy || !domain || elsewhere;
  if (usb && device.port) $("give-port").textContent = `Always give port ${device.port} to this VM`;
}

// Runs one picker action: the buttons wait for it, its outcome is said under them.
async function pickerAction(what, run) {
  pickerBusy = true;
  renderPickerActions();
  showMessage($("picker-message"), `${what}…`, "wait");
  try {
    const done = await run();
    showMessage($("picker-message"), done);
    log(done);
  } catch (error) {
    showMessage($("picker-message"), `${what} failed: ${error.message}`, "error");
    log(`${what} failed: ${error.message}`, "error");
  } finally {
    pickerBusy = false;
    renderPickerActions();
  }
}

$("picker-domain").addEventListener("change", () => {
  showMessage($("picker-message"), "");
  renderPickerActions();
});

$("attach-now").addEventListener("click", () => {
  const device = chosen();
  const domain = $("picker-domain").value;
  const [template, query] = templateCall(device);
  pickerAction(`${domain}: attach ${deviceTitle(device)}`, async () => {
    await api(`/api/0/attach/${encodeURIComponent(domain)}/${template}?${query}`,
      { method: "POST" });
    return `${domain}: attached ${deviceTitle(device)}`;
  });
});

function addRule(match, what) {
  const domain = $("picker-domain").value;
  pickerAction(`${domain}: rule for ${what}`, async () => {
    const rule = await api("/api/0/rules", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ domain, match }),
    });
    refreshRules();
    return `${domain}: rule ${rule.id} gives it ${what}`;
  });
}

$("give-always").addEventListener("click", () => {
  const device = chosen();
  addRule({ vendor_id: device.vendor_id, product_id: device.product_id },
    `${deviceTitle(device)} (${idsOf(device)})`);
});

$("give-port").addEventListener("click", () => {
  const device = chosen();
  addRule({ port: device.port }, `whatever is plugged into port ${device.port}`);
});

// --- USB rules ---------------------------------------------------------------

let rules = []; // GET /api/0/rules
const ruleErrors = new Map(); // rule id -> its latest "rule" event, when that was an error
const rulesBusy = new Set(); // ids of the rules being changed now

const refreshRules = coalesced(async () => {
  try {
    rules = await api("/api/0/rules");
  } catch (error) {
    log(`cannot list USB rules: ${error.message}`, "error");
    return;
  }
  renderRules();
});

function ruleTarget(match) {
  if (match.port) {
    const now = hostDevices.find((device) => device.type === "usb" && device.port === match.port);
    return `port ${match.port}` + (now ? ` (now ${deviceTitle(now)})` : "");
  }
  const device = hostDevices.find((d) => d.type === "usb" && idsOf(d) === idsOf(match));
  let text = device ? `${deviceTitle(device)} (${idsOf(match)})` : `USB ${idsOf(match)}`;
  if (match.serial) text += `, serial ${match.serial}`;
  return text;
}

function renderRules() {
  $("rules").replaceChildren(...rules.map(ruleItem));
  $("no-rules").hidden = rules.length > 0;
}

function ruleItem(rule) {
  const item = el("li", rule.enabled ? "rule" : "rule rule-off");
  item.dataset.rule = rule.id;
  const busy = rulesBusy.has(rule.id);
  const toggle = el("label", "switch");
  const box = el("input");
  box.type = "checkbox";
  box.checked = rule.enabled;
  box.disabled = busy;
  box.addEventListener("change", () => changeRule(rule, box.checked));
  toggle.append(box, el("span", "", "Enabled"));
  const text = el("span", "rule-text");
  text.append(el("span", "rule-what", `${rule.domain} always gets ${ruleTarget(rule.match)}`),
    el("span", "muted", [rule.match.port ? "by port" : "by device", `rule ${rule.id}`]
      .join(" · ")));
  const remove = el("button", "secondary small", "Delete");
  remove.type = "button";
  remove.disabled = busy;
  remove.setAttribute("aria-label", `Delete rule ${rule.id}`);
  remove.addEventListener("click", () => deleteRule(rule));
  item.append(toggle, text, remove);
  const failed = ruleErrors.get(rule.id);
  if (failed) {
    const what = failed.product || failed.device;
    item.append(el("p", "message message-error rule-error",
      `Could not ${failed.action} ${what}: ${failed.error}`));
  }
  return item;
}

async function ruleAction(rule, what, run) {
  rulesBusy.add(rule.id);
  renderRules();
  showMessage($("rules-message"), "");
  try {
    await run();
    log(`rule ${rule.id}: ${what}`);
  } catch (error) {
    showMessage($("rules-message"), `Rule ${rule.id}: ${what} failed: ${error.message}`, "error");
    log(`rule ${rule.id}: ${what} failed: ${error.message}`, "error");
  } finally {
    rulesBusy.delete(rule.id);
    renderRules(); // as it was, if it failed: the switch goes back
    refreshRules();
  }
}

function changeRule(rule, enabled) {
  ruleAction(rule, enabled ? "switched on" : "switched off", async () => {
    const body = { domain: rule.domain, match: rule.match, enabled, persistent: rule.persistent };
    const kept = await api(`/api/0/rules/${rule.id}`, {
      method: "PUT",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    rules = rules.map((r) => (r.id === kept.id ? kept : r));
  });
}

function deleteRule(rule) {
  ruleAction(rule, "deleted", async () => {
    await api(`/api/0/rules/${rule.id}`, { method: "DELETE" });
    rules = rules.filter((r) => r.id !== rule.id);
    ruleErrors.delete(rule.id);
  });
}

// --- Device templates -------------------------------------------------------

function renderDomainChoices() {
  const names = [...domains.keys()].sort();
  for (const select of [$("device-domain"), $("picker-domain")]) {
    const chosen = select.value;
    select.replaceChildren(...names.map((name) => new Option(name, name)));
    if (domains.has(chosen)) select.value = chosen;
    else if (select === $("picker-domain")) {
      // First time: a running VM is the likely one to give a device to.
      select.value = names.find((name) => domains.get(name).state === "running") || names[0] || "";
    }
  }
  renderPickerActions();
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

// --- Live usage: a CPU and a memory sparkline per running VM, from "stats" messages -----------

const USAGE_SECONDS = 300; // what a graph shows: the last five minutes
const SVG = "http://www.w3.org/2000/svg";
const usage = new Map(); // VM name -> {cpu: [0-100…], memory: [0-1…], latest (its stats entry)}
let usageSamples = 150; // USAGE_SECONDS at the server's --stats-interval
let usageStale = false; // stats came while the page was hidden: drawn when it shows again

function addStats(message) {
  if (message.interval > 0) {
    usageSamples = Math.min(600, Math.max(10, Math.round(USAGE_SECONDS / message.interval)));
  }
  const seen = new Set();
  for (const entry of message.domains) {
    const ref = refOf(entry.domain, message.host);
    if (!domains.has(ref)) continue;
    seen.add(ref);
    let history = usage.get(ref);
    if (!history) usage.set(ref, history = { cpu: [], memory: [] });
    history.latest = entry;
    push(history.cpu, clamp(entry.guest_cpu_percent, 0, 100));
    push(history.memory, entry.memory_total_bytes
      ? clamp(entry.memory_bytes / entry.memory_total_bytes, 0, 1) : 0);
  }
  // Every running or paused VM is in each message (from its second sample on): one that is
  // missing has stopped.
  // With several hosts, each host's message speaks for its own VMs only.
  for (const name of [...usage.keys()]) {
    const host = domains.has(name) ? domains.get(name).host : undefined;
    if (!seen.has(name) && host === message.host) usage.delete(name);
  }
  if (document.hidden) usageStale = true;
  else for (const name of domains.keys()) renderUsage(name);
}

function push(values, value) {
  values.push(value);
  if (values.length > usageSamples) values.splice(0, values.length - usageSamples);
}

function clamp(value, low, high) {
  return Math.min(high, Math.max(low, Number(value) || 0));
}

// A stopped VM drops its graph (and starts a fresh one when it runs again).
function dropUsage(name) {
  if (usage.delete(name)) renderUsage(name);
}

document.addEventListener("visibilitychange", () => {
  if (document.hidden || !usageStale) return;
  usageStale = false;
  for (const name of domains.keys()) renderUsage(name);
});

function usageBox(box) {
  for (const [kind, label] of [["cpu", "CPU"], ["memory", "Memory"]]) {
    const row = el("div", `gauge gauge-${kind}`);
    const text = el("span", "gauge-text");
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", "0 -3 100 106");
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", `${label} over the last ${USAGE_SECONDS / 60} minutes`);
    svg.append(document.createElementNS(SVG, "polygon"),
      document.createElementNS(SVG, "polyline"));
    row.append(text, svg);
    box.append(row);
  }
}

function renderUsage(name) {
  const card = cardOf(name);
  if (!card) return;
  const box = card.querySelector(".usage");
  const history = usage.get(name);
  box.hidden = !history;
  if (!history) {
    box.replaceChildren(); // built again, empty, when it runs again
    return;
  }
  if (!box.firstChild) usageBox(box);
  const { latest } = history;
  box.querySelector(".gauge-cpu .gauge-text").textContent =
    `CPU ${formatNumber(latest.guest_cpu_percent)} %`;
  box.querySelector(".gauge-memory .gauge-text").textContent =
    `RAM ${memoryText(latest.memory_bytes, latest.memory_total_bytes)}`;
  drawSpark(box.querySelector(".gauge-cpu svg"), history.cpu, 100);
  drawSpark(box.querySelector(".gauge-memory svg"), history.memory, 1);
}

// The line, and the area under it down to the base line.
function drawSpark(svg, values, top) {
  const line = points(values, top);
  const left = line.slice(0, line.indexOf(","));
  svg.lastChild.setAttribute("points", line);
  svg.firstChild.setAttribute("points", `${line} 100,100 ${left},100`);
}

// The newest sample at the right edge, one step per sample: a full window spans 0-100.
function points(values, top) {
  const step = 100 / Math.max(1, usageSamples - 1);
  const start = 100 - (values.length - 1) * step;
  return values.map((value, i) =>
    `${(start + i * step).toFixed(1)},${(100 - (value / top) * 100).toFixed(1)}`).join(" ");
}

function formatNumber(value) {
  const number = Number(value) || 0;
  return number >= 10 ? String(Math.round(number)) : number.toFixed(1).replace(/\.0$/, "");
}

function memoryText(used, total) {
  const unit = total >= 2 ** 30 ? ["GiB", 2 ** 30] : ["MiB", 2 ** 20];
  return `${formatNumber(used / unit[1])} / ${formatNumber(total / unit[1])} ${unit[0]}`;
}

// --- Live events ------------------------------------------------------------

let socket = null;
let retryDelay = 500;
let lastEventId = null; // resume from here after a reconnect: no event is missed
let retryTimer = null;
const STREAM_TYPES = "lifecycle,device,host,connection,stats";

function connect() {
  clearTimeout(retryTimer); // a reconnect by hand (new token) replaces a pending one
  retryTimer = null;
  if (socket) socket.close();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const params = new URLSearchParams();
  if (token) params.set("token", token);
  // Every event category, and the live usage (which no type would leave out).
  params.set("type", STREAM_TYPES);
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
    case "snapshot": {
      domains.clear();
      for (const domain of message.domains) domains.set(refOf(domain.name, domain.host), domain);
      for (const name of [...held.keys()]) if (!domains.has(name)) held.delete(name);
      for (const name of [...usage.keys()]) if (!isActive(name)) usage.delete(name);
      hostStates.clear();
      for (const host of message.hosts || []) hostStates.set(host.name, host.connected);
      renderHosts();
      renderAll();
      // Several hosts: each group's badge says its host's connection; the header, the server's.
      const live = message.connected || hostStates.size > 0;
      setConnection(live ? "live" : "libvirt unreachable", live ? "ok" : "bad");
      // The first message, or a fresh start: read again what events keep current.
      for (const name of domains.keys()) refreshHeld(name);
      refreshHostDevices();
      refreshRules();
      break;
    }
    case "lifecycle":
    case "state": {
      // "state": a re-read found what no lifecycle event said (e.g. while libvirt was away).
      const ref = refOf(message.domain, message.host);
      if (message.state === "undefined") {
        domains.delete(ref);
        held.delete(ref);
      } else {
        domains.set(ref, { name: message.domain, uuid: message.uuid, state: message.state,
          ...(message.host ? { host: message.host } : {}) });
      }
      renderAll();
      if (!isActive(ref)) dropUsage(ref);
      if (message.type === "lifecycle") log(`${ref}: ${message.event} (${message.detail})`);
      else log(`${ref}: now ${message.state} (was ${message.previous})`);
      // Started or stopped: its live definition is not its saved one, and what it holds counts.
      refreshHeld(ref);
      refreshHostDevices();
      break;
    }
    case "connection":
      if (message.host) {
        hostStates.set(message.host, message.state !== "lost");
        renderHosts();
        if (message.state === "lost") log(`${message.host}: libvirt connection lost: ${message.reason}`, "error");
        else log(`${message.host}: libvirt connection restored`);
      } else if (message.state === "lost") {
        setConnection("libvirt connection lost", "bad");
        log(`libvirt connection lost: ${message.reason}`, "error");
      } else {
        setConnection("live", "ok");
        log("libvirt connection restored");
      }
      break;
    case "device-added":
    case "device-removed":
    case "device-removal-failed":
      log(`${message.domain}: ${message.type.replaceAll("-", " ")} ${message.device}`);
      refreshHeld(refOf(message.domain, message.host));
      refreshHostDevices();
      break;
    case "attach":
    case "detach":
      if (message.reason === "unplugged") {
        log(`${message.domain}: let go of ${message.vendor_id}:${message.product_id} (unplugged)`);
      }
      refreshHeld(refOf(message.domain, message.host));
      refreshHostDevices();
      break;
    case "node-device-added":
    case "node-device-removed":
      log(`host: ${message.type.replace("node-device-", "device ")} ${message.device}`);
      if (message.device_type === "usb" || message.device_type === "pci") refreshHostDevices();
      break;
    case "rule": {
      // The reconciler acted on a rule: attached (or took) a device, or could not.
      const what = message.product || message.device;
      if (message.result === "error") {
        ruleErrors.set(message.rule, message);
        log(`rule ${message.rule}: could not ${message.action} ${what}: ${message.error}`, "error");
      } else {
        ruleErrors.delete(message.rule);
        log(`rule ${message.rule}: ${message.action}ed ${what} (${message.domain})`);
      }
      renderRules();
      refreshHeld(refOf(message.domain, message.host));
      refreshHostDevices();
      break;
    }
    case "rule-changed":
      if (message.change === "deleted") ruleErrors.delete(message.rule);
      refreshRules();
      break;
    case "stats":
      addStats(message);
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
