"""The project's exceptions and the one table that maps them to gRPC status codes.

Domain code raises these and never imports grpc; only the servicer edge calls `status_for`.
Errors from `fedocr.tensors`, `fedocr.encodings` (both subclass WireFormatError, defined here) and
`fedocr.tls` are mapped too (looked up by class, lazily, so this module imports neither grpc nor
those modules at import time).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


class FedOCRError(Exception):
    """Base of every error the federation reports to a peer with a specific status."""


class WireFormatError(ValueError):
    """A tensor stream or payload that breaks the wire contract (maps to INVALID_ARGUMENT).

    Subclassed where each check lives: fedocr.tensors (order, lengths, checksum, size) and
    fedocr.encodings (a payload that is no valid encoding: bad scale, bad code, wrong size).
    """


class MalformedRequest(FedOCRError):
    """A request or stream is malformed: bad chunk, length mismatch, checksum, non-finite values."""


class RoundClosed(FedOCRError):
    """The upload names a round that is no longer (or not yet) accepting uploads."""


class UnknownRound(FedOCRError):
    """The round id was never opened by this aggregator."""


class DuplicateUpload(FedOCRError):
    """This edge already has an acknowledged upload in this round."""


class TooLarge(FedOCRError):
    """A chunk, message or stream exceeds the configured limits."""


class Busy(FedOCRError):
    """Too many uploads in progress; retry later."""


class Draining(FedOCRError):
    """The aggregator is shutting down and accepts no new work."""


class StorageUnavailable(FedOCRError):
    """The aggregator could not make state durable; nothing was counted, retry later."""


class WrongRole(FedOCRError):
    """The caller's certificate role may not call this method."""


class ModelMismatch(FedOCRError):
    """The edge's manifest or fingerprint differs from the federation's model."""


class NotReady(FedOCRError):
    """The federation has no model yet (no edge has joined with a manifest)."""


class SecureRefused(FedOCRError):
    """Secure aggregation: a bad share, a replayed or changed key, a share for another round or holder.

    The message names the edges involved (dealer and holder of a share, owner of a key).
    """


class WrongMode(FedOCRError):
    """A secure-aggregation request to a plain federation, or a plain upload to a secure one."""


class OverWeight(FedOCRError):
    """Secure aggregation: an upload that would take the round's weight past max_weight_sum."""


class WrongPhase(FedOCRError):
    """A secure-aggregation request the round's current phase does not take."""


# The one table: exception class -> grpc.StatusCode name. Looked up along the MRO, most specific
# class first, so a subclass may refine its parent's code (ChunkTooLarge is a WireFormatError).
STATUS_TABLE: dict[str, str] = {
    "MalformedRequest": "INVALID_ARGUMENT",
    "WireFormatError": "INVALID_ARGUMENT",  # fedocr.tensors and .encodings: order, length, checksum, codes
    "ChunkTooLarge": "RESOURCE_EXHAUSTED",  # fedocr.tensors: one chunk over max_chunk_bytes
    "RoundClosed": "FAILED_PRECONDITION",
    "NotReady": "FAILED_PRECONDITION",
    "SecureRefused": "INVALID_ARGUMENT",
    "WrongMode": "FAILED_PRECONDITION",
    "WrongPhase": "FAILED_PRECONDITION",
    "OverWeight": "FAILED_PRECONDITION",  # not RESOURCE_EXHAUSTED: a retry would fail the same
    "UnknownRound": "NOT_FOUND",
    "DuplicateUpload": "ALREADY_EXISTS",
    "TooLarge": "RESOURCE_EXHAUSTED",
    "Busy": "RESOURCE_EXHAUSTED",
    "Draining": "UNAVAILABLE",
    "StorageUnavailable": "UNAVAILABLE",
    "WrongRole": "PERMISSION_DENIED",
    # A foreign model (fingerprint or tensor lengths differ) is not a state to wait out: the edge
    # holds another federation key or preset and must not retry, so PERMISSION_DENIED.
    "ModelMismatch": "PERMISSION_DENIED",
    "UnknownRole": "PERMISSION_DENIED",  # fedocr.tls: a certificate that names no known role
}

_OWN_MODULES = ("fedocr.errors", "fedocr.tensors", "fedocr.tls")


def status_name_for(exc: BaseException) -> str | None:
    """Return the status-code name for a known project exception, or None for anything else."""
    for cls in type(exc).__mro__:
        if cls.__module__ in _OWN_MODULES and cls.__name__ in STATUS_TABLE:
            return STATUS_TABLE[cls.__name__]
    return None


def status_for(exc: BaseException) -> tuple[Any, str]:
    """Map an exception to (grpc.StatusCode, details); unknown ones are logged and become INTERNAL."""
    import grpc  # the adapter's concern only: keeps domain imports grpc-free

    name = status_name_for(exc)
    if name is None:
        logger.error("unexpected error: %r", exc, exc_info=exc)
        return grpc.StatusCode.INTERNAL, "internal error"
    return grpc.StatusCode[name], str(exc) or type(exc).__name__
