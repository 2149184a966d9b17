// A USB device key: whether the VM holds the device (by vendor and product id), live; a press
// hands it over or takes it back (the usb template, as /api/0/toggle does).

import { usbKey } from "../keys.js";
import { KeySet, shortName } from "../keyset.js";

const RUNS_A_GUEST = new Set(["running", "paused", "stopping", "asleep"]);

export class Usb extends KeySet {
  manifestId = "org.webvirt.streamdeck.usb";

  follow(key, more) {
    if (this.webvirt && key.settings.domain) this.webvirt.watchDevices(key.settings.domain, more);
  }

  image(key) {
    const { domain: ref, vendor_id: vendor, product_id: product, label } = key.settings;
    const device = label || (vendor ? `${vendor}:${product}` : "no device");
    if (!this.webvirt || !ref || !vendor) return usbKey(shortName(ref), device, "set up");
    const look = this.webvirt.look(ref);
    if (!RUNS_A_GUEST.has(look)) {
      return usbKey(shortName(ref), device, look === "shut off" ? "not here" : look);
    }
    const holds = this.webvirt.holds(ref, vendor, product);
    return usbKey(shortName(ref), device, holds === null ? "unknown"
      : holds ? "attached" : "not here");
  }

  async onKeyUp(ev) {
    await this.act(ev, (k) => `toggle ${k.settings.vendor_id}:${k.settings.product_id} on `
      + `${k.settings.domain}`, (api, k) => {
      const { domain: ref, vendor_id: vendor, product_id: product } = k.settings;
      if (!ref || !vendor) return { ok: false, status: 0, detail: "no VM or device chosen" };
      const query = new URLSearchParams({ vendor_id: vendor, product_id: product });
      return api.call("POST", `/api/0/toggle/${encodeURIComponent(ref)}/usb?${query}`);
    });
  }
}
