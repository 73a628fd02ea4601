"""Per-host credentials for downloads: which header, with which secret, goes to which host.

A specification is a comma- (or newline-) separated list of entries::

    PATTERN=[HEADER:]SOURCE
    huggingface.co=env:HF_TOKEN            Authorization: Bearer <value of HF_TOKEN>
    civitai.com=env:CIVITAI_TOKEN
    *.models.internal=X-Api-Key:file:/run/secrets/models-key    X-Api-Key: <file content>

``PATTERN`` is a host name (``files.example``) or ``*.`` and a domain (every host under it,
not the domain itself). ``SOURCE`` is ``env:NAME`` (a variable of the worker's environment)
or ``file:PATH`` (a file's content, surrounding white space dropped). Without ``HEADER`` the
secret goes in ``Authorization: Bearer <secret>``; with it, the secret is the header's value
as it is. The first matching entry wins. Secrets are read once, when the specification is
parsed; the worker's environment is passed in (this package never reads it itself).

When ``HF_TOKEN`` is set and no entry names a Hugging Face host, ``huggingface.co`` and
``hf.co`` get ``Authorization: Bearer $HF_TOKEN`` (as the Hugging Face tools do). Their CDN
hosts (``cdn-lfs.huggingface.co``, ``*.hf.co``...) get nothing: downloads are redirected there
with signed URLs.

The ``Fetcher`` sends a credential only to the host of the URL it was asked for, and drops it
for good on the first redirect to another origin. Errors never repeat a secret, nor an entry
(an entry may be a secret written by mistake in place of ``env:NAME``): they name the entry
by its number.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

HF_TOKEN_VARIABLE = "HF_TOKEN"
HF_HOSTS = ("huggingface.co", "hf.co")
# RFC 9110 token characters: a header name.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_FORMAT = "expected PATTERN=[HEADER:]env:NAME or PATTERN=[HEADER:]file:PATH"


class CredentialsError(ValueError):
    """A credentials specification that cannot be used; the message holds no secret."""


@dataclass(frozen=True)
class Credential:
    """One header for the hosts matching ``pattern``; ``source`` says where its value came from
    (``env:NAME`` / ``file:PATH``, never the value)."""

    pattern: str
    header: str
    source: str
    _value: str = field(repr=False)

    def matches(self, host: str) -> bool:
        """Whether ``host`` (lower case, no trailing dot) is one this credential belongs to."""
        if self.pattern.startswith("*."):
            return host.endswith(self.pattern[1:])
        return host == self.pattern

    def header_pair(self) -> tuple[str, str]:
        """``(header name, header value)`` to send."""
        return self.header, self._value


def _normal_host(host: str) -> str:
    return host.strip().lower().rstrip(".")


def _check_pattern(pattern: str) -> str | None:
    """Why ``pattern`` is not a host pattern, or None."""
    name = pattern[2:] if pattern.startswith("*.") else pattern
    labels = name.split(".")
    if not name or not all(_LABEL.fullmatch(label) for label in labels):
        return "has no host name or *.domain before '='"
    if pattern.startswith("*.") and len(labels) < 2:
        return "has a wildcard over a whole top-level domain"
    return None


class URLCredentials:
    """The credentials of a worker: ``header_for(url)`` picks the one for a URL's host."""

    def __init__(self, entries: tuple[Credential, ...] = ()) -> None:
        self.entries = entries

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __repr__(self) -> str:  # never the values
        return f"URLCredentials({[(c.pattern, c.header, c.source) for c in self.entries]})"

    def for_url(self, url: str) -> Credential | None:
        """The credential for ``url``'s host, or None."""
        try:
            host = urlsplit(url).hostname
        except ValueError:
            return None
        if not host:
            return None
        host = _normal_host(host)
        return next((c for c in self.entries if c.matches(host)), None)

    @classmethod
    def parse(cls, spec: str | None, environ: Mapping[str, str]) -> URLCredentials:
        """Build from a specification (see the module docstring) and the worker's environment.

        ``spec`` beginning with ``/`` names a file holding the entries (one a line or
        comma-separated, ``#`` comments). Raises ``CredentialsError`` naming the entry by number.
        """
        text = (spec or "").strip()
        if text.startswith("/"):
            try:
                text = Path(text).read_text()
            except OSError as exc:
                raise CredentialsError(f"cannot read the credentials file {text} "
                                       f"({exc.strerror or type(exc).__name__})") from None
            text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
        entries: list[Credential] = []
        items = [item.strip() for line in text.splitlines() for item in line.split(",")]
        for n, item in enumerate((i for i in items if i), 1):
            entries.append(_parse_entry(n, item, environ))
        token = (environ.get(HF_TOKEN_VARIABLE) or "").strip()
        if token:
            _check_secret(token, HF_TOKEN_VARIABLE)
        for host in HF_HOSTS if token else ():
            if not any(c.matches(host) for c in entries):  # an explicit entry wins
                entries.append(Credential(host, "Authorization", f"env:{HF_TOKEN_VARIABLE}",
                                          f"Bearer {token}"))
        return cls(tuple(entries))


def _check_secret(value: str, what: str) -> None:
    """Raise ``CredentialsError`` when ``value`` cannot be a header value (never showing it)."""
    if any(ch in value for ch in "\r\n\0"):
        raise CredentialsError(f"{what} spans lines")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise CredentialsError(f"{what} is not latin-1 text") from None


def _parse_entry(n: int, item: str, environ: Mapping[str, str]) -> Credential:
    pattern, sep, rest = item.partition("=")
    pattern = _normal_host(pattern)
    if not sep or not rest:
        raise CredentialsError(f"entry {n}: {_FORMAT}")
    why = _check_pattern(pattern)
    if why:
        raise CredentialsError(f"entry {n} {why}; {_FORMAT}")
    header = None
    if not rest.startswith(("env:", "file:")):
        header, _, rest = rest.partition(":")
        if not _HEADER_NAME.fullmatch(header) or not rest.startswith(("env:", "file:")):
            raise CredentialsError(f"entry {n} ({pattern}): {_FORMAT}")
    kind, _, where = rest.partition(":")
    if kind == "env":
        if not _ENV_NAME.fullmatch(where):
            raise CredentialsError(f"entry {n} ({pattern}): env: needs a variable name")
        value = (environ.get(where) or "").strip()
        if not value:
            raise CredentialsError(f"entry {n} ({pattern}): the variable {where} is not set")
    else:
        try:
            value = Path(where).expanduser().read_text().strip()
        except OSError as exc:
            raise CredentialsError(f"entry {n} ({pattern}): cannot read {where} "
                                   f"({exc.strerror or type(exc).__name__})") from None
        if not value:
            raise CredentialsError(f"entry {n} ({pattern}): {where} is empty")
    _check_secret(value, f"entry {n} ({pattern}): the secret from {kind}:{where}")
    if header is None:
        return Credential(pattern, "Authorization", f"{kind}:{where}", f"Bearer {value}")
    return Credential(pattern, header, f"{kind}:{where}", value)
