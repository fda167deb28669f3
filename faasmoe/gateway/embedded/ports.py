"""Free TCP ports for replicas (and for tests starting a gateway): the process toolkit's."""

from __future__ import annotations

from faasmoe.process import free_port

__all__ = ["free_port"]
