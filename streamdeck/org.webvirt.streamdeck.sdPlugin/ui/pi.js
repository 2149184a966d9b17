// The property inspector's side of the Stream Deck app's WebSocket protocol, and the part
// every action's page shares: the server and token (global settings, set once), "Test
// connection", and the VM list, all asked of the plugin (which talks to webvirt).
/* global document, WebSocket, window */

const pi = {
  socket: null, uuid: null, action: null, settings: {}, global: { server: "", token: "" },
  handlers: {},
};

pi.on = (event, handler) => { (pi.handlers[event] ??= []).push(handler); };

function emit(event, message) {
  for (const handler of pi.handlers[event] ?? []) handler(message);
}

function send(event, payload) {
  if (pi.socket?.readyState !== WebSocket.OPEN) return;
  pi.socket.send(JSON.stringify({ event, context: pi.uuid, action: pi.action, payload }));
}

pi.saveSettings = (changes) => {
  pi.settings = { ...pi.settings, ...changes };
  send("setSettings", pi.settings);
};

// A question for the plugin, with the server and token as shown (saved or not). Only the
// answer to the latest question of each kind counts: an earlier one can come later (a server
// that did not answer), and would undo what the page shows.
let asked = 0;
const latest = {};
pi.ask = (request, extra = {}) => {
  asked += 1;
  latest[request] = asked;
  send("sendToPlugin", { request, id: asked, ...pi.global, ...extra });
};

// The Stream Deck app calls this once the page has loaded.
window.connectElgatoStreamDeckSocket = (port, uuid, registerEvent, info, actionInfo) => {
  const action = JSON.parse(actionInfo);
  pi.uuid = uuid;
  pi.action = action.action;
  pi.settings = action.payload?.settings ?? {};
  pi.socket = new WebSocket(`ws://127.0.0.1:${port}`);
  pi.socket.addEventListener("open", () => {
    pi.socket.send(JSON.stringify({ event: registerEvent, uuid }));
    send("getGlobalSettings");
    emit("connected");
  });
  pi.socket.addEventListener("message", (message) => {
    const data = JSON.parse(message.data);
    if (data.event === "didReceiveGlobalSettings") {
      pi.global = { server: "", token: "", ...data.payload.settings };
      emit("global", pi.global);
    } else if (data.event === "didReceiveSettings") {
      pi.settings = data.payload.settings ?? {};
      emit("settings", pi.settings);
    } else if (data.event === "sendToPropertyInspector") {
      const reply = data.payload;
      // For this key (another key's page may have asked), and the latest of its kind.
      if (reply.context !== pi.uuid || reply.id !== latest[reply.event]) return;
      emit(reply.event, reply);
    }
  });
};

// The fields every page has.
const field = (id) => document.getElementById(id);

function say(text, ok) {
  const status = field("status");
  status.textContent = text;
  status.className = ok ? "ok" : "bad";
}

function saveGlobal() {
  pi.global = { server: field("server").value.trim(), token: field("token").value.trim() };
  send("setGlobalSettings", pi.global);
  pi.ask("domains");
}

function fillDomains(reply) {
  const select = field("domain");
  const chosen = pi.settings.domain ?? "";
  select.replaceChildren(new Option(reply.ok ? "choose a VM" : "no VMs", ""));
  for (const item of reply.items ?? []) {
    select.add(new Option(`${item.ref} (${item.state})`, item.ref, false, item.ref === chosen));
  }
  if (chosen && ![...select.options].some((o) => o.value === chosen)) {
    select.add(new Option(`${chosen} (not found)`, chosen, false, true));
  }
  if (!reply.ok) say(reply.text, false);
}

pi.on("connected", () => {
  field("server").addEventListener("change", saveGlobal);
  field("token").addEventListener("change", saveGlobal);
  field("test").addEventListener("click", () => {
    say("testing…", true);
    pi.ask("test");
  });
  field("domain").addEventListener("change", () => {
    pi.saveSettings({ domain: field("domain").value });
    emit("domain", field("domain").value);
  });
});

pi.on("global", (global) => {
  field("server").value = global.server;
  field("token").value = global.token;
  if (global.server) pi.ask("domains");
});

pi.on("test", (reply) => say(reply.text, reply.ok));
pi.on("domains", fillDomains);

window.pi = pi;
