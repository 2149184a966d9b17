// What every action of the plugin shares: the keys it shows, each redrawn when what it shows
// changes (and only then), one press at a time per key, and the property inspector's
// questions about the server.

import streamDeck, { SingletonAction } from "@elgato/streamdeck";

import { refOf } from "../../static/stream.js";
import { dataUrl } from "./keys.js";

export class KeySet extends SingletonAction {
  constructor(connection) {
    super();
    this.connection = connection;
    this.shown = new Map(); // action id -> {action, settings, image, busy}
    connection.listen((replaced) => {
      if (replaced) for (const key of this.shown.values()) this.follow(key, +1);
      this.redrawAll();
    });
  }

  get webvirt() {
    return this.connection.webvirt;
  }

  // What a key needs from the webvirt beyond states (devices, stats), as it comes and goes.
  follow(_key, _more) {}

  // The key's image (SVG text).
  image(_key) {
    throw new Error("an action draws its keys");
  }

  onWillAppear(ev) {
    this.onWillDisappear(ev); // seen again without having gone: counted once
    const key = { action: ev.action, settings: ev.payload.settings ?? {}, image: null,
      busy: false };
    this.shown.set(ev.action.id, key);
    this.follow(key, +1);
    this.draw(key);
  }

  onWillDisappear(ev) {
    const key = this.shown.get(ev.action.id);
    if (!key) return;
    this.follow(key, -1);
    this.shown.delete(ev.action.id);
  }

  onDidReceiveSettings(ev) {
    const key = this.shown.get(ev.action.id);
    if (!key) return;
    this.follow(key, -1);
    key.settings = ev.payload.settings ?? {};
    this.follow(key, +1);
    this.draw(key);
  }

  redrawAll() {
    for (const key of this.shown.values()) this.draw(key);
  }

  draw(key) {
    // Until the settings and the server's first answer have come, the manifest's image stays.
    if (!this.connection.configured || this.webvirt?.link === null) return;
    const image = dataUrl(this.image(key));
    if (image === key.image) return; // unchanged: nothing sent
    key.image = image;
    key.action.setImage(image).catch((error) => streamDeck.logger.error(`setImage: ${error}`));
  }

  // A press: its call, one at a time per key (a second press meanwhile is refused, lest it
  // undo the first), and its outcome on the key: a tick, or a warning and the reason logged.
  async act(ev, what, call) {
    const key = this.shown.get(ev.action.id);
    if (!key || !this.webvirt || key.busy) {
      await ev.action.showAlert();
      return;
    }
    key.busy = true;
    try {
      const answer = await call(this.webvirt.api, key);
      if (answer.ok) {
        await key.action.showOk();
      } else {
        streamDeck.logger.warn(`${what(key)}: ${answer.detail} (${answer.status})`);
        await key.action.showAlert();
      }
    } finally {
      key.busy = false;
    }
  }

  // The property inspector asks (with the server and token it shows, saved or not); the
  // answer names the question and the key, for the page to drop one that came too late.
  async onSendToPlugin(ev) {
    const request = ev.payload ?? {};
    const api = this.connection.probe(request.server, request.token);
    let reply;
    if (!["test", "domains", "devices"].includes(request.request)) {
      return;
    } else if (!api) {
      reply = { ok: false, text: "set the server's address, e.g. http://192.168.1.10:5000" };
    } else if (request.request === "test") {
      reply = await api.test();
    } else if (request.request === "domains") {
      const answer = await api.list("/api/0/domains");
      reply = answer.ok
        ? { ok: true, items: answer.body.map((d) => ({ ref: refOf(d.name, d.host),
          state: d.state })) }
        : { ok: false, text: answer.detail };
    } else {
      const host = String(request.domain ?? "").split("@")[1];
      const answer = await api.list(
        `/api/0/host/devices${host ? `?host=${encodeURIComponent(host)}` : ""}`);
      reply = answer.ok
        ? { ok: true, items: answer.body.filter((d) => d?.type === "usb" && d.vendor_id)
          .map((d) => ({ vendor_id: d.vendor_id, product_id: d.product_id,
            label: d.product || d.name })) }
        : { ok: false, text: answer.detail };
    }
    await streamDeck.ui.sendToPropertyInspector({ event: request.request, id: request.id,
      context: ev.action.id, ...reply });
  }
}

// The VM's own name, without @HOST (the key has little room).
export function shortName(ref) {
  return String(ref ?? "").split("@")[0];
}
