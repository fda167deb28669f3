"""Dispatch: scatter each MoE layer's routed tokens to the functions holding their experts, gather results.

It implements the executor that faasmoe.model.moe_block defines; ``executor.open_executor`` opens one.
"""
