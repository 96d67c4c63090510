"""The status page: server-rendered HTML pages, inline SVG charts and a JSON API over the watcher's state.

It reads durable state through `watcher.store.reports.Reports` and the daemon's live state through the callables
the daemon hands it (`site.LiveSources`); it imports nothing of the daemon.
"""
