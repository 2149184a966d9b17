// The plugin's one webvirt: made from the global settings (server, token), replaced when they
// change. Keys listen here and hear of every change of the webvirt they show.

import { Api, validServer } from "./api.js";
import { Webvirt } from "./webvirt.js";

export class Connection {
  constructor(logger) {
    this.logger = logger;
    this.settings = { server: "", token: "" };
    this.webvirt = null; // none until a valid server is set
    this.configured = false; // the global settings have come (keys wait for them to draw)
    this.listeners = new Set();
    this.removeFromWebvirt = null;
  }

  // Registers a listener (replaced: true when a new webvirt took the old one's place).
  listen(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  tell(replaced) {
    for (const listener of [...this.listeners]) listener(replaced);
  }

  configure(settings) {
    const server = String(settings?.server ?? "").trim();
    const token = String(settings?.token ?? "").trim();
    const first = !this.configured;
    this.configured = true;
    if (!first && server === this.settings.server && token === this.settings.token) return;
    this.settings = { server, token };
    this.removeFromWebvirt?.();
    this.webvirt?.stop();
    this.webvirt = null;
    if (validServer(server)) {
      this.webvirt = new Webvirt(server, token, this.logger);
      this.removeFromWebvirt = this.webvirt.listen(() => this.tell(false));
      this.logger.info(`webvirt at ${this.webvirt.server}`);
    } else if (server) {
      this.logger.warn(`not a server URL: ${JSON.stringify(server)}`);
    }
    this.tell(true);
    this.webvirt?.start();
  }

  // The API for the property inspector's questions: these settings, not yet saved perhaps.
  probe(server, token) {
    server = String(server ?? "").trim();
    return validServer(server) ? new Api(server, String(token ?? "").trim()) : null;
  }
}
