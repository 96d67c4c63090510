"""`python -m watcher.receiver`: the verifying webhook receiver (it lives in `watcher.testing.receiver`)."""
