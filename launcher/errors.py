"""Errors that map to HTTP responses. One handler (in app.py) turns them into ``{"detail": ...}``."""

from __future__ import annotations


class LauncherError(Exception):
    """Base class: carries the HTTP status code and a message for the client."""

    status_code = 500

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadRequest(LauncherError):
    status_code = 400


class NotFound(LauncherError):
    status_code = 404


class Conflict(LauncherError):
    status_code = 409


class PayloadTooLarge(LauncherError):
    status_code = 413


class UnsupportedMediaType(LauncherError):
    status_code = 415


class RangeNotSatisfiable(LauncherError):
    status_code = 416


class Unprocessable(LauncherError):
    status_code = 422


class ServiceUnavailable(LauncherError):
    status_code = 503


class InternalError(LauncherError):
    status_code = 500


class TooManyInstances(LauncherError):
    status_code = 429


class Gone(LauncherError):
    status_code = 410
