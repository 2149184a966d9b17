// The key images: 144x144 SVG (the Stream Deck scales it to the key), one look per state, each
// told apart by its colour and its word, so a glance from across the room is enough.

const SIZE = 144;

// Each look: its background and text colour; its word (under the name) is its name. The states
// of a VM differ by colour too, so a glance from across the room is enough; what keeps a
// state from being known is black with a dashed border.
export const LOOKS = {
  running: { fill: "#1f7a3a", ink: "#ffffff" },
  paused: { fill: "#b7791f", ink: "#ffffff" },
  stopping: { fill: "#7a5a1f", ink: "#ffffff" },
  "shut off": { fill: "#3a3f47", ink: "#d0d4da" },
  asleep: { fill: "#2b4a8a", ink: "#ffffff" },
  crashed: { fill: "#9b1c1c", ink: "#ffffff" },
  unknown: { fill: "#4b3d63", ink: "#ffffff" },
  attached: { fill: "#1f7a3a", ink: "#ffffff" },
  "not here": { fill: "#3a3f47", ink: "#d0d4da" },
  "no such VM": { fill: "#000000", ink: "#f06a6a", dashed: true },
  offline: { fill: "#000000", ink: "#8a8f98", dashed: true },
  "libvirt down": { fill: "#000000", ink: "#c98ad6", dashed: true },
  "token?": { fill: "#000000", ink: "#f0b429", dashed: true },
  "set up": { fill: "#000000", ink: "#8a8f98", dashed: true },
};
const ON = new Set(["running", "paused", "stopping", "asleep"]);

// For SVG text: markup escaped, and what XML cannot hold at all left out.
export function escape(text) {
  return String(text).replace(/[\u0000-\u0008\u000b\u000c\u000e-\u001f\ufffe\uffff]/g, "")
    .replace(/[<>&"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

// A name that fits the key: long ones are cut, and smaller.
function nameLine(name, y, ink) {
  const shown = name.length > 12 ? `${name.slice(0, 11)}…` : name;
  const size = shown.length > 9 ? 19 : 24;
  return `<text x="72" y="${y}" font-family="sans-serif" font-size="${size}" font-weight="bold" `
    + `fill="${ink}" text-anchor="middle">${escape(shown)}</text>`;
}

function svg(body, fill, dashed = false) {
  const border = dashed
    ? `<rect x="4" y="4" width="136" height="136" rx="14" fill="none" stroke="#8a8f98" `
      + `stroke-width="4" stroke-dasharray="10 8"/>`
    : "";
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${SIZE}" height="${SIZE}" `
    + `viewBox="0 0 ${SIZE} ${SIZE}"><rect width="${SIZE}" height="${SIZE}" fill="${fill}"/>`
    + `${border}${body}</svg>`;
}

export function dataUrl(image) {
  return `data:image/svg+xml;base64,${Buffer.from(image).toString("base64")}`;
}

// The power symbol, in the key's upper half: filled while the VM runs a guest.
function powerSymbol(ink, on) {
  return `<g fill="none" stroke="${ink}" stroke-width="7" stroke-linecap="round" `
    + `opacity="${on ? 1 : 0.7}"><path d="M52 34 A26 26 0 1 0 92 34"/><path d="M72 18 V50"/></g>`;
}

// A VM's power key: its name and state (or why it cannot be known).
export function powerKey(name, look) {
  const style = LOOKS[look] ?? LOOKS.unknown;
  return svg(`${powerSymbol(style.ink, ON.has(look))}${nameLine(name || "—", 98, style.ink)}`
    + `<text x="72" y="128" font-family="sans-serif" font-size="20" fill="${style.ink}" `
    + `text-anchor="middle">${escape(look)}</text>`, style.fill, style.dashed);
}

// A USB key: the device, the VM, and whether the VM holds it.
export function usbKey(name, device, look) {
  const style = LOOKS[look] ?? LOOKS.unknown;
  const plug = `<g fill="${style.ink}"><rect x="60" y="14" width="24" height="30" rx="3"/>`
    + `<rect x="64" y="20" width="5" height="6"/><rect x="75" y="20" width="5" height="6"/>`
    + `<rect x="68" y="44" width="8" height="14"/></g>`;
  return svg(`${plug}<text x="72" y="80" font-family="sans-serif" font-size="17" `
    + `fill="${style.ink}" text-anchor="middle">${escape(device)}</text>`
    + `${nameLine(name || "—", 106, style.ink)}<text x="72" y="132" font-family="sans-serif" `
    + `font-size="19" fill="${style.ink}" text-anchor="middle">${escape(look)}</text>`,
  style.fill, style.dashed);
}

// A usage key: the last CPU samples as a graph, and the latest CPU and memory figures.
export function usageKey(name, cpu, memory, look) {
  if (look !== "running") {
    return powerKey(name, look);
  }
  const points = cpu.map((value, i) => {
    const x = 8 + (i * 128) / Math.max(1, cpu.length - 1);
    const y = 96 - (Math.max(0, Math.min(100, value)) * 56) / 100;
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  const last = cpu.length ? cpu[cpu.length - 1] : null;
  const graph = points.length > 1
    ? `<polyline points="${points.join(" ")}" fill="none" stroke="#5fd38d" stroke-width="4"/>`
    : "";
  const memoryBar = memory === null ? ""
    : `<rect x="8" y="104" width="128" height="8" fill="#3a3f47"/>`
      + `<rect x="8" y="104" width="${(Math.max(0, Math.min(100, memory)) * 1.28).toFixed(1)}" `
      + `height="8" fill="#6aa7f0"/>`;
  const figures = `CPU ${last === null ? "…" : `${Math.round(last)}%`}`
    + (memory === null ? "" : `  MEM ${Math.round(memory)}%`);
  return svg(`${nameLine(name, 28, "#ffffff")}<line x1="8" y1="96" x2="136" y2="96" `
    + `stroke="#3a3f47" stroke-width="2"/>${graph}${memoryBar}<text x="72" y="134" `
    + `font-family="sans-serif" font-size="14" fill="#ffffff" text-anchor="middle">`
    + `${escape(figures)}</text>`, "#111418");
}
