// For a USB key, the settings page has one more field: the host's USB devices (of the VM's
// host), to pick the one the key hands over; saved with its ids and a short name for the key.
/* global document, window, Option */
{
  const pi = window.pi;

  const forUsb = () => pi.action === "org.webvirt.streamdeck.usb";

  function askDevices(domain) {
    if (domain && forUsb()) pi.ask("devices", { domain });
  }

  pi.on("connected", () => {
    if (!forUsb()) return;
    document.getElementById("device-row").hidden = false;
    const select = document.getElementById("device");
    select.addEventListener("change", () => {
      const option = select.selectedOptions[0];
      const [vendor, product] = select.value.split(":");
      pi.saveSettings({ vendor_id: vendor ?? "", product_id: product ?? "",
        label: option?.dataset.label ?? "" });
    });
  });
  pi.on("domain", askDevices);
  // The server and token come after the page connects: ask again with them.
  pi.on("global", () => askDevices(pi.settings.domain));

  pi.on("devices", (reply) => {
    const select = document.getElementById("device");
    const chosen = pi.settings.vendor_id ? `${pi.settings.vendor_id}:${pi.settings.product_id}` : "";
    select.replaceChildren(new Option(reply.ok ? "choose a device" : "no devices", ""));
    for (const item of reply.items ?? []) {
      const value = `${item.vendor_id}:${item.product_id}`;
      const option = new Option(`${item.label} (${value})`, value, false, value === chosen);
      option.dataset.label = item.label;
      select.add(option);
    }
    if (chosen && ![...select.options].some((o) => o.value === chosen)) {
      select.add(new Option(`${pi.settings.label || chosen} (not plugged)`, chosen, false, true));
    }
  });
}
