"""The system's trust settings (SSL_CERT_FILE, SSL_CERT_DIR) count for downloads, callbacks
and git, besides the public roots and RUNFLOW_CA_BUNDLE."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from runflow_worker.cache.errors import FetchConnectError
from runflow_worker.cache.git import GitMirrors
from runflow_worker.cache.trust import CATrust
from runflow_worker.run.assembly import build_environments, build_fetcher
from runflow_worker.serve.callbacks import build_poster
from runflow_worker.settings import InvalidSettings, Settings
from tests.support.gitrepos import commit, git, make_repo
from tests.support.https_server import HTTPSServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _no_trust_from_the_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "RUNFLOW_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RUNFLOW_URL_ALLOW", "127.0.0.1/32")
    monkeypatch.setenv("RUNFLOW_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def hashed_dir(ca_bundle: Path, tmp_path: Path) -> Path:
    """A directory holding the test CA under its subject hash, as ``c_rehash`` names it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to name a certificate by its subject hash")
    subject_hash = subprocess.run([openssl, "x509", "-hash", "-noout", "-in", str(ca_bundle)],
                                  capture_output=True, text=True, check=True,
                                  timeout=30).stdout.strip()
    directory = tmp_path / "certs"
    directory.mkdir()
    shutil.copy(ca_bundle, directory / f"{subject_hash}.0")
    return directory


def test_without_the_system_trust_the_private_ca_is_refused(
    https_server: HTTPSServer, tmp_path: Path
) -> None:
    https_server.add("/f", b"x")
    with pytest.raises(FetchConnectError) as info:
        build_fetcher(Settings()).fetch_to_file(https_server.url("/f"), tmp_path / "o")
    assert info.value.reason == "tls_failed"


def test_ssl_cert_file_is_trusted_for_downloads_and_callbacks(
    https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_bundle))
    settings = Settings()
    https_server.add("/f", b"data")
    https_server.add("/hook", b"ok")
    assert build_fetcher(settings).fetch_to_file(https_server.url("/f"), tmp_path / "o").size == 4
    assert build_poster(settings).post(https_server.url("/hook"), b"{}") == 200


def test_ssl_cert_dir_is_trusted(
    https_server: HTTPSServer, hashed_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_DIR", f"{tmp_path / 'missing'}:{hashed_dir}")
    settings = Settings()
    assert settings.ca_trust.dirs == (hashed_dir,)  # a missing directory is skipped
    https_server.add("/f", b"data")
    assert build_fetcher(settings).fetch_to_file(https_server.url("/f"), tmp_path / "o").size == 4


def test_a_missing_ssl_cert_file_is_skipped_and_a_bad_one_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "absent.pem"))
    assert Settings().ca_trust == CATrust()
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    monkeypatch.setenv("SSL_CERT_FILE", str(junk))
    with pytest.raises(InvalidSettings) as info:
        Settings()
    assert "SSL_CERT_FILE" in str(info.value) and "RUNFLOW_SSL" not in str(info.value)


@pytest.mark.parametrize("how", ["file", "dir"])
def test_git_trusts_the_system_ca(
    https_server: HTTPSServer, ca_bundle: Path, hashed_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    work = make_repo(tmp_path / "work" / "Node")
    first = commit(work, {"__init__.py": "VERSION = 1\n"})
    bare = tmp_path / "served" / "Node.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(work), str(bare)], check=True,
                   timeout=60)
    git(bare, "update-server-info")  # a dumb-protocol server: plain files
    for path in bare.rglob("*"):
        if path.is_file():
            https_server.add(f"/Node.git/{path.relative_to(bare).as_posix()}",
                             path.read_bytes())
    if how == "file":
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_bundle))
    else:
        monkeypatch.setenv("SSL_CERT_DIR", str(hashed_dir))
    # git's own CA settings from the machine must not decide the outcome.
    monkeypatch.delenv("GIT_SSL_CAINFO", raising=False)
    monkeypatch.delenv("GIT_SSL_CAPATH", raising=False)
    mirrors: GitMirrors = build_environments(Settings()).git
    dest = tmp_path / "checkout"
    mirrors.checkout(https_server.url("/Node.git"), first, dest)
    assert (dest / "__init__.py").read_text() == "VERSION = 1\n"
