// webvirt's Stream Deck plugin: keys that show a VM's state, the devices it holds and what it
// uses, live from webvirt's event stream (no polling), and act on a press.

import streamDeck from "@elgato/streamdeck";

import { Power } from "./actions/power.js";
import { Usage } from "./actions/usage.js";
import { Usb } from "./actions/usb.js";
import { Connection } from "./connection.js";

// The last resort for a bug: logged, and every key goes on (the SDK would end the process).
process.on("unhandledRejection", (error) => {
  streamDeck.logger.error(`unhandled: ${error?.stack || error}`);
});

const connection = new Connection(streamDeck.logger);
for (const action of [new Power(connection), new Usb(connection), new Usage(connection)]) {
  streamDeck.actions.registerAction(action);
}
streamDeck.settings.onDidReceiveGlobalSettings((ev) => connection.configure(ev.settings));
await streamDeck.connect();
connection.configure(await streamDeck.settings.getGlobalSettings());
