"""`python -m watcher` is the `oxen-watcher` command."""

from watcher.cli import main

main()
