// webvirt overlay for OBS browser sources: the chosen VMs, their state and the USB host
// devices they hold, live from /api/0/events (an EventSource, which resumes by itself).
// Options in the query string: domain=win11,linux (default: all), size=small|medium|large,
// theme=dark|light, token=TOKEN. With several libvirt hosts a VM is NAME@HOST (win11@desk);
// a bare NAME shows that VM on every host that has one.

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

// Keyed by ref: NAME, or NAME@HOST when webvirt has several hosts (events then name theirs).
const domains = new Map(); // ref -> {name, uuid, state, host?}
const devices = new Map(); // ref -> the USB host devices it holds
const requests = new Map(); // ref -> number of its latest devices request (older ones lose)
const hostsDown = new Set(); // several hosts: those webvirt is not connected to
let snapshotSeen = false;
let streamProblem = ""; // the event stream is down
let libvirtProblem = ""; // webvirt is up, libvirt is not

function oneOf(value, allowed, fallback) {
  return allowed.includes(value) ? value : fallback;
}

const refOf = (name, host) => (host ? `${name}@${host}` : name);

function matches(choice, ref) {
  const domain = domains.get(ref);
  return choice === ref || (domain !== undefined && choice === domain.name);
}

function wanted(ref) {
  return chosen.length === 0 || chosen.some((choice) => matches(choice, ref));
}

// The VMs to show, in the order the URL names them (else by name); a choice no VM matches
// is shown as not found.
function shownRefs() {
  if (!chosen.length) return [...domains.keys()].sort();
  const refs = [];
  for (const choice of chosen) {
    const found = [...domains.keys()].filter((ref) => matches(choice, ref)).sort();
    for (const ref of found.length ? found : [choice]) if (!refs.includes(ref)) refs.push(ref);
  }
  return refs;
}

function deviceLabel(device) {
  if (device.vendor_id && device.product_id) return `${device.vendor_id}:${device.product_id}`;
  if (device.address) return `bus ${device.address}`;
  return device.alias || "device";
}

function vmItem(ref) {
  const domain = domains.get(ref);
  const state = domain ? domain.state : "missing";
  const item = document.createElement("li");
  item.className = "vm";
  item.dataset.domain = ref;
  item.dataset.state = state;
  const head = document.createElement("div");
  head.className = "vm-head";
  const title = document.createElement("span");
  title.className = "name";
  title.textContent = ref;
  const label = document.createElement("span");
  label.className = `state state-${state}`;
  label.textContent = domain ? STATE_LABELS[state] || state : "not found";
  head.append(title, label);
  const list = document.createElement("ul");
  list.className = "devices";
  for (const device of domain ? devices.get(ref) || [] : []) {
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
  document.getElementById("vms").replaceChildren(...shownRefs().map(vmItem));
}

// Several hosts: a problem only when a VM shown is on a host that is down.
function hostProblem() {
  const down = [...new Set(shownRefs().map((ref) => domains.get(ref)?.host))]
    .filter((host) => host !== undefined && hostsDown.has(host)).sort();
  return down.length ? `libvirt connection lost (${down.join(", ")})` : "";
}

function showStatus() {
  const problem = streamProblem || libvirtProblem || hostProblem();
  const status = document.getElementById("status");
  status.textContent = problem || "";
  status.hidden = !problem;
  root.dataset.live = problem ? "false" : "true";
}

async function refreshDevices(ref) {
  if (!wanted(ref) || !domains.has(ref)) return;
  const ticket = (requests.get(ref) || 0) + 1;
  requests.set(ref, ticket);
  let held;
  try {
    const response = await fetch(`/api/0/devices/${encodeURIComponent(ref)}`, {
      headers: token ? { Authorization: `Bearer ${token}` } : {}, cache: "no-store",
    });
    if (response.status === 404) held = [];
    else if (!response.ok) return; // keep what is shown; the next event tries again
    else held = await response.json();
  } catch {
    return;
  }
  if (requests.get(ref) !== ticket) return; // a newer request was sent meanwhile
  devices.set(ref, held.filter((device) => device.type === "usb"));
  render();
}

function handle(event) {
  switch (event.type) {
    case "snapshot": // the first message, or after a resync: start over from it
      snapshotSeen = true;
      domains.clear();
      for (const domain of event.domains) domains.set(refOf(domain.name, domain.host), domain);
      for (const ref of [...devices.keys()]) if (!domains.has(ref)) devices.delete(ref);
      takeHosts(event);
      showStatus();
      render();
      for (const ref of domains.keys()) refreshDevices(ref);
      break;
    case "lifecycle":
    case "state": {
      const ref = refOf(event.domain, event.host);
      if (event.state === "undefined") {
        domains.delete(ref);
        devices.delete(ref);
      } else {
        domains.set(ref, { name: event.domain, uuid: event.uuid, state: event.state,
          ...(event.host ? { host: event.host } : {}) });
      }
      render();
      refreshDevices(ref); // the live definition differs from the saved one
      break;
    }
    case "connection":
      // "restored" is followed by a fresh snapshot.
      if (event.host) {
        if (event.state === "lost") hostsDown.add(event.host);
        else hostsDown.delete(event.host);
      } else {
        libvirtProblem = event.state === "lost" ? "libvirt connection lost" : "";
      }
      showStatus();
      break;
    case "heartbeat":
      if (event.hosts) takeHosts(event);
      else if (!event.connected && !libvirtProblem) libvirtProblem = "libvirt unreachable";
      else if (event.connected) libvirtProblem = "";
      showStatus();
      break;
    default:
      if (DEVICE_EVENTS.has(event.type)) refreshDevices(refOf(event.domain, event.host));
      break; // anything newer
  }
}

// A snapshot or heartbeat: with several hosts, each host's connection; else libvirt's.
function takeHosts(event) {
  if (!event.hosts) {
    libvirtProblem = event.connected ? "" : "libvirt unreachable";
    return;
  }
  libvirtProblem = "";
  hostsDown.clear();
  for (const host of event.hosts) if (!host.connected) hostsDown.add(host.name);
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
