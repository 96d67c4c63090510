"""`python -m watcher.receiver` runs the verifying webhook receiver."""

import sys

try:
    from watcher.testing.receiver import main
except ModuleNotFoundError as err:  # the receiver's one extra dependency
    if err.name != "standardwebhooks":
        raise
    sys.exit("oxen-watcher: the receiver needs the standardwebhooks package: pip install 'oxen-watcher[receiver]'")

main()
