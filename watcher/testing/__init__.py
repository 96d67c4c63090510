"""Helpers for tests and the benchmark that are not part of the daemon: a throwaway PostgreSQL cluster."""
