"""`python -m watcher` is the `oxen-watcher` command."""

from .cli import main

main()
