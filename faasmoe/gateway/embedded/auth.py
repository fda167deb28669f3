"""Who may call /system/*: HTTP basic auth as the OpenFaaS gateway requires it, and no browser cross-site."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from urllib.parse import urlsplit

from fastapi import HTTPException, Request, status
from fastapi.security import HTTPBasic

from faasmoe.gateway.embedded.errors import ForbiddenHost, UnsupportedMediaType
from faasmoe.gateway.embedded.settings import EmbeddedGatewaySettings, is_loopback

_JSON = "application/json"
_READS = ("GET", "HEAD")

_REALM = "faasmoe gateway"


def basic_auth_guard(settings: EmbeddedGatewaySettings) -> Callable[[Request], object]:
    """A FastAPI dependency that answers 401 unless the request carries the configured credentials.

    Without configured credentials it lets everything through (the gateway then binds to
    loopback only, see ensure_safe_binding).
    """
    if not settings.auth_enabled:

        async def open_access(request: Request) -> None:
            return None

        return open_access

    assert settings.basic_auth_user is not None and settings.basic_auth_password is not None
    expected_user = settings.basic_auth_user.encode()
    expected_password = settings.basic_auth_password.get_secret_value().encode()
    parse = HTTPBasic(auto_error=False, realm=_REALM)

    async def require_credentials(request: Request) -> None:
        given = await parse(request)
        user = given.username.encode() if given else b""
        password = given.password.encode() if given else b""
        # Compare both in constant time, and always both, so timing reveals neither.
        user_ok = secrets.compare_digest(user, expected_user)
        password_ok = secrets.compare_digest(password, expected_password)
        if not (given and user_ok and password_ok):
            raise HTTPException(
                status_code=status.HTTP_401_UNAUTHORIZED,
                detail="invalid or missing basic auth credentials",
                headers={"WWW-Authenticate": f'Basic realm="{_REALM}"'},
            )

    return require_credentials


def same_origin_guard(settings: EmbeddedGatewaySettings) -> Callable[[Request], object]:
    """A FastAPI dependency that keeps web pages in a user's browser out of /system/*.

    A cross-site page can send "simple" requests (form or text/plain bodies) without a CORS preflight:
    bodies must be declared JSON, which a page can only send after a preflight this gateway never
    grants. Without credentials, a page could still resolve its own name to 127.0.0.1 (DNS rebinding)
    and be same-origin: there the Host header must name the loopback address itself.
    """

    async def require_same_origin(request: Request) -> None:
        if not settings.auth_enabled and not is_loopback(_host_name(request.headers.get("host", ""))):
            raise ForbiddenHost("/system/* of a gateway without credentials answers only to a loopback Host")
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if request.method not in _READS and media_type != _JSON:
            raise UnsupportedMediaType(f"/system/* bodies must be sent as Content-Type: {_JSON}")

    return require_same_origin


def _host_name(host_header: str) -> str:
    """The name in a Host header ("localhost:8080", "[::1]:8080"); "" when it has none."""
    if any(c in host_header for c in "@/?#\\"):  # a URL's other parts: no browser sends them as a Host
        return ""
    try:
        return urlsplit("//" + host_header).hostname or ""
    except ValueError:  # an unbalanced bracket
        return ""
