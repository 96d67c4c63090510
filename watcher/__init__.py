"""oxen-watcher: watches Oxen Hub fine-tunes for new checkpoints and deployment changes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("oxen-watcher")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"
