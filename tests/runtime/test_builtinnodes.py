"""Deferred built-in nodes (``runtime.builtinnodes``) against a stand-in of ComfyUI's
``nodes`` module: the same class for every name as with every file loaded in order.

The stand-in keeps what matters of ComfyUI's ``nodes.py`` at the pinned commit:
``init_extra_nodes`` calls the module's ``load_custom_node`` once per built-in file, in a
fixed order, with ``module_parent="comfy_extras"``; the loader executes the file and
registers its ``NODE_CLASS_MAPPINGS`` (later files replacing earlier ones). The real one is
checked against real ComfyUI in ``tests/comfyui/test_real_builtin_nodes.py``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import types
from pathlib import Path
from typing import Any

import pytest

from runflow_worker.runtime.comfy import ComfyEmbedding

NODES_PY = '''
import importlib.util, os, sys
NODE_CLASS_MAPPINGS = {"Core": type("Core", (), {})}
NODE_DISPLAY_NAME_MAPPINGS = {}
EXTRAS = []
LOADED = []
PUBLIC_APIS = []

async def load_custom_node(module_path, ignore=set(), module_parent="custom_nodes"):
    LOADED.append(os.path.basename(module_path))
    name = os.path.splitext(module_path)[0]
    try:
        spec = importlib.util.spec_from_file_location(name, module_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception:
        return False
    for key, cls in module.NODE_CLASS_MAPPINGS.items():
        if key not in ignore:
            NODE_CLASS_MAPPINGS[key] = cls
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
    return True

async def init_builtin_extra_nodes():
    failed = []
    for path in EXTRAS:
        if not await load_custom_node(path, module_parent="comfy_extras"):
            failed.append(os.path.basename(path))
    return failed

async def init_extra_nodes(init_custom_nodes=True, init_api_nodes=True):
    PUBLIC_APIS.append(True)
    return await init_builtin_extra_nodes()
'''

FILES = {
    # name -> source; every class knows its file
    "nodes_a.py": 'NODE_CLASS_MAPPINGS = {"A1": type("A1", (), {"f": "a"}),\n'
                  '                       "Shared": type("S", (), {"f": "a"})}\n'
                  'NODE_DISPLAY_NAME_MAPPINGS = {"Shared": "from a"}\n',
    "nodes_b.py": "NODE_CLASS_MAPPINGS = {'B1': type('B1', (), {'f': 'b'})}\n",
    # c overrides the core class and a's "Shared" (it is later in the order)
    "nodes_c.py": 'NODE_CLASS_MAPPINGS = {"Core": type("C", (), {"f": "c"}),\n'
                  '                       "Shared": type("S", (), {"f": "c"})}\n'
                  'NODE_DISPLAY_NAME_MAPPINGS = {"Shared": "from c"}\n',
    # a name made at import: no literal of it in the file
    "nodes_d.py": 'NODE_CLASS_MAPPINGS = {"D" + "1": type("D1", (), {"f": "d"})}\n',
    "nodes_e.py": 'raise ImportError("a missing dependency")\nNODE_CLASS_MAPPINGS = {"E1": 1}\n',
}


OWN_PACK = ('NODE_CLASS_MAPPINGS = {"Own1": type("O1", (), {"f": "own"}),\n'
            '                       "B1": type("OB", (), {"f": "own"}),\n'
            '                       "Core": type("OC", (), {"f": "own"})}\n')
"""ComfyUI's own custom node file: loaded after every built-in, its names taken by then
(a built-in's, the core's) ignored."""


def own_pack(tmp_path: Path) -> str:
    (tmp_path / "custom_nodes").mkdir(exist_ok=True)
    path = tmp_path / "custom_nodes" / "own_pack.py"
    path.write_text(OWN_PACK)
    return str(path)


def fake_nodes(tmp_path: Path) -> types.ModuleType:
    """A fresh stand-in of ComfyUI's ``nodes`` with the files above as its built-ins."""
    module = types.ModuleType("fake_comfy_nodes")
    exec(compile(NODES_PY, "fake_nodes.py", "exec"), module.__dict__)  # noqa: S102 - test code
    for name, source in FILES.items():
        (tmp_path / name).write_text(source)
        module.EXTRAS.append(str(tmp_path / name))
    return module


def embedding(nodes: types.ModuleType) -> ComfyEmbedding:
    emb = ComfyEmbedding({"comfyui_dir": ".", "base_dir": "."})
    emb._nodes = nodes
    emb._hook_breaker = types.SimpleNamespace(save_functions=lambda: None,
                                              restore_functions=lambda: None)
    installs: list[bool] = []
    emb._install_server = lambda: installs.append(True)  # type: ignore[method-assign]
    emb.server_installs = installs  # type: ignore[attr-defined]
    return emb


def describe(nodes: types.ModuleType) -> dict[str, Any]:
    return {name: getattr(cls, "f", "core") for name, cls in nodes.NODE_CLASS_MAPPINGS.items()}


@pytest.fixture
def eager(tmp_path_factory: pytest.TempPathFactory) -> types.ModuleType:
    """Everything loaded at start, as ComfyUI does: the built-ins, then the custom nodes
    told to leave alone every name registered by then."""
    tmp_path = tmp_path_factory.mktemp("eager")
    nodes = fake_nodes(tmp_path)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    asyncio.run(nodes.load_custom_node(own_pack(tmp_path), set(nodes.NODE_CLASS_MAPPINGS),
                                       module_parent="custom_nodes"))
    return nodes


def test_start_records_comfyuis_calls_and_loads_nothing(tmp_path: Path) -> None:
    nodes = fake_nodes(tmp_path)
    emb = embedding(nodes)
    deferred = emb._defer_builtin_nodes([])
    assert nodes.LOADED == [] and nodes.PUBLIC_APIS == [True]  # the rest of init ran
    assert deferred.pending == len(FILES)
    assert nodes.load_custom_node.__name__ == "load_custom_node"  # the loader is back
    assert list(nodes.NODE_CLASS_MAPPINGS) == ["Core"]


def test_a_name_loads_only_the_files_holding_it(tmp_path: Path) -> None:
    nodes = fake_nodes(tmp_path)
    emb = embedding(nodes)
    deferred = emb._defer_builtin_nodes([])
    assert emb.server_installs == []  # nothing loaded yet
    assert deferred.settle(["B1", "Core"]) == [str(tmp_path / "nodes_b.py"),
                                               str(tmp_path / "nodes_c.py")]
    assert describe(nodes) == {"Core": "c", "B1": "b", "Shared": "c"}
    assert emb.server_installs  # ComfyUI's server module before any node module
    assert deferred.settle(["B1", "Core"]) == []  # settled: nothing more to do
    assert deferred.full_loads == 0 and deferred.pending == 3


@pytest.mark.parametrize("seed", range(8))
def test_any_order_of_names_resolves_as_everything_loaded_in_order(
        tmp_path: Path, eager: types.ModuleType, seed: int) -> None:
    names = ["A1", "B1", "Core", "Shared", "D1", "E1", "Own1", "Nope", 7, None]
    random.Random(seed).shuffle(names)
    nodes = fake_nodes(tmp_path)
    deferred = embedding(nodes)._defer_builtin_nodes([own_pack(tmp_path)])
    for name in names:
        deferred.settle([name])
        for settled in names[:names.index(name) + 1]:
            if isinstance(settled, str) and settled in eager.NODE_CLASS_MAPPINGS:
                assert describe(nodes)[settled] == describe(eager)[settled], (names, settled)
    assert deferred.pending == 0  # "Nope" and "D1" (no literal) loaded everything
    assert describe(nodes) == describe(eager)
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS == eager.NODE_DISPLAY_NAME_MAPPINGS


def test_an_earlier_file_loaded_later_does_not_win(tmp_path: Path) -> None:
    nodes = fake_nodes(tmp_path)
    deferred = embedding(nodes)._defer_builtin_nodes([])
    deferred.settle(["Core"])  # nodes_c: its "Shared" is registered
    deferred.settle(["A1"])  # nodes_a, earlier in the order, registers "Shared" again
    assert describe(nodes)["Shared"] == "c"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS == {"Shared": "from c"}


def test_a_name_found_nowhere_loads_everything_once(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    nodes = fake_nodes(tmp_path)
    deferred = embedding(nodes)._defer_builtin_nodes([])
    with caplog.at_level(logging.WARNING):
        loaded = deferred.settle(["NoSuchNode"])
    assert [Path(p).name for p in loaded] == sorted(FILES)  # ComfyUI's order
    assert "NoSuchNode" not in nodes.NODE_CLASS_MAPPINGS and deferred.full_loads == 1
    assert "IMPORT FAILED: nodes_e.py" in caplog.text  # as ComfyUI logs a failed built-in
    nodes.LOADED.clear()
    assert deferred.settle(["Other"]) == [] and nodes.LOADED == []  # nothing is tried twice


def test_comfyuis_own_custom_node_comes_after_every_builtin(tmp_path: Path) -> None:
    nodes = fake_nodes(tmp_path)
    deferred = embedding(nodes)._defer_builtin_nodes([own_pack(tmp_path)])
    assert deferred.settle(["A1"]) == [str(tmp_path / "nodes_a.py")]  # not the pack
    loaded = deferred.settle(["Own1"])
    assert [Path(p).name for p in loaded] == ["nodes_b.py", "nodes_c.py", "nodes_d.py",
                                              "nodes_e.py", "own_pack.py"]
    # The pack's "B1" and "Core" were taken by then: ignored, as ComfyUI tells it.
    assert describe(nodes) == {"Core": "c", "A1": "a", "B1": "b", "Shared": "c", "D1": "d",
                               "Own1": "own"}
    assert deferred.pending == 0 and deferred.full_loads == 0


def test_a_name_made_at_import_is_found(tmp_path: Path) -> None:
    nodes = fake_nodes(tmp_path)
    deferred = embedding(nodes)._defer_builtin_nodes([])
    deferred.settle(["D1"])
    assert describe(nodes)["D1"] == "d"


def test_an_unreadable_file_is_loaded_at_the_first_settle(tmp_path: Path) -> None:
    nodes = fake_nodes(tmp_path)
    nodes.EXTRAS.append(str(tmp_path / "gone.py"))
    deferred = embedding(nodes)._defer_builtin_nodes([])
    deferred.settle(["B1"])
    assert nodes.LOADED == ["nodes_b.py", "gone.py"]


def test_names_that_are_not_text_are_left_to_validation(tmp_path: Path) -> None:
    nodes = fake_nodes(tmp_path)
    deferred = embedding(nodes)._defer_builtin_nodes([])
    assert deferred.settle([None, 3, ["B1"], {"x": 1}]) == []
    assert nodes.LOADED == []
