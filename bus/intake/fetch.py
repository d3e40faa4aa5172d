"""Fetching an image by URL for the ingest webhook, without turning the gateway into a proxy.

The URL comes from a client, but the request leaves from the gateway, which can reach
what the client cannot: cloud metadata at 169.254.169.254, admin ports on localhost, the
LAN. So a fetch is refused unless

- the scheme is http or https and the host is on ``ingest.fetch.allow_hosts``;
- every address the host resolves to is public, or inside ``ingest.fetch.allow_networks``.

The host is resolved once, here, and the connection goes to the vetted addresses only
(:class:`PinnedResolver`): a second lookup could answer differently (DNS rebinding). The
Host header and the TLS server name stay the original host. Redirects are not followed
(every hop would need the same vetting), proxies from the environment are ignored, the
whole fetch runs under one time limit and the body is counted against the size limit as
it streams.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.multipart import content_disposition_filename, parse_content_disposition
from yarl import URL

from bus.core.settings import FetchSettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CHUNK = 256 * 1024
MAX_URL_CHARS = 2048
USER_AGENT = "darkroom-fetch"
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT, RFC 6598
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the last 32 bits are IPv4

__all__ = [
    "FetchError",
    "Fetched",
    "PinnedResolver",
    "address_refusal",
    "check_url",
    "disposition_filename",
    "fetch_image",
    "host_allowed",
    "resolve_vetted",
]


class FetchError(Exception):
    """A fetch was refused or failed; ``status``, ``title`` and ``detail`` answer the client."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Fetched:
    """A response whose status and headers passed; ``chunks`` streams its body."""

    chunks: AsyncIterator[bytes]
    filename: str | None  # from the response's Content-Disposition, else the URL's path


def host_allowed(host: str, allow_hosts: Iterable[str]) -> bool:
    """Whether ``host`` is on the allow-list: exact names, or ``*.example.com`` for the
    subdomains of example.com (not example.com itself). Case and a final dot do not count.
    """
    name = host.rstrip(".").lower()
    for entry in allow_hosts:
        pattern = entry.strip().rstrip(".").lower()
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]):
                return True
        elif name == pattern:
            return True
    return False


def _unfit(address: IPAddress) -> str | None:
    """What makes ``address`` internal, or None when it is a public unicast address.

    ``is_global`` alone is not enough: on Python 3.11 it is true for multicast and IPv6
    site-local addresses, and the reason is worth naming anyway.
    """
    checks = (
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (isinstance(address, ipaddress.IPv4Address) and address in _SHARED, "CGNAT shared space"),
        (isinstance(address, ipaddress.IPv6Address) and address.is_site_local, "site-local"),
        (address.is_reserved, "reserved"),
        (address.is_private, "private"),
        (not address.is_global, "not globally routable"),
    )
    return next((kind for unfit, kind in checks if unfit), None)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a 6to4 or NAT64 address leads to, if it is one."""
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_refusal(address: IPAddress, allow_networks: Iterable[IPNetwork] = ()) -> str | None:
    """Why the gateway must not connect to ``address`` (for a message), or None when it may.

    Addresses inside ``allow_networks`` are always allowed. An IPv4-mapped IPv6 address is
    judged as the IPv4 address it is; a 6to4 or NAT64 one also by the IPv4 address inside.
    """
    reason = _reason(address, tuple(allow_networks))
    return None if reason is None else f"{address} ({reason})"


def _reason(address: IPAddress, networks: tuple[IPNetwork, ...]) -> str | None:
    if any(address.version == net.version and address in net for net in networks):
        return None
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            inner = _reason(mapped, networks)
            return None if inner is None else f"IPv4-mapped {mapped}, {inner}"
        embedded = _embedded_ipv4(address)
        if embedded is not None and (inner := _reason(embedded, networks)) is not None:
            return f"leads to {embedded}, {inner}"
    return _unfit(address)


def check_url(url: str, allow_hosts: Iterable[str]) -> URL:
    """Parse ``url`` and check its scheme and host; raise :class:`FetchError`."""
    if len(url) > MAX_URL_CHARS:
        raise FetchError(422, "Invalid URL", f"the URL is longer than {MAX_URL_CHARS} characters")
    try:
        target = URL(url)
    except (ValueError, TypeError) as exc:
        raise FetchError(422, "Invalid URL", f"{url[:200]!r} is not a URL: {exc}") from None
    if target.scheme not in ("http", "https"):
        raise FetchError(
            403, "Forbidden", f"only http and https URLs are fetched, not {target.scheme or '?'}:"
        )
    host = target.raw_host
    if not host or not target.absolute:
        raise FetchError(422, "Invalid URL", f"{url[:200]!r} has no host")
    if target.raw_user is not None or target.raw_password is not None:
        raise FetchError(422, "Invalid URL", "URLs with credentials in them are not fetched")
    if not host_allowed(host, allow_hosts):
        raise FetchError(
            403,
            "Forbidden",
            f"{host} is not an allowed host; add it to ingest.fetch.allow_hosts to fetch from it",
        )
    return target


async def resolve_vetted(
    host: str, port: int, allow_networks: Iterable[IPNetwork] = ()
) -> list[ResolveResult]:
    """Resolve ``host`` once and vet every address; raise :class:`FetchError` (403) when any
    is internal, so a name with one public and one private address is refused outright."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError(502, "Bad Gateway", f"{host} does not resolve ({exc})") from None
    networks = tuple(allow_networks)
    results: list[ResolveResult] = []
    refused: list[str] = []
    for family, _, proto, _, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]))
        reason = address_refusal(address, networks)
        if reason is not None:
            refused.append(reason)
        elif all(r["host"] != str(address) for r in results):
            results.append(
                ResolveResult(
                    hostname=host,
                    host=str(address),
                    port=port,
                    family=family,
                    proto=proto,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
    if refused:
        raise FetchError(
            403,
            "Forbidden",
            f"{host} resolves to {', '.join(dict.fromkeys(refused))}: private and internal "
            "addresses are not fetched (a network in ingest.fetch.allow_networks would allow it)",
        )
    if not results:
        raise FetchError(502, "Bad Gateway", f"{host} resolves to no address")
    return results


class PinnedResolver(AbstractResolver):
    """A resolver that answers only for one host, with the addresses vetted beforehand."""

    def __init__(self, host: str, results: list[ResolveResult]) -> None:
        self._host = host
        self._results = results

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host != self._host:
            raise OSError(f"{host} was not vetted for this fetch")
        found: list[ResolveResult] = [
            {**result, "port": port}
            for result in self._results
            if family in (socket.AF_UNSPEC, result["family"])
        ]
        if not found:
            raise OSError(f"{host} has no vetted address of family {family!r}")
        return found

    async def close(self) -> None:
        return None


def disposition_filename(header: str | None) -> str | None:
    """The file name in a Content-Disposition header (``filename*`` too), if any."""
    if not header:
        return None
    _, params = parse_content_disposition(header)
    return content_disposition_filename(params, "filename") or None


def _timed_out(url: str, timeout_s: float) -> FetchError:
    return FetchError(
        504, "Gateway Timeout", f"fetching {url} took longer than {timeout_s:g} s (timeout_s)"
    )


class _Body:
    """The response body in chunks, refused once it passes ``max_bytes``."""

    def __init__(
        self, response: aiohttp.ClientResponse, url: str, max_bytes: int, timeout_s: float
    ) -> None:
        self._response = response
        self._url = url
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s
        self._size = 0

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._response.content.read(CHUNK)
        except TimeoutError:
            raise _timed_out(self._url, self._timeout_s) from None
        except aiohttp.ClientError as exc:
            raise FetchError(
                502, "Bad Gateway", f"the download of {self._url} broke off ({exc!s:.200})"
            ) from None
        if not chunk:
            raise StopAsyncIteration
        self._size += len(chunk)
        if self._size > self._max_bytes:
            raise FetchError(
                413,
                "Payload Too Large",
                f"{self._url} is larger than the limit of {self._max_bytes:,} bytes",
            )
        return chunk


def _check_response(response: aiohttp.ClientResponse, target: URL, max_bytes: int) -> None:
    url = str(target)
    if 300 <= response.status < 400:
        location = response.headers.get("Location")
        if not location:
            raise FetchError(
                502, "Bad Gateway", f"{url} answered {response.status} without a Location"
            )
        with suppress(ValueError):
            location = str(target.join(URL(location)))
        raise FetchError(
            422,
            "Redirect not followed",
            f"the URL redirects to {location[:500]}; fetch the final URL",
        )
    if not 200 <= response.status < 300:
        raise FetchError(
            502,
            "Bad Gateway",
            f"{target.raw_host} answered {response.status} {response.reason or ''}".rstrip()
            + f" for {url}",
        )
    length = response.content_length
    if length is not None and length > max_bytes:
        raise FetchError(
            413,
            "Payload Too Large",
            f"{url} is {length:,} bytes, over the limit of {max_bytes:,} bytes",
        )


@asynccontextmanager
async def fetch_image(url: str, settings: FetchSettings, max_bytes: int) -> AsyncIterator[Fetched]:
    """Open ``url`` under the fetch rules; the body streams while the context is open.

    Raises :class:`FetchError` on entry (refused, unreachable, not 2xx, declared too big)
    and from the body's chunks (too slow, too big, broken off).
    """
    target = check_url(url, settings.allow_hosts)
    host = target.raw_host or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.timeout_s
    try:
        async with asyncio.timeout_at(deadline):
            vetted = await resolve_vetted(host, port, settings.allow_networks)
    except TimeoutError:
        raise _timed_out(url, settings.timeout_s) from None
    connector = aiohttp.TCPConnector(
        resolver=PinnedResolver(host, vetted), use_dns_cache=False, limit=1
    )
    timeout = aiohttp.ClientTimeout(total=max(deadline - loop.time(), 0.001))
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=False,  # no HTTP(S)_PROXY: the vetted address must be what we connect to
        headers={"User-Agent": USER_AGENT, "Accept": "image/*"},
    ) as session:
        try:
            response = await session.get(target, allow_redirects=False)
        except TimeoutError:
            raise _timed_out(url, settings.timeout_s) from None
        except aiohttp.ClientError as exc:
            raise FetchError(
                502, "Bad Gateway", f"could not fetch {url} ({type(exc).__name__}: {exc!s:.200})"
            ) from None
        async with response:
            _check_response(response, target, max_bytes)
            filename = disposition_filename(response.headers.get("Content-Disposition"))
            yield Fetched(
                _Body(response, url, max_bytes, settings.timeout_s),
                filename or target.name or None,
            )
