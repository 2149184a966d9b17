"""USB rules over HTTP: list, read, make, replace and delete them. Rules are checked by
webvirt/rules.py and kept by webvirt/rules_store.py; this only translates HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

from aiohttp import web
from aiohttp_apigami import docs, match_info_schema, request_schema

from webvirt import deadline
from webvirt.appkeys import HOSTS, RULES
from webvirt.errors import ApiError, NotFound
from webvirt.hosts import Hosts, split_ref
from webvirt.rules import Rule, RuleError, RuleSpec, parse_rule_body
from webvirt.rules_store import Change
from webvirt.schemas import Error, RuleBody, RulePath, UsbRule, error_responses

log = logging.getLogger(__name__)

RULE_NOT_FOUND = {"description": "Unknown rule, or unknown domain", "schema": Error}
WRITE_ERRORS = {**error_responses(400, 408, 413, 415, 503, 504), 404: RULE_NOT_FOUND}
BODY_DESCRIPTION = (
    "A rule hands a host USB device to a domain: `match` names the device by its vendor and "
    "product id (and serial, to tell alike devices apart), or by the port it is plugged into. "
    "The domain, by name or UUID, must exist; the rule keeps its name and UUID."
)


def publish_change(hosts: Hosts, change: Change, rule: Rule) -> None:
    """A store listener: event clients (the dashboard) hear of every committed change."""
    log.info("rule %d %s: %s %s", rule.id, change, rule.domain, rule.match.as_dict())
    name, host = split_ref(rule.domain) if hosts.several else (rule.domain, None)
    where = {"host": host} if host else {}
    hosts.hub.publish("rule-changed", domain=name, rule=rule.id, change=change, **where)


def rule_id(request: web.Request) -> int:
    return int(request.match_info["id"])  # its digits were checked against RulePath


async def read_rule_body(request: web.Request) -> RuleSpec:
    """The body as a rule; a 400 (or 415) that says what is wrong with it."""
    if request.content_type != "application/json":
        raise ApiError("send the rule as JSON, with Content-Type: application/json",
                       status=415, code="unsupported_media_type")
    # The client's pace: bounded by the request's time, and said to be the body's fault.
    limit, _budget = deadline.within(None)
    try:
        async with asyncio.timeout(limit) as timeout:
            raw = await request.read()
    except TimeoutError:
        if not timeout.expired():
            raise
        raise ApiError(f"the request body did not arrive within {limit:g} s", status=408,
                       code="body_timeout") from None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise ApiError(f"the body is not JSON: {err}", code="bad_json") from None
    try:
        return parse_rule_body(body)
    except RuleError as err:
        raise ApiError(str(err), code="bad_rule") from None


async def resolved(request: web.Request) -> tuple[RuleSpec, str]:
    """The rule in the body, naming its domain by name, and the domain's UUID."""
    spec = await read_rule_body(request)
    host, entry = await request.app[HOSTS].resolve(spec.domain)
    # With several hosts the rule keeps its host: NAME@HOST (webvirt/usb_reconciler.py).
    name = f"{entry.name}@{host.name}" if host.tags else entry.name
    return dataclasses.replace(spec, domain=name), entry.uuid


def found(rule: Rule | None, request: web.Request) -> Rule:
    """The rule the store answered with; 404 when it had none with the request's id."""
    if rule is None:
        raise NotFound(f"no rule with id {rule_id(request)}", code="rule_not_found")
    return rule


@docs(
    tags=["rules"],
    summary="List USB rules",
    description="Every rule, by id.",
    responses={200: {"description": "Rules", "schema": UsbRule(many=True)},
               **error_responses(503, 504)},
)
async def list_rules(request: web.Request) -> web.Response:
    rules = await request.app[RULES].list()
    return web.json_response([rule.as_dict() for rule in rules])


@docs(
    tags=["rules"],
    summary="Get a USB rule",
    responses={200: {"description": "The rule", "schema": UsbRule},
               404: RULE_NOT_FOUND, **error_responses(503, 504)},
)
@match_info_schema(RulePath)
async def get_rule(request: web.Request) -> web.Response:
    rule = found(await request.app[RULES].get(rule_id(request)), request)
    return web.json_response(rule.as_dict())


@docs(
    tags=["rules"],
    summary="Create a USB rule",
    description=BODY_DESCRIPTION,
    responses={201: {"description": "The rule as kept, with its id", "schema": UsbRule},
               **WRITE_ERRORS},
)
@request_schema(RuleBody, required=True)
async def create_rule(request: web.Request) -> web.Response:
    spec, uuid = await resolved(request)
    rule = await request.app[RULES].add(spec, uuid)
    return web.json_response(rule.as_dict(), status=201,
                             headers={"Location": f"/api/0/rules/{rule.id}"})


@docs(
    tags=["rules"],
    summary="Replace a USB rule",
    description=BODY_DESCRIPTION + " The rule keeps its id and its age (`created`).",
    responses={200: {"description": "The rule as kept", "schema": UsbRule}, **WRITE_ERRORS},
)
@match_info_schema(RulePath)
@request_schema(RuleBody, required=True)
async def replace_rule(request: web.Request) -> web.Response:
    spec, uuid = await resolved(request)
    rule = found(await request.app[RULES].replace(rule_id(request), spec, uuid), request)
    return web.json_response(rule.as_dict())


@docs(
    tags=["rules"],
    summary="Delete a USB rule",
    responses={204: {"description": "Deleted"}, 404: RULE_NOT_FOUND, **error_responses(503, 504)},
)
@match_info_schema(RulePath)
async def delete_rule(request: web.Request) -> web.Response:
    found(await request.app[RULES].delete(rule_id(request)), request)
    return web.Response(status=204)
