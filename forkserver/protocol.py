"""The wire format between the API and the forkserver.

Every message is one JSON object, framed by a 4-byte big-endian length. A peer that sends a
frame larger than ``MAX_FRAME`` is cut off: the cap keeps a confused or hostile client from
making the forkserver buffer without bound.

Requests carry ``"op"`` and a client-chosen ``"id"``; the forkserver answers each with a reply
carrying the same ``"id"`` and either ``"ok": true`` plus fields, or ``"ok": false`` plus
``"error"`` (a message for a human) and ``"kind"`` (``"invalid"`` for bad input, ``"conflict"``,
``"not_found"``, or ``"internal"``). Without an ``"id"``, a message from the forkserver is an
event (``"event": "exited"``) pushed to every connected client.

This module imports nothing heavy: the lean API process uses it too.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any

HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 20  # 1 MiB: options and env vars are small; anything bigger is a bug or an attack
PROTOCOL_VERSION = 1

# Instance ids: 1-128 letters, digits, '.', '_', '-', starting with a letter or digit. They name
# log files, so nothing else (no '/', no '..' alone) may pass.
INSTANCE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
INSTANCE_ID = re.compile(INSTANCE_ID_PATTERN)


def valid_instance_id(value: object) -> bool:
    """True if ``value`` is a string that is a valid instance id."""
    return isinstance(value, str) and INSTANCE_ID.fullmatch(value) is not None


# Request operations.
OP_HELLO = "hello"  # -> {"pid", "version", "workload", "preload_seconds", "threads", "instances": [...]}
OP_VALIDATE = "validate"  # {"argv"} -> {"model", "port", "port_given", "host"}
OP_SPAWN = "spawn"  # {"instance_id", "argv", "env", "log_path", "meta", "unstartable"?} -> {"pid", "model", "port", ...}
OP_CANCEL = "cancel"  # {"instance_id"} -> {"cancelled"} ; drops a spawn still waiting for its zygote
OP_STOP = "stop"  # {"instance_id", "grace_seconds"} -> {} ; an "exited" event follows
OP_FORGET = "forget"  # {"instance_id"} -> {} ; drops the record of a stopped instance
OP_NOTE = "note"  # {"instance_id", "meta"} -> {} ; merges into the instance's API notes
OP_SHUTDOWN = "shutdown"  # {"grace_seconds"} -> {} ; stops every instance, then the server exits

EVENT_EXITED = "exited"  # an instance's description (see hello) once no process of it is left
EVENT_FORKED = "forked"  # an instance's description (see hello), forked for a client gone meanwhile

# Error kinds in replies.
KIND_INVALID = "invalid"
KIND_CONFLICT = "conflict"
KIND_NOT_FOUND = "not_found"
KIND_INTERNAL = "internal"


class FrameError(ValueError):
    """A peer sent bytes that are not a valid frame."""


def encode(message: dict[str, Any]) -> bytes:
    """Serialise ``message`` into one length-prefixed frame."""
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise FrameError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte cap")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """Decode a frame header, refusing lengths over the cap."""
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise FrameError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte cap")
    return int(length)


def decode_body(body: bytes) -> dict[str, Any]:
    """Parse a frame body, which must be a JSON object."""
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"frame is not valid JSON: {exc}") from None
    except RecursionError:
        raise FrameError("frame is JSON nested too deeply") from None
    if not isinstance(message, dict):
        raise FrameError("frame is not a JSON object")
    return message


class FrameBuffer:
    """Accumulates bytes from a non-blocking socket and yields complete messages."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        """Add ``chunk``; return every message now complete (raises FrameError on garbage)."""
        self._data += chunk
        messages: list[dict[str, Any]] = []
        while len(self._data) >= HEADER.size:
            length = frame_length(bytes(self._data[: HEADER.size]))
            end = HEADER.size + length
            if len(self._data) < end:
                break
            messages.append(decode_body(bytes(self._data[HEADER.size : end])))
            del self._data[:end]
        return messages
