"""Git mirrors: one bare repository per origin; commits fetched by SHA; worktree checkouts.

``GitMirrors(root, local={origin: path})`` keeps ``<root>/<name>-<hash of origin>.git``:

- ``ensure_commit(origin, commit)``: nothing to do if the mirror has the commit; else fetch
  exactly that commit (``git fetch --depth 1 <source> <sha>``, which servers allowing
  reachable-SHA fetches, GitHub among them, answer), falling back to a full fetch of every
  branch and tag. The fetched commit gets a ref (``refs/runflow/<sha>``) so no gc drops it.
- ``checkout(origin, commit, dest)``: a detached worktree of the mirror at the commit: a real
  checkout (``git rev-parse HEAD`` works in it, as ComfyUI and custom nodes expect) that
  shares the mirror's objects instead of copying them.
- ``gc()``: remove the mirrors no checkout uses any more (their environments were evicted),
  so the mirrors' disk use follows the environments kept instead of growing with every
  origin and commit ever fetched. A removed mirror is fetched again when a build needs it.

The source of an origin is the origin itself, or the local repository ``local`` maps it to
(``RUNFLOW_GIT_MIRRORS``, offline operation). Only that source's transport is allowed
(``GIT_ALLOW_PROTOCOL``: ``https`` for an https origin, ``file`` for a local path), git never
prompts for credentials, and a per-mirror file lock lets several workers share one volume.

An https origin is a URL a deployment supplies, so it gets the fetcher's SSRF policy before
git runs: ``<origin>/info/refs?service=git-upload-pack`` (git's first request) is asked
through ``cache.fetcher.Fetcher``, which refuses internal addresses and re-checks every
redirect (a renamed GitHub repository redirects); git is then pointed at where that request
ended, its host pinned to the addresses the policy checked (``http.curloptResolve``, so a
DNS answer that changes in between cannot send it elsewhere) and with redirects off.

Commands run the git CLI through ``cache.commands.run_command`` rather than GitPython: a
run's cancel must stop a long fetch within a second, process group included, and GitPython
(itself a wrapper around the same CLI) offers a timeout but no cancel. It is therefore not a
dependency.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from filelock import FileLock, Timeout

from runflow_worker.cache.commands import CommandResult, run_command
from runflow_worker.cache.errors import (
    BuildCanceled,
    FetchCanceled,
    FetchError,
    GitError,
    OriginRefused,
    URLRefused,
    redact_url,
)
from runflow_worker.cache.fetcher import Fetcher
from runflow_worker.cache.progress import Cancel, held_or_cancel
from runflow_worker.cache.trust import CATrust
from runflow_worker.cache.urlpolicy import URLPolicy

HEX40 = re.compile(r"[0-9a-f]{40}")
FETCH_TIMEOUT_S = 1800.0
LOCAL_TIMEOUT_S = 300.0
MAX_SUBMODULE_DEPTH = 4


_PROBE = "/info/refs"


class GitMirrors:
    """Bare mirrors under ``root``; ``local`` maps origins to local repositories.

    ``fetcher``: checks https origins (the SSRF policy; default: the policy without an
    allowlist). ``ca_bundle``: extra CA certificates git trusts, as the fetcher does (a PEM
    file or a ``CATrust``: files and hashed directories).
    """

    def __init__(self, root: Path, local: Mapping[str, Path | str] | None = None, *,
                 fetcher: Fetcher | None = None,
                 ca_bundle: CATrust | Path | None = None) -> None:
        self.root = Path(root)
        self.local = {_normal(o): Path(p) for o, p in (local or {}).items()}
        self._fetcher = fetcher
        self.trust = CATrust.of(ca_bundle)

    def mirror_path(self, origin: str) -> Path:
        """Where the bare mirror of ``origin`` lives."""
        digest = hashlib.sha256(_normal(origin).encode()).hexdigest()[:16]
        name = re.sub(r"[^A-Za-z0-9._-]", "_", _normal(origin).rsplit("/", 1)[-1])[:40]
        return self.root / f"{name or 'repo'}-{digest}.git"

    def ensure_commit(self, origin: str, commit: str, *, cancel: Cancel | None = None) -> Path:
        """Make sure the mirror of ``origin`` has ``commit``; return the mirror's path."""
        commit = _checked_commit(commit)
        mirror = self.mirror_path(origin)
        self.root.mkdir(parents=True, exist_ok=True)
        with self._mirror_lock(mirror, cancel):
            self._ensure_locked(mirror, origin, commit, cancel)
        return mirror

    @staticmethod
    def _mirror_lock(mirror: Path, cancel: Cancel | None) -> AbstractContextManager[None]:
        """The mirror's lock, waited for as long as ``cancel`` allows."""
        return held_or_cancel(FileLock(str(mirror) + ".lock"), cancel, lambda: BuildCanceled(
            f"canceled while waiting for the git mirror {mirror.name}"))

    def _ensure_locked(self, mirror: Path, origin: str, commit: str,
                       cancel: Cancel | None) -> None:
        """``ensure_commit``'s work, with the mirror's lock held by the caller."""
        if not (mirror / "HEAD").exists():
            self._git(None, "init", "--quiet", "--bare", str(mirror), cancel=cancel)
            self._git(mirror, "config", "gc.auto", "0", cancel=cancel)
        if self._has_commit(mirror, commit):
            return
        source, protocol = self._source(origin)
        shown = redact_url(origin)
        env = {"GIT_ALLOW_PROTOCOL": protocol}
        config: list[str] = []
        if protocol == "https":
            source, config = self._checked_https(source, cancel)
            # The variables, not http.sslCAInfo: a GIT_SSL_CAINFO already in the
            # environment would win over the setting.
            if self.trust.files:
                env["GIT_SSL_CAINFO"] = str(self._ca_file())
            if self.trust.dirs:
                env["GIT_SSL_CAPATH"] = self.trust.capath() or ""
        shallow = self._git(mirror, "fetch", "--quiet", "--no-tags", "--depth", "1",
                            source, commit, cancel=cancel, env=env, config=config,
                            check=False)
        if shallow.returncode != 0 or not self._has_commit(mirror, commit):
            unshallow = ["--unshallow"] if (mirror / "shallow").exists() else []
            full = self._git(mirror, "fetch", "--quiet", *unshallow, source,
                             "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*",
                             cancel=cancel, env=env, config=config, check=False)
            if not self._has_commit(mirror, commit):
                detail = full.error_tail or shallow.error_tail
                raise GitError(f"commit {commit} not found at {shown}"
                               + (f": {detail}" if detail else ""))
        self._git(mirror, "update-ref", f"refs/runflow/{commit}", commit, cancel=cancel)

    def checkout(self, origin: str, commit: str, dest: Path, *,
                 cancel: Cancel | None = None, _depth: int = 0) -> None:
        """Check ``commit`` of ``origin`` out at ``dest`` (a detached worktree), with its git
        submodules at the commits it records (as ``git clone --recursive`` would)."""
        commit = _checked_commit(commit)
        mirror = self.mirror_path(origin)
        self.root.mkdir(parents=True, exist_ok=True)
        # One hold of the lock from the fetch to the new worktree: in between, the mirror
        # would have no worktree of this build yet, and a gc could remove it as unused.
        with self._mirror_lock(mirror, cancel):
            self._ensure_locked(mirror, origin, commit, cancel)
            # A worktree whose directory was deleted (an abandoned build) still holds its
            # name in the mirror until pruned.
            self._git(mirror, "worktree", "prune", cancel=cancel)
            self._git(mirror, "worktree", "add", "--quiet", "--detach", "--force", str(dest),
                      commit, cancel=cancel)
        if (dest / ".gitmodules").is_file():
            if _depth >= MAX_SUBMODULE_DEPTH:
                raise GitError(f"submodules of {redact_url(origin)} nest deeper than "
                               f"{MAX_SUBMODULE_DEPTH} levels")
            for path, url, sub_commit in self._submodules(mirror, commit, dest, cancel):
                target = dest / path
                if not target.resolve().is_relative_to(dest.resolve()):
                    raise GitError(f"submodule path {path!r} leads out of the checkout")
                if url.startswith(("./", "../")):
                    url = urljoin(origin.rstrip("/") + "/", url)
                # Each submodule is an origin of its own (its own mirror, the same URL
                # policy), and like every origin it must be https unless mapped to a local
                # mirror: a .gitmodules naming file:// or ssh:// could read the worker's disk.
                if _normal(url) not in self.local and urlsplit(url).scheme.lower() != "https":
                    raise OriginRefused(f"submodule {path!r} of {redact_url(origin)}: origin "
                                        f"{redact_url(url)} is not https")
                if target.is_dir() and not any(target.iterdir()):
                    target.rmdir()  # the empty placeholder git leaves for a submodule
                self.checkout(url, sub_commit, target, cancel=cancel, _depth=_depth + 1)

    def _submodules(self, mirror: Path, commit: str, dest: Path,
                    cancel: Cancel | None) -> list[tuple[str, str, str]]:
        """``(path, url, commit)`` of each submodule the checkout at ``dest`` records."""
        listed = self._git(None, "config", "--file", str(dest / ".gitmodules"),
                           "--get-regexp", r"^submodule\..*\.(path|url)$", cancel=cancel,
                           check=False)
        paths: dict[str, str] = {}
        urls: dict[str, str] = {}
        for line in listed.stdout.splitlines():
            key, _, value = line.partition(" ")
            name, _, field = key[len("submodule."):].rpartition(".")
            (paths if field == "path" else urls)[name] = value.strip()
        found = []
        for name, path in sorted(paths.items()):
            rel = Path(path)
            if rel.is_absolute() or ".." in rel.parts or name not in urls:
                raise GitError(f"submodule {name!r} has an unusable path or no url")
            tree = self._git(mirror, "ls-tree", commit.lower(), "--", path, cancel=cancel)
            parts = tree.stdout.split()
            if len(parts) < 3 or parts[1] != "commit":
                continue  # listed in .gitmodules but not recorded at this commit
            found.append((path, urls[name], parts[2]))
        return found

    def gc(self) -> list[str]:
        """Remove every mirror that no checkout uses any more; return their directory names.

        Worktrees whose directories are gone (evicted environments) are forgotten first; a
        mirror left with none, or one whose creation died before it was initialised, is
        renamed out of the way and deleted. A mirror whose lock is held (a fetch or checkout
        in progress, in any process) is left for a later gc.
        """
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        for leftover in self.root.glob(".evicted-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # a gc that died mid-delete
        for mirror in sorted(self.root.glob("*.git")):
            doomed = self.root / f".evicted-{mirror.name}-{uuid.uuid4().hex[:8]}"
            try:
                with FileLock(str(mirror) + ".lock", timeout=0):
                    if (mirror / "HEAD").exists():
                        self._git(mirror, "worktree", "prune")
                        worktrees = mirror / "worktrees"
                        if worktrees.is_dir() and any(worktrees.iterdir()):
                            continue
                    mirror.rename(doomed)
            except (Timeout, GitError, FileNotFoundError):
                continue  # in use, or gone meanwhile: a later gc looks again
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(mirror.name)
        return removed

    # ------------------------------------------------------------------ helpers

    def _source(self, origin: str) -> tuple[str, str]:
        local = self.local.get(_normal(origin))
        if local is not None:
            return str(local), "file"
        scheme = urlsplit(origin).scheme.lower()
        if not scheme:
            raise GitError(f"origin {redact_url(origin)} is neither a URL nor mapped to a "
                           "local mirror (RUNFLOW_GIT_MIRRORS)")
        return origin, scheme

    @property
    def fetcher(self) -> Fetcher:
        """The fetcher whose policy https origins pass (built on first use)."""
        if self._fetcher is None:
            self._fetcher = Fetcher(URLPolicy(), ca_bundle=self.trust)
        return self._fetcher

    def _checked_https(self, origin: str, cancel: Cancel | None) -> tuple[str, list[str]]:
        """Where git should fetch ``origin`` from, and the ``-c`` settings that hold it to the
        addresses the URL policy checked. Raises ``OriginRefused`` for a refused origin or
        redirect, ``GitError`` when the origin does not answer as a git server."""
        shown = redact_url(origin)
        probe = origin.rstrip("/") + _PROBE + "?service=git-upload-pack"
        try:
            with self.fetcher.open(probe, cancel=cancel) as response:
                final, status = response.url, response.status_code
            base = final.split("?", 1)[0]
            base = base[: -len(_PROBE)] if base.endswith(_PROBE) else origin
            resolved = self.fetcher.policy.check(base)
        except FetchCanceled as exc:
            raise BuildCanceled(f"fetching {shown} canceled") from exc
        except URLRefused as exc:
            raise OriginRefused(f"git origin {shown}: {exc}") from exc
        except FetchError as exc:
            raise GitError(f"cannot reach git origin {shown}: {exc}") from exc
        if status >= 400:
            raise GitError(f"git origin {shown} answered HTTP {status}")
        config = ["http.followRedirects=false"]
        target = resolved.target
        if target.address is None:
            addresses = ",".join(f"[{a}]" if a.version == 6 else str(a)
                                 for a in resolved.addresses)
            config.append(f"http.curloptResolve={target.host}:{target.port}:{addresses}")
        # Git gets the URL as the policy spelled it (IDNA, lower case, no trailing dot,
        # explicit port): curl matches the pinned name only in that spelling, and resolves
        # any other one (``host.``) itself, past the check.
        host = f"[{target.host}]" if ":" in target.host else target.host
        return f"https://{host}:{target.port}{target.path}", config

    def _ca_file(self) -> Path:
        """The public CAs plus the extra files: git's CA file replaces its default set, where
        the fetcher's bundle adds to it."""
        combined = self.root / "ca-bundle.pem"
        text = self.trust.pem_text()
        if not combined.exists() or combined.read_text() != text:
            tmp = combined.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, combined)
        return combined

    def _has_commit(self, mirror: Path, commit: str) -> bool:
        found = self._git(mirror, "cat-file", "-e", f"{commit}^{{commit}}", check=False)
        return found.returncode == 0

    def _git(self, repo: Path | None, *args: str, cancel: Cancel | None = None,
             env: Mapping[str, str] | None = None, config: list[str] | None = None,
             check: bool = True) -> CommandResult:
        full_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true",
                    **(env or {})}
        settings = [arg for item in config or () for arg in ("-c", item)]
        cmd = ["git", *settings, *(["--git-dir", str(repo)] if repo is not None else []),
               *args]
        timeout_s = FETCH_TIMEOUT_S if args[0] == "fetch" else LOCAL_TIMEOUT_S
        try:
            result = run_command(cmd, env=full_env, cancel=cancel, timeout_s=timeout_s)
        except TimeoutError as exc:
            raise GitError(f"git {args[0]} timed out") from exc
        except OSError as exc:
            raise GitError(f"cannot run git: {exc}") from exc
        if check and result.returncode != 0:
            raise GitError(f"git {args[0]} failed: {result.error_tail}")
        return result


def _checked_commit(commit: str) -> str:
    """``commit`` in lower case; ``GitError`` unless it is 40 hex digits."""
    commit = commit.lower()
    if not HEX40.fullmatch(commit):
        raise GitError(f"{commit!r} is not a 40-hex commit")
    return commit


def _normal(origin: str) -> str:
    """An origin without a trailing slash or ``.git``, so spellings of one repo share a
    mirror."""
    text = origin.strip().rstrip("/")
    return text.removesuffix(".git")
