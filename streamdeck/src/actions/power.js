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
    const ref = key?.settings.domain;
    if (!key || !this.webvirt || !ref) {
      await ev.action.showAlert();
      return;
    }
    const held = Date.now() - (key.downAt ?? Date.now()) >= HOLD_MS;
    const action = held ? "destroy" : "power";
    const answer = await this.webvirt.call("POST",
      `/api/0/${action}/${encodeURIComponent(ref)}`);
    await this.outcome(key, `${action} ${ref}`, answer);
  }
}
