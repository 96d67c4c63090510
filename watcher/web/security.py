"""The guards in front of every page and API answer: Host check, GET only, token, and the security headers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from watcher.observe.auth import authorized

CSP = "default-src 'none'; style-src 'self'; img-src 'self'; frame-ancestors 'none'"
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
PAGE_PREFIXES = ("/fine-tunes/", "/api/v1/", "/static/")
PAGE_PATHS = ("/", "/events", "/api/v1/fine-tunes", "/api/v1/events")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_page(path: str) -> bool:
    """Whether a path belongs to the status page (the guards apply) rather than /metrics or the health checks."""
    return path in PAGE_PATHS or path.startswith(PAGE_PREFIXES)


def split_host(value: str) -> tuple[str, str] | None:
    """A Host header as (host, port); port is "" when absent; None when malformed."""
    value = value.strip().lower()
    if not value or any(c in value for c in "/@ \t\\"):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[: end + 1], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:]
    else:
        host, _, port = value.partition(":")
        if ":" in port:
            return None
    if port and not port.isdigit():
        return None
    return host, port


def host_allowed(value: str | None, *, listen_host: str, listen_port: int) -> int | None:
    """None when the Host header names this listener (or a loopback name, any port); else 400 or 421.

    A DNS-rebinding page reaches us under its own name: refusing other names keeps it out.
    """
    if value is None:
        return 400
    parts = split_host(value)
    if parts is None:
        return 400
    host, port = parts
    if host in LOOPBACK_NAMES:
        return None
    listener = f"[{listen_host.lower()}]" if ":" in listen_host else listen_host.lower()
    if host == listener and (port == str(listen_port) or (not port and listen_port == 80)):
        return None
    return 421


def guard(*, listen_host: str, listen_port: Callable[[], int], token: Callable[[], str | None]) -> Middleware:
    """An aiohttp middleware applying the guards and headers to the status page's paths only."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not is_page(request.path):
            return await handler(request)
        response = await _guarded(request, handler, listen_host, listen_port(), token())
        response.headers.update(HEADERS)
        return response

    return middleware


async def _guarded(
    request: web.Request, handler: Handler, listen_host: str, listen_port: int, token: str | None
) -> web.StreamResponse:
    refused = host_allowed(request.headers.get("Host"), listen_host=listen_host, listen_port=listen_port)
    if refused is not None:
        reason = "bad Host header" if refused == 400 else "this server does not answer for that Host"
        return web.Response(status=refused, text=f"{reason}\n")
    if request.method not in ("GET", "HEAD"):
        return web.Response(status=405, text="method not allowed\n", headers={"Allow": "GET, HEAD"})
    if not authorized(request.headers.get("Authorization"), token, basic=True):
        return web.Response(
            status=401,
            text="unauthorized: give the [http] token as a bearer token, or as the password (any user name)\n",
            headers={"WWW-Authenticate": 'Basic realm="oxen-watcher", charset="UTF-8"'},
        )
    try:
        return await handler(request)
    except web.HTTPException as err:
        # aiohttp's own answers (404, 405 from the router) get the same headers
        return web.Response(
            status=err.status,
            text=f"{err.reason}\n",
            headers={k: v for k, v in err.headers.items() if k.lower() == "allow"},
        )
