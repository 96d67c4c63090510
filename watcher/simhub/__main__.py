"""`python -m watcher.simhub` serves a simulated Hub in the foreground."""

from watcher.testing.simhub.__main__ import main

main()
