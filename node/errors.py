"""The root of edgeshard's one error tree.

Every error edgeshard raises on purpose derives from `EdgeshardError`: its message says what went wrong and
what to do, so the command line prints it as one `edgeshard: error: ...` line and the HTTP API turns it into
an OpenAI error body. The HTTP fields (`status`, `type`, `code`, `param`) live here because they are plain
data; the coordinator's serving errors (coordinator/errors.py) only choose their values. Node-side errors
(a bad checkpoint, a malformed key, a failed pull) also keep the builtin class callers catch them as
(`ValueError`, `FileNotFoundError`, ...).
"""

from __future__ import annotations

from typing import Any


class EdgeshardError(Exception):
    """Base of every edgeshard error; `message` says what went wrong and what to do."""

    status = 500
    type = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str = "",
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        if status is not None:
            self.status = status

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
