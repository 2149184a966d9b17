// A VM's usage key: its CPU over the last minute as a graph, its memory as a bar, from the
// event stream's stats messages (asked for only while such a key is shown). A press does
// nothing: it only shows.

import { usageKey } from "../keys.js";
import { KeySet, shortName } from "../keyset.js";

export class Usage extends KeySet {
  manifestId = "org.webvirt.streamdeck.usage";

  follow(key, more) {
    if (this.webvirt) this.webvirt.wantStats(more);
  }

  image(key) {
    const ref = key.settings.domain;
    if (!this.webvirt || !ref) return usageKey(shortName(ref), [], null, "set up");
    const usage = this.webvirt.usage.get(ref) ?? { cpu: [], memory: null };
    return usageKey(shortName(ref), usage.cpu, usage.memory, this.webvirt.look(ref));
  }
}
