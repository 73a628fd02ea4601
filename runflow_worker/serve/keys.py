"""Every Redis key, stream, group and field name the worker uses, in one place (SPEC §2, §7).

Nothing else in the worker spells a ``runflow:`` key: importers call these helpers, so a
rename or a prefix change is one edit here.
"""

from __future__ import annotations

PREFIX = "runflow:"
"""Common prefix of every key."""

RUNS_STREAM_PREFIX = PREFIX + "runs:"
"""Per-GPU-class run streams: ``runflow:runs:<gpu_class>``."""

DEAD_LETTER_STREAM = RUNS_STREAM_PREFIX + "dead"
"""Entries delivered more than ``max_deliveries`` times are copied here before the ack."""

EVENTS_STREAM = PREFIX + "events"
"""Capped stream of status, progress and log events of every run."""

CONSUMER_GROUP = "workers"
"""The consumer group every worker of a class joins."""

RUN_FIELD = "run"
"""The one field of a run stream entry: the run message as JSON."""

DEAD_REASON_FIELD = "reason"
"""Extra field of a dead-letter entry: why it was dead-lettered."""

SOURCE_STREAM_FIELD = "stream"
"""Extra field of a dead-letter entry: the stream the entry came from."""

SOURCE_ID_FIELD = "entry_id"
"""Extra field of a dead-letter entry: its id in the source stream."""

DELIVERIES_FIELD = "deliveries"
"""Extra field of a dead-letter entry: how many times it was delivered."""

CALLBACKS_DUE = PREFIX + "callbacks"
"""Sorted set of pending callback jobs, scored by when their next delivery is due (epoch ms)."""

FENCE_TTL_S = 7 * 24 * 3600
"""Lifetime of a fencing counter after its last use (far beyond any lease or run)."""


def runs_stream(gpu_class: str) -> str:
    """The run stream of ``gpu_class``, e.g. ``runflow:runs:l4``."""
    return RUNS_STREAM_PREFIX + gpu_class


def run_record(run_id: str) -> str:
    """The run record key ``runflow:run:<run_id>`` (a JSON string)."""
    return f"{PREFIX}run:{run_id}"


def cancel_flag(run_id: str) -> str:
    """The cancellation flag ``runflow:cancel:<run_id>`` (any value, any TTL)."""
    return f"{PREFIX}cancel:{run_id}"


def fence(run_id: str) -> str:
    """The fencing counter ``runflow:fence:<run_id>``: incremented at every pickup."""
    return f"{PREFIX}fence:{run_id}"


def callback_job(job_id: str) -> str:
    """A pending callback ``runflow:callback:<job_id>`` (hash: url, payload, run_id, tries)."""
    return f"{PREFIX}callback:{job_id}"


def consumer_name(hostname: str, pid: int, nonce: str) -> str:
    """A consumer name unique to one worker process (host, pid and a random nonce)."""
    return f"{hostname}:{pid}:{nonce}"
