"""Fakes of what surrounds the worker, for tests (the one place they are kept).

- ComfyUI children, each a ``module:function`` entry the runner spawns in place of the real
  child (``RunnerConfig.child_entry``, ``RUNFLOW_RUNNER_ENTRY``): the constants below name
  them. ``fake_child`` speaks the runner protocol and executes toy graphs; the others wrap
  it (a slow, gated or failing start, a forked helper, test nodes for the serve tests,
  attacks on the channel).
- Custom node packs copied into a test checkout's ``custom_nodes/`` (``hostile_pack``,
  ``self_writing_pack``).
- In-process stand-ins: the run control the pipeline reports to (``control``), input
  fetchers (``fetchers``), a ``pynvml`` for a subprocess's path (``nvml``).

This package imports nothing: the children run it inside the sandbox.
"""

FAKE_CHILD = "tests.fakes.fake_child:main"
"""The fake ComfyUI child (``fake_child``)."""
SERVE_CHILD = "tests.fakes.serve_child:main"
"""The fake child plus the serve tests' nodes ``TestMark``, ``TestPid``, ``TestKillWorker``."""
HOSTILE_CHILD = "tests.fakes.hostile_child:main"
"""The fake child plus attacks on the runner's channel."""
FORKING_CHILD = "tests.fakes.forking_child:main"
"""The fake child after forking a long-sleeping helper."""
SLOW_START_CHILD = "tests.fakes.slow_start_child:main"
"""The fake child, Ready only after a minute."""
GATED_START_CHILD = "tests.fakes.gated_start_child:main"
"""The fake child, Ready only once ``<checkout>/gate`` exists."""
FAIL_START_CHILD = "tests.fakes.fail_start_child:main"
"""The fake child, exiting before Ready while ``<checkout>/fail-start`` exists."""
INIT_FAILED_CHILD = "tests.fakes.init_failed_child:main"
"""A child whose start fails as a custom node that does not import makes it fail."""
SECOND_START_GATED_CHILD = "tests.fakes.second_start_gated_child:main"
"""The serve child, counting its starts; the second waits for ``<checkout>/gate``."""
