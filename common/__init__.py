"""What the coordinator, the peers and the client share: the job spec and its validation, the task registry, the sampling order. Imports no server or client code."""
