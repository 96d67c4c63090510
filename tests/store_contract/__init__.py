"""The store contract: tests written against the store protocols only, run over every implementation."""
