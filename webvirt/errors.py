"""API errors and how libvirt's errors map onto HTTP statuses."""

from __future__ import annotations

import libvirt


class ApiError(Exception):
    """An error the client caused or must know about; rendered as JSON by the middleware."""

    status = 400
    code = "bad_request"

    def __init__(self, detail: str, *, status: int | None = None, code: str | None = None):
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class Unavailable(ApiError):
    status = 503
    code = "libvirt_unavailable"


class CallTimeout(ApiError):
    status = 504
    code = "libvirt_timeout"


# Errors that mean the connection to libvirt itself is gone, not that the request was wrong.
_CONNECTION_ERRORS = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_AUTH_FAILED,
    libvirt.VIR_ERR_AUTH_UNAVAILABLE,
}
_CONNECTION_DOMAINS = {libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE}

_STATUS_BY_CODE = {
    libvirt.VIR_ERR_NO_DOMAIN: (404, "domain_not_found"),
    libvirt.VIR_ERR_NO_NODE_DEVICE: (404, "node_device_not_found"),
    libvirt.VIR_ERR_NO_SUPPORT: (501, "not_supported"),
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED: (501, "not_supported"),
    libvirt.VIR_ERR_XML_ERROR: (422, "invalid_xml"),
    libvirt.VIR_ERR_XML_DETAIL: (422, "invalid_xml"),
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED: (422, "unsupported_config"),
    libvirt.VIR_ERR_INVALID_ARG: (422, "invalid_argument"),
    libvirt.VIR_ERR_OPERATION_INVALID: (409, "wrong_state"),
    libvirt.VIR_ERR_OPERATION_TIMEOUT: (504, "libvirt_timeout"),
}


def is_connection_error(err: libvirt.libvirtError) -> bool:
    return err.get_error_code() in _CONNECTION_ERRORS or (
        err.get_error_domain() in _CONNECTION_DOMAINS
        and err.get_error_code() in {libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR}
    )


def from_libvirt(err: libvirt.libvirtError) -> ApiError:
    """Translate a libvirt error; anything not listed is libvirt refusing the operation (409)."""
    message = err.get_error_message() or str(err)
    if is_connection_error(err):
        return Unavailable(f"libvirt connection lost: {message}")
    status, code = _STATUS_BY_CODE.get(err.get_error_code(), (409, "libvirt_refused"))
    return ApiError(message, status=status, code=code)
