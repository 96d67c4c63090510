"""The set of watched fine-tunes: which ones, with which settings, each one's object dropped whole when it stops
being watched (its health, hold-back, flags and metric series go with it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from watcher.config.load import Config
from watcher.core.models import FineTuneRef
from watcher.daemon.ownership import Ownership
from watcher.daemon.watched import PollHealth, WatchedFineTune, ref_of
from watcher.observe.metrics import Metrics


@dataclass(slots=True, kw_only=True)
class WatchSet:
    """The watched fine-tunes by key, adopted from the config and the discovery sources."""

    config: Config
    metrics: Metrics | None = None
    commit: bool = True
    fine_tunes: dict[str, WatchedFineTune] = field(default_factory=dict)
    # fine-tunes the [[discover]] sources watch: key -> (ref, source name); set_fine_tunes() adopts them
    discovered: dict[str, tuple[FineTuneRef, str]] = field(default_factory=dict)
    _unauthorized: int = 0  # watched fine-tunes whose last answer was 401/403
    # replicas: which fine-tunes this process owns (the lease keeper); None on SQLite (it owns everything)
    ownership: Ownership | None = None

    @property
    def refs(self) -> dict[str, FineTuneRef]:
        """The watched fine-tunes by key."""
        return {key: ft.ref for key, ft in self.fine_tunes.items()}

    @property
    def health(self) -> dict[str, PollHealth]:
        """The poll health of every watched fine-tune by key."""
        return {key: ft.health for key, ft in self.fine_tunes.items()}

    def every_ref(self) -> dict[str, FineTuneRef]:
        """Every fine-tune the config watches, listed or discovered, whichever process polls it: a replica on
        PostgreSQL holds only the ones it owns, and its status page shows them all (their state is in the shared
        database)."""
        refs = self.refs
        for fine_tune in self.config.fine_tunes:
            refs.setdefault(fine_tune.key, ref_of(fine_tune))
        sources = {source.name for source in self.config.discover}
        for key, (ref, source) in dict(self.discovered).items():
            if source in sources:
                refs.setdefault(key, ref)
        return refs

    def set_fine_tunes(self, config: Config) -> None:
        """Adopt the fine-tunes (and options) of a config, plus those its [[discover]] sources found: new ones
        start, removed ones are dropped whole. One both listed and discovered is watched with the listed settings.
        """
        self.config = config
        wanted = {ft.key: (ref_of(ft), "config", config.interval_of(ft)) for ft in config.fine_tunes}
        sources = {source.name for source in config.discover}
        for key, (ref, source) in self.discovered.items():
            if source in sources and key not in wanted:
                wanted[key] = (ref, source, config.watch.interval_s)
        if self.ownership is not None:  # replicas: only the fine-tunes this one holds the lease of
            owns = self.ownership.owns
            wanted = {key: entry for key, entry in wanted.items() if owns(key)}
        for key in [k for k in self.fine_tunes if k not in wanted]:
            self.drop(key)
        for key, (ref, source, interval) in wanted.items():
            watched = self.fine_tunes.get(key)
            if watched is None:
                children = self.metrics.poll_children(ref) if self.metrics is not None and self.commit else None
                self.fine_tunes[key] = WatchedFineTune(ref, children=children, source=source, interval_s=interval)
                continue
            watched.source, watched.interval_s = source, interval
            if watched.ref != ref:  # renamed: the gauges show the new name
                watched.ref = ref
                if self.metrics is not None and watched.status is not None:
                    self.metrics.state.set_fine_tune(ref, watched.status)

    def owns(self, key: str) -> bool:
        """Whether this process polls the fine-tune (replicas: holds its lease; SQLite: always)."""
        return self.ownership is None or self.ownership.owns(key)

    def set_discovered(self, found: dict[str, tuple[FineTuneRef, str]]) -> bool:
        """Take what the sources watch now (replicas: as the database says for the sources others read) and adopt
        it; returns whether the set of watched fine-tunes changed."""
        before = set(self.fine_tunes)
        self.discovered = found
        self.set_fine_tunes(self.config)  # drops an owned fine-tune its source no longer watches
        return set(self.fine_tunes) != before

    def snapshot(self) -> tuple[Config, dict[str, WatchedFineTune]]:
        """The watched set as it is now, for restore() when a reload fails half-way."""
        return self.config, dict(self.fine_tunes)

    def restore(self, snapshot: tuple[Config, dict[str, WatchedFineTune]]) -> None:
        """Go back to a snapshot: fine-tunes added since are dropped, dropped ones come back as they were."""
        config, fine_tunes = snapshot
        for key in [k for k in self.fine_tunes if k not in fine_tunes]:
            self.drop(key)
        for key, watched in fine_tunes.items():
            if self.fine_tunes.get(key) is watched:
                continue
            watched.watched = True
            if self.metrics is not None and self.commit:
                watched.children = self.metrics.poll_children(watched.ref)
                if watched.status is not None:
                    self.metrics.state.set_fine_tune(watched.ref, watched.status)
            if watched.unauthorized:
                self._unauthorized += 1
            self.fine_tunes[key] = watched
        self.set_fine_tunes(config)  # the old sources and intervals of the objects kept

    def drop(self, key: str) -> None:
        """Stop watching a fine-tune: its object, health, hold-back, flags and metric series go at once."""
        watched = self.fine_tunes.pop(key, None)
        if watched is None:
            return
        watched.watched = False
        if watched.unauthorized:
            self._unauthorized -= 1
        if self.metrics is not None:
            self.metrics.drop_fine_tune(watched.ref)
