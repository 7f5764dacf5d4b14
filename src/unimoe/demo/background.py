"""Two independent jobs at once, on half the threads each: tiny training steps use a second core poorly.

A step of the demo's models is some thousands of small operator calls, so a second intra-op thread
makes it only 10-25% faster; two independent jobs on one thread each finish sooner than one after the
other on two. ``Background(fn, *args)`` forks a process that runs ``fn(*args)`` on half of the
caller's intra-op threads and leaves the caller the other half until ``result()`` hands back the value
(sent pickled through a pipe: keep it small, and write weights to files). The job's output (progress
bars, logging) goes to the file ``log`` (appended to), so that the terminal shows the caller's alone.
Without ``fork`` (Windows), or with a single thread to share, ``fn`` runs in the caller when
``result()`` is asked for.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class BackgroundJobError(RuntimeError):
    """The background job raised or died; the message carries its traceback or exit code."""


def _run_child(send, fn: Callable[..., Any], args: tuple, log: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    with open(log, "a", buffering=1) as out:  # stdout and stderr, Python's and the C libraries' alike
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        sys.stdout = sys.stderr = out
        try:
            message = ("ok", fn(*args))
        except BaseException:
            message = ("error", traceback.format_exc())
        send.send(message)
        send.close()


class Background:
    """``fn(*args)`` in a forked process beside the caller, the two on half of its threads each."""

    def __init__(self, fn: Callable[..., Any], *args: Any, log: str | Path, name: str = "background job"):
        self.name, self.log, self._fn, self._args = name, Path(log), fn, args
        self._process = None
        self._threads = torch.get_num_threads()
        if self._threads < 2 or "fork" not in multiprocessing.get_all_start_methods():
            return
        context = multiprocessing.get_context("fork")
        self._receive, send = context.Pipe(duplex=False)
        share = self._threads // 2
        self._process = context.Process(target=_run_child, args=(send, fn, args, self.log, share), name=name)
        sys.stdout.flush()  # else the child inherits (and writes to its log) what the caller has buffered
        sys.stderr.flush()
        self._process.start()
        send.close()
        torch.set_num_threads(self._threads - share)

    def result(self) -> Any:
        """Waits for the job; its return value, or ``BackgroundJobError`` if it failed."""
        if self._process is None:
            return self._fn(*self._args)
        try:
            status, value = self._receive.recv()
        except EOFError:  # the child died without a word (killed, out of memory)
            status, value = "error", None
        finally:
            self._receive.close()
            self._process.join()
            torch.set_num_threads(self._threads)
        if status != "ok":
            detail = value or f"exit code {self._process.exitcode}"
            raise BackgroundJobError(f"{self.name} failed (its output: {self.log}):\n{detail}")
        return value
