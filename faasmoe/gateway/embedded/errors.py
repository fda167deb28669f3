"""Errors of the embedded gateway; the HTTP layer maps each to a status code.

Each failure means one thing: "busy / starting" is the function's own 429/503 (retried by clients);
a function that failed to load (500) or crashed (502) is final, and clients do not retry it.
"""

from __future__ import annotations

from faasmoe.errors import BadRequest, BodyTooLarge, FaasmoeError


class InsecureBindError(FaasmoeError):
    """The gateway was asked to run insecurely: an open /system/* beyond loopback, or envProcess without auth."""


class UnknownFunction(FaasmoeError):
    """No function of that name is deployed (HTTP 404)."""


class FunctionExists(BadRequest):
    """A POST deploy named a function that is already deployed (HTTP 400, as in OpenFaaS)."""


class UnsupportedMediaType(FaasmoeError):
    """A /system/* body that is not declared as JSON (HTTP 415): no cross-site form can send one."""


class ForbiddenHost(FaasmoeError):
    """A /system/* request to an open (loopback) gateway under a non-loopback Host: DNS rebinding (HTTP 403)."""


class FunctionFailed(FaasmoeError):
    """The function said it cannot serve: its ready path answered 500, e.g. its shard failed to load (HTTP 500)."""


class ReplicaUnavailable(FaasmoeError):
    """No replica could serve the request: it crashed, timed out or could not be run (HTTP 502)."""


class ReplicaLost(ReplicaUnavailable):
    """A starting replica was killed by a signal, or its runtime (the zygote) went away: not the
    function's fault, so the pool starts another for the same request."""


# Error -> HTTP status; the most specific class that matches wins (ReplicaLost is a ReplicaUnavailable).
ERROR_STATUS: dict[type[Exception], int] = {
    UnknownFunction: 404,
    BadRequest: 400,
    ForbiddenHost: 403,
    BodyTooLarge: 413,
    UnsupportedMediaType: 415,
    FunctionFailed: 500,
    ReplicaUnavailable: 502,
}


def status_of(error: Exception) -> int:
    """The HTTP status ``error`` answers with; 500 for anything unexpected."""
    for error_type in type(error).__mro__:
        if error_type in ERROR_STATUS:
            return ERROR_STATUS[error_type]
    return 500
