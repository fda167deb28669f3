"""Dispatch: scatter each MoE layer's routed tokens to the functions holding their experts, gather results."""
