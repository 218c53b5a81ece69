"""Errors a client is told about, in the OpenAI error schema: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations


class ServeError(Exception):
    """An error with the HTTP status and OpenAI error fields it is answered with.

    Statuses the `openai` client retries by itself (408, 409, 429, 5xx) are kept for what a retry can cure."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
        if status is not None:
            self.status = status

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(ServeError):
    status = 400


class Unauthorized(ServeError):
    status = 401
    type = "authentication_error"


class NotFound(ServeError):
    status = 404
    type = "not_found_error"


class TooLarge(ServeError):
    status = 413


class Gone(ServeError):
    status = 410
    type = "not_found_error"


class ServerError(ServeError):
    status = 500
    type = "server_error"
