"""The job client: the job API as a small library (dml.client.api), the dml CLI and dml local on top of it. Loads no server code, no SQLite and no torch."""
