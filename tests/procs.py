"""Subprocesses in tests that can fail but never hang: every wait is bounded, every child is
killed (with its process group) in ``finally``.

A child started from a background job of a non-interactive shell inherits SIGINT as ignored;
``start_new_session`` plus ``SIG_DFL`` in the child gives every test child the default
dispositions, whatever started pytest.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence

DEFAULT_TIMEOUT = 300


def _default_signals():  # runs in the child between fork and exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _kill_group(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            p.kill()
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
        pass


def run(cmd: Sequence[str], timeout: float = DEFAULT_TIMEOUT, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run(capture_output=True, text=True)`` with a bounded wait, and the child's
    whole process group killed afterwards (torchrun's workers included).

    Raises:
        subprocess.TimeoutExpired: the child ran past ``timeout``.
        subprocess.CalledProcessError: ``check`` and a non-zero exit code.
    """
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=kw.pop("preexec_fn", _default_signals), **kw)
    try:
        out, err = p.communicate(timeout=timeout)
        if check and p.returncode:
            raise subprocess.CalledProcessError(p.returncode, cmd, out, err)
        return subprocess.CompletedProcess(cmd, p.returncode, out, err)
    finally:
        _kill_group(p)


@dataclass
class Interrupted:
    returncode: Optional[int]  # None: the child did not stop within the wait (it was killed)
    stdout: str
    stderr: str


def signal_when_ready(cmd: Sequence[str], ready: str, sig: int, start_timeout: float = 120, stop_timeout: float = 60,
                      preexec_fn=_default_signals, **kw) -> Interrupted:
    """Start ``cmd``, wait until its stderr shows ``ready``, send ``sig``, and collect what it
    printed. Every wait is bounded: a child that never gets ready or ignores the signal is
    killed and reported with ``returncode=None``, so the calling test fails instead of hanging."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=preexec_fn, **kw)
    err_chunks: list = []
    out_chunks: list = []
    ready_seen = threading.Event()

    def pump(stream, chunks, watch):
        fd = stream.fileno()
        for raw in iter(lambda: os.read(fd, 4096), b""):  # whatever is there: a short line must not wait
            chunks.append(raw.decode(errors="replace"))
            if watch and ready in "".join(chunks[-4:]):
                ready_seen.set()

    readers = [threading.Thread(target=pump, args=(p.stderr, err_chunks, True), daemon=True),
               threading.Thread(target=pump, args=(p.stdout, out_chunks, False), daemon=True)]
    for r in readers:
        r.start()
    code = None
    try:
        if ready_seen.wait(start_timeout):
            time.sleep(0.5)
            p.send_signal(sig)
            try:
                code = p.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                code = None
    finally:
        _kill_group(p)
        for r in readers:
            r.join(timeout=10)
    return Interrupted(code, "".join(out_chunks), "".join(err_chunks))
