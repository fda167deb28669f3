"""The model trunk: checkpoint loading, the split MoE block and the forward over a batch of sequences."""
