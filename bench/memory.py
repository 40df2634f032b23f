"""Resident memory of a worker's process tree, read from /proc (Linux; no psutil), and its limit."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

GIB = 2**30
DEFAULT_MEMORY_FRACTION = 0.9
MEMORY_RESCAN_S = 2.0


def _meminfo_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_limit_bytes() -> int | None:
    try:
        value = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return None
    return int(value) if value.isdigit() else None


def default_memory_limit_gb() -> float | None:
    """90% of the machine's memory (or of a lower cgroup limit); None where it cannot be read."""
    known = [b for b in (_meminfo_total_bytes(), _cgroup_limit_bytes()) if b]
    return DEFAULT_MEMORY_FRACTION * min(known) / GIB if known else None


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (VmRSS); 0 when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _parent_and_group(pid: str) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rfind(b")") + 2 :].split()  # the command name may contain spaces and parentheses
        return int(fields[1]), int(fields[2])
    except (OSError, ValueError, IndexError):
        return None


def process_tree(root: int) -> list[int]:
    """`root`, the processes in its process group and all their descendants (one scan of /proc)."""
    members = {root}
    children: dict[int, list[int]] = {}
    with os.scandir("/proc") as entries:
        for entry in entries:
            ids = _parent_and_group(entry.name) if entry.name.isdigit() else None
            if ids is None:
                continue
            pid = int(entry.name)
            children.setdefault(ids[0], []).append(pid)
            if ids[1] == root:
                members.add(pid)
    stack = list(members)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in members:
                members.add(child)
                stack.append(child)
    return sorted(members)


def tree_rss_bytes(pid: int) -> int:
    return sum(rss_bytes(p) for p in process_tree(pid))


class MemoryWatchdog:
    """A worker tree's resident memory against a limit.

    RSS is read every poll; /proc is rescanned for new processes only every MEMORY_RESCAN_S, since a
    full scan costs milliseconds on a busy machine and would steal time from the run being measured.
    """

    def __init__(self, pid: int, limit_bytes: float | None):
        self.pid = pid
        self.limit_bytes = limit_bytes
        self._pids = [pid]
        self._scanned = -math.inf

    def exceeded(self) -> int | None:
        """The tree's resident bytes when over the limit, else None."""
        if self.limit_bytes is None:
            return None
        now = time.monotonic()
        if now - self._scanned >= MEMORY_RESCAN_S:
            self._pids, self._scanned = process_tree(self.pid), now
        used = sum(rss_bytes(p) for p in self._pids)
        return used if used > self.limit_bytes else None
