"""Git origins get the fetcher's SSRF policy: checked before git runs, redirects re-checked,
and git held to the addresses the policy checked.

The origin is a bare repository served over the test TLS server (git's "dumb" HTTP protocol:
plain files), under a host name only the test resolver knows, so git can reach it only at
the address the worker pinned for it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from runflow_worker.cache.errors import GitError, OriginRefused
from runflow_worker.cache.fetcher import Fetcher
from runflow_worker.cache.git import GitMirrors
from runflow_worker.cache.urlpolicy import URLPolicy
from tests.support.gitrepos import commit, git, make_repo
from tests.support.https_server import HTTPSServer, Mode

pytestmark = pytest.mark.timeout(60)

NAME = "files.test"  # in the server's certificate; no real resolver knows it


@pytest.fixture
def served(https_server: HTTPSServer, tmp_path: Path) -> dict[str, str]:
    """A repository with two commits, served at /acme/Node.git; returns its commits."""
    work = make_repo(tmp_path / "work" / "Node")
    first = commit(work, {"__init__.py": "VERSION = 1\n"})
    second = commit(work, {"__init__.py": "VERSION = 2\n"})
    bare = tmp_path / "served" / "Node.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(work), str(bare)], check=True,
                   timeout=60)
    git(bare, "update-server-info")  # what a dumb-protocol server needs
    for path in bare.rglob("*"):
        if path.is_file():
            https_server.add(f"/acme/Node.git/{path.relative_to(bare).as_posix()}",
                             path.read_bytes())
    return {"first": first, "second": second}


def _mirrors(tmp_path: Path, ca_bundle: Path, allow: tuple[str, ...]) -> GitMirrors:
    policy = URLPolicy(allow, resolver=lambda host, port: ["127.0.0.1"])
    return GitMirrors(tmp_path / "git", fetcher=Fetcher(policy, ca_bundle=ca_bundle,
                                                        timeout_s=10), ca_bundle=ca_bundle)


def test_https_origin_is_fetched_at_the_address_the_policy_checked(
    https_server: HTTPSServer, served: dict[str, str], tmp_path: Path, ca_bundle: Path
) -> None:
    mirrors = _mirrors(tmp_path, ca_bundle, (NAME,))
    origin = https_server.url("/acme/Node.git", host=NAME)
    dest = tmp_path / "checkout"
    mirrors.checkout(origin, served["first"], dest)
    assert (dest / "__init__.py").read_text() == "VERSION = 1\n"
    assert git(dest, "rev-parse", "HEAD") == served["first"]
    # The policy's request came first; git's own requests followed it to the same server.
    assert https_server.requests_for("/acme/Node.git/info/refs")
    assert https_server.requests_for("/acme/Node.git/HEAD") or any(
        r.path.startswith("/acme/Node.git/objects/") for r in https_server.requests)


@pytest.mark.parametrize("spelling", [NAME.upper(), NAME + ".", NAME.upper() + "."])
def test_git_is_held_to_the_checked_address_whatever_the_hosts_spelling(
    spelling: str, https_server: HTTPSServer, served: dict[str, str], tmp_path: Path,
    ca_bundle: Path
) -> None:
    # The name does not resolve outside the policy's resolver: git reaches the server only
    # through the pinned address, which curl matches to the name only in its checked
    # spelling (a trailing dot would otherwise send git to its own DNS lookup).
    mirrors = _mirrors(tmp_path, ca_bundle, (NAME,))
    origin = f"https://{spelling}:{https_server.port}/acme/Node.git"
    dest = tmp_path / "checkout"
    mirrors.checkout(origin, served["first"], dest)
    assert git(dest, "rev-parse", "HEAD") == served["first"]


def test_a_redirect_is_checked_and_followed(
    https_server: HTTPSServer, served: dict[str, str], tmp_path: Path, ca_bundle: Path
) -> None:
    moved = https_server.url("/acme/Node.git/info/refs?service=git-upload-pack", host=NAME)
    https_server.add("/old/Node.git/info/refs", mode=Mode.REDIRECT, status=301, location=moved)
    mirrors = _mirrors(tmp_path, ca_bundle, (NAME,))
    dest = tmp_path / "checkout"
    mirrors.checkout(https_server.url("/old/Node.git", host=NAME), served["second"], dest)
    assert (dest / "__init__.py").read_text() == "VERSION = 2\n"
    assert not any(r.path.startswith("/old/Node.git/objects") for r in https_server.requests)


def test_an_internal_origin_is_refused_before_git_runs(
    https_server: HTTPSServer, served: dict[str, str], tmp_path: Path, ca_bundle: Path
) -> None:
    mirrors = _mirrors(tmp_path, ca_bundle, ())  # no allowlist: loopback is internal
    with pytest.raises(OriginRefused, match="refused"):
        mirrors.ensure_commit(https_server.url("/acme/Node.git"), served["first"])
    with pytest.raises(OriginRefused):
        mirrors.ensure_commit(https_server.url("/acme/Node.git", host=NAME), served["first"])
    assert https_server.requests == []


def test_a_redirect_to_an_internal_address_is_refused(
    https_server: HTTPSServer, served: dict[str, str], tmp_path: Path, ca_bundle: Path
) -> None:
    internal = https_server.url("/acme/Node.git/info/refs")  # 127.0.0.1: not on the list
    https_server.add("/evil/Node.git/info/refs", mode=Mode.REDIRECT, location=internal)
    mirrors = _mirrors(tmp_path, ca_bundle, (NAME,))
    with pytest.raises(OriginRefused, match="refused"):
        mirrors.ensure_commit(https_server.url("/evil/Node.git", host=NAME), served["first"])
    assert [r.path.split("?")[0] for r in https_server.requests] == ["/evil/Node.git/info/refs"]


def test_git_does_not_follow_a_redirect_the_policy_did_not_see(
    https_server: HTTPSServer, served: dict[str, str], tmp_path: Path, ca_bundle: Path
) -> None:
    # The origin answers the policy's probe, then redirects git's own request: a server
    # (or DNS answer) that changes between the check and git. Following it would work, the
    # repository is served there too, but git must not follow what nobody checked.
    refs = "/acme/Node.git/info/refs"
    for path, route in list(https_server.routes.items()):
        https_server.add(path.replace("/acme/", "/moved/", 1), route.body)
    https_server.add(refs, https_server.routes[refs].body, redirect_after_hits=1,
                     location=https_server.url("/moved/Node.git/info/refs", host=NAME))
    mirrors = _mirrors(tmp_path, ca_bundle, (NAME,))
    with pytest.raises(GitError, match="not found"):
        mirrors.checkout(https_server.url("/acme/Node.git", host=NAME), served["first"],
                         tmp_path / "checkout")
    assert len(https_server.requests_for(refs)) >= 2  # the probe, then git itself
    assert not any(r.path.startswith("/moved/") for r in https_server.requests)
