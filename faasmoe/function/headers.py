"""The function's HTTP headers, shared with the gateway and the control plane that read them (no torch here)."""

INVOCATION_HEADER = "X-Faasmoe-Invocation"  # invocations this replica served; "1": the call met a fresh replica
COMPUTE_HEADER = "X-Faasmoe-Compute-Seconds"  # the call's decode + partial sums + encode, on its thread
# Seconds the call waited, weights loaded, for the compute thread that earlier calls held: the queueing that
# another replica would remove (faasmoe/elastic/hot_replicas.py scales on it).
QUEUE_HEADER = "X-Faasmoe-Queue-Seconds"
LOAD_HEADER = "X-Faasmoe-Load-Seconds"  # process start -> weights loaded, the replica's cold start
# Requests sent straight to a replica (the direct path) name the function they are for: a replica of
# another function (a stale address) answers 421 instead of computing with the wrong experts.
FUNCTION_HEADER = "X-Faasmoe-Function"
# On /ready: seconds since the replica last answered an invocation (0 while one runs), so that the gateway
# counts calls it did not forward when it decides a function is idle.
IDLE_HEADER = "X-Faasmoe-Idle-Seconds"
