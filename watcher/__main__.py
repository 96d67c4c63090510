"""`python -m watcher` is the `oxen-watcher` command."""

from watcher.cli.main import main

main()
