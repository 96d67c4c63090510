"""A throwaway PostgreSQL cluster: initdb into a temporary directory, a Unix socket only, fsync off.

The tests (tests/pgcluster.py, as fixtures) and the benchmark (bench/replicas.py) start one with
`throwaway_cluster()`, using the machine's PostgreSQL server binaries. initdb refuses to run as root (CI runs as
root), so the server then runs as `nobody`.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

SUPERUSER = "watcher_test"
PREFIX = "oxen-watcher-pg-"
_SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")


class ClusterUnavailable(RuntimeError):
    """The PostgreSQL server binaries are missing, or the server could not be run."""


def find_server_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    found = [shutil.which(name) for name in _SERVER_BINARIES]
    if all(found):
        return Path(os.path.realpath(str(found[0]))).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
    )
    for folder in reversed(candidates):
        if all((Path(folder) / name).exists() for name in _SERVER_BINARIES):
            return Path(folder)
    return None


@dataclass(frozen=True, slots=True)
class PgCluster:
    """A running throwaway cluster: its socket folder, port and superuser (trust authentication)."""

    socket_dir: Path
    port: int
    bindir: Path
    data_dir: Path
    run_as: tuple[str, ...]

    def url(self, dbname: str = "postgres") -> str:
        """A postgresql:// URL of a database in this cluster, over the Unix socket."""
        return f"postgresql://{SUPERUSER}@/{dbname}?host={quote(str(self.socket_dir), safe='')}&port={self.port}"

    def pg_ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run pg_ctl on this cluster's data directory as the server's user."""
        return run([*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), *args], timeout=timeout)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-k {self.socket_dir} -p {self.port} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self.pg_ctl("-l", str(self.data_dir / "server.log"), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (an outage, for tests that survive one; `start` ends it)."""
        self.pg_ctl("-m", mode, "-w", "stop")

    def postmaster_pid(self) -> int | None:
        """The server's main process id while it runs (for measuring its CPU), else None."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def create_database(self, name: str) -> str:
        """Create an empty database (fast: a file copy of template0) and return its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 STRATEGY FILE_COPY')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting its clients."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(cmd: list[str], *, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; raise ClusterUnavailable with its output when it fails."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd)
    if result.returncode != 0:
        raise ClusterUnavailable(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def _unprivileged_user() -> tuple[str, ...]:
    """The command prefix that runs the server: none as a normal user; `runuser -u nobody --` as root."""
    if os.geteuid() != 0:
        return ()
    runuser = shutil.which("runuser")
    if runuser is None:
        raise ClusterUnavailable("running as root and runuser is missing: cannot run PostgreSQL unprivileged")
    return (runuser, "-u", "nobody", "--")


def _stop_orphans(bindir: Path, run_as: tuple[str, ...]) -> None:
    """Stop and remove clusters left by runs that were killed before their teardown (their pid is gone)."""
    for root in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            owner = int((root / "owner.pid").read_text())
            os.kill(owner, 0)
            continue  # its run is still going
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue  # not ours to judge (no readable owner file yet, or another user's)
        if (root / "data" / "postmaster.pid").exists():
            subprocess.run(
                [*run_as, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def throwaway_cluster() -> Iterator[PgCluster]:
    """Start a PostgreSQL server in a temporary directory; stop it and remove everything on exit."""
    bindir = find_server_bindir()
    if bindir is None:
        raise ClusterUnavailable(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) are not on PATH nor under /usr/lib/postgresql; "
            "`make test` installs them (Debian package `postgresql`)"
        )
    run_as = _unprivileged_user()
    _stop_orphans(bindir, run_as)
    root = Path(tempfile.mkdtemp(prefix=PREFIX))
    (root / "owner.pid").write_text(str(os.getpid()))
    data_dir, socket_dir = root / "data", root / "sock"
    socket_dir.mkdir()
    if run_as:
        # the server's user must own its folders (and reach them: mkdtemp makes root's folder 0700)
        root.chmod(0o755)
        shutil.chown(socket_dir, "nobody")
        data_dir.mkdir(mode=0o700)
        shutil.chown(data_dir, "nobody")
    cluster = PgCluster(socket_dir=socket_dir, port=5432, bindir=bindir, data_dir=data_dir, run_as=run_as)
    try:
        run(
            [*run_as, str(bindir / "initdb"), "-D", str(data_dir), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
             "--no-sync", "--locale=C"],
            cwd=root,
        )  # fmt: skip
        cluster.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield cluster
    finally:
        try:
            if cluster.postmaster_pid() is not None:
                cluster.stop("immediate")
        finally:
            shutil.rmtree(root, ignore_errors=True)
