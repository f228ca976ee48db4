"""``memrec serve``: settings from the environment and the command line, then uvicorn.

With ``workers`` > 1 each worker process binds its own listening socket to the same port with
``SO_REUSEPORT``, so the kernel spreads new connections evenly over them. uvicorn's own multi-process
mode shares one socket instead, and whichever worker wakes first accepts a whole burst: a client that
opens its keep-alive pool at once (a gateway, the load benchmark) ended with about twice as many
connections on one worker as on the other, and that worker's queue set the tail latency. A worker's
socket is bound at once but listens only when its app has started (asyncio calls ``listen`` once the
lifespan is done), so the kernel never hands a connection to a worker still loading its model. The parent
only supervises: it restarts a worker that dies after starting up, and stops them all on SIGTERM or
SIGINT. Workers run in their own process group, so a terminal's Ctrl-C reaches the parent alone and
every worker gets exactly one SIGTERM, which uvicorn answers with a graceful shutdown. The workers share
a metrics directory (see ``service.metrics``), so a scrape of the port answers for all of them; the
parent clears a dead worker's live gauges and removes the directory on exit.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import uvicorn
from prometheus_client import multiprocess
from pydantic import ValidationError

from service.app import create_app
from service.metrics import MULTIPROC_ENV
from service.settings import Settings

log = logging.getLogger(__name__)

STARTUP_FAILURE = 3  # uvicorn's exit status when the app did not start


def _uvicorn_options(settings: Settings) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": settings.graceful_shutdown_s,
        "access_log": False,
    }


def serve(overrides: dict[str, Any]) -> int:
    """Run the server until interrupted; command-line values win over ``MEMREC_*`` variables."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        log.error("invalid settings: %s", exc)
        return 2
    if settings.workers == 1:
        server = AnnouncingServer(uvicorn.Config(create_app(settings), **_uvicorn_options(settings)))
        try:
            server.run()
        except KeyboardInterrupt:  # as uvicorn.run: a second Ctrl-C during the drain
            pass
        return 0 if server.started else STARTUP_FAILURE
    return Supervisor(overrides, settings).run()


def page_address(host: str, port: int) -> str:
    """Where a browser on this machine finds the page (a wildcard address means this machine too)."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}/ui"


class AnnouncingServer(uvicorn.Server):
    """uvicorn's server, whose start-up log ends with the address of the page at /ui."""

    def _log_started_message(self, listeners: Sequence[socket.SocketType]) -> None:
        super()._log_started_message(listeners)
        log.info("the page: %s (API docs at /docs)", page_address(self.config.host, self.config.port))


# ------------------------------------------------------------------------------------------ workers


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` that other processes may bind too (``SO_REUSEPORT``); not yet
    listening, so it joins the kernel's share of the port only when ``listen`` is called."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _worker_main(overrides: dict[str, Any]) -> None:
    """A worker process: its own socket on the shared port, its own app, one uvicorn server."""
    os.setpgrp()  # out of the terminal's process group: signals come from the supervisor only
    settings = Settings(**overrides)
    logging.basicConfig(  # as `memrec` configures the parent; a spawned process starts without
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sock = reuse_port_socket(settings.host, settings.port)
    config = uvicorn.Config(create_app(settings), **_uvicorn_options(settings))
    uvicorn.Server(config).run(sockets=[sock])


class Supervisor:
    """Starts ``settings.workers`` worker processes and keeps them running until told to stop."""

    def __init__(self, overrides: dict[str, Any], settings: Settings) -> None:
        self.overrides = overrides
        self.settings = settings
        self.ctx = multiprocessing.get_context("spawn")  # no torch or event-loop state forked
        self.stopping = threading.Event()
        self.procs: list[tuple[BaseProcess, float]] = []

    def _start(self) -> tuple[BaseProcess, float]:
        proc = self.ctx.Process(target=_worker_main, args=(self.overrides,), name="memrec-worker")
        proc.start()
        return proc, time.monotonic()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping %d workers", signal.Signals(signum).name, len(self.procs))
        self.stopping.set()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        s = self.settings
        # Bind once here first: a port another program holds fails now, with a clear message.
        try:
            reuse_port_socket(s.host, s.port).close()
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", s.host, s.port, exc)
            return 1
        # A fresh directory per run: files left by an earlier run would be counted again.
        metrics_dir = tempfile.mkdtemp(prefix="memrec-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir  # the spawned workers inherit it
        try:
            self.procs = [self._start() for _ in range(s.workers)]
            log.info("serving on http://%s:%d with %d workers (SO_REUSEPORT)", s.host, s.port, s.workers)
            log.info("the page: %s (API docs at /docs)", page_address(s.host, s.port))
            status = 0
            while not self.stopping.wait(0.5):
                status = self._check()
                if status:
                    break
            self._stop_all()
        finally:
            del os.environ[MULTIPROC_ENV]
            shutil.rmtree(metrics_dir, ignore_errors=True)
        return status

    def _check(self) -> int:
        """Restart workers that died after their start-up; 1 if one died during it."""
        for i, (proc, started) in enumerate(self.procs):
            if proc.is_alive():
                continue
            if time.monotonic() - started < self.settings.worker_startup_grace_s:  # never came up
                log.error("worker %s exited with %s during start-up; stopping", proc.pid, proc.exitcode)
                return 1
            log.warning("worker %s exited with %s; starting another", proc.pid, proc.exitcode)
            multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]  # its live gauges go; its counts stay in the sums
            self.procs[i] = self._start()
        return 0

    def _stop_all(self) -> None:
        for proc, _ in self.procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)  # once: a second one makes uvicorn skip the drain
        deadline = time.monotonic() + self.settings.graceful_shutdown_s + 10.0
        for proc, _ in self.procs:
            proc.join(max(deadline - time.monotonic(), 0.1))
            if proc.is_alive():
                log.warning("worker %s did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join(5.0)
