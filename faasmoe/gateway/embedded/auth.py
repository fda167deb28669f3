"""HTTP basic auth for /system/*, as the OpenFaaS gateway requires it."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from fastapi import HTTPException, Request, status
from fastapi.security import HTTPBasic

from faasmoe.gateway.embedded.settings import EmbeddedGatewaySettings

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
