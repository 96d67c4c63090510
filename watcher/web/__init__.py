"""The status page: server-rendered HTML pages, inline SVG charts and a JSON API over the watcher's state.

Nothing is imported here, so `watcher.store` can use `watcher.web.reports` without loading the templates.
"""
