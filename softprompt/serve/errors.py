"""Errors the server turns into HTTP responses: each carries its status code, a one-line message and, where a
request field is to blame, the field's name (`param`)."""

from __future__ import annotations


class ServeError(Exception):
    status = 500
    kind = "server_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class BadRequest(ServeError):
    status, kind = 400, "invalid_request_error"


class Unauthorized(ServeError):
    status, kind = 401, "authentication_error"


class Forbidden(ServeError):
    status, kind = 403, "permission_error"


class NotFound(ServeError):
    status, kind = 404, "not_found_error"


class Conflict(ServeError):
    status, kind = 409, "conflict_error"


class TooLarge(ServeError):
    status, kind = 413, "request_too_large"


class Unprocessable(ServeError):
    status, kind = 422, "invalid_request_error"


class QueueFull(ServeError):
    status, kind = 429, "rate_limit_error"


class Unavailable(ServeError):
    status, kind = 503, "unavailable_error"


class Timeout(ServeError):
    status, kind = 504, "timeout_error"
