"""The function's response headers, shared with the control plane that reads them (no torch imported here)."""

INVOCATION_HEADER = "X-Faasmoe-Invocation"  # invocations this replica served; "1": the call met a fresh replica
COMPUTE_HEADER = "X-Faasmoe-Compute-Seconds"
LOAD_HEADER = "X-Faasmoe-Load-Seconds"  # process start -> weights loaded, the replica's cold start
