"""``runflow-worker cache ls | verify | gc | pull | envs`` through the command functions."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runflow_worker.cache.blobs import BlobStore
from runflow_worker.cache.environments import EnvironmentSpec
from runflow_worker.cli import cache as cache_cli
from runflow_worker.run import assembly
from runflow_worker.settings import Settings
from tests.support.bodies import make_body, sha256_hex
from tests.support.gitrepos import commit, make_repo
from tests.support.https_server import HTTPSServer

pytestmark = pytest.mark.timeout(60)

BODY = make_body(500_000)
DIGEST = sha256_hex(BODY)


def _run(argv: list[str], settings: Settings) -> int:
    parser = argparse.ArgumentParser(prog="runflow-worker")
    cache_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args, settings)


@pytest.fixture
def settings(tmp_path: Path, ca_bundle: Path) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", url_allow=("127.0.0.1/32",),
                    ca_bundle=ca_bundle, cache_max_bytes=10 * 2**20, fetch_timeout_s=10)


def test_pull_ls_verify_gc(
    https_server: HTTPSServer, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    https_server.add("/m", BODY)
    assert _run(["cache", "pull", DIGEST, https_server.url("/m"), "--size", str(len(BODY))],
                settings) == 0
    assert capsys.readouterr().out.strip() == str(settings.blobs_dir / "sha256" / DIGEST[:2] / DIGEST)

    assert _run(["cache", "ls", "--json"], settings) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["sha256"] == DIGEST and row["size_bytes"] == len(BODY) and not row["pinned"]
    assert row["public"] and row["proven_owners"] == 0  # from a public https URL
    assert _run(["cache", "ls"], settings) == 0
    assert f"{DIGEST}" in (out := capsys.readouterr().out) and "public" in out

    assert _run(["cache", "verify"], settings) == 0
    assert "1 ok, 0 corrupt" in capsys.readouterr().out
    blob = BlobStore(settings.blobs_dir).path_for(DIGEST)
    os.chmod(blob, 0o644)
    blob.write_bytes(b"rot")
    assert _run(["cache", "verify", "--no-quarantine"], settings) == 1
    assert f"corrupt {DIGEST}" in capsys.readouterr().out
    assert blob.exists()
    assert _run(["cache", "verify", DIGEST], settings) == 1
    assert "quarantined" in capsys.readouterr().out and not blob.exists()

    assert _run(["cache", "pull", DIGEST, https_server.url("/m")], settings) == 0
    capsys.readouterr()
    assert _run(["cache", "gc", "--max-bytes", "0"], settings) == 0
    assert f"evicted {DIGEST}" in capsys.readouterr().out
    assert not blob.exists()
    # Nothing of it is left: no access record, no lock or pin file.
    for leftover in ("access", "locks", "pins"):
        assert os.listdir(settings.blobs_dir / leftover) == [], leftover


def test_pull_failures(https_server: HTTPSServer, settings: Settings,
                       capsys: pytest.CaptureFixture[str]) -> None:
    https_server.add("/m", b"something else")
    assert _run(["cache", "pull", DIGEST, https_server.url("/m")], settings) == 1
    assert "sha256" in capsys.readouterr().err
    assert _run(["cache", "pull", "not-a-digest", https_server.url("/m")], settings) == 2
    assert _run(["cache", "pull", DIGEST, "http://example.com/x"], settings) == 1
    assert "refused" in capsys.readouterr().err


def test_builders(settings: Settings) -> None:
    fetcher = assembly.build_fetcher(settings)
    assert fetcher.timeout_s == 10
    store = assembly.build_blob_store(settings, fetcher)
    assert store.root == settings.blobs_dir and store.max_bytes == 10 * 2**20
    assert store.sources.allow_s3
    assert not assembly.build_sources(settings, fetcher).allow_s3  # caller URLs: no s3


def test_console_script_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "RUNFLOW_CACHE_DIR": str(tmp_path / "cache"),
           "RUNFLOW_CACHE_MAX_BYTES": "1000"}
    done = subprocess.run([sys.executable, "-m", "runflow_worker.cli.main", "cache", "gc"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "freed" in done.stdout


def test_envs_and_gc_of_environments(
    tmp_path: Path, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    origin = "https://git.example/comfyanonymous/ComfyUI"
    repo = make_repo(tmp_path / "origins" / "ComfyUI")
    v1, v2 = commit(repo, {"main.py": "1\n"}), commit(repo, {"main.py": "2\n"})
    node_origin = "https://git.example/acme/ComfyUI-Foo"
    node = make_repo(tmp_path / "origins" / "ComfyUI-Foo")
    node_v1 = commit(node, {"__init__.py": "\n"})
    settings = settings.model_copy(update={
        "git_mirrors": (f"{origin}={repo}", f"{node_origin}={node}"), "env_max_count": 5})
    envs = assembly.build_environments(settings)
    assert envs.root == settings.cache_dir / "envs" and envs.max_count == 5
    old = envs.prepare(EnvironmentSpec(origin, v1))
    new = envs.prepare(EnvironmentSpec(origin, v2))
    stamp = time.time() - 3600
    os.utime(old.root / "READY", (stamp, stamp))

    assert _run(["cache", "envs", "--json"], settings) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in rows] == [new.key, old.key]
    assert all(r["ready"] and not r["pinned"] and r["size_bytes"] > 0 for r in rows)
    with envs.pin(new.key):
        assert _run(["cache", "envs"], settings) == 0
        table = capsys.readouterr().out
    assert f"{new.key}" in table and "in use" in table and "2 environments (keeping 5)" in table

    unused = envs.git.ensure_commit(node_origin, node_v1)  # fetched by a build that failed
    assert _run(["cache", "gc"], settings) == 0  # within RUNFLOW_ENV_MAX_COUNT
    out = capsys.readouterr().out
    assert "2 environments left" in out
    assert f"removed git mirror {unused.name} (no environment uses it)" in out
    assert not unused.exists() and envs.git.mirror_path(origin).is_dir()
    assert _run(["cache", "gc", "--max-envs", "1"], settings) == 0
    assert f"evicted environment {old.key}" in capsys.readouterr().out
    assert not old.root.exists() and new.root.exists()
    assert _run(["cache", "gc", "--max-envs", "-1"], settings) == 2
