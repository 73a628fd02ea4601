"""Per-host download credentials: parsed from the operator's specification, sent to the host
they belong to over TLS, never past a redirect to another origin, never in an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from runflow_worker.cache.credentials import CredentialsError, URLCredentials
from runflow_worker.cache.errors import HTTPStatusError
from runflow_worker.cache.fetcher import Fetcher
from runflow_worker.cache.sources import Sources
from runflow_worker.cache.urlpolicy import URLPolicy
from tests.support.https_server import HTTPSServer, Mode

pytestmark = pytest.mark.timeout(30)

SECRET = "hf_s3cretValue"
OTHER = "files.test"  # another host name for the same loopback server


def _fetcher(ca_bundle: Path, credentials: URLCredentials) -> Fetcher:
    policy = URLPolicy(["127.0.0.1/32", OTHER], resolver=lambda host, port: ["127.0.0.1"])
    return Fetcher(policy, ca_bundle=ca_bundle, credentials=credentials, timeout_s=10)


def test_parse_entries_headers_and_sources(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("  k-123\n")
    creds = URLCredentials.parse(
        f"huggingface.co=env:HF, *.models.internal=X-Api-Key:file:{key_file}",
        {"HF": SECRET})
    hf = creds.for_url("https://HuggingFace.co./org/repo/resolve/main/a.safetensors")
    assert hf is not None and hf.header_pair() == ("Authorization", f"Bearer {SECRET}")
    internal = creds.for_url("https://a.b.models.internal:8443/x")
    assert internal is not None and internal.header_pair() == ("X-Api-Key", "k-123")
    assert creds.for_url("https://models.internal/x") is None  # *. is the subdomains only
    assert creds.for_url("https://cdn-lfs.huggingface.co/x") is None
    assert creds.for_url("https://evilhuggingface.co/x") is None
    assert SECRET not in repr(creds) and "k-123" not in repr(creds)


def test_a_file_of_entries_and_the_hf_token_default(tmp_path: Path) -> None:
    spec = tmp_path / "credentials"
    spec.write_text("# gated models\ncivitai.com=env:CIVITAI_TOKEN\n")
    creds = URLCredentials.parse(str(spec), {"CIVITAI_TOKEN": "c1", "HF_TOKEN": "hf_1"})
    assert creds.for_url("https://civitai.com/api/download/models/1").header_pair() == (
        "Authorization", "Bearer c1")
    for host in ("huggingface.co", "hf.co"):
        assert creds.for_url(f"https://{host}/a").header_pair() == ("Authorization",
                                                                   "Bearer hf_1")
    assert creds.for_url("https://cas-bridge.xethub.hf.co/a") is None
    # An explicit entry for a Hugging Face host wins over HF_TOKEN.
    explicit = URLCredentials.parse("huggingface.co=env:MINE", {"MINE": "m", "HF_TOKEN": "h"})
    assert explicit.for_url("https://huggingface.co/a").header_pair()[1] == "Bearer m"
    assert not URLCredentials.parse(None, {})
    with pytest.raises(CredentialsError, match="HF_TOKEN spans lines") as info:
        URLCredentials.parse(None, {"HF_TOKEN": "hf_a\nX-Injected: 1"})
    assert "hf_a" not in str(info.value)


@pytest.mark.parametrize("spec", [
    f"huggingface.co={SECRET}",  # the token written in place of env:NAME
    f"{SECRET}",
    "huggingface.co=env:UNSET",
    "huggingface.co=file:/nonexistent/token",
    "*.com=env:HF",
    "bad host=env:HF",
])
def test_bad_entries_are_refused_without_repeating_them(spec: str) -> None:
    with pytest.raises(CredentialsError) as info:
        URLCredentials.parse(spec, {"HF": "v"})
    assert "entry 1" in str(info.value)
    assert SECRET not in str(info.value)


def test_gated_file_needs_the_token_and_gets_it(
    https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path
) -> None:
    https_server.add("/gated.bin", b"weights", authorization=f"Bearer {SECRET}")
    url = https_server.url("/gated.bin")
    without = _fetcher(ca_bundle, URLCredentials())
    with pytest.raises(HTTPStatusError) as info:
        without.fetch_to_file(url, tmp_path / "a")
    assert info.value.status_code == 401

    with_token = _fetcher(ca_bundle, URLCredentials.parse("127.0.0.1=env:T", {"T": SECRET}))
    result = with_token.fetch_to_file(url, tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == b"weights"
    assert result.credential_sent is True
    # A host with no credential: nothing sent, and the result says so.
    https_server.add("/public.bin", b"open")
    public = with_token.fetch_to_file(https_server.url("/public.bin", host=OTHER),
                                      tmp_path / "c")
    assert public.credential_sent is False
    assert "Authorization" not in https_server.requests_for("/public.bin")[0].headers


def test_redirect_to_another_host_does_not_see_the_token(
    https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path
) -> None:
    # As Hugging Face does: the gated URL answers a redirect to a CDN with a signed URL.
    https_server.add("/cdn/blob", b"from the cdn")
    https_server.add("/resolve/a.bin", mode=Mode.REDIRECT, status=302,
                     location=https_server.url("/cdn/blob?X-Amz-Signature=sig", host=OTHER),
                     authorization=f"Bearer {SECRET}")
    fetcher = _fetcher(ca_bundle, URLCredentials.parse("127.0.0.1=env:T", {"T": SECRET}))
    result = fetcher.fetch_to_file(https_server.url("/resolve/a.bin"), tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"from the cdn"
    assert result.credential_sent is True
    assert https_server.requests_for("/resolve/a.bin")[0].headers["Authorization"] == (
        f"Bearer {SECRET}")
    cdn = https_server.requests_for("/cdn/blob")
    assert len(cdn) == 1 and "Authorization" not in cdn[0].headers
    assert all(SECRET not in value for value in cdn[0].headers.values())


def test_a_chain_that_comes_back_to_the_credential_host_gets_nothing(
    https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path
) -> None:
    # A URL of another host redirecting to the gated one: the credential belongs to the host
    # asked for, so a caller's URL cannot borrow it through a redirect.
    https_server.add("/gated.bin", b"weights", authorization=f"Bearer {SECRET}")
    https_server.add("/bounce", mode=Mode.REDIRECT, location=https_server.url("/gated.bin"))
    fetcher = _fetcher(ca_bundle, URLCredentials.parse("127.0.0.1=env:T", {"T": SECRET}))
    with pytest.raises(HTTPStatusError) as info:
        fetcher.fetch_to_file(https_server.url("/bounce", host=OTHER), tmp_path / "out")
    assert info.value.status_code == 401
    assert SECRET not in str(info.value)
    assert "Authorization" not in https_server.requests_for("/gated.bin")[0].headers


def test_open_and_post_never_carry_a_credential(
    https_server: HTTPSServer, ca_bundle: Path
) -> None:
    https_server.add("/hook", b"ok")
    fetcher = _fetcher(ca_bundle, URLCredentials.parse("127.0.0.1=env:T", {"T": SECRET}))
    assert fetcher.post(https_server.url("/hook"), b"{}") == 200
    with fetcher.open(https_server.url("/hook")) as resp:
        assert resp.credential_sent is False
    assert all("Authorization" not in r.headers for r in https_server.requests_for("/hook"))


def test_sources_report_whether_a_credential_was_sent(
    https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path
) -> None:
    data = b"private model"
    https_server.add("/m.bin", data, authorization=f"Bearer {SECRET}")
    fetcher = _fetcher(ca_bundle, URLCredentials.parse("127.0.0.1=env:T", {"T": SECRET}))
    source = Sources(fetcher=fetcher).source_for(https_server.url("/m.bin"))
    assert SECRET not in source.label
    result = source.fetch(tmp_path / "m")
    assert result.credential_sent is True and result.size == len(data)
