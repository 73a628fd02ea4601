"""URLPolicy: static checks, address rules, odd IPv4 spellings, the allowlist."""

from __future__ import annotations

import ipaddress

import pytest

from runflow_worker.cache.errors import FetchConnectError, URLRefused, redact_url
from runflow_worker.cache.urlpolicy import (
    URLPolicy,
    address_problem,
    allow_entry_problem,
    parse_ipv4_host,
)

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("10.0.0.1.", "10.0.0.1"),
        ("0", "0.0.0.0"),
    ],
)
def test_odd_ipv4_spellings_are_read_like_a_resolver(host: str, expected: str) -> None:
    assert parse_ipv4_host(host) == ipaddress.IPv4Address(expected)


@pytest.mark.parametrize("host", ["example.com", "files.test", "deadbeef", "a.b-c.d"])
def test_names_are_not_addresses(host: str) -> None:
    assert parse_ipv4_host(host) is None


@pytest.mark.parametrize("host", ["1.2.3.256", "1.2.3.4.5", "256.1", "foo.0x1", "1.0x100.1.1"])
def test_hosts_ending_in_a_number_must_be_valid_addresses(host: str) -> None:
    with pytest.raises(ValueError):
        parse_ipv4_host(host)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "metadata"),
        ("169.254.1.1", "link-local"),
        ("fd00:ec2::254", "metadata"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "special-purpose"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.1.2.3", "private"),
        ("64:ff9b::7f00:1", "loopback"),
        ("64:ff9b::a9fe:a9fe", "metadata"),
        ("2002:7f00:1::", "loopback"),
        ("2002:a00:1::", "private"),
        ("192.0.0.192", "metadata"),
        ("fec0::1", "special-purpose"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
    ],
)
def test_address_rules(address: str, problem: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) == problem


@pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "2606:4700::1111",
                                     "64:ff9b::5db8:d822", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/x",
        "ftp://example.com/x",
        "gopher://127.0.0.1:6379/_FLUSHALL",
        "file:///etc/passwd",
        "https://user:pass@example.com/",
        "https://user@example.com/",
        "https:///nohost",
        "https://exa mple.com/",
        "https://example.com\\@evil/",
        "https://example.com:0/",
        "https://example.com:99999/",
        "https://%31%32%37.0.0.1/",
        "https://[fe80::1%25eth0]/",
        "//example.com/x",
        "example.com",
    ],
)
def test_static_refusals(url: str) -> None:
    policy = URLPolicy()
    with pytest.raises(URLRefused) as info:
        policy.check_url(url)
    assert info.value.reason == "url_refused"
    assert ":pass@" not in str(info.value)


def test_check_url_splits_the_target() -> None:
    target = URLPolicy().check_url("https://Files.Example.COM./a%20b/ü?q=1&r=ä")
    assert target.host == "files.example.com"
    assert target.port == 443
    assert target.path == "/a%20b/%C3%BC?q=1&r=%C3%A4"
    assert target.host_header == "files.example.com"
    assert URLPolicy().check_url("https://example.com:8443/").host_header == "example.com:8443"


def test_resolution_refuses_if_any_answer_is_private() -> None:
    policy = URLPolicy(resolver=lambda host, port: ["93.184.216.34", "10.0.0.1"])
    with pytest.raises(URLRefused, match="resolves to a private address"):
        policy.check("https://mixed.example/")


def test_refusal_messages_do_not_reveal_the_address() -> None:
    policy = URLPolicy(resolver=lambda host, port: ["10.11.12.13"])
    with pytest.raises(URLRefused) as info:
        policy.check("https://internal.example/x?token=secret")
    assert "10.11.12.13" not in str(info.value)
    assert "secret" not in str(info.value)


def test_unresolvable_name_is_a_connect_error() -> None:
    def fail(host: str, port: int) -> list[str]:
        raise OSError("no such name")

    with pytest.raises(FetchConnectError) as info:
        URLPolicy(resolver=fail).check("https://nowhere.example/")
    assert info.value.reason == "dns_failed"


def test_allowlist_network_allows_exactly_that_network() -> None:
    policy = URLPolicy(["127.0.0.1/32"])
    assert policy.check("https://127.0.0.1:8443/").addresses == (ipaddress.ip_address("127.0.0.1"),)
    policy.check("https://[::ffff:127.0.0.1]/")  # the same address, IPv4-mapped
    with pytest.raises(URLRefused):
        policy.check("https://127.0.0.2/")
    with pytest.raises(URLRefused):
        policy.check("https://[::1]/")


def test_allowlist_host_name_allows_its_private_addresses_but_not_metadata() -> None:
    answers = {"minio.internal": ["10.1.2.3"], "meta.internal": ["169.254.169.254"],
               "x.corp.example": ["10.9.9.9"]}
    policy = URLPolicy(["minio.internal", "meta.internal", "*.corp.example"],
                       resolver=lambda host, port: answers[host])
    policy.check("https://minio.internal/bucket/key")
    policy.check("https://x.corp.example/")
    with pytest.raises(URLRefused, match="metadata"):
        policy.check("https://meta.internal/")
    with pytest.raises(URLRefused):  # a name entry does not allow the bare address
        policy.check("https://10.1.2.3/")


def test_loopback_needs_an_explicit_entry() -> None:
    with pytest.raises(URLRefused, match="loopback"):
        URLPolicy(resolver=lambda h, p: ["127.0.0.1"]).check("https://localhost/")
    URLPolicy(["127.0.0.0/8"], resolver=lambda h, p: ["127.0.0.1"]).check("https://localhost/")


def test_redact_url() -> None:
    assert redact_url("https://u:p@h.example:8443/a/b?X-Amz-Signature=s#f") == (
        "https://h.example:8443/a/b?..."
    )
    assert redact_url("https://h.example/a") == "https://h.example/a"
    assert redact_url("https://[::1]:1/a?x") == "https://[::1]:1/a?..."


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "300.1.2.3", "host name", "-bad.example",
                                   "a..b", "https://files.internal"])
def test_malformed_allowlist_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="neither a CIDR network"):
        URLPolicy([entry])
    assert allow_entry_problem(entry) is not None
    assert allow_entry_problem("10.0.0.0/8") is None and allow_entry_problem("*.corp.example") is None
