"""The dml peer: trains on its shards with torch and averages parameters with other peers."""
