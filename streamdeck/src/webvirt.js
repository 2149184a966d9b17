// One webvirt server as the keys see it: a single event connection for all of them (states,
// the devices each VM holds, live usage), and the API calls a key press makes. The token goes
// in a header, never in a URL.

import WebSocket from "ws";

import { EventStream, REFUSED_RETRY_MS, STATE_LABELS, refOf } from "../../static/stream.js";

const REQUEST_MS = 10_000;
// The stream's categories: states, devices (what a USB key shows), the connection.
const TYPES = "lifecycle,device,connection";
// What a usage key's graph keeps (one sample per --stats-interval, 2 s by default).
const SAMPLES = 30;

// What a key shows for the server as a whole, before any VM's own state.
export const LINK = {
  setUp: "set up",
  unreachable: "unreachable",
  wrongToken: "wrong token",
  up: "up",
};

export class Webvirt {
  constructor(server, token, logger) {
    this.server = server.replace(/\/+$/, "");
    this.token = token;
    this.logger = logger;
    this.link = LINK.unreachable;
    this.why = "connecting";
    this.domains = new Map(); // ref -> {name, state, host}
    this.held = new Map(); // ref -> Set of "vendor:product"
    this.usage = new Map(); // ref -> {cpu: [...], memory}
    this.watchingDevices = new Map(); // ref -> number of USB keys that show it
    this.statsWanted = 0; // usage keys shown
    this.listeners = new Set();
    this.stream = new EventStream({
      open: (url) => this.openSocket(url),
      url: (lastEventId) => this.streamUrl(lastEventId),
      onMessage: (message) => this.handle(message),
      onState: (up, why) => this.linkChanged(up, why),
    });
  }

  // Registers a listener of every change; answers its remover.
  listen(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  changed() {
    for (const listener of [...this.listeners]) {
      try {
        listener();
      } catch (error) {
        this.logger.error(`a key failed to redraw: ${error.stack || error}`);
      }
    }
  }

  start() {
    this.stream.start();
  }

  stop() {
    this.stream.stop();
    this.listeners.clear();
  }

  streamUrl(lastEventId) {
    const url = new URL(`${this.server}/api/0/events`);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("type", this.statsWanted ? `${TYPES},stats` : TYPES);
    if (lastEventId) url.searchParams.set("last_event_id", lastEventId);
    return url.href;
  }

  openSocket(url) {
    const socket = new WebSocket(url, { headers: this.headers(), handshakeTimeout: REQUEST_MS });
    // A refused upgrade says why (401: the token); ws then reports only "closed".
    socket.on("unexpected-response", (_request, response) => {
      this.refusedWith = response.statusCode;
      if (response.statusCode === 401 || response.statusCode === 403) {
        this.stream.holdNext = REFUSED_RETRY_MS; // asking again every second changes nothing
      }
      socket.terminate();
    });
    this.refusedWith = null;
    return socket;
  }

  headers() {
    return this.token ? { Authorization: `Bearer ${this.token}` } : {};
  }

  linkChanged(up, why) {
    if (up) {
      this.link = LINK.up;
      this.why = "";
    } else {
      this.link = this.refusedWith === 401 ? LINK.wrongToken : LINK.unreachable;
      this.why = this.refusedWith ? `webvirt answered ${this.refusedWith}` : why;
      this.logger.info(`webvirt at ${this.server}: ${this.why}`);
    }
    this.changed();
  }

  // What a key shows for a VM: its state in a word, or what keeps it from being known.
  look(ref) {
    if (this.link !== LINK.up) return this.link;
    const domain = this.domains.get(ref);
    if (!domain) return "not found";
    return STATE_LABELS[domain.state] ?? "unknown";
  }

  handle(message) {
    switch (message.type) {
      case "snapshot":
        this.domains.clear();
        for (const domain of message.domains) {
          this.domains.set(refOf(domain.name, domain.host), domain);
        }
        for (const ref of this.watchingDevices.keys()) this.refreshHeld(ref);
        this.changed();
        break;
      case "lifecycle":
      case "state": {
        const ref = refOf(message.domain, message.host);
        if (message.state === "undefined") {
          this.domains.delete(ref);
        } else {
          this.domains.set(ref, { name: message.domain, uuid: message.uuid,
            state: message.state, ...(message.host ? { host: message.host } : {}) });
        }
        if (this.watchingDevices.has(ref)) this.refreshHeld(ref);
        this.changed();
        break;
      }
      case "device-added":
      case "device-removed":
      case "attach":
      case "detach":
      case "rule": {
        const ref = refOf(message.domain, message.host);
        if (this.watchingDevices.has(ref)) this.refreshHeld(ref);
        break;
      }
      case "stats":
        this.addStats(message);
        break;
      default:
        break; // heartbeats, connection news (a snapshot follows a restore), newer types
    }
  }

  addStats(message) {
    for (const domain of message.domains) {
      const ref = refOf(domain.domain, domain.host);
      const usage = this.usage.get(ref) ?? { cpu: [], memory: null };
      usage.cpu = [...usage.cpu, domain.cpu_percent].slice(-SAMPLES);
      usage.memory = domain.memory_total_bytes
        ? (100 * domain.memory_bytes) / domain.memory_total_bytes : null;
      this.usage.set(ref, usage);
    }
    this.changed();
  }

  // A usage key came or went: stats are asked for only while one is shown.
  wantStats(more) {
    const before = this.statsWanted > 0;
    this.statsWanted = Math.max(0, this.statsWanted + more);
    if (before !== this.statsWanted > 0 && !this.stream.stopped) this.stream.restart();
  }

  // A USB key came or went: what its VM holds is read, and read again at each change.
  watchDevices(ref, more) {
    const count = (this.watchingDevices.get(ref) ?? 0) + more;
    if (count > 0) {
      this.watchingDevices.set(ref, count);
      if (more > 0 && this.link === LINK.up) this.refreshHeld(ref);
    } else {
      this.watchingDevices.delete(ref);
      this.held.delete(ref);
    }
  }

  async refreshHeld(ref) {
    const answer = await this.call("GET", `/api/0/devices/${encodeURIComponent(ref)}`);
    if (!this.watchingDevices.has(ref)) return;
    if (answer.ok) {
      this.held.set(ref, new Set(answer.body.filter((d) => d.vendor_id)
        .map((d) => `${d.vendor_id}:${d.product_id}`)));
    } else {
      this.held.delete(ref);
    }
    this.changed();
  }

  // An API call: {ok, status, body, detail}; a network failure is status 0, never thrown.
  async call(method, path, body = undefined) {
    const headers = { ...this.headers() };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(`${this.server}${path}`, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(REQUEST_MS),
      });
    } catch (error) {
      const why = error.cause?.code || error.cause?.message || error.message;
      return { ok: false, status: 0, body: null, detail: `unreachable (${why})` };
    }
    let parsed = null;
    try {
      parsed = await response.json();
    } catch {
      // not JSON: a proxy's page, say
    }
    const detail = response.ok ? "" : (parsed?.detail ?? `HTTP ${response.status}`);
    return { ok: response.ok, status: response.status, body: parsed, detail };
  }

  // What "Test connection" says: reachable, the token accepted, and whether it may act.
  async test() {
    const listing = await this.call("GET", "/api/0/domains");
    if (listing.status === 0) return { ok: false, text: `webvirt is ${listing.detail}` };
    if (listing.status === 401) return { ok: false, text: "the token is wrong (401)" };
    if (!listing.ok) return { ok: false, text: `${listing.detail} (${listing.status})` };
    // A rule with nothing in it: refused as a bad rule (400) with the full token, as an action
    // (403 read_only_token) with a read token. Nothing is made either way.
    const probe = await this.call("POST", "/api/0/rules", {});
    const count = listing.body.length;
    if (probe.status === 403) {
      return { ok: false, text: `read-only token: ${count} VMs shown, presses refused (403)` };
    }
    return { ok: true, text: `connected: ${count} VMs` };
  }
}

export function validServer(text) {
  try {
    const url = new URL(text);
    return ["http:", "https:"].includes(url.protocol) && url.host !== "";
  } catch {
    return false;
  }
}
