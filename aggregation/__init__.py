"""Socket-free aggregation algorithms: ring all-reduce schedule, weighted averaging, transports."""
