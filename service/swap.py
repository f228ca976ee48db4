"""Hot model swap: a running replica moves to another model version without stopping.

**Trigger.** The model path a replica was started with (``MEMREC_MODEL_DIR``) is the source of truth:
point it at a ``current`` link that the retrain job switches to each new model directory it publishes.
Every ``MEMREC_MODEL_WATCH_S`` seconds, and at once on ``POST /admin/reload``, the replica resolves the
path; when it leads to another directory holding another model version, the replica moves to it. Every
replica (and every worker) watching the same path converges on the version it points to.

**Steps.** The old version answers throughout; only the last step changes what a request meets.

1. *Load*: the new model and its runtime in its own store namespace (the model version's): its memory
   bank is loaded there once, by whichever replica comes first (the others find it loaded, service.bank),
   and the known users' encoder states are written.
2. *Catch up*: from now on every write reaches both versions (``Versions.warming``); then the
   interactions the old version logged after the new model's training data (its ``data_until``, every
   logged interaction for data without timestamps) are replayed into the new one in log order, with their
   event ids, so an interaction written both ways, or replayed by two replicas, is stored once. While a
   version is warming, events that come without an id get one (service.routes.interactions). Users erased
   meanwhile are erased from the new version again once the replay is done.
3. *Switch*: one assignment in the event loop. A request reads its version once, when it starts, so each
   answer comes entirely from one version; every request after the switch meets the new one.
4. *Retire*: after ``MEMREC_SWAP_GRACE_S`` (requests still running on the old version finish), the old
   version's micro-batcher stops and its store closes. With ``MEMREC_SWAP_DROP_OLD`` (the default) the
   last process to leave the version deletes its namespace (``MemoryStore.drop``: nothing is deleted
   while another replica or worker still has it open), so nothing of it, erased users included, outlives
   the move; a move back to it then loads its bank again.

A failed load or catch-up leaves the old version serving alone (the new one's writes stop with it), is
logged and counted (``memrec_model_swaps_total{outcome="failed"}``), and is tried again at the next check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from memory_store import Interaction
from memory_store.base import LoggedInteractions
from model import artifact
from service.metrics import Metrics
from service.settings import Settings
from service.state import Runtime
from service.versions import Versions

log = logging.getLogger(__name__)

WRITES_SETTLE_S = 30.0  # the longest a move waits for the writes that started before it
REPLAY_PAGE = 256  # logged interactions read and ingested per step: small, so requests interleave


@dataclass(frozen=True)
class SwapReport:
    outcome: str  # "switched", "current" (the path leads to the version served) or "failed"
    from_version: str
    to_version: str
    seconds: float = 0.0  # from the check to the switch
    replayed: int = 0  # logged interactions stored into the new version by the catch-up
    error: str | None = None


async def replay(source: Runtime, target: Runtime, since: float | None, page: int = REPLAY_PAGE) -> int:
    """Ingest into ``target`` what ``source``'s store logged that ``target``'s memory bank lacks, oldest
    first; returns how many ``target`` stored (not duplicates).

    ``since`` is the last timestamp of ``target``'s training data (None: data without timestamps, so
    nothing logged is in it). The rows after it are replayed, and of the rows up to it each user's
    latest: the bank holds a user's training data but their last item, held out as the test target
    (service.bank), which the user's history must end with again."""
    held_out = {} if since is None else await _latest_rows(source, since, page)
    stored, after = 0, ""
    while True:
        rows = await source.store.interactions(after, page)
        if not len(rows):
            return stored
        keep = [
            j
            for j in range(len(rows))
            if since is None or rows.timestamps[j] > since or held_out.get(rows.users[j]) == rows.positions[j]
        ]
        # a held-out row is in the training data the next export merges: not logged again
        held = [since is not None and rows.timestamps[j] <= since for j in keep]
        for run, is_held in _runs(keep, held):
            stored += await _ingest(source, target, rows, run, logged=not is_held)
        after = rows.position
        await asyncio.sleep(0)  # let the requests waiting on the loop run between pages


async def _latest_rows(source: Runtime, since: float, page: int) -> dict[str, str]:
    """Each user's latest logged row with a timestamp up to ``since`` (ties: the later logged), by
    position."""
    latest: dict[str, tuple[float, str]] = {}
    after = ""
    while len(rows := await source.store.interactions(after, page)):
        for user, t, pos in zip(rows.users, rows.timestamps.tolist(), rows.positions, strict=True):
            if t <= since and t >= latest.get(user, (-math.inf, ""))[0]:
                latest[user] = (t, pos)
        after = rows.position
        await asyncio.sleep(0)
    return {user: pos for user, (_, pos) in latest.items()}


def _runs(keep: list[int], flags: list[bool]) -> list[tuple[list[int], bool]]:
    """``keep`` cut where ``flags`` changes: consecutive rows of one kind, in order, with their flag."""
    runs: list[tuple[list[int], bool]] = []
    for row, flag in zip(keep, flags, strict=True):
        if runs and runs[-1][1] == flag:
            runs[-1][0].append(row)
        else:
            runs.append(([row], flag))
    return runs


async def _ingest(
    source: Runtime, target: Runtime, rows: LoggedInteractions, keep: list[int], logged: bool
) -> int:
    """Rows ``keep`` of a page of ``source``'s log into ``target``, with their event ids (a row logged
    without one is named by its position, the same for every replica replaying it)."""
    names = await source.items.names()  # the source's registry: its new items may grow meanwhile
    externals = [names.external(int(rows.items[j])) for j in keep]
    items = await target.items.write(externals, "log", accept=True)
    events = [
        Interaction(
            rows.users[j], item, float(rows.timestamps[j]), rows.event_ids[j] or f"log:{rows.positions[j]}"
        )
        for j, item in zip(keep, items, strict=True)
    ]
    accepted, _ = await target.ingestor.ingest(events, logged)
    return accepted


async def copy_availability(source: Runtime, target: Runtime) -> int:
    """Mark unavailable in ``target`` the items ``source`` holds unavailable (those ``target`` knows);
    later changes reach both while the move runs."""
    names = await source.items.names()
    externals = []
    for item in (await source.store.unavailable_items()).tolist():
        with contextlib.suppress(KeyError):  # an id of no version this replica knows
            externals.append(names.external(item))
    ids = await target.items.those_known(externals)
    return await target.store.set_available(ids, False) if ids else 0


class Swapper:
    """Moves this replica to the model version its model path leads to, one move at a time.

    ``current`` reads the versions served; ``publish`` makes new ones served (one assignment, so a
    request sees either the old or the new); ``build`` loads a model directory's runtime."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        current: Callable[[], Versions],
        publish: Callable[[Versions], None],
        build: Callable[[Path], Awaitable[Runtime]],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.current = current
        self.publish = publish
        self.build = build
        self._lock = asyncio.Lock()
        self._erased: set[str] = set()  # users erased during a catch-up
        self._retiring: set[asyncio.Task[None]] = set()

    def erased(self, user_id: str) -> None:
        """A user was erased: a catch-up in progress may have read their rows before."""
        if self._lock.locked():
            self._erased.add(user_id)

    async def check(self) -> SwapReport:
        """Move to the version the model path leads to, if it is not the one served."""
        async with self._lock:
            target = self.settings.model_dir.resolve()
            served = self.current().primary
            if target == served.model_dir:
                return SwapReport("current", served.model_version, served.model_version)
            try:
                version = artifact.model_version(target)
            except artifact.ArtifactError as exc:
                return self._failed(served.model_version, str(target), exc)
            if version == served.model_version:
                return SwapReport("current", served.model_version, version)
            return await self._swap(target, version)

    async def _swap(self, target: Path, version: str) -> SwapReport:
        t0 = time.perf_counter()
        old = self.current()
        was = old.primary.model_version
        if self.settings.namespace is not None:
            reason = "a hot swap needs one store namespace per model version: leave MEMREC_NAMESPACE unset"
            return self._failed(was, version, ValueError(reason))
        if version in old.names:
            return self._failed(was, version, ValueError(f"{version} is already served beside {was}"))
        log.info("moving from %s to %s (%s)", was, version, target)
        self._erased.clear()
        new: Runtime | None = None
        try:
            new = await self.build(target)
            new.pipeline.start()
            self.publish(replace(old, warming=(new,)))
            await asyncio.wait_for(old.writes.settled(), WRITES_SETTLE_S)  # the last writes to the old alone
            await copy_availability(old.primary, new)
            replayed = await replay(old.primary, new, artifact.read_config(target).get("data_until"))
            for user in sorted(self._erased):
                await new.store.erase_user(user)
        except BaseException as exc:  # a bad directory, the store unreachable, shut-down: the old serves on
            if new is not None:
                self.publish(replace(self.current(), warming=()))
                await _close(new)
            if not isinstance(exc, Exception):
                raise
            return self._failed(was, version, exc)
        latest = self.current()
        self.publish(Versions(new, latest.secondary, latest.share))
        seconds = time.perf_counter() - t0
        self.metrics.model_swaps.labels("switched").inc()
        self.metrics.model_swap_seconds.set(seconds)
        self.metrics.model_info.labels(was).set(0)
        self.metrics.model_info.labels(new.model_version).set(1)
        log.info("now serving %s (%.1f s, %d interactions replayed)", version, seconds, replayed)
        task = asyncio.create_task(self._retire(old.primary, self.settings.swap_grace_s))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return SwapReport("switched", was, version, seconds, replayed)

    def _failed(self, was: str, version: str, exc: BaseException) -> SwapReport:
        log.error("moving from %s to %s failed: %s", was, version, exc)
        self.metrics.model_swaps.labels("failed").inc()
        return SwapReport("failed", was, version, error=str(exc))

    async def _retire(self, rt: Runtime, grace_s: float) -> None:
        try:
            await asyncio.sleep(grace_s)
        except asyncio.CancelledError:  # shut-down: close now, and keep the namespace
            await _close(rt)
            raise
        await rt.pipeline.stop()
        if self.settings.swap_drop_old:  # the last process that leaves the version deletes its data
            dropped = await rt.store.drop()
            log.info("retired %s (namespace %s)", rt.model_version, "dropped" if dropped else "kept")
        else:
            await rt.store.close()
            log.info("retired %s (namespace kept)", rt.model_version)

    async def watch(self, interval_s: float) -> None:
        """Check the model path every ``interval_s`` seconds."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.check()
            except Exception:  # the next period tries again
                log.exception("model path check failed")

    @contextlib.asynccontextmanager
    async def stopped(self) -> AsyncIterator[None]:
        """Hold off any move (waiting for one under way to end) while the block runs."""
        async with self._lock:
            yield

    async def close(self) -> None:
        """Shut-down: versions still retiring close now."""
        tasks = list(self._retiring)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def get_swapper(request: Request) -> Swapper:
    swapper: Swapper = request.app.state.swapper
    return swapper


SwapperDep = Annotated[Swapper, Depends(get_swapper)]


async def _close(rt: Runtime) -> None:
    await rt.pipeline.stop()
    await rt.store.close()
