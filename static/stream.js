// webvirt's event stream for JavaScript clients (the Stream Deck plugin; the dashboard and the
// overlay to follow): one WebSocket, resumed from the last event after a drop, so no event is
// missed; reconnected at once and then every half second; given up and opened again when the
// server falls silent for longer than its heartbeats allow. Knows nothing of keys or pages.

// webvirt sends a heartbeat every 15 s (and WebSocket pings): silence past this is a dead link.
export const SILENCE_MS = 20_000;
// Reconnect delays: short, so a restarted webvirt is followed within a second.
export const RETRY_MS = [100, 250, 500];
// After a refusal that will not change by itself (a wrong token), until the settings change.
export const REFUSED_RETRY_MS = 30_000;

// libvirt's state names as webvirt sends them, in the words a small label has room for.
export const STATE_LABELS = {
  running: "running",
  blocked: "running",
  paused: "paused",
  shutdown: "stopping",
  shutoff: "shut off",
  crashed: "crashed",
  pmsuspended: "asleep",
  nostate: "unknown",
};

// Whether a domain in this state runs a guest (power: on).
export function isActive(state) {
  return ["running", "blocked", "paused", "shutdown", "pmsuspended"].includes(state);
}

// NAME, or NAME@HOST when the server has several hosts: how the API addresses a domain.
export function refOf(name, host) {
  return host ? `${name}@${host}` : name;
}

export class EventStream {
  // open(url) answers a WebSocket (the browser's, or ws in Node with the token in a header);
  // url(lastEventId) the stream's URL; onMessage(message) every message; onState(up, why)
  // each time the link comes up or goes down; onError(error) a message that could not be
  // handled (the stream goes on).
  constructor({ open, url, onMessage, onState, onError = () => {} }) {
    this.open = open;
    this.url = url;
    this.onMessage = onMessage;
    this.onState = onState;
    this.onError = onError;
    this.lastEventId = null;
    this.socket = null;
    this.up = null; // not yet known
    this.retry = 0;
    this.retryTimer = null;
    this.silenceTimer = null;
    this.refusal = false; // the server refused the last connection: ask again later
    this.stopped = true;
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  // Reconnects now (another filter): resumes where the last one was.
  restart() {
    this.retry = 0;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    clearTimeout(this.silenceTimer);
    this.drop();
    this.setUp(false, "stopped");
  }

  // The server refused the connection being opened (401, 403): it is asked again later.
  refused() {
    this.refusal = true;
  }

  connect() {
    clearTimeout(this.retryTimer);
    this.drop();
    this.refusal = false;
    let socket;
    try {
      socket = this.open(this.url(this.lastEventId));
    } catch (error) {
      this.lost(`cannot connect: ${error.message}`);
      return;
    }
    this.socket = socket;
    // A first connection is up with its snapshot (not before: nothing is known yet); a resumed
    // one once accepted: it gets the events it missed, and no snapshot (one from an earlier
    // run of webvirt, a snapshot with "resync").
    const resuming = this.lastEventId !== null;
    this.listenFor("open", () => {
      if (resuming) this.setUp(true, "");
    });
    this.listenFor("message", (event) => {
      this.heard();
      this.retry = 0; // it answered: the next drop is reconnected at once again
      try {
        const message = JSON.parse(typeof event.data === "string" ? event.data
          : event.data.toString());
        if (message === null || typeof message !== "object") return; // not webvirt's
        if (message.id) this.lastEventId = message.id; // "lagging" has none: resume before it
        if (message.type === "snapshot") this.setUp(true, "");
        this.onMessage(message);
      } catch (error) {
        this.onError(error);
      }
    });
    this.listenFor("close", (event) => this.lost(event.reason || `closed (${event.code})`));
    this.listenFor("error", (event) => this.lost(event.message || "connection error"));
    this.heard();
  }

  // Only the current socket's events count: a replaced one may still report its end.
  listenFor(kind, handler) {
    const socket = this.socket;
    socket.addEventListener(kind, (event) => {
      if (socket === this.socket) handler(event);
    });
  }

  heard() {
    clearTimeout(this.silenceTimer);
    this.silenceTimer = setTimeout(() => this.lost("the server fell silent"), SILENCE_MS);
  }

  lost(why) {
    clearTimeout(this.silenceTimer);
    this.drop();
    this.setUp(false, why);
    if (this.stopped) return;
    const delay = this.refusal ? REFUSED_RETRY_MS
      : RETRY_MS[Math.min(this.retry, RETRY_MS.length - 1)];
    this.retry += 1;
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  drop() {
    const socket = this.socket;
    this.socket = null;
    if (socket) {
      try {
        socket.close();
      } catch {
        // already closed
      }
    }
  }

  // Told once per change: a server that stays away is not news at every retry.
  setUp(up, why) {
    if (up === this.up) return;
    this.up = up;
    this.onState(up, why);
  }
}
