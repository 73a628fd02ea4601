"""Git mirrors: one bare repository per origin; commits fetched by SHA; worktree checkouts.

``GitMirrors(root, local={origin: path})`` keeps ``<root>/<name>-<hash of origin>.git``:

- ``ensure_commit(origin, commit)``: nothing to do if the mirror has the commit; else fetch
  exactly that commit (``git fetch --depth 1 <source> <sha>``, which servers allowing
  reachable-SHA fetches, GitHub among them, answer), falling back to a full fetch of every
  branch and tag. The fetched commit gets a ref (``refs/runflow/<sha>``) so no gc drops it.
- ``checkout(origin, commit, dest)``: a detached worktree of the mirror at the commit: a real
  checkout (``git rev-parse HEAD`` works in it, as ComfyUI and custom nodes expect) that
  shares the mirror's objects instead of copying them.

The source of an origin is the origin itself, or the local repository ``local`` maps it to
(``RUNFLOW_GIT_MIRRORS``, offline operation). Only that source's transport is allowed
(``GIT_ALLOW_PROTOCOL``: ``https`` for an https origin, ``file`` for a local path), git never
prompts for credentials, and a per-mirror file lock lets several workers share one volume.

Commands run the git CLI through ``cache.commands.run_command`` rather than GitPython: a
run's cancel must stop a long fetch within a second, process group included, and GitPython
(itself a wrapper around the same CLI) offers a timeout but no cancel. It is therefore not a
dependency.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from filelock import FileLock

from cache.commands import CommandResult, run_command
from cache.errors import GitError, redact_url
from cache.progress import Cancel

HEX40 = re.compile(r"^[0-9a-f]{40}$")
FETCH_TIMEOUT_S = 1800.0
LOCAL_TIMEOUT_S = 300.0


class GitMirrors:
    """Bare mirrors under ``root``; ``local`` maps origins to local repositories."""

    def __init__(self, root: Path, local: Mapping[str, Path | str] | None = None) -> None:
        self.root = Path(root)
        self.local = {_normal(o): Path(p) for o, p in (local or {}).items()}

    def mirror_path(self, origin: str) -> Path:
        """Where the bare mirror of ``origin`` lives."""
        digest = hashlib.sha256(_normal(origin).encode()).hexdigest()[:16]
        name = re.sub(r"[^A-Za-z0-9._-]", "_", _normal(origin).rsplit("/", 1)[-1])[:40]
        return self.root / f"{name or 'repo'}-{digest}.git"

    def ensure_commit(self, origin: str, commit: str, *, cancel: Cancel | None = None) -> Path:
        """Make sure the mirror of ``origin`` has ``commit``; return the mirror's path."""
        commit = commit.lower()
        if not HEX40.match(commit):
            raise GitError(f"{commit!r} is not a 40-hex commit")
        mirror = self.mirror_path(origin)
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(mirror) + ".lock"):
            if not (mirror / "HEAD").exists():
                self._git(None, "init", "--quiet", "--bare", str(mirror), cancel=cancel)
                self._git(mirror, "config", "gc.auto", "0", cancel=cancel)
            if self._has_commit(mirror, commit):
                return mirror
            source, protocol = self._source(origin)
            shown = redact_url(origin)
            env = {"GIT_ALLOW_PROTOCOL": protocol}
            shallow = self._git(mirror, "fetch", "--quiet", "--no-tags", "--depth", "1",
                                source, commit, cancel=cancel, env=env, check=False)
            if shallow.returncode != 0 or not self._has_commit(mirror, commit):
                unshallow = ["--unshallow"] if (mirror / "shallow").exists() else []
                full = self._git(mirror, "fetch", "--quiet", *unshallow, source,
                                 "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*",
                                 cancel=cancel, env=env, check=False)
                if not self._has_commit(mirror, commit):
                    detail = full.error_tail or shallow.error_tail
                    raise GitError(f"commit {commit} not found at {shown}"
                                   + (f": {detail}" if detail else ""))
            self._git(mirror, "update-ref", f"refs/runflow/{commit}", commit, cancel=cancel)
        return mirror

    def checkout(self, origin: str, commit: str, dest: Path, *,
                 cancel: Cancel | None = None) -> None:
        """Check ``commit`` of ``origin`` out at ``dest`` (a detached worktree)."""
        mirror = self.ensure_commit(origin, commit, cancel=cancel)
        with FileLock(str(mirror) + ".lock"):
            # A worktree whose directory was deleted (an abandoned build) still holds its
            # name in the mirror until pruned.
            self._git(mirror, "worktree", "prune", cancel=cancel)
            self._git(mirror, "worktree", "add", "--quiet", "--detach", "--force", str(dest),
                      commit.lower(), cancel=cancel)

    def prune_worktrees(self) -> None:
        """Forget worktrees whose directories were deleted (evicted environments), in every
        mirror. A mirror that cannot be pruned is left as it is."""
        if not self.root.is_dir():
            return
        for mirror in sorted(self.root.glob("*.git")):
            if not (mirror / "HEAD").exists():
                continue
            try:
                with FileLock(str(mirror) + ".lock"):
                    self._git(mirror, "worktree", "prune", check=False)
            except GitError:
                continue  # pruned again before the mirror's next checkout

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

    def _has_commit(self, mirror: Path, commit: str) -> bool:
        found = self._git(mirror, "cat-file", "-e", f"{commit}^{{commit}}", check=False)
        return found.returncode == 0

    def _git(self, repo: Path | None, *args: str, cancel: Cancel | None = None,
             env: Mapping[str, str] | None = None, check: bool = True) -> CommandResult:
        full_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true",
                    **(env or {})}
        cmd = ["git", *(["--git-dir", str(repo)] if repo is not None else []), *args]
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


def _normal(origin: str) -> str:
    """An origin without a trailing slash or ``.git``, so spellings of one repo share a
    mirror."""
    text = origin.strip().rstrip("/")
    return text.removesuffix(".git")
