// webvirt overlay for OBS browser sources: the chosen VMs, their state and the USB host
// devices they hold, live from /api/0/events (an EventSource, which resumes by itself).
// Options in the query string: domain=win11,linux (default: all), size=small|medium|large,
// theme=dark|light, token=TOKEN.

const STATE_LABELS = {
  running: "running", paused: "paused", shutoff: "shut off", shutdown: "shutting down",
  crashed: "crashed", pmsuspended: "suspended", blocked: "blocked", nostate: "unknown",
};
const DEVICE_EVENTS = new Set(["device-added", "device-removed", "device-removal-failed",
  "attach", "detach"]);
const RETRY_MS = 5000; // when the browser gives up on the stream (an HTTP error, not a blip)

const params = new URLSearchParams(location.search);
const chosen = (params.get("domain") || "").split(",").map((n) => n.trim()).filter(Boolean);
const token = params.get("token") || "";
const root = document.documentElement;
root.dataset.size = oneOf(params.get("size"), ["small", "medium", "large"], "medium");
root.dataset.theme = oneOf(params.get("theme"), ["dark", "light"], "dark");

const domains = new Map(); // name -> {name, uuid, state}
const devices = new Map(); // name -> the USB host devices it holds
const requests = new Map(); // name -> number of its latest devices request (older ones lose)
let snapshotSeen = false;
let streamProblem = ""; // the event stream is down
let libvirtProblem = ""; // webvirt is up, libvirt is not

function oneOf(value, allowed, fallback) {
  return allowed.includes(value) ? value : fallback;
}

function wanted(name) {
  return chosen.length === 0 || chosen.includes(name);
}

// The VMs to show, in the order the URL names them (else by name).
function shownNames() {
  return chosen.length ? chosen : [...domains.keys()].sort();
}

function deviceLabel(device) {
  if (device.vendor_id && device.product_id) return `${device.vendor_id}:${device.product_id}`;
  if (device.address) return `bus ${device.address}`;
  return device.alias || "device";
}

function vmItem(name) {
  const domain = domains.get(name);
  const state = domain ? domain.state : "missing";
  const item = document.createElement("li");
  item.className = "vm";
  item.dataset.domain = name;
  item.dataset.state = state;
  const head = document.createElement("div");
  head.className = "vm-head";
  const title = document.createElement("span");
  title.className = "name";
  title.textContent = name;
  const label = document.createElement("span");
  label.className = `state state-${state}`;
  label.textContent = domain ? STATE_LABELS[state] || state : "not found";
  head.append(title, label);
  const list = document.createElement("ul");
  list.className = "devices";
  for (const device of domain ? devices.get(name) || [] : []) {
    const entry = document.createElement("li");
    entry.className = "device";
    entry.textContent = deviceLabel(device);
    list.append(entry);
  }
  item.append(head, list);
  return item;
}

function render() {
  if (!snapshotSeen) return;
  document.getElementById("vms").replaceChildren(...shownNames().map(vmItem));
}

function showStatus() {
  const problem = streamProblem || libvirtProblem;
  const status = document.getElementById("status");
  status.textContent = problem || "";
  status.hidden = !problem;
  root.dataset.live = problem ? "false" : "true";
}

async function refreshDevices(name) {
  if (!wanted(name) || !domains.has(name)) return;
  const ticket = (requests.get(name) || 0) + 1;
  requests.set(name, ticket);
  let held;
  try {
    const response = await fetch(`/api/0/devices/${encodeURIComponent(name)}`, {
      headers: token ? { Authorization: `Bearer ${token}` } : {}, cache: "no-store",
    });
    if (response.status === 404) held = [];
    else if (!response.ok) return; // keep what is shown; the next event tries again
    else held = await response.json();
  } catch {
    return;
  }
  if (requests.get(name) !== ticket) return; // a newer request was sent meanwhile
  devices.set(name, held.filter((device) => device.type === "usb"));
  render();
}

function handle(event) {
  switch (event.type) {
    case "snapshot": // the first message, or after a resync: start over from it
      snapshotSeen = true;
      domains.clear();
      for (const domain of event.domains) domains.set(domain.name, domain);
      for (const name of [...devices.keys()]) if (!domains.has(name)) devices.delete(name);
      libvirtProblem = event.connected ? "" : "libvirt unreachable";
      showStatus();
      render();
      for (const name of domains.keys()) refreshDevices(name);
      break;
    case "lifecycle":
    case "state":
      if (event.state === "undefined") {
        domains.delete(event.domain);
        devices.delete(event.domain);
      } else {
        domains.set(event.domain, { name: event.domain, uuid: event.uuid, state: event.state });
      }
      render();
      refreshDevices(event.domain); // the live definition differs from the saved one
      break;
    case "connection":
      // "restored" is followed by a fresh snapshot.
      libvirtProblem = event.state === "lost" ? "libvirt connection lost" : "";
      showStatus();
      break;
    case "heartbeat":
      if (!event.connected && !libvirtProblem) libvirtProblem = "libvirt unreachable";
      else if (event.connected) libvirtProblem = "";
      showStatus();
      break;
    default:
      if (DEVICE_EVENTS.has(event.type)) refreshDevices(event.domain);
      break; // anything newer
  }
}

function connect() {
  const query = new URLSearchParams({ type: "lifecycle,device,connection" });
  if (chosen.length) query.set("domain", chosen.join(","));
  if (token) query.set("token", token);
  // After a blip the browser reconnects by itself, sending Last-Event-ID: the events missed
  // follow, or a snapshot when they cannot be had.
  const source = new EventSource(`/api/0/events?${query}`);
  source.addEventListener("message", (message) => {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    handle(event);
  });
  source.addEventListener("open", () => {
    streamProblem = "";
    showStatus();
  });
  source.addEventListener("error", () => {
    streamProblem = "webvirt unreachable, reconnecting…";
    showStatus();
    if (source.readyState === EventSource.CLOSED) {
      // The browser gave up (an HTTP error such as a refused token): start over later,
      // from a snapshot.
      setTimeout(connect, RETRY_MS);
    }
  });
}

connect();
