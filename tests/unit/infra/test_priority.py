"""infra/priority.py: background work runs at a lower CPU priority, thread by thread (Linux nice is per thread)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from infra.priority import MAX_NICE, lower_process, lower_thread
from infra.settings import Settings
from schemas.errors import ConfigError

linux = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")


def nice_of(tid: int) -> int:
    """Field 19 of the thread's stat line, as the kernel schedules it (not what the library believes it set)."""
    return int(Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def in_thread(work: object) -> dict[str, int]:
    """Run ``work(seen)`` in a new thread; ``seen`` is filled there with the thread's id and its nices."""
    seen: dict[str, int] = {}
    thread = threading.Thread(target=work, args=(seen,))
    thread.start()
    thread.join()
    return seen


@linux
def test_lower_thread_lowers_only_the_calling_thread_and_its_later_threads() -> None:
    base = nice_of(threading.get_native_id())

    def work(seen: dict[str, int]) -> None:
        lowered = lower_thread(base + 3)
        seen["lowered"] = int(lowered)
        seen["self"] = nice_of(threading.get_native_id())
        child = in_thread(lambda inner: inner.update(nice=nice_of(threading.get_native_id())))
        seen["child"] = child["nice"]

    seen = in_thread(work)
    assert seen == {"lowered": 1, "self": base + 3, "child": base + 3}
    assert nice_of(threading.get_native_id()) == base  # the rest of the process keeps its priority


@linux
def test_lower_thread_never_raises_a_priority_and_0_leaves_it_alone() -> None:
    base = nice_of(threading.get_native_id())

    def work(seen: dict[str, int]) -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), base + 5)
        lower_thread(base + 2)  # already lower than asked: kept
        seen["kept"] = nice_of(threading.get_native_id())
        assert not lower_thread(0)
        seen["zero"] = nice_of(threading.get_native_id())

    assert in_thread(work) == {"kept": base + 5, "zero": base + 5}


@linux
def test_lower_process_lowers_every_running_thread_in_a_child_process() -> None:
    # in a child: the test process' own threads must keep their priority
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        started = threading.Event()
        hold = threading.Event()
        threads = [threading.Thread(target=lambda: (started.set(), hold.wait())) for _ in range(3)]
        for thread in threads:
            thread.start()
        started.wait()
        lower_process(MAX_NICE)
        nices = {nice_of(int(task.name)) for task in Path("/proc/self/task").iterdir()}
        hold.set()
        os.write(write, repr(sorted(nices)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as out:
        assert out.read() == f"[{MAX_NICE}]"


def test_sink_nice_is_validated() -> None:
    assert Settings().sink_nice == 0  # off by default (infra/settings.py says why)
    assert Settings.from_env({"MEMSTREAM_SINK_NICE": "10"}).sink_nice == 10
    for wrong in ("-1", "20"):
        with pytest.raises(ConfigError, match="MEMSTREAM_SINK_NICE"):
            Settings.from_env({"MEMSTREAM_SINK_NICE": wrong})
