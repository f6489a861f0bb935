"""Process lifetime helpers shared by the launcher and the job workers (Linux; no-ops elsewhere)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def _resolve_prctl():
    """libc's prctl, looked up once at import rather than in a freshly forked child (loading a library after fork
    can deadlock on a lock another thread held); None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _resolve_prctl()


def set_parent_death_signal(sig: signal.Signals = signal.SIGKILL, parent_pid: int | None = None) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies, however it dies.

    The signal follows the death of the parent *thread* that forked us. A parent that is already gone (it died
    before this call) gets the signal sent right away: known by ``parent_pid`` when the caller captured it before
    forking, else by having been reparented to init.
    """
    if _PRCTL is None:
        return
    _PRCTL(PR_SET_PDEATHSIG, int(sig))
    parent_gone = os.getppid() != parent_pid if parent_pid is not None else os.getppid() == 1
    if parent_gone:
        os.kill(os.getpid(), sig)
