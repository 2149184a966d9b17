// One webvirt server as the keys see it: a single event connection for all of them (states,
// the libvirt hosts' connections, the devices each VM holds, live usage), and its API.

import WebSocket from "ws";

import { EventStream, STATE_LABELS, isActive, refOf } from "../../static/stream.js";
import { Api, REQUEST_MS } from "./api.js";

// The stream's categories: states, devices (what a USB key shows), libvirt's connection.
const TYPES = "lifecycle,device,connection";
// What a usage key's graph keeps: a minute at webvirt's default --stats-interval (2 s).
const SAMPLES = 30;

export class Webvirt {
  constructor(server, token, logger) {
    this.api = new Api(server, token);
    this.logger = logger;
    this.link = null; // "up", "offline" or "token?": the server, before any VM
    this.refusedWith = null; // the status that refused the last upgrade
    this.domains = new Map(); // ref -> {name, state, host}
    this.hostsDown = new Set(); // libvirt hosts webvirt has lost ("" with one host)
    this.held = new Map(); // ref -> Set of "vendor:product"; null: could not be read
    this.heldReads = new Map(); // ref -> number of the latest read (older answers are stale)
    this.usage = new Map(); // ref -> {cpu: [...], memory}
    this.watchingDevices = new Map(); // ref -> number of USB keys that show it
    this.statsWanted = 0; // usage keys shown
    this.listeners = new Set();
    this.stream = new EventStream({
      open: (url) => this.openSocket(url),
      url: (lastEventId) => this.streamUrl(lastEventId),
      onMessage: (message) => this.handle(message),
      onState: (up, why) => this.linkChanged(up, why),
      onError: (error) => this.logger.error(`an event could not be handled: ${error.stack}`),
    });
  }

  get server() {
    return this.api.server;
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
    this.listeners.clear();
    this.stream.stop();
  }

  streamUrl(lastEventId) {
    const url = new URL(`${this.server}/api/0/events`);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("type", this.statsWanted ? `${TYPES},stats` : TYPES);
    if (lastEventId) url.searchParams.set("last_event_id", lastEventId);
    return url.href;
  }

  openSocket(url) {
    const socket = new WebSocket(url, { headers: this.api.headers(),
      handshakeTimeout: REQUEST_MS });
    this.refusedWith = null;
    socket.on("unexpected-response", (_request, response) => {
      // A refused upgrade says why (401: the token); ws then reports only "closed".
      this.refusedWith = response.statusCode;
      if ([401, 403].includes(response.statusCode)) this.stream.refused();
      socket.terminate();
      this.setLink(response.statusCode === 401 ? "token?" : "offline",
        `answered ${response.statusCode}`);
    });
    return socket;
  }

  linkChanged(up, why) {
    this.setLink(up ? "up" : this.refusedWith === 401 ? "token?" : "offline",
      up ? "connected" : why);
    if (up) {
      // A resumed stream brings no snapshot: what the keys show of devices is read again.
      for (const ref of this.watchingDevices.keys()) this.refreshHeld(ref);
    }
  }

  setLink(link, why) {
    if (link === this.link) return;
    this.link = link;
    this.logger.info(`webvirt at ${this.server}: ${why}`);
    this.changed();
  }

  // What a key shows for a VM: its state in a word, or what keeps it from being known.
  look(ref) {
    if (this.link !== "up") return this.link ?? "offline";
    const host = String(ref).includes("@") ? ref.split("@").pop() : "";
    if (this.hostsDown.has(host)) return "libvirt down";
    const domain = this.domains.get(ref);
    if (!domain) return "no such VM";
    return STATE_LABELS[domain.state] ?? "unknown";
  }

  // Whether the VM holds the device (null: not known).
  holds(ref, vendor, product) {
    const held = this.held.get(ref);
    return held ? held.has(`${vendor}:${product}`) : null;
  }

  handle(message) {
    switch (message.type) {
      case "snapshot":
        this.domains.clear();
        for (const domain of message.domains ?? []) {
          this.domains.set(refOf(domain.name, domain.host), domain);
        }
        this.hostsDown.clear();
        if (message.hosts) {
          for (const host of message.hosts) if (!host.connected) this.hostsDown.add(host.name);
        } else if (message.connected === false) {
          this.hostsDown.add("");
        }
        for (const ref of this.watchingDevices.keys()) this.refreshHeld(ref);
        this.changed();
        break;
      case "connection":
        if (message.state === "lost") this.hostsDown.add(message.host ?? "");
        else this.hostsDown.delete(message.host ?? "");
        this.changed();
        break;
      case "lifecycle":
      case "state": {
        const ref = refOf(message.domain, message.host);
        if (message.state === "undefined") {
          this.domains.delete(ref);
        } else {
          this.domains.set(ref, { name: message.domain, state: message.state,
            ...(message.host ? { host: message.host } : {}) });
        }
        if (!isActive(message.state)) this.usage.delete(ref); // a new graph when it starts
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
        break; // heartbeats, newer types
    }
  }

  addStats(message) {
    for (const domain of message.domains ?? []) {
      // Several hosts: the message names its host, not each domain.
      const ref = refOf(domain.domain, message.host);
      const usage = this.usage.get(ref) ?? { cpu: [], memory: null };
      // Of the VM's own vCPUs, as the dashboard shows it: a busy VM is busy.
      usage.cpu = [...usage.cpu, domain.guest_cpu_percent].slice(-SAMPLES);
      usage.memory = domain.memory_total_bytes
        ? (100 * domain.memory_bytes) / domain.memory_total_bytes : null;
      this.usage.set(ref, usage);
    }
    this.changed();
  }

  // A usage key came or went: stats are asked for only while one is shown.
  wantStats(more) {
    const before = this.statsWanted > 0;
    this.statsWanted += more;
    if (before !== this.statsWanted > 0 && !this.stream.stopped) this.stream.restart();
  }

  // A USB key came or went: what its VM holds is read, and read again at each change.
  watchDevices(ref, more) {
    const count = (this.watchingDevices.get(ref) ?? 0) + more;
    if (count > 0) {
      this.watchingDevices.set(ref, count);
      if (more > 0 && this.link === "up") this.refreshHeld(ref);
    } else {
      this.watchingDevices.delete(ref);
      this.held.delete(ref);
    }
  }

  refreshHeld(ref) {
    const read = (this.heldReads.get(ref) ?? 0) + 1;
    this.heldReads.set(ref, read);
    this.api.list(`/api/0/devices/${encodeURIComponent(ref)}`).then((answer) => {
      if (!this.watchingDevices.has(ref) || this.heldReads.get(ref) !== read) return;
      this.held.set(ref, answer.ok ? new Set(answer.body.filter((d) => d?.vendor_id)
        .map((d) => `${d.vendor_id}:${d.product_id}`)) : null);
      if (!answer.ok) this.logger.warn(`devices of ${ref}: ${answer.detail}`);
      this.changed();
    }).catch((error) => this.logger.error(`devices of ${ref}: ${error.stack}`));
  }
}
