"""``bench/quiesce.py``: the benchmark's wait for an idle machine."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.quiesce import Quiesce, runnable_tasks

pytestmark = pytest.mark.timeout(60)


def test_the_count_of_runnable_tasks_includes_the_reader() -> None:
    assert runnable_tasks() >= 1


def test_a_spinning_process_keeps_the_wait_from_ending() -> None:
    spinner = subprocess.Popen(
        [sys.executable, "-c", "import sys\nprint('ready', flush=True)\nwhile True: pass"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert spinner.stdout is not None and spinner.stdout.readline() == "ready\n"
        quiesce = Quiesce(window_s=0.001, timeout_s=0.05)
        waited = quiesce.wait()
        # Runnable at every read, on one CPU or many: the wait can only give up.
        assert quiesce.timeouts == 1
        assert waited >= 0.05
        assert quiesce.summary()["timeouts"] == 1
    finally:
        spinner.kill()
        spinner.wait()
