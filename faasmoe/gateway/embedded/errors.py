"""Errors of the embedded gateway; the HTTP layer maps each to a status code."""

from __future__ import annotations

from faasmoe.errors import BadRequest, FaasmoeError


class InsecureBindError(FaasmoeError):
    """The gateway was asked to serve an open /system/* API beyond loopback."""


class UnknownFunction(FaasmoeError):
    """No function of that name is deployed (HTTP 404)."""


class FunctionExists(BadRequest):
    """A POST deploy named a function that is already deployed (HTTP 400, as in OpenFaaS)."""


class ReplicaUnavailable(FaasmoeError):
    """No replica could serve the request: it failed to start, timed out or died (HTTP 502)."""
