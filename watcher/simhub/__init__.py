"""`python -m watcher.simhub`: the simulated Hub (it lives in `watcher.testing.simhub`)."""
