// A USB device key: whether the VM holds the device (by vendor and product id), live; a press
// hands it over or takes it back (the usb template, as /api/0/toggle does).

import { usbKey } from "../keys.js";
import { KeySet, shortName } from "../keyset.js";

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
    if (!["running", "paused", "stopping", "asleep"].includes(look)) {
      return usbKey(shortName(ref), device, look === "shut off" ? "detached" : look);
    }
    const held = this.webvirt.held.get(ref)?.has(`${vendor}:${product}`);
    return usbKey(shortName(ref), device, held ? "attached" : "detached");
  }

  async onKeyUp(ev) {
    const key = this.shown.get(ev.action.id);
    const { domain: ref, vendor_id: vendor, product_id: product } = key?.settings ?? {};
    if (!key || !this.webvirt || !ref || !vendor) {
      await ev.action.showAlert();
      return;
    }
    const query = new URLSearchParams({ vendor_id: vendor, product_id: product });
    const answer = await this.webvirt.call("POST",
      `/api/0/toggle/${encodeURIComponent(ref)}/usb?${query}`);
    await this.outcome(key, `toggle ${vendor}:${product} on ${ref}`, answer);
  }
}
