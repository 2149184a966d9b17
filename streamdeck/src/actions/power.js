// A VM's power key: its state, live; a press does what /api/0/power does (start, resume, or
// shut down), a hold of a second or more forces it off.

import { powerKey } from "../keys.js";
import { KeySet, shortName } from "../keyset.js";

export const HOLD_MS = 1000;

export class Power extends KeySet {
  manifestId = "org.webvirt.streamdeck.power";

  image(key) {
    const ref = key.settings.domain;
    if (!this.webvirt || !ref) return powerKey(shortName(ref), "set up");
    return powerKey(shortName(ref), this.webvirt.look(ref));
  }

  onKeyDown(ev) {
    const key = this.shown.get(ev.action.id);
    if (key) key.downAt = Date.now();
  }

  async onKeyUp(ev) {
    const key = this.shown.get(ev.action.id);
    const downAt = key?.downAt;
    if (key) delete key.downAt;
    if (downAt === undefined) return; // a release without its press (a page changed): nothing
    const action = Date.now() - downAt >= HOLD_MS ? "destroy" : "power";
    await this.act(ev, (k) => `${action} ${k.settings.domain}`, (api, k) => (k.settings.domain
      ? api.call("POST", `/api/0/${action}/${encodeURIComponent(k.settings.domain)}`)
      : { ok: false, status: 0, detail: "no VM chosen" }));
  }
}
