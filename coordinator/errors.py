"""The coordinator's errors: the serving path's (engine, HTTP API, SDK), the cluster's and the user's.

One class per thing a caller can do something about. Each knows its HTTP status and its OpenAI error fields
(`type`, `param`, `code`), so the server turns it into `{"error": {...}}` and the SDK turns that JSON back into
the same class: `except ClusterBusyError` works the same against an in-process `Engine` and a remote server.
This module imports nothing heavy (the SDK depends on it). The root, `EdgeshardError`, is node/errors.py's:
one tree for the whole package.
"""

from __future__ import annotations

from typing import Any

from edgeshard.node.errors import EdgeshardError


class BadRequestError(EdgeshardError):
    """The request is malformed or asks for something unsupported (HTTP 400)."""

    status = 400
    type = "invalid_request_error"


class ContextLengthError(BadRequestError):
    """Prompt plus requested tokens do not fit the model's context (HTTP 400, code context_length_exceeded)."""

    default_code = "context_length_exceeded"


class AuthenticationError(EdgeshardError):
    """The server wants an API key and the request had none or a wrong one (HTTP 401, code invalid_api_key)."""

    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class RequestTooLargeError(BadRequestError):
    """The request body exceeds the server's limit (HTTP 413)."""

    status = 413
    default_code = "request_too_large"


class ModelNotFoundError(EdgeshardError):
    """The request names a model this server does not serve (HTTP 404)."""

    status = 404
    type = "invalid_request_error"
    default_code = "model_not_found"


class ClusterBusyError(EdgeshardError):
    """Every generation slot and queue place is taken; retry later (HTTP 429)."""

    status = 429
    type = "rate_limit_error"
    default_code = "cluster_busy"


class ServerUnavailableError(EdgeshardError):
    """No plan can run now (nodes missing or failed), or the server cannot be reached (HTTP 503)."""

    status = 503
    type = "service_unavailable"
    default_code = "no_plan"


class UserError(EdgeshardError):
    """A mistake on the command line the user can fix (exit code 2); printed as one line."""

    status = 400
    type = "invalid_request_error"


class ClusterError(ServerUnavailableError):
    """The cluster cannot do what was asked (a node refused a load or failed a step); the message says why."""

    default_code = "cluster_error"


class PlanError(ClusterError):
    """No placement fits (or an explicit one does not); the message says what is missing and what to add.

    `missing_bytes` is the memory a node to add needs at least (0 when it is not memory that is missing).
    """

    default_code = "no_plan"

    def __init__(self, message: str, missing_bytes: int = 0) -> None:
        super().__init__(message)
        self.missing_bytes = missing_bytes


class CapacityError(PlanError):
    """After a failure, the nodes left cannot hold the model; the message names them and what to add."""

    default_code = "insufficient_memory"


_BY_STATUS: dict[int, type[EdgeshardError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    413: RequestTooLargeError,
    404: ModelNotFoundError,
    429: ClusterBusyError,
    503: ServerUnavailableError,
}
_BY_TYPE = {cls.type: cls for cls in (ClusterBusyError, ServerUnavailableError)}


def error_from_body(status: int | None, body: Any) -> EdgeshardError:
    """Rebuild the typed error from a response status and its JSON body (an error event has no status)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return EdgeshardError(f"HTTP {status}: {str(body)[:500]}", status=status)
    message, code = str(err.get("message") or f"HTTP {status}"), err.get("code")
    if code == ContextLengthError.default_code:
        cls: type[EdgeshardError] = ContextLengthError
    elif status in _BY_STATUS:
        cls = _BY_STATUS[status]
    else:
        cls = _BY_TYPE.get(err.get("type"), EdgeshardError)
    return cls(message, param=err.get("param"), code=code, status=status if cls is EdgeshardError else None)
