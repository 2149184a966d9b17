// webvirt's HTTP API as the plugin calls it: the token in a header, never in a URL; every
// answer checked for the shape webvirt gives (a server that is not webvirt, a login page, must
// not crash the plugin); a failure is an answer too, never thrown.

// webvirt answers every request within its --call-timeout (30 s by default) and 2 s: waiting
// less would report a start that goes on as failed, and a second press would shut it down.
export const REQUEST_MS = 35_000;

export class Api {
  constructor(server, token) {
    this.server = server.replace(/\/+$/, "");
    this.token = token;
  }

  headers() {
    return this.token ? { Authorization: `Bearer ${this.token}` } : {};
  }

  // {ok, status, body, detail}; status 0 when webvirt could not be reached.
  async call(method, path, body = undefined) {
    const headers = this.headers();
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
      // not JSON: not webvirt's answer
    }
    if (response.ok && parsed === null) {
      return { ok: false, status: response.status, body: null,
        detail: "the server's answer is not webvirt's (not JSON)" };
    }
    const detail = response.ok ? "" : (parsed?.detail ?? `HTTP ${response.status}`);
    return { ok: response.ok, status: response.status, body: parsed, detail };
  }

  // A list webvirt answers with (domains, devices): [] and the reason when it is not one.
  async list(path) {
    const answer = await this.call("GET", path);
    if (answer.ok && !Array.isArray(answer.body)) {
      return { ...answer, ok: false, body: [], detail: "the server's answer is not webvirt's" };
    }
    return { ...answer, body: answer.ok ? answer.body : [] };
  }

  // What "Test connection" says: reachable, the token accepted, and whether it may act.
  async test() {
    const listing = await this.list("/api/0/domains");
    if (listing.status === 0) return { ok: false, text: `webvirt is ${listing.detail}` };
    if (listing.status === 401) return { ok: false, text: "the token is wrong (401)" };
    if (!listing.ok) return { ok: false, text: `${listing.detail} (${listing.status})` };
    // A rule with nothing in it: refused as a bad rule (400) with the full token, as an action
    // (403 read_only_token) with a read token, before anything is made.
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
