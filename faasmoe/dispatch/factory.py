"""Which executor computes the routed experts: in-process without a gateway, the functions with one."""

from __future__ import annotations

from faasmoe.dispatch.local import local_executor
from faasmoe.dispatch.remote import InvocationLog, remote_executor_factory
from faasmoe.model.split_model import ExecutorFactory


def executor_factory(
    gateway_url: str | None, basic_auth: str | None = None, log: InvocationLog | None = None
) -> ExecutorFactory:
    if gateway_url is None:
        return local_executor
    return remote_executor_factory(gateway_url, basic_auth, log)
