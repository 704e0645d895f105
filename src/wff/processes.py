"""Processes, memory and sockets of this machine, read from /proc; a free TCP port; stopping a process group.

Used by the server (its backend stubs, binding checks, stopping tritonserver), by ``wff soak`` and
``wff bench`` (the memory of a server they did not start) and by the tests. Linux only; nothing here
knows Triton.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
from pathlib import Path


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at ``address`` now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def stop_process_group(process: subprocess.Popen, timeout_s: float, term_group: bool = True) -> tuple[int, bool]:
    """Stop ``process``, started with ``start_new_session=True`` (it leads its own process group): SIGTERM to the
    group (to the process alone when not ``term_group``, for a leader that stops its children itself), wait up to
    ``timeout_s``, then SIGKILL the whole group. Returns (exit code, whether it had to be killed); a process that
    has already exited is only reaped."""
    if process.poll() is not None:
        return process.returncode, False
    with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
        if term_group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout_s), False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait(), True


def child_pids(pid: int, recursive: bool = True) -> list[int]:
    """The children of ``pid`` (every descendant when ``recursive``), from /proc/<pid>/task/*/children."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:  # the task ended meanwhile
                continue
            found.extend(kids)
            if recursive:
                queue.extend(kids)
    return found


def process_rss(pid: int) -> int:
    """VmRSS of one process in bytes; 0 when it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_tree_rss(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, in bytes (shared pages counted per process)."""
    return sum(process_rss(p) for p in [pid, *child_pids(pid)])


def process_pss(pid: int) -> int:
    """Proportional set size of one process in bytes (shared pages split among their users); 0 when it has gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass  # a stub that exited between listing and reading counts as 0
    return 0


def process_tree_pss(pid: int) -> int:
    """Memory of ``pid`` and all its descendants in bytes, each shared page once: the Python backend's
    shared-memory regions are mapped by tritonserver and a stub each, which a sum of RSS counts twice."""
    return sum(process_pss(p) for p in [pid, *child_pids(pid)])


def process_name(pid: int) -> str:
    """argv[0]'s base name of a process ('' when it has gone)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return ""
    return os.path.basename(argv0.decode(errors="replace"))


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state owned by ``pid``, from /proc/net/tcp{,6}.

    IPv4-mapped IPv6 addresses are given as IPv4 (``::ffff:127.0.0.1`` -> ``127.0.0.1``).
    """
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("tcp", 4), ("tcp6", 16)):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            host, port = local.split(":")
            raw = bytes.fromhex(host)
            # /proc prints each 32-bit word in host (little-endian) order
            packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(packed if width == 16 else packed[:4])
            ip = getattr(ip, "ipv4_mapped", None) or ip  # gRPC listens on ::ffff:127.0.0.1 for 127.0.0.1
            found.append((str(ip), int(port, 16)))
    return sorted(found)
