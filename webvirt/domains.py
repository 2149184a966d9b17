"""Blocking libvirt domain operations; each runs on a connection's thread (Host.call)."""

from __future__ import annotations

import contextlib
import uuid

import libvirt

from webvirt.errors import Conflict, NotFound

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}

# The seed's /api/0/state answers with these texts; kept word for word for its clients.
SEED_STATE_TEXT = {
    libvirt.VIR_DOMAIN_NOSTATE: "",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked on resource",
    libvirt.VIR_DOMAIN_PAUSED: "paused by user",
    libvirt.VIR_DOMAIN_SHUTDOWN: "being shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended by guest power management",
}


SEED_TEXT_BY_NAME = {STATE_NAMES[code]: text for code, text in SEED_STATE_TEXT.items()}


def state_name(state: int) -> str:
    return STATE_NAMES.get(state, "nostate")


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    """Find a domain by name, or by UUID when the name looks like one."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
    with contextlib.suppress(ValueError, libvirt.libvirtError):
        return conn.lookupByUUIDString(str(uuid.UUID(name)))
    raise NotFound(f"no domain named {name!r}", code="domain_not_found")


# Power operations: each takes the domain and answers what it did, as the seed's texts.

def start(dom: libvirt.virDomain) -> str:
    if dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
        return "already running"
    dom.create()
    return "starting"


def shutdown(dom: libvirt.virDomain) -> str:
    if dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
        return "not running"
    dom.shutdown()
    return "shutting down"


def reboot(dom: libvirt.virDomain) -> str:
    dom.reboot(0)  # libvirt refuses (409) when the domain is not running
    return "rebooting"


def destroy(dom: libvirt.virDomain) -> str:
    if not dom.isActive():
        return "not running"
    dom.destroy()
    return "forced off"


def reset(dom: libvirt.virDomain) -> str:
    dom.reset(0)
    return "reset"


def suspend(dom: libvirt.virDomain) -> str:
    if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
        return "already paused"
    dom.suspend()
    return "paused"


def resume(dom: libvirt.virDomain) -> str:
    if dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
        return "already running"
    dom.resume()
    return "resumed"


def power(dom: libvirt.virDomain) -> str:
    """One button: start what is off, shut down (ACPI) what runs, resume what is paused."""
    state = dom.state()[0]
    if state in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
        dom.create()
        return "starting"
    if state == libvirt.VIR_DOMAIN_PAUSED:
        dom.resume()
        return "resumed"
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        dom.shutdown()
        return "shutting down"
    raise Conflict(f"cannot toggle the power of a domain that is {state_name(state)}",
                   code="wrong_state")


def device_flags(*, live: bool, persistent: bool) -> int:
    flags = 0
    if live:
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    if persistent:
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    return flags


def attach(conn: libvirt.virConnect, uuid: str, xml: str, flags: int) -> None:
    conn.lookupByUUIDString(uuid).attachDeviceFlags(xml, flags)


def xml_for(conn: libvirt.virConnect, uuid: str, *, live: bool) -> str:
    """The live definition, or the saved one (what a persistent-only change would edit)."""
    dom = conn.lookupByUUIDString(uuid)
    return str(dom.XMLDesc(0 if live and dom.isActive() else libvirt.VIR_DOMAIN_XML_INACTIVE))


def detach(conn: libvirt.virConnect, uuid: str, xml: str, flags: int) -> None:
    conn.lookupByUUIDString(uuid).detachDeviceFlags(xml, flags)
