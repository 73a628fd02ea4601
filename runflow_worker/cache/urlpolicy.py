"""Which URLs the worker may fetch: the SSRF policy.

Every URL a caller or a deployment supplies passes two checks before any byte is sent:

1. ``URLPolicy.check_url``, static: ``https`` only, no credentials, a well-formed host and
   port. A host that is an address literal, in any spelling a resolver accepts (``2130706433``,
   ``0x7f.0.0.1``, ``017700000001``, ``127.1``, ``[::ffff:127.0.0.1]``), is normalised and
   checked as an address.
2. ``URLPolicy.resolve``, the host's addresses: every address the resolver returns must be
   public (not loopback, private, link-local, CGNAT, multicast, unspecified, reserved,
   documentation or a cloud metadata address). IPv6 forms that embed an IPv4 address
   (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged by
   the embedded address. One bad answer refuses the whole name.

The fetcher then connects to exactly the addresses returned by ``resolve`` (never resolving
again), so a DNS answer that changes between check and connect (rebinding) cannot redirect
the connection.

An operator allowlist (``allow``) lets chosen destinations through: CIDR networks
(``127.0.0.1/32`` allows that address only, ``10.1.0.0/16`` a subnet) and host names
(``minio.internal``; ``*.corp.example`` for every subdomain). A network entry allows any
address in it; a host-name entry allows that name's non-public addresses, except cloud
metadata addresses, which only a network entry can allow. Loopback is reachable only through
an explicit entry.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from runflow_worker.cache.errors import FetchConnectError, URLRefused, redact_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
"""``resolver(host, port) -> address strings``; raises ``OSError`` when the name does not resolve."""

ALLOWED_SCHEMES = ("https",)
_REFUSED_CHAR = re.compile(r"[\s\x00-\x1f\x7f\\]")
"""Whitespace (``\\s`` of a str pattern is ``str.isspace``), control characters and the
backslash: refused anywhere in a URL. One search, not a Python step per character."""
CHECKED_URLS_KEPT = 64
"""URLs whose static checks passed, remembered per policy (``URLPolicy.check_url``)."""

# Cloud metadata and host-agent endpoints: AWS/GCP/Azure/OpenStack (169.254.169.254), AWS ECS
# task metadata, Azure wireserver, Alibaba, Oracle, AWS over IPv6.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "169.254.170.2",
        "168.63.129.16",
        "100.100.100.200",
        "192.0.0.192",
        "fd00:ec2::254",
    )
)

# Ranges refused besides what the ``ipaddress`` flags already cover; spelled out because the
# flags differ between Python versions (e.g. 192.0.0.0/24 and fec0::/10 count as global in some).
_BLOCKED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "100.64.0.0/10",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/96",
        "100::/64",
        "64:ff9b:1::/48",
        "2001:db8::/32",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"


def system_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` with the system resolver; return its TCP addresses, in resolver order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    out: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in out:
            out.append(address)
    return out


@dataclass(frozen=True)
class Target:
    """A URL that passed the static checks, split into what a connection needs."""

    url: str
    host: str
    """ASCII host name (IDNA, lower case, no trailing dot) or normalised address text."""
    port: int
    path: str
    """Path and query, as sent in the request line (``/a/b?x=1``)."""
    address: IPAddress | None
    """The address when the host is an address literal, else None."""

    @property
    def host_header(self) -> str:
        """Value of the ``Host`` header (brackets for IPv6, port when not 443)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 443 else f"{host}:{self.port}"


@dataclass(frozen=True)
class ResolvedTarget:
    """A target with the checked addresses the connection must use."""

    target: Target
    addresses: tuple[IPAddress, ...]


def _ipv4_number(part: str) -> int | None:
    """Value of one dotted part as inet_aton reads it (0x hex, leading-0 octal), else None."""
    if part[:2] in ("0x", "0X"):
        digits, base = part[2:], 16
        if digits == "":
            return 0
    elif len(part) > 1 and part.startswith("0"):
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    try:
        return int(digits, base) if digits and digits.isalnum() else None
    except ValueError:
        return None


@functools.lru_cache(maxsize=256)
def parse_ipv4_host(host: str) -> ipaddress.IPv4Address | None:
    """Read ``host`` as an IPv4 address the way resolvers do (1 to 4 parts, each decimal, octal
    or hex, the last filling the remaining bytes), or return None if it is a name.

    Raises ``ValueError`` for a host that ends in a number but is no valid address
    (``1.2.3.999``), because resolvers disagree on such names.
    """
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    last = parts[-1]
    if not last or _ipv4_number(last) is None:
        return None
    numbers = [_ipv4_number(p) for p in parts]
    if len(parts) > 4 or any(n is None for n in numbers):
        raise ValueError("host ends in a number but is not an IPv4 address")
    *head, tail = numbers
    if any(n > 255 for n in head) or tail >= 256 ** (5 - len(parts)):  # type: ignore[operator]
        raise ValueError("IPv4 address part out of range")
    value = 0
    for n in head:
        value = value * 256 + n  # type: ignore[operator]
    value = value * 256 ** (5 - len(parts)) + tail  # type: ignore[operator]
    return ipaddress.IPv4Address(value)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped, NAT64 or 6to4 IPv6 address, if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


@functools.lru_cache(maxsize=1024)
def address_problem(address: IPAddress) -> str | None:
    """Why ``address`` must not be fetched from (``"loopback"``, ``"private"``, ...), or None.

    Kept per address: the answer never changes, and working it out asks ``ipaddress`` for
    some forty network memberships (most of a URL's checks, for a public host), where the
    callers' files of a run come from a handful of hosts.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return "scoped"
        inner = _embedded_ipv4(address)
        if inner is not None:
            return address_problem(inner)
    if address in METADATA_ADDRESSES:
        return "metadata"
    for flag in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(address, f"is_{flag}"):
            return flag.replace("_", "-")
    if any(address in net for net in _BLOCKED_NETWORKS if net.version == address.version):
        return "special-purpose"
    if not address.is_global:
        return "non-global"
    return None


def allow_entry_problem(entry: str) -> str | None:
    """Why ``entry`` is no allowlist entry (a CIDR network, an address, a host name or
    ``*.suffix``), else None."""
    entry = entry.strip().lower()
    try:
        ipaddress.ip_network(entry, strict=False)
        return None
    except ValueError:
        pass
    labels = entry.removeprefix("*.").rstrip(".").split(".")
    # A malformed network or address (10.0.0.0/33, 300.1.2.3) is no host name either.
    malformed = any(ch in entry for ch in "/:") or all(c.isdigit() or c == "." for c in entry)
    if malformed or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return ("is neither a CIDR network (e.g. 10.0.0.0/8) nor a host name "
                "(e.g. files.internal, *.internal)")
    return None


class URLPolicy:
    """The SSRF policy: static URL checks, resolution, and the operator allowlist.

    ``allow``: CIDR networks and host names allowed despite the policy (``RUNFLOW_URL_ALLOW``);
    a malformed entry raises ``ValueError`` (``allow_entry_problem``).
    ``resolver``: ``(host, port) -> addresses``; the system resolver by default (tests inject
    one).
    """

    def __init__(self, allow: Sequence[str] = (), *, resolver: Resolver | None = None) -> None:
        self._resolver = resolver or system_resolver
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        names: set[str] = set()
        suffixes: list[str] = []
        for raw in allow:
            entry = raw.strip().lower()
            if not entry:
                continue
            why = allow_entry_problem(entry)
            if why:
                raise ValueError(f"allowlist entry {entry!r} {why}")
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if entry.startswith("*."):
                suffixes.append(entry[1:].rstrip("."))
            else:
                names.add(entry.rstrip("."))
        self.allowed_networks = tuple(networks)
        self.allowed_names = frozenset(names)
        self._allowed_suffixes = tuple(suffixes)
        # The static checks depend on the URL and the allowlist alone, and a URL is checked
        # more than once (``cache.sources`` refuses early, the fetcher checks every hop):
        # the last few passed URLs are remembered. A refused one is checked anew each time.
        self._checked_url = functools.lru_cache(maxsize=CHECKED_URLS_KEPT)(self._check_url)

    def check_url(self, url: str) -> Target:
        """Static checks of ``url``; return its Target or raise ``URLRefused``.

        Address-literal hosts are fully checked here; names are checked by ``resolve``.
        """
        return self._checked_url(url)

    def _check_url(self, url: str) -> Target:
        shown = redact_url(url)
        if _REFUSED_CHAR.search(url):
            raise URLRefused(f"refused {shown}: whitespace, control or backslash in URL")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise URLRefused(f"refused {shown}: malformed URL") from exc
        scheme = parts.scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise URLRefused(f"refused {shown}: scheme {scheme or '(none)'!r} is not https")
        if "@" in parts.netloc or parts.username is not None or parts.password is not None:
            raise URLRefused(f"refused {shown}: credentials in URL")
        host = self._normalise_host(parts.hostname or "", shown)
        if port == 0:
            raise URLRefused(f"refused {shown}: port 0")
        address = self._literal(host, shown)
        if address is not None:
            host = str(address)
            self._check_address(address, host=None, shown=shown)
        # Percent-encode anything outside ASCII; existing escapes are kept as they are.
        path = quote(parts.path or "/", safe=_PATH_SAFE)
        if parts.query:
            path = f"{path}?{quote(parts.query, safe=_PATH_SAFE + '?')}"
        return Target(url=url, host=host, port=port or 443, path=path, address=address)

    def resolve(self, target: Target) -> ResolvedTarget:
        """Resolve ``target``'s host once and check every address; return the checked addresses.

        Raises ``URLRefused`` if any address is refused, ``FetchConnectError`` if the name does
        not resolve.
        """
        shown = redact_url(target.url)
        if target.address is not None:
            return ResolvedTarget(target, (target.address,))
        try:
            answers = list(self._resolver(target.host, target.port))
        except (OSError, UnicodeError) as exc:
            raise FetchConnectError(
                f"cannot resolve the host of {shown}", reason="dns_failed"
            ) from exc
        addresses: list[IPAddress] = []
        for answer in answers:
            try:
                address = ipaddress.ip_address(str(answer).split("%", 1)[0])
            except ValueError as exc:
                raise URLRefused(f"refused {shown}: resolver returned a malformed address") from exc
            self._check_address(address, host=target.host, shown=shown)
            addresses.append(address)
        if not addresses:
            raise FetchConnectError(f"cannot resolve the host of {shown}", reason="dns_failed")
        return ResolvedTarget(target, tuple(addresses))

    def check(self, url: str) -> ResolvedTarget:
        """``check_url`` then ``resolve``: everything needed before connecting to ``url``."""
        return self.resolve(self.check_url(url))

    def host_allowed(self, host: str) -> bool:
        """Whether ``host`` (a name) is on the allowlist."""
        host = host.lower().rstrip(".")
        return host in self.allowed_names or any(
            host.endswith(suffix) for suffix in self._allowed_suffixes
        )

    def address_allowed(self, address: IPAddress) -> bool:
        """Whether ``address`` (or the IPv4 address it embeds) is in an allowed network."""
        candidates: list[IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address):
            inner = _embedded_ipv4(address)
            if inner is not None:
                candidates.append(inner)
        return any(
            c in net for c in candidates for net in self.allowed_networks if net.version == c.version
        )

    def _check_address(self, address: IPAddress, *, host: str | None, shown: str) -> None:
        problem = address_problem(address)
        if problem is None or self.address_allowed(address):
            return
        if host is not None and problem != "metadata" and self.host_allowed(host):
            return
        # The address itself stays out of the message: it would tell a caller about the
        # internal network.
        where = "resolves to" if host is not None else "is"
        raise URLRefused(f"refused {shown}: host {where} a {problem} address")

    @staticmethod
    def _normalise_host(host: str, shown: str) -> str:
        if not host:
            raise URLRefused(f"refused {shown}: no host")
        if ":" in host:  # an IPv6 literal; urlsplit removed the brackets
            return host
        try:
            ascii_host = host.encode("idna").decode("ascii").lower()
        except UnicodeError as exc:
            raise URLRefused(f"refused {shown}: host is not a valid name") from exc
        ascii_host = ascii_host.rstrip(".") if ascii_host != "." else ascii_host
        if not ascii_host or not set(ascii_host) <= _HOST_CHARS or ".." in ascii_host:
            raise URLRefused(f"refused {shown}: host is not a valid name")
        return ascii_host

    @staticmethod
    def _literal(host: str, shown: str) -> IPAddress | None:
        if ":" in host:
            if "%" in host:
                raise URLRefused(f"refused {shown}: scoped IPv6 address")
            try:
                return ipaddress.IPv6Address(host)
            except ValueError as exc:
                raise URLRefused(f"refused {shown}: malformed IPv6 address") from exc
        try:
            return parse_ipv4_host(host)
        except ValueError as exc:
            raise URLRefused(f"refused {shown}: {exc}") from exc
