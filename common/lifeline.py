"""How a coordinator or peer process stops: on SIGINT or SIGTERM, and when the process that
started it dies, however it dies (SIGKILL included).

Stop signals (:func:`on_stop_signals`): the signal handler itself does nothing; the C-level
handler writes the signal's number to a pipe (``signal.set_wakeup_fd``), from whichever thread
the kernel delivered it to, and a thread reading that pipe runs the stop callback. A Python
handler that calls ``Event.set()`` deadlocks when it runs while the main thread is inside
``Event.wait()`` holding the event's lock (a second SIGTERM of a burst lands there: 3 of 100
bursts of 20 hung a ``done.wait()`` for good), and a parent SIGKILLed with several threads
sends one parent-death signal per exiting thread, up to 7 here.

Parent's death (:class:`Lifeline` in the parent, :func:`watch_parent` in the child): the parent
holds the write end of a pipe and passes the read end to each child (``pass_fds``, with its fd
number and the parent's pid in ``DML_PARENT_FD`` and ``DML_PARENT_PID``). The kernel closes the
write end when the parent exits, by any death, and the child's read returns EOF; the child then
sends itself SIGTERM, so it stops the way a SIGTERM stops it at that point of its life. Unlike
PR_SET_PDEATHSIG this needs no ``preexec_fn`` (unsafe in a process with threads, and it keeps
subprocess from using vfork) and has no window between fork and prctl: the pipe exists before
the child does, and a child whose parent died before it looked reads EOF at once. It also checks
``getppid()`` against the pid it was given, once a second: a fork of the parent that did not exec
(multiprocessing's default) holds the write end too, and would delay the EOF until it ends.
"""
from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

ENV_FD = "DML_PARENT_FD"
ENV_PID = "DML_PARENT_PID"
# After its parent died a child has this long to stop by itself before it ends at once: nobody
# is left to SIGKILL it, and a stop that hangs must not leave it running for good.
ORPHAN_GRACE_S = 30.0
POLL_S = 1.0  # how often the watch also compares getppid() with the parent's pid


class Lifeline:
    """The parent's end: one pipe whose read end every child it starts gets (:meth:`child`).
    The write end never leaves this process (``os.pipe`` fds are not inheritable, and
    subprocess passes only ``pass_fds``), so when this process exits every child reads EOF."""

    def __init__(self) -> None:
        self._fds: tuple[int, int] | None = None

    def child(self, env: Mapping[str, str]) -> dict[str, object]:
        """``subprocess.Popen`` keyword arguments (``env``, ``pass_fds``) that tie a child to
        this process: ``env`` plus the two variables :func:`watch_parent` reads."""
        if self._fds is None:
            self._fds = os.pipe()
        read_fd = self._fds[0]
        return {"env": {**env, ENV_FD: str(read_fd), ENV_PID: str(os.getpid())}, "pass_fds": (read_fd,)}

    def close(self) -> None:
        """Cuts the line: children started through it read EOF now and stop. Call it once they
        have been reaped (or to stop them all)."""
        if self._fds is not None:
            for fd in self._fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds = None


def watch_parent(environ: dict[str, str] | None = None, grace_s: float = ORPHAN_GRACE_S) -> bool:
    """In a child started through a :class:`Lifeline`: from now on, the parent's death sends
    this process SIGTERM, and ends it ``grace_s`` later if it is still running. Call it first
    thing in ``main``: a parent already dead is seen at once. Removes the two variables from
    ``environ`` (default ``os.environ``) so this process's own children do not inherit them.
    Returns False (and does nothing) when the process was not started through a lifeline."""
    env = os.environ if environ is None else environ
    fd_text, pid_text = env.pop(ENV_FD, None), env.pop(ENV_PID, None)
    if fd_text is None or pid_text is None:
        return False
    fd, parent = int(fd_text), int(pid_text)
    threading.Thread(target=_watch, args=(fd, parent, grace_s), name="parent-watch", daemon=True).start()
    return True


def _watch(fd: int, parent: int, grace_s: float) -> None:
    try:
        # EOF when the parent has exited (it never writes); getppid() as well, once a second, in
        # case a fork of the parent that did not exec still holds the write end.
        poller = select.poll()  # not select(): the fd's number may be over 1023
        poller.register(fd, select.POLLIN)
        while os.getppid() == parent and not poller.poll(POLL_S * 1000):
            pass
    except OSError as e:
        log.warning("the pipe to parent process %d failed (%s): stopping as if it died", parent, e)
    log.warning("parent process %d died: stopping (SIGTERM to myself, exit in %.0fs at the latest)", parent, grace_s)
    os.kill(os.getpid(), signal.SIGTERM)
    threading.Event().wait(grace_s)
    log.error("still running %.0fs after parent process %d died: exiting now", grace_s, parent)
    logging.shutdown()
    os._exit(1)


def on_stop_signals(stop: Callable[[int], None], signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
    """Runs ``stop(signum)`` on a thread of its own each time one of ``signals`` arrives, in
    place of any Python-level handler: the handlers installed do nothing, so no lock is ever
    taken in signal context (see the module docstring). Call it from the main thread, once;
    it takes the process's wakeup fd (nothing else in the coordinator or the peer uses it)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the C handler must never block; a full pipe drops a byte
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for sig in signals:
        signal.signal(sig, _nothing)
    threading.Thread(target=_dispatch, args=(read_fd, frozenset(signals), stop), name="stop-signals",
                     daemon=True).start()


def _nothing(_signum: int, _frame: object) -> None:
    """The Python-level handler: the work is done by the thread reading the wakeup fd."""


def _dispatch(read_fd: int, signals: frozenset[int], stop: Callable[[int], None]) -> None:
    while True:
        data = os.read(read_fd, 64)
        if not data:
            return
        for signum in data:
            if signum in signals:
                log.info("signal %d: stopping", signum)
                stop(signum)
