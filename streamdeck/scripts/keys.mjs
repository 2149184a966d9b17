// Prints, as JSON, the plugin's own key images: each look a key can have (for the README's
// picture) and the images the Stream Deck app shows before the plugin draws (the manifest's).
// scripts/streamdeck-images (Python, Chromium) turns them into files.
import { powerKey, usageKey, usbKey } from "../src/keys.js";

const cpu = [12, 18, 15, 30, 44, 38, 52, 61, 48, 40, 55, 63, 58, 47, 35, 42, 50, 66, 71, 64];
const gallery = {
  running: powerKey("win11", "running"),
  paused: powerKey("win11", "paused"),
  "shut off": powerKey("win11", "shut off"),
  asleep: powerKey("win11", "asleep"),
  crashed: powerKey("win11", "crashed"),
  "no such VM": powerKey("win10", "no such VM"),
  offline: powerKey("win11", "offline"),
  "libvirt down": powerKey("win11", "libvirt down"),
  "wrong token": powerKey("win11", "token?"),
  "USB attached": usbKey("win11", "G502 mouse", "attached"),
  "USB not here": usbKey("win11", "G502 mouse", "not here"),
  usage: usageKey("win11", cpu, 41, "running"),
};
const defaults = {
  "power-key": powerKey("", "set up"),
  "usb-key": usbKey("", "no device", "set up"),
  "usage-key": usageKey("", [], null, "set up"),
};
console.log(JSON.stringify({ gallery, defaults }));
