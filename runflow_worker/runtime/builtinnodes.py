"""ComfyUI's built-in extra nodes (``comfy_extras``), loaded when a graph names them.

ComfyUI's start (``nodes.init_extra_nodes``) imports some 75 files of built-in extra nodes
(and through them kornia, spandrel, pydantic): 0.35-0.7 s of a child's start on two cores,
for nodes most graphs never use. A child that loads no custom node pack defers them, and
ComfyUI's own ``custom_nodes/websocket_image_save.py`` (whose load imports pydantic, 0.1 s)
after them (``runtime.comfy`` decides): at start it records the files ComfyUI's own
``init_builtin_extra_nodes`` would load, in its order (its loader replaced by a recorder
for that call), and loads none. Before a job's graph is validated, every class name it
holds is *settled* once (``DeferredBuiltins.settle``): the deferred files whose source
holds the name as a quoted string literal (``"Name"`` or ``'Name'``: how a file declares
its nodes, in a ``NODE_CLASS_MAPPINGS`` key or a schema's ``node_id``) are loaded, with
ComfyUI's own call; a name no deferred file holds and nothing registered (a name made at
run time, or no class at all) loads every deferred file. So a graph sees the same class
for every name it holds as with everything loaded at start, and a class that does not
exist fails validation as before.

Why that is the same as loading at start:

- ComfyUI registers the files in its order, each file's classes replacing any earlier
  registration of the same name (built-ins have no ignore set). Files loaded out of that
  order would let the wrong one win, so after each load every name it registered is given
  back to the last loaded file in ComfyUI's order that registered it. Every file that
  spells a name out is loaded before the name is used; a file that makes a name at import
  (no literal) is loaded for it only when nothing else registered the name. At the pinned
  commit every built-in file spells each of its names out, and the registry a graph sees
  is ComfyUI's own (``tests/comfyui/test_real_builtin_nodes.py``).
- A file is imported once, with ComfyUI's own ``load_custom_node`` call; one that fails is
  logged as ComfyUI logs it and not tried again (ComfyUI does not retry it either). A
  custom node file comes after every built-in one and is told the names registered by
  then, as ComfyUI tells custom nodes (they may not replace those).
- What a built-in file does at import beyond registering classes (``nodes_upscale_model``
  adds spandrel's extra architectures to its registry) is done before any node of that
  file runs. Only custom nodes could depend on it from elsewhere, or read
  ``NODE_CLASS_MAPPINGS`` whole at import: a child with custom nodes loads everything at
  start, as ComfyUI does (``runtime.comfy``).
- Nothing at the pinned commit looks a class up by a name the graph does not hold but node
  expansion, which no built-in node does.

This module imports nothing of ComfyUI: ``runtime.comfy`` hands it the registries and the
loader.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

LoaderCall = tuple[tuple[Any, ...], dict[str, Any]]
"""One recorded call of ComfyUI's ``load_custom_node``: its positional and keyword
arguments (the first positional, or ``module_path``, is the file)."""

_ABSENT = object()


def recorder(calls: list[LoaderCall]) -> Callable[..., Any]:
    """A stand-in for ComfyUI's ``load_custom_node`` that records its calls, loads nothing
    and reports success (so ComfyUI logs no import failure)."""

    async def record(*args: Any, **kwargs: Any) -> bool:
        calls.append((args, dict(kwargs)))
        return True

    return record


def _path_of(call: LoaderCall) -> str:
    args, kwargs = call
    return str(args[0] if args else kwargs.get("module_path", ""))


class DeferredBuiltins:
    """The built-in node files not loaded at start, loaded when a graph needs them."""

    def __init__(self, calls: Sequence[LoaderCall], load: Callable[[LoaderCall], bool],
                 classes: MutableMapping[str, Any], display_names: MutableMapping[str, Any],
                 *, own_packs: Sequence[str] = ()) -> None:
        """``calls``: ComfyUI's loader calls, in its order; ``load`` makes one (True once
        loaded); ``classes`` and ``display_names``: ``nodes.NODE_CLASS_MAPPINGS`` and
        ``nodes.NODE_DISPLAY_NAME_MAPPINGS``, which the loader fills (as they are now: the
        names ComfyUI's core registered).

        ``own_packs``: ComfyUI's own files in its ``custom_nodes/`` (``websocket_image_save
        .py``), deferred too. ComfyUI loads custom nodes after every built-in, telling them
        to leave alone every name registered by then: one is loaded only after every
        built-in file, with that set of names.
        """
        self._builtin_count = len(calls)
        self._calls = [*calls, *(((path,), {"module_parent": "custom_nodes"})
                                 for path in own_packs)]
        self._load = load
        self._classes = classes
        self._display_names = display_names
        self._core_names = frozenset(classes)
        self._pending = set(range(len(self._calls)))
        self._sources: dict[int, bytes | None] = {}
        self._registered: dict[int, dict[str, Any]] = {}
        """Per loaded file: the classes it registered (name -> class)."""
        self._shown: dict[int, dict[str, Any]] = {}
        """Per loaded file: the display names it registered."""
        self._settled: set[str] = set()
        self.full_loads = 0
        """How many settles had to load every deferred file (a name found nowhere)."""

    @property
    def pending(self) -> int:
        """How many files are still not loaded."""
        return len(self._pending)

    def settle(self, names: Iterable[Any]) -> list[str]:
        """Load what resolving ``names`` needs; return the files loaded (in order).

        Non-string names are left to validation (which reports them). A name is settled
        once: later calls with it cost a set lookup.
        """
        loaded: list[str] = []
        for name in names:
            if not self._pending:
                break
            if not isinstance(name, str) or name in self._settled:
                continue
            loaded += self._load_files(i for i in self._pending if self._holds(i, name))
            if name not in self._classes:
                self.full_loads += 1
                loaded += self._load_files(self._pending)
            self._settled.add(name)
        return loaded

    def load_all(self) -> list[str]:
        """Load every deferred file (in ComfyUI's order); return them."""
        return self._load_files(self._pending)

    def _holds(self, index: int, name: str) -> bool:
        """Whether the file's source holds ``name`` as a quoted literal (True when the
        source cannot be read: the load says what is wrong with it)."""
        if index not in self._sources:
            try:
                with open(_path_of(self._calls[index]), "rb") as fh:
                    self._sources[index] = fh.read()
            except OSError:
                self._sources[index] = None
        source = self._sources[index]
        if source is None:
            return True
        raw = name.encode("utf-8", "backslashreplace")
        return b'"' + raw + b'"' in source or b"'" + raw + b"'" in source

    def _load_files(self, indices: Iterable[int]) -> list[str]:
        wanted = sorted(indices)
        if wanted and wanted[-1] >= self._builtin_count:
            # A custom node comes after every built-in (see __init__).
            wanted = sorted({*wanted, *(i for i in self._pending if i < self._builtin_count)})
        loaded: list[str] = []
        failed: list[str] = []
        for index in wanted:
            self._pending.discard(index)
            self._sources.pop(index, None)
            classes, shown = dict(self._classes), dict(self._display_names)
            path = _path_of(self._calls[index])
            if not self._load(self._call(index)):
                failed.append(path.rsplit("/", 1)[-1])
            self._registered[index] = _changed(classes, self._classes)
            self._shown[index] = _changed(shown, self._display_names)
            self._restore_order(index)
            loaded.append(path)
        if failed:
            # ComfyUI's own words for a file that did not import (init_extra_nodes).
            log.warning("WARNING: some comfy_extras/ nodes did not import correctly. This may "
                        "be because they are missing some dependencies.\n")
            for name in failed:
                log.warning("IMPORT FAILED: %s", name)
        return loaded

    def _call(self, index: int) -> LoaderCall:
        """The loader call of a file; a custom node's with the names it must leave alone:
        those registered when ComfyUI starts on custom nodes (its core's and every
        built-in file's)."""
        if index < self._builtin_count:
            return self._calls[index]
        (path,), kwargs = self._calls[index]
        base_names = set(self._core_names)
        for i in range(self._builtin_count):
            base_names.update(self._registered.get(i, ()))
        return (path, base_names), kwargs

    def _restore_order(self, index: int) -> None:
        """Give each name the file just loaded registered back to the last loaded file in
        ComfyUI's order that registered it (ComfyUI's own outcome of loading in order)."""
        for registered, target in ((self._registered, self._classes),
                                   (self._shown, self._display_names)):
            for name in registered[index]:
                later = [i for i in registered if i > index and name in registered[i]]
                if later:
                    target[name] = registered[max(later)][name]


def _changed(before: dict[str, Any], after: MutableMapping[str, Any]) -> dict[str, Any]:
    """The entries of ``after`` that are new or another object than in ``before``."""
    return {k: v for k, v in after.items() if before.get(k, _ABSENT) is not v}
