"""Marshmallow schemas: they document the API in OpenAPI, parse query strings and check path
parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp_apigami.constants import SCHEMAS_ATTR
from marshmallow import EXCLUDE, Schema, ValidationError, fields
from marshmallow.validate import Equal, Range, Regexp

from webvirt.errors import ApiError
from webvirt.rules import HEX_ID_PATTERN, PORT_PATTERN, SERIAL_MAX_LENGTH, SERIAL_PATTERN
from webvirt.templates import TEMPLATE_NAME

# libvirt takes names as C strings: its binding raises ValueError on a NUL.
NO_NUL = Regexp(r"^[^\x00]+$", error="must not contain a NUL character")


HOST_FIELD_NOTE = "Only with several hosts (--connect repeated): the host's name"


class DomainPath(Schema):
    domain = fields.Str(required=True, validate=NO_NUL, metadata={
        "description": "Domain name (or UUID); NAME@HOST names the host too, and is needed "
                       "when several hosts have a domain of that name (else 409 "
                       "ambiguous_domain)"})


class TemplatePath(DomainPath):
    xml_name = fields.Str(
        required=True,
        validate=Regexp(TEMPLATE_NAME, error="use letters, digits, '_', '-' and '.'"),
        metadata={"description": "Template name: devices/{xml_name}.xml"},
    )


class DeviceQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    live = fields.Bool(
        load_default=True,
        metadata={"description": "Change the running domain (default true)"},
    )
    persistent = fields.Bool(
        load_default=False,
        metadata={"description": "Also change the persistent configuration (default false)"},
    )


class Error(Schema):
    detail = fields.Str(required=True, metadata={"description": "What went wrong"})
    code = fields.Str(required=True, metadata={"description": "Machine-readable error code"})
    status = fields.Int(required=True)


class DeviceResult(Schema):
    device = fields.Str(required=True, metadata={"description": "attached or detached"})
    xml = fields.Str(required=True, metadata={"description": "The device XML sent to libvirt"})
    domain = fields.Str(required=True)
    template = fields.Str(required=True)
    variables = fields.Dict(keys=fields.Str(), values=fields.Str(), required=True)
    host = fields.Str(metadata={"description": HOST_FIELD_NOTE})


def string_enum(*values: str) -> dict[str, object]:
    return {"type": "string", "enum": list(values)}


def error_responses(*statuses: int) -> dict[int, dict[str, object]]:
    text = {
        400: "Bad or missing parameter",
        403: "Refused",
        404: "Unknown domain or template",
        408: "The body did not arrive in the request's time (--call-timeout)",
        409: "Wrong state, or libvirt refused",
        413: "The body is over 64 KiB",
        415: "The body is not sent as JSON (Content-Type: application/json)",
        422: "libvirt rejected the device XML",
        501: "Not supported by the libvirt driver",
        503: "libvirt unreachable",
        504: "What the request waited for (libvirt, the rule store) did not answer in its time "
             "(--call-timeout)",
    }
    return {s: {"description": text[s], "schema": Error} for s in statuses}


def _problems(err: ValidationError) -> str:
    messages = err.messages if isinstance(err.messages, dict) else {"": err.messages}
    return "; ".join(f"{k}: {' '.join(map(str, v))}" for k, v in messages.items())


def parse_query(request: web.Request, schema: type[Schema]) -> dict[str, Any]:
    try:
        loaded: dict[str, Any] = schema().load(request.query)
        return loaded
    except ValidationError as err:
        raise ApiError(f"bad query parameter: {_problems(err)}", code="bad_parameter") from None


Validator = Callable[[Any], Any]
# Per handler: (parameter, its validators). A path parameter is always a string, present when
# the route matched, so the validators are all there is to run; marshmallow's whole load()
# per request cost about a tenth of the throughput of a cached state request.
_PATH_CHECKS: dict[Any, tuple[tuple[str, tuple[Validator, ...]], ...]] = {}


def _path_checks(handler: Any) -> tuple[tuple[str, tuple[Validator, ...]], ...]:
    checks = _PATH_CHECKS.get(handler)
    if checks is None:
        checks = tuple(
            (name, tuple(field.validators))
            for declared in getattr(handler, SCHEMAS_ATTR, ())
            if declared.location == "match_info"
            for name, field in declared.schema.fields.items() if field.validators)
        _PATH_CHECKS[handler] = checks
    return checks


def check_path(request: web.Request) -> None:
    """Check the path parameters against the handler's @match_info_schema, if it has one."""
    for name, validators in _path_checks(request.match_info.handler):
        value = request.match_info.get(name, "")
        for validate in validators:
            try:
                validate(value)
            except ValidationError as err:
                messages = err.messages if isinstance(err.messages, list) else [err.messages]
                raise ApiError(f"bad path parameter: {name}: {' '.join(map(str, messages))}",
                               code="bad_parameter") from None


class WaitQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    wait = fields.Bool(load_default=False,
                       metadata={"description": "Wait for the outcome before answering"})
    timeout = fields.Float(
        load_default=60.0, validate=Range(min=0, max=3600),
        metadata={"description": "Seconds to wait (default 60, at most 3600)"},
    )


class RebootQuery(WaitQuery):
    pass


class ShutdownQuery(WaitQuery):
    force = fields.Bool(
        load_default=False,
        metadata={"description": "Force the domain off if it has not shut down in time"},
    )


class DomainSummary(Schema):
    name = fields.Str(required=True)
    uuid = fields.Str(required=True)
    state = fields.Str(required=True, metadata={
        "description": "nostate, running, blocked, paused, shutdown, shutoff, crashed or "
                       "pmsuspended"})
    vcpus = fields.Int(required=True)
    memory_kib = fields.Int(required=True)
    autostart = fields.Bool(required=True)
    persistent = fields.Bool(required=True)
    host = fields.Str(metadata={"description": HOST_FIELD_NOTE})


class DomainStatus(Schema):
    domain = fields.Str(required=True)
    state = fields.Str(required=True)
    running = fields.Bool(required=True)
    paused = fields.Bool(required=True)
    devices = fields.List(fields.Str(), required=True, metadata={
        "description": "Host devices it holds: USB vendor:product, or PCI address"})
    host = fields.Str(metadata={"description": HOST_FIELD_NOTE})


class HostQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    host = fields.Str(metadata={"description": "A host's name (see GET /api/0/hosts)"})


class HostInfo(Schema):
    name = fields.Str(required=True, metadata={
        "description": "The name in NAME@HOST: --connect NAME=URI, else the URI's host part, "
                       "else local"})
    uri = fields.Str(required=True, allow_none=True, metadata={
        "description": "The URI as configured (null: libvirt's default)"})
    connected = fields.Bool(required=True)
    libvirt_version = fields.Str(allow_none=True, required=True, metadata={
        "description": "The daemon's libvirt version, e.g. 9.0.0 (null until first connected)"})
    hypervisor = fields.Str(allow_none=True, required=True, metadata={
        "description": "The driver, e.g. QEMU"})
    hypervisor_version = fields.Str(allow_none=True, required=True)


class HostDevice(Schema):
    type = fields.Str(required=True, metadata={"description": "usb or pci"})
    mode = fields.Str(allow_none=True)
    alias = fields.Str(allow_none=True, metadata={"description": "libvirt's alias (live only)"})
    vendor_id = fields.Str(allow_none=True)
    product_id = fields.Str(allow_none=True)
    address = fields.Str(allow_none=True,
                         metadata={"description": "USB bus:device or PCI 0000:0f:00.0"})
    missing = fields.Bool(metadata={
        "description": "Present (true) only for an optional USB device that was absent when "
                       "the domain started: a placeholder that holds nothing"})


class NodeDevice(Schema):
    name = fields.Str(required=True, metadata={"description": "libvirt's node device name"})
    type = fields.Str(required=True, metadata={"description": "usb or pci"})
    vendor_id = fields.Str(allow_none=True)
    vendor = fields.Str(allow_none=True)
    product_id = fields.Str(allow_none=True)
    product = fields.Str(allow_none=True)
    address = fields.Str(allow_none=True, metadata={
        "description": "USB bus:device (changes at every plug) or PCI address"})
    port = fields.Str(allow_none=True, metadata={
        "description": "USB only: the port path as the kernel names it, e.g. 1-4.2"})
    serial = fields.Str(allow_none=True, metadata={
        "description": "USB only: the serial number, where known (read from sysfs when "
                       "libvirt runs on this machine; libvirt itself does not report it)"})
    iommu_group = fields.Int(allow_none=True, metadata={"description": "PCI only"})
    held_by = fields.List(fields.Str(), required=True, metadata={
        "description": "Running domains that hold it now"})
    configured_in = fields.List(fields.Str(), required=True, metadata={
        "description": "Domains whose saved definition names it"})


class TemplateInfo(Schema):
    name = fields.Str(required=True)
    variables = fields.List(fields.Str(), required=True,
                            metadata={"description": "Query parameters the template needs"})
    error = fields.Str(metadata={"description": "Why the template cannot be used"})


def _hex_id(what: str, example: str) -> dict[str, object]:
    return {"type": "string", "pattern": HEX_ID_PATTERN, "example": example,
            "description": f"USB {what} id: 4 hexadecimal digits, optionally after 0x; "
                           "kept in lower case without 0x"}


# JSON Schema of a rule's match (webvirt/rules.py checks the same): exactly one of two shapes.
MATCH_SHAPES: list[dict[str, object]] = [
    {"type": "object", "title": "By USB ids", "required": ["vendor_id", "product_id"],
     "additionalProperties": False,
     "properties": {
         "vendor_id": _hex_id("vendor", "046d"), "product_id": _hex_id("product", "c52b"),
         "serial": {"type": "string", "pattern": SERIAL_PATTERN, "minLength": 1,
                    "maxLength": SERIAL_MAX_LENGTH,
                    "description": "Only the device with this serial number (compared as "
                                   "given)"}}},
    {"type": "object", "title": "By port", "required": ["port"], "additionalProperties": False,
     "properties": {"port": {
         "type": "string", "pattern": PORT_PATTERN, "example": "1-4.2",
         "description": "Kernel USB port path, bus-port.port..., as in /sys/bus/usb/devices: "
                        "whatever device is plugged in there"}}},
]
MATCH_DESCRIPTION = "Which host USB device: by vendor and product id (and serial), or by port"


class RulePath(Schema):
    id = fields.Str(required=True, validate=Regexp(r"^[0-9]{1,18}$", error="must be a rule id"),
                    metadata={"description": "Rule id"})


class RuleBody(Schema):
    # No example: the fuzzer would take it, and a real domain for every {domain} it links to.
    domain = fields.Str(required=True, validate=NO_NUL, metadata={
        "description": "Domain name or UUID (kept as its name and UUID)"})
    match = fields.Raw(required=True, metadata={"oneOf": MATCH_SHAPES,
                                                "description": MATCH_DESCRIPTION})
    enabled = fields.Bool(load_default=True, metadata={
        "description": "Whether the rule acts (default true)"})
    persistent = fields.Bool(load_default=False, validate=Equal(False), metadata={
        "enum": [False],
        "description": "Only false: webvirt attaches the device at every start of the VM "
                       "(saved in its definition, a USB device could keep the VM from "
                       "starting while another VM holds it)"})


class UsbRule(Schema):
    id = fields.Int(required=True)
    domain = fields.Str(required=True, metadata={"description": "Domain name"})
    domain_uuid = fields.Str(required=True, metadata={
        "description": "The domain's UUID when the rule was made or last replaced"})
    match = fields.Raw(required=True, metadata={"oneOf": MATCH_SHAPES,
                                                "description": MATCH_DESCRIPTION})
    enabled = fields.Bool(required=True)
    persistent = fields.Bool(required=True)
    created = fields.Float(required=True, metadata={
        "description": "Unix time it was made; of two rules that want one device, the older "
                       "wins"})
