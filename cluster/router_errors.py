"""How a request ends, in protocol-neutral terms: `Status`, and `RouterError` carrying one. The gRPC
adapter maps a status to the gRPC code of the same name, the HTTP adapter to an HTTP status and
OpenAI's error JSON (cluster/http_errors.py)."""

from __future__ import annotations

import enum
import logging
import uuid

log = logging.getLogger("kvrelay")


class Status(enum.Enum):
    """How a request ended, in the protocol-neutral terms each adapter maps to its own codes (the
    names are gRPC's, so the gRPC adapter maps by name)."""

    OK = "ok"
    CANCELLED = "cancelled"  # the client went away
    INVALID_ARGUMENT = "invalid_argument"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    ALREADY_EXISTS = "already_exists"
    RESOURCE_EXHAUSTED = "resource_exhausted"  # admission is full
    UNAVAILABLE = "unavailable"  # draining, starting, no worker, a worker died
    INTERNAL = "internal"


class RouterError(Exception):
    """Ends a request with a status; the message is for the client (no path, address or traceback).
    For INVALID_ARGUMENT, `param` is the field the message starts with ("max_tokens: ...")."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def param(self) -> str | None:
        if self.status is not Status.INVALID_ARGUMENT:
            return None
        head, sep, _ = self.message.partition(":")
        return head if sep and head.replace("_", "").replace(".", "").isalnum() else None


def internal_error(what: str) -> RouterError:
    """INTERNAL with an id to quote; the exception being handled goes to the log under that id."""
    error_id = uuid.uuid4().hex[:12]
    log.exception("%s failed (error id %s)", what, error_id)
    return RouterError(Status.INTERNAL, f"internal error (id {error_id})")
