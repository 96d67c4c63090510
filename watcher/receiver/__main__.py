"""`python -m watcher.receiver` runs the verifying webhook receiver."""

from watcher.testing.receiver import main

main()
