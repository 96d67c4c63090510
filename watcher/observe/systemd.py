"""sd_notify(3) by hand (a datagram to $NOTIFY_SOCKET): READY, STATUS, WATCHDOG, STOPPING, RELOADING."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    """Talks to systemd when started by it (Type=notify); does nothing otherwise."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # an abstract socket's name starts with "@", which means a leading NUL byte
        self._address = "\0" + address[1:] if address.startswith("@") else address
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        mine = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_s = int(watchdog_usec) / 1e6 if watchdog_usec.isdigit() and mine else None

    @property
    def enabled(self) -> bool:
        """Whether systemd listens."""
        return bool(self._address)

    def send(self, **fields: str) -> bool:
        """Send KEY=value lines; False (never an exception) when it could not be sent."""
        if not self._address:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self._address)
                sock.sendall(message)
        except OSError:
            return False
        return True
