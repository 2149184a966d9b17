"""Marshmallow schemas: they document the API in OpenAPI and parse query strings."""

from __future__ import annotations

from aiohttp import web
from marshmallow import EXCLUDE, Schema, ValidationError, fields

from webvirt.errors import ApiError


class DomainPath(Schema):
    domain = fields.Str(required=True, metadata={"description": "Domain name (or UUID)"})


class TemplatePath(DomainPath):
    xml_name = fields.Str(
        required=True, metadata={"description": "Template name: devices/{xml_name}.xml"}
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


def string_enum(*values: str) -> dict[str, object]:
    return {"type": "string", "enum": list(values)}


def error_responses(*statuses: int) -> dict[int, dict[str, object]]:
    text = {
        400: "Bad or missing parameter",
        403: "Refused",
        404: "Unknown domain or template",
        409: "Wrong state, or libvirt refused",
        422: "libvirt rejected the device XML",
        501: "Not supported by the libvirt driver",
        503: "libvirt unreachable",
        504: "libvirt did not answer in time",
    }
    return {s: {"description": text[s], "schema": Error} for s in statuses}


def parse_query(request: web.Request, schema: type[Schema]) -> dict[str, object]:
    try:
        return schema().load(request.query)
    except ValidationError as err:
        problems = "; ".join(f"{k}: {' '.join(map(str, v))}" for k, v in err.messages.items())
        raise ApiError(f"bad query parameter: {problems}", code="bad_parameter") from None
