"""Errors users see: each names the problem in its message."""


class FaasmoeError(Exception):
    """Base class for faasmoe's user-facing errors."""


class CheckpointError(FaasmoeError):
    """A model directory is not a usable checkpoint of a supported MoE family."""


class PlanError(FaasmoeError):
    """An expert plan is malformed or does not match its model."""


class ShardError(FaasmoeError):
    """A plan's weight file (a function's shard, the trunk) is missing, corrupt, malformed or lacks an expert."""


class BadRequest(FaasmoeError):
    """A request body is malformed or asks for something the receiver cannot do."""


class BodyTooLarge(FaasmoeError):
    """A request body exceeds the receiver's limit (HTTP 413); it is not read further."""
