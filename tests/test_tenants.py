"""A tenant's quotas on their own: max_tokens, max_concurrent and the tokens_per_minute sliding window.

Time is the tenant's clock, set by the test: the window's expiry and Retry-After are checked to the second.
"""

from __future__ import annotations

import pytest

from faasmoe.server.tenants import TOKEN_WINDOW_S, QuotaExceeded, Tenant, TenantConfig


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tenant(clock: Clock, **quotas: int) -> Tenant:
    return Tenant(TenantConfig(name="t", api_keys=["sk-test-0001"], **quotas), clock=clock)


def retry_after(t: Tenant, max_tokens: int, prompt_tokens: int) -> float:
    with pytest.raises(QuotaExceeded) as refused:
        t.admit(max_tokens, prompt_tokens)
    return refused.value.retry_after_s


def test_admission_reserves_prompt_plus_max_tokens():
    t = tenant(Clock(1000.0), tokens_per_minute=100)
    t.admit(max_tokens=30, prompt_tokens=10)
    t.admit(max_tokens=50, prompt_tokens=10)  # 40 + 60 = 100: exactly the quota
    retry_after(t, max_tokens=1, prompt_tokens=0)
    assert t.in_flight == 2


def test_release_returns_the_unused_reservation():
    t = tenant(Clock(1000.0), tokens_per_minute=100)
    t.release(t.admit(max_tokens=80, prompt_tokens=10), tokens_used=25)  # 65 of the 90 reserved come back
    retry_after(t, max_tokens=66, prompt_tokens=10)
    t.admit(max_tokens=65, prompt_tokens=10)
    assert t.in_flight == 1


def test_release_is_idempotent():
    t = tenant(Clock(1000.0), max_concurrent=2, tokens_per_minute=100)
    charge = t.admit(max_tokens=50, prompt_tokens=0)
    t.release(charge, tokens_used=10)
    t.release(charge, tokens_used=50)  # a second release changes neither the slot count nor the tokens
    assert t.in_flight == 0
    t.admit(max_tokens=90, prompt_tokens=0)


def test_tokens_leave_the_window_60_seconds_after_admission():
    clock = Clock(1000.0)
    t = tenant(clock, tokens_per_minute=100)
    t.release(t.admit(max_tokens=60, prompt_tokens=0), tokens_used=60)
    clock.now = 1030.0
    t.release(t.admit(max_tokens=40, prompt_tokens=0), tokens_used=40)
    clock.now = 1000.0 + TOKEN_WINDOW_S - 0.001
    retry_after(t, max_tokens=1, prompt_tokens=0)  # the first charge is still 1 ms inside the window
    clock.now = 1000.0 + TOKEN_WINDOW_S
    t.admit(max_tokens=60, prompt_tokens=0)  # it left; the second (40) stays until 30 s later
    retry_after(t, max_tokens=1, prompt_tokens=0)


def test_retry_after_is_when_enough_tokens_leave_the_window():
    clock = Clock(1000.0)
    t = tenant(clock, tokens_per_minute=100)
    for used in (30, 30, 40):  # admitted at 0 s, 10 s and 20 s
        t.release(t.admit(max_tokens=used, prompt_tokens=0), tokens_used=used)
        clock.now += 10
    assert retry_after(t, max_tokens=30, prompt_tokens=0) == TOKEN_WINDOW_S - 30  # the first charge frees 30
    assert retry_after(t, max_tokens=50, prompt_tokens=0) == TOKEN_WINDOW_S - 20  # 50 needs the second one too
    clock.now += TOKEN_WINDOW_S - 20
    t.admit(max_tokens=50, prompt_tokens=10)


def test_retry_after_is_whole_seconds_and_a_retry_then_is_admitted():
    """Retry-After is an integer header: rounding 20.3 s down would send the client back too early."""
    clock = Clock(1000.3)
    t = tenant(clock, tokens_per_minute=100)
    t.admit(max_tokens=100, prompt_tokens=0)
    clock.now = 1040.0
    wait = retry_after(t, max_tokens=100, prompt_tokens=0)
    assert wait == 21
    clock.now += wait
    t.admit(max_tokens=100, prompt_tokens=0)


def test_retry_after_is_at_least_one_second():
    clock = Clock(1000.0)
    t = tenant(clock, tokens_per_minute=100)
    t.admit(max_tokens=100, prompt_tokens=0)
    clock.now += TOKEN_WINDOW_S - 0.25
    assert retry_after(t, max_tokens=1, prompt_tokens=0) == 1


def test_a_request_over_the_whole_minute_is_refused_for_a_window():
    t = tenant(Clock(1000.0), tokens_per_minute=100)
    assert retry_after(t, max_tokens=95, prompt_tokens=6) == TOKEN_WINDOW_S
    t.admit(max_tokens=94, prompt_tokens=6)  # the refusal reserved nothing


def test_max_concurrent_counts_requests_in_flight():
    t = tenant(Clock(1000.0), max_concurrent=2)
    first = t.admit(max_tokens=10, prompt_tokens=5)
    t.admit(max_tokens=10, prompt_tokens=5)
    assert retry_after(t, max_tokens=10, prompt_tokens=5) == 1
    assert t.in_flight == 2
    t.release(first, tokens_used=15)
    t.admit(max_tokens=10, prompt_tokens=5)
    assert t.in_flight == 2


def test_max_tokens_is_a_limit_per_request_and_reserves_nothing():
    t = tenant(Clock(1000.0), max_tokens=40, max_concurrent=1, tokens_per_minute=100)
    retry_after(t, max_tokens=41, prompt_tokens=0)
    assert t.in_flight == 0
    t.admit(max_tokens=40, prompt_tokens=60)  # prompt tokens do not count against max_tokens


def test_a_refusal_for_tokens_holds_no_slot():
    t = tenant(Clock(1000.0), max_concurrent=2, tokens_per_minute=100)
    t.admit(max_tokens=100, prompt_tokens=0)
    retry_after(t, max_tokens=1, prompt_tokens=0)
    assert t.in_flight == 1


def test_without_a_token_quota_nothing_is_kept_per_request():
    """Charges only expire while a tokens_per_minute quota checks them: without one none may pile up."""
    t = tenant(Clock(1000.0), max_concurrent=1)
    for _ in range(1000):
        t.release(t.admit(max_tokens=10, prompt_tokens=5), tokens_used=15)
    assert not t._charges
