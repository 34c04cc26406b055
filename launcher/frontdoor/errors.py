"""OpenAI-shaped errors, for the front door's ``/v1`` answers (SDKs raise their usual exceptions)."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import unquote_to_bytes

from starlette.responses import JSONResponse

OPENAI_PREFIX = "/v1/"  # the front door's paths: errors here are OpenAI-shaped


def openai_error(status: int, message: str, error_type: str, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> JSONResponse:  # fmt: skip
    """An error in OpenAI's shape, so SDKs raise their usual exceptions with the message."""
    return JSONResponse({"error": {"message": message, "type": error_type, "code": code}}, status, headers=headers)


def has_dot_segment(raw_path: bytes) -> bool:
    """True if a segment of the path is ``.`` or ``..``, as sent or percent-decoded.

    Such a path would leave ``/v1`` once normalised and reach the instance's own ``/sleep``,
    ``/collective_rpc`` and so on: the front door refuses it before routing.
    """
    return any(unquote_to_bytes(segment) in (b".", b"..") for segment in raw_path.split(b"/"))


def dot_segment_error() -> JSONResponse:
    """The answer to a path with ``.`` or ``..`` segments."""
    return openai_error(400, "The request path has '.' or '..' segments: send it without them.", "BadRequestError",
                        "invalid_path")  # fmt: skip
