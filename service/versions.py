"""The model versions one replica serves: one, or two side by side with the users split between them.

An A/B test of two model versions (``MEMREC_MODEL_DIR_B``, ``MEMREC_SHARE_B``) needs three things:

* every user always sees the same version, whichever replica or worker answers: the split is a hash of
  the user id (:func:`in_share`), the same in every process, not Python's salted ``hash``;
* both versions know everything that happened: each keeps its own store namespace (its encoder's memory
  keys differ), and every write (interactions, availability, erasure) goes to both, so a user moved from
  one version to the other by a change of share finds their history there too;
* the versions can be compared online: answers name their version, and the latency and outcome metrics
  carry it as a label (:class:`Outcomes` counts whether a user's next interaction was one of the items
  the last answer showed them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.metrics import Metrics

if TYPE_CHECKING:  # state.py hands Versions to the routes: it imports this module
    from service.state import Runtime

SPLIT_SALT = b"memrec-ab"  # part of the hash: a user's bucket here is unrelated to other uses of its id
REMEMBERED_ANSWERS = 20_000  # users whose last answer a worker keeps for the outcome metric (~15 MB)


def bucket(user_id: str) -> float:
    """A user's place in [0, 1): uniform over users, the same in every process and on every machine."""
    digest = hashlib.blake2b(user_id.encode(), digest_size=8, key=SPLIT_SALT).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def in_share(user_id: str, share: float) -> bool:
    """Whether the user falls in the first ``share`` of users (0: nobody, 1: everybody)."""
    return bucket(user_id) < share


class InFlight:
    """The write requests running against one :class:`Versions`. A request reads the versions once, when
    it starts: a move to a new version waits for the writes that started before it was warming, which
    reach only the old one, to land in the old one's log before the catch-up reads it to the end."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        self.count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if not self.count:
                self._idle.set()

    async def settled(self) -> None:
        """Return once no write is running (at once when none is)."""
        await self._idle.wait()


@dataclass(frozen=True)
class Versions:
    """The runtimes of a replica. ``secondary`` answers the users :func:`in_share` of ``share``;
    ``primary`` answers everybody else and the requests that name no user (the page's)."""

    primary: Runtime
    secondary: Runtime | None = None
    share: float = 0.0
    # A version being moved to (service.swap): it answers nobody yet, but every write reaches it.
    warming: tuple[Runtime, ...] = ()
    writes: InFlight = field(default_factory=InFlight, init=False, compare=False)  # each Versions its own

    def for_user(self, user_id: str) -> Runtime:
        """The runtime that answers this user's recommendations."""
        if self.secondary is not None and in_share(user_id, self.share):
            return self.secondary
        return self.primary

    @property
    def serving(self) -> tuple[Runtime, ...]:
        """The runtimes that answer, primary first."""
        return (self.primary,) if self.secondary is None else (self.primary, self.secondary)

    @property
    def runtimes(self) -> tuple[Runtime, ...]:
        """Every runtime each write reaches: the serving ones, then a version being moved to."""
        return self.serving + self.warming

    @property
    def names(self) -> list[str]:
        return [rt.model_version for rt in self.serving]


class Outcomes:
    """Online hits per version: whether an interaction's item was in the last answer its user got.

    A worker remembers the last answer of its ``capacity`` most recent users (least recently answered
    forgotten first). An interaction counts as a ``hit`` or a ``miss`` only when the same worker answered
    that user before, so with several workers or replicas part of the interactions go uncounted; the
    split is by user and the worker by connection, so both versions lose the same share, and the ratio
    hit / (hit + miss) stays comparable between them."""

    def __init__(self, metrics: Metrics, capacity: int = REMEMBERED_ANSWERS) -> None:
        self.metrics = metrics
        self.capacity = capacity
        self._last: OrderedDict[str, tuple[str, tuple[str, ...]]] = OrderedDict()

    def answered(self, user_id: str, version: str, items: Sequence[str]) -> None:
        """The (external) item ids ``version`` just recommended to the user."""
        self._last[user_id] = (version, tuple(items))
        self._last.move_to_end(user_id)
        while len(self._last) > self.capacity:
            self._last.popitem(last=False)

    def interacted(self, user_id: str, item: str) -> None:
        """One stored interaction of the user with the (external) item id."""
        last = self._last.get(user_id)
        if last is None:
            return
        version, shown = last
        self.metrics.outcomes.labels(version, "hit" if item in shown else "miss").inc()

    def forget(self, user_id: str) -> None:
        """The user was erased: nothing of them stays, here either."""
        self._last.pop(user_id, None)
