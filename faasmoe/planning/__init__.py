"""Planning: which function holds which experts (grouping), export of shards, stack.yml, scaling."""
