"""Tenants: who may call, with which key, which models, and how much (concurrency, tokens).

Quotas are checked at the edge, before a request reaches the scheduler, so a tenant over its quota
costs the others nothing.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from faasmoe.errors import FaasmoeError

TOKEN_WINDOW_S = 60.0  # tokens_per_minute is a sliding one-minute window


class TenantsError(FaasmoeError):
    """The tenants file is missing or malformed."""


class TenantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    api_keys: list[str] = Field(min_length=1)
    models: list[str] | None = Field(None, description="served model names it may use; None: all")
    max_concurrent: int | None = Field(None, ge=1, description="requests in flight at once")
    max_tokens: int | None = Field(None, ge=1, description="max_tokens of one request")
    tokens_per_minute: int | None = Field(None, ge=1, description="prompt + completion tokens per minute")

    @field_validator("api_keys")
    @classmethod
    def _keys_not_empty(cls, keys: list[str]) -> list[str]:
        if any(len(key) < 8 for key in keys):
            raise ValueError("API keys must be at least 8 characters")
        return keys


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: list[TenantConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> TenantsFile:
        names = [t.name for t in self.tenants]
        keys = [k for t in self.tenants for k in t.api_keys]
        if len(set(names)) != len(names):
            raise ValueError("tenant names must be unique")
        if len(set(keys)) != len(keys):
            raise ValueError("an API key may belong to one tenant only")
        return self

    @classmethod
    def load(cls, path: Path) -> TenantsFile:
        try:
            return cls.model_validate(yaml.safe_load(path.read_text()))
        except FileNotFoundError:
            raise TenantsError(f"tenants file {path} does not exist") from None
        except (yaml.YAMLError, ValidationError) as exc:
            raise TenantsError(f"tenants file {path} is malformed: {exc}") from None


@dataclass
class Charge:
    """A request's hold on its tenant's quotas, from ``Tenant.admit`` until ``Tenant.release``."""

    at: float  # the tenant's clock at admission
    tokens: int  # reserved at admission (prompt + max_tokens), then what was really used
    released: bool = False


class QuotaExceeded(FaasmoeError):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Tenant:
    """A tenant's configuration and the live state of its quotas (touched on the event loop only)."""

    config: TenantConfig
    clock: Callable[[], float] = time.monotonic
    in_flight: int = 0
    _charges: deque[Charge] = field(default_factory=deque)  # within the last TOKEN_WINDOW_S

    @property
    def name(self) -> str:
        return self.config.name

    def may_use(self, model: str) -> bool:
        return self.config.models is None or model in self.config.models

    def admit(self, max_tokens: int, prompt_tokens: int) -> Charge:
        """Reserves a request slot and its worst-case tokens, or raises QuotaExceeded."""
        cfg = self.config
        if cfg.max_tokens is not None and max_tokens > cfg.max_tokens:
            # Listed with the quotas, so a 429 like the others; retrying the same request will not help.
            raise QuotaExceeded(f"max_tokens {max_tokens} is over tenant {self.name}'s limit of {cfg.max_tokens}", 1)
        if cfg.max_concurrent is not None and self.in_flight >= cfg.max_concurrent:
            raise QuotaExceeded(f"tenant {self.name} already has {self.in_flight} requests in flight", 1)
        cost, now = prompt_tokens + max_tokens, self.clock()
        if cfg.tokens_per_minute is not None:
            self._expire(now)
            if cost > cfg.tokens_per_minute:
                raise QuotaExceeded(
                    f"this request may use {cost} tokens, over tenant {self.name}'s {cfg.tokens_per_minute} per minute",
                    TOKEN_WINDOW_S,
                )
            if self._used() + cost > cfg.tokens_per_minute:
                raise QuotaExceeded(
                    f"tenant {self.name} used its {cfg.tokens_per_minute} tokens per minute",
                    self._seconds_until_free(cost, now),
                )
        charge = Charge(now, cost)
        if cfg.tokens_per_minute is not None:  # else nothing would ever expire it
            self._charges.append(charge)
        self.in_flight += 1
        return charge

    def release(self, charge: Charge, tokens_used: int) -> None:
        """Ends the request's hold (once): its slot, and the unused part of its reservation, come back."""
        if charge.released:
            return
        charge.released = True
        self.in_flight -= 1
        charge.tokens = tokens_used

    def _used(self) -> int:
        return sum(charge.tokens for charge in self._charges)

    def _expire(self, now: float) -> None:
        while self._charges and self._charges[0].at <= now - TOKEN_WINDOW_S:
            self._charges.popleft()

    def _seconds_until_free(self, cost: int, now: float) -> float:
        assert self.config.tokens_per_minute is not None
        excess = self._used() + cost - self.config.tokens_per_minute
        for charge in self._charges:
            excess -= charge.tokens
            if excess <= 0:  # whole seconds, rounded up: a retry after Retry-After finds the tokens free
                return max(math.ceil(charge.at + TOKEN_WINDOW_S - now), 1)
        return TOKEN_WINDOW_S


class TenantRegistry:
    def __init__(self, tenants: TenantsFile) -> None:
        self.tenants = {cfg.name: Tenant(cfg) for cfg in tenants.tenants}
        self._keys = [(key.encode(), tenant) for tenant in self.tenants.values() for key in tenant.config.api_keys]

    @classmethod
    def load(cls, path: Path) -> TenantRegistry:
        return cls(TenantsFile.load(path))

    def authenticate(self, key: str) -> Tenant | None:
        """The key's tenant; every key is compared, in constant time, so timing tells nothing."""
        given = key.encode()
        found = None
        for candidate, tenant in self._keys:
            if hmac.compare_digest(candidate, given):
                found = tenant
        return found
