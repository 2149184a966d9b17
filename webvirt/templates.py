"""Device templates: devices/NAME.xml with $UPPER_CASE variables filled from query parameters."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from webvirt.errors import ApiError, NotFound

# Greedy, so $VENDOR_ID is one variable and never $VENDOR followed by "_ID".
VARIABLE = re.compile(r"\$([A-Z][A-Z0-9_]*)")
# No "/" and no leading ".", so a name cannot climb out of the devices folder.
TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_VALUE_LENGTH = 1024
MAX_TEMPLATE_BYTES = 64 * 1024
# Query parameters webvirt itself uses; a template may not name a variable after them.
RESERVED_PARAMETERS = frozenset({"live", "persistent", "token", "timeout", "wait"})
# Characters XML 1.0 cannot carry at all, even escaped.
_NOT_XML_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


@dataclass(frozen=True)
class DeviceTemplate:
    name: str
    text: str

    @property
    def variables(self) -> list[str]:
        """Variable names in order of first appearance."""
        return list(dict.fromkeys(VARIABLE.findall(self.text)))

    def render(self, params: Mapping[str, str]) -> tuple[str, dict[str, str]]:
        """Fill the variables from case-insensitive params; returns the XML and the values used."""
        values = _values_by_variable(params)
        missing = [v for v in self.variables if v not in values]
        if missing:
            names = ", ".join(v.lower() for v in missing)
            raise ApiError(
                f"template {self.name!r} needs the query parameter(s): {names}",
                code="missing_variable",
            )
        used = {v: values[v] for v in self.variables}
        xml = VARIABLE.sub(lambda m: escape(used[m.group(1)], {"'": "&apos;", '"': "&quot;"}),
                           self.text)
        _check_well_formed(xml, self.name)
        return xml, used


class TemplateStore:
    """Reads templates from one directory on every use, so edits apply without a restart."""

    def __init__(self, directory: Path):
        self.directory = directory

    def names(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(
            p.stem for p in self.directory.glob("*.xml")
            if TEMPLATE_NAME.fullmatch(p.stem) and self._inside(p)
        )

    def load(self, name: str) -> DeviceTemplate:
        if not TEMPLATE_NAME.fullmatch(name):
            raise ApiError(
                f"invalid template name {name!r}: use letters, digits, '_', '-' and '.'",
                code="invalid_template_name",
            )
        path = self.directory / f"{name}.xml"
        if not path.is_file():
            raise NotFound(f"no device template {name!r} in {self.directory}",
                           code="template_not_found")
        if not self._inside(path):
            raise ApiError(f"device template {name!r} points outside {self.directory}",
                           status=403, code="template_outside_devices")
        data = path.read_bytes()
        if len(data) > MAX_TEMPLATE_BYTES:
            raise ApiError(f"device template {name!r} is larger than {MAX_TEMPLATE_BYTES} bytes",
                           status=422, code="invalid_template")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(f"device template {name!r} is not UTF-8", status=422,
                           code="invalid_template") from None
        clash = sorted(RESERVED_PARAMETERS & {v.lower() for v in VARIABLE.findall(text)})
        if clash:
            raise ApiError(
                f"device template {name!r} uses reserved variable name(s): "
                + ", ".join(f"${v.upper()}" for v in clash),
                status=422, code="invalid_template",
            )
        return DeviceTemplate(name, text)

    def _inside(self, path: Path) -> bool:
        # Symlinks are followed, so a link out of the directory is caught here.
        return path.resolve().is_relative_to(self.directory.resolve())


def _values_by_variable(params: Mapping[str, str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for key, value in params.items():
        variable = key.upper()
        if not VARIABLE.fullmatch("$" + variable) or key.lower() in RESERVED_PARAMETERS:
            continue
        if variable in values and values[variable] != value:
            raise ApiError(f"query parameter {key.lower()!r} is given twice with different values",
                           code="ambiguous_variable")
        _check_value(key.lower(), value)
        values[variable] = value
    return values


def _check_value(name: str, value: str) -> None:
    if value == "":
        raise ApiError(f"query parameter {name!r} is empty", code="invalid_variable")
    if len(value) > MAX_VALUE_LENGTH:
        raise ApiError(f"query parameter {name!r} is longer than {MAX_VALUE_LENGTH} characters",
                       code="invalid_variable")
    if "\ufffd" in value or _NOT_XML_CHAR.search(value):
        raise ApiError(f"query parameter {name!r} holds bytes that are not valid UTF-8 XML text",
                       code="invalid_variable")


def _check_well_formed(xml: str, name: str) -> None:
    try:
        ET.fromstring(xml)
    except ET.ParseError as err:
        raise ApiError(f"device template {name!r} is not well-formed XML: {err}", status=422,
                       code="invalid_template") from None
