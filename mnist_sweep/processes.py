"""Which process this is, unique across hosts and containers, and whether another one has provably ended.

`host:pid` is what a person reads, but it names no process for sure: containers that share a hostname
(compose's `network_mode: host`, k8s' `hostNetwork: true`) each number their processes from 1, so one
container's live pid 7 is "no such process" in another's, and two of them can both be `host:7`. So each
process also draws a random token when it starts, and carries where its pid means something: the kernel
boot and the PID namespace, and when the process started (a pid is reused). Another process is judged to
have ended only where that can be proven: same boot, same PID namespace, and its pid no longer runs the
process that started then. Anywhere else its liveness is unknown here, and only its heartbeat can say it
stopped (the test-set claim, final.py; a trial's run, Optuna's trial heartbeat and the upload grace).
Importing this module imports nothing heavy.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

TOKEN_BYTES = 6  # 12 hex digits: 2**48 values, drawn once per process


@dataclass(frozen=True)
class ProcessId:
    """One process: `host:pid` for people, a random token that makes it unique, and where its pid is valid."""

    host: str
    pid: int
    token: str = ""  # "" in a record written before tokens (a bare host:pid)
    boot: str = ""  # the kernel's boot id; "" where unknown (not Linux)
    namespace: str = ""  # the PID namespace's inode; "" where unknown
    started: str = ""  # the process's start, in clock ticks after boot (/proc/PID/stat); "" where unknown

    @property
    def label(self) -> str:
        """`host:pid/token`, as messages, the run's `worker` tag and the test result show it."""
        return f"{self.host}:{self.pid}/{self.token}" if self.token else f"{self.host}:{self.pid}"

    def encode(self) -> str:
        """Everything, in one string that `decode` reads back (a run tag, the claim's attribute)."""
        return "/".join([f"{self.host}:{self.pid}", self.token, self.boot, self.namespace, self.started])

    @classmethod
    def decode(cls, text: str) -> ProcessId | None:
        """The process `encode` wrote, or a bare `host:pid` (older records); None if `text` is neither."""
        head, *rest = text.split("/")
        host, _, pid = head.rpartition(":")
        if not host or not pid.isdigit() or len(rest) not in (0, 4):
            return None
        token, boot, namespace, started = rest or ["", "", "", ""]
        return cls(host, int(pid), token, boot, namespace, started)


_cached: tuple[int, ProcessId] | None = None  # (os.getpid() when drawn, the identity): a fork draws its own


def this_process() -> ProcessId:
    """This process's identity, drawn once (per fork)."""
    global _cached
    pid = os.getpid()
    if _cached is None or _cached[0] != pid:
        boot, namespace = _read(Path("/proc/sys/kernel/random/boot_id")), _pid_namespace()
        process = ProcessId(socket.gethostname(), pid, secrets.token_hex(TOKEN_BYTES), boot, namespace, _started(pid))
        _cached = (pid, process)
    return _cached[1]


def is_this_process(other: ProcessId) -> bool:
    me = this_process()
    return other.token == me.token if other.token else (other.host, other.pid) == (me.host, me.pid)


def ended(other: ProcessId) -> bool:
    """Whether `other` has provably ended: it ran in this boot and PID namespace, and its pid runs no process
    started when it did. False where that is unknown (another host or container, an older record)."""
    me = this_process()
    if is_this_process(other) or not (other.boot and other.namespace and other.started):
        return False
    if (other.boot, other.namespace) != (me.boot, me.namespace):
        return False
    return _started(other.pid) != other.started  # "" once the pid is gone


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""
    return link.partition("[")[2].rstrip("]")


def _started(pid: int) -> str:
    """Field 22 of /proc/PID/stat (after the command name, which may hold spaces); "" if there is no such pid."""
    stat = _read(Path(f"/proc/{pid}/stat"))
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""
