"""The dml coordinator: jobs, peer registry, shard plans and the round state machine."""
