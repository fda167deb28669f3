"""Routed experts: the maths (shared by the in-process executor and the function), shards and the wire format."""
