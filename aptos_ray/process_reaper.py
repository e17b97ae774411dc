"""Ends a local Ray instance together with the driver that started it, even a SIGKILLed driver.

Ray ties its head processes (GCS, raylet, dashboard) to the driver with the kernel's parent-death
signal, but the dashboard and runtime-env agents are the raylet's children: when the raylet dies
they try to tell the dead GCS first and linger for a minute or more, one of them listening on a
port. This watcher is started by ``ray_setup.init_ray`` for a local instance only. It reads a pipe
whose other end only the driver holds (end of file: the driver is gone, however it died), keeps a
list of the driver's descendants meanwhile, and SIGKILLs those still running when the driver is
gone. A script run by path (not ``-m``), and without imports from this package: it starts in a
fraction of a second and needs nothing but the standard library. Linux only (``/proc``).
"""

from __future__ import annotations

import os
import select
import signal
import sys

SNAPSHOT_S = 1.0  # how often the descendants are listed: a process younger than this may be missed


def process_table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, start time)} of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended while listed
            continue
        table[int(entry)] = (int(fields[1]), fields[19])  # ppid, starttime (tells a reused pid apart)
    return table


def descendants(root: int, table: dict[int, tuple[int, str]]) -> dict[int, str]:
    """{pid: start time} of every process below ``root``."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = table[pid][1]
        todo += children.get(pid, [])
    return found


def kill_remaining(known: dict[int, str]) -> None:
    table = process_table()
    for pid, started in known.items():
        if pid in table and table[pid][1] == started and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def watch(driver: int) -> None:
    """Until the driver's end of stdin closes: list its descendants; then kill those left."""
    known: dict[int, str] = {}
    while True:
        known.update(descendants(driver, process_table()))
        ready, _, _ = select.select([sys.stdin], [], [], SNAPSHOT_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
    kill_remaining(known)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the driver's to handle; this ends after it
    watch(int(sys.argv[1]))
