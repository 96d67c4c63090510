"""An httpx transport on aiohttp's HTTP/1.1 engine that reads whole (bounded) bodies in one go.

The Hub client's hot path: httpx's API and exceptions on top, aiohttp's C-accelerated parser below. Reading
the body at once, rather than through httpx's chunked stream wrappers, is most of what makes a poll cheap.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import httpx

DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024


class BodyTooLarge(httpx.TransportError):
    """The response body is over the transport's limit (nothing more is read)."""


class ReadBody(httpx.AsyncByteStream):
    """A response body this transport has read whole and bounded: the Hub client takes `body` as it is."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx requests through one aiohttp ClientSession; never follows redirects, never decompresses twice."""

    def __init__(self, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, keepalive_s: float = 30.0) -> None:
        self._max_body_bytes = max_body_bytes
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    def _session_now(self) -> aiohttp.ClientSession:
        # created lazily, inside the running event loop
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=self._keepalive_s, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=True, trust_env=False, cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send one request and return the response with its body read."""
        timeouts = request.extensions.get("timeout", {})
        # a total deadline per request: a body that trickles in must not hold a poll (and a slot) forever
        timeout = aiohttp.ClientTimeout(
            total=timeouts.get("read"),
            connect=timeouts.get("pool"),
            sock_connect=timeouts.get("connect"),
        )
        content = request.content if request.method not in ("GET", "HEAD") else None
        try:
            async with self._session_now().request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=content or None,
                allow_redirects=False,
                timeout=timeout,
            ) as response:
                body = await self._read(response)
                # aiohttp has decoded the body: httpx must not decode it again, nor trust the wire length
                headers = [
                    (k, v)
                    for k, v in response.raw_headers
                    if k.lower() not in (b"content-encoding", b"content-length", b"transfer-encoding")
                ]
                # a stream, not content=: httpx would run the body through its decoders once more (a fifth of
                # the transport's CPU per request); the client reads ReadBody.body directly
                return httpx.Response(
                    status_code=response.status,
                    headers=headers,
                    stream=ReadBody(body),
                    request=request,
                    extensions={"http_version": b"HTTP/1.1"},
                )
        except asyncio.CancelledError:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError) as err:
            raise httpx.ReadTimeout(f"timed out ({type(err).__name__})", request=request) from err
        except aiohttp.ClientConnectorError as err:
            raise httpx.ConnectError(f"cannot connect ({type(err).__name__})", request=request) from err
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as err:
            raise httpx.ReadError(f"connection broke ({type(err).__name__})", request=request) from err
        except aiohttp.ClientResponseError as err:
            raise httpx.RemoteProtocolError(f"bad response ({type(err).__name__})", request=request) from err
        except aiohttp.ClientError as err:
            raise httpx.TransportError(f"HTTP failure ({type(err).__name__})", request=request) from err

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        length = response.content_length  # on the wire: a compressed body grows, so count what is decoded too
        if length is not None and length > self._max_body_bytes:
            raise BodyTooLarge(f"body of {length} bytes is over the {self._max_body_bytes} byte limit")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > self._max_body_bytes:
                raise BodyTooLarge(f"body is over the {self._max_body_bytes} byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def aclose(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
