"""Request bodies read up to a limit: an over-size body is refused before it is buffered.

The embedded gateway (invocations, /system/*) and the function server read their bodies this way.
"""

from __future__ import annotations

from starlette.requests import Request

from faasmoe.errors import BodyTooLarge

MIB = 1 << 20


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body; raises BodyTooLarge (HTTP 413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(_too_large(limit))
    body = bytearray()
    async for chunk in request.stream():  # chunked, or longer than declared
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(_too_large(limit))
    return bytes(body)


def _too_large(limit: int) -> str:
    return f"request body exceeds the limit of {limit} bytes"
