"""The pusher: drains one peer's outbox into that Jellyfin server, with retries and pauses.

One :class:`Pusher` per peer, the only path by which outbox rows become writes: ``jfsync run``
starts it (:meth:`Pusher.start`, it runs until stopped) and ``jfsync reconcile`` drains it once
(:meth:`Pusher.drain`; with ``dry_run`` it reads and compares but sends nothing, and a
:class:`DeliveryWatcher` hears what became of each row). It takes due rows from the ledger in
batches, reads the target's current state for the whole batch in one ``/Items?Ids=`` call
(compare-before-write), lets the ledger merge anything the peer changed behind the event path
and records each write's intents (the steps of its :mod:`jfsync.jellyfin.writeplan`), then
writes what is still owed with bounded concurrency through
:meth:`JellyfinClient.write_user_data` and records the batch's writes (pending echo +
last-known) in the ledger in one transaction. While a batch is written, the next one is taken,
read and compared ahead, and the one before is recorded.

Failures never drop a row:

* transient (unreachable, timeout, 429, 5xx): a few quick retries (tenacity, capped exponential
  backoff with jitter, on the injected clock); then the peer counts as *down*: its rows wait
  and the pusher probes ``/System/Info/Public`` with capped backoff, forever, and drains again
  when it answers;
* 401/403: the peer is *paused* with a visible reason, probed slowly with ``/System/Info``
  (which needs the key), and resumes by itself when the key works again;
* 404/400: the row is parked as *dead* with its reason, shown on the status endpoint, and
  revived by a newer change or ``retry_dead``.

Nothing ends the pusher but :meth:`Pusher.stop`: a round, a probe or a pause that fails in any
other way (the ledger locked, a proxy answering 404 or an HTML page for a server behind it, a
bug) is logged once (an unexpected error at ERROR with its traceback, repeats at DEBUG), shown
as the peer's ``last_error``, and tried again after a capped backoff on the injected clock.
While the peer is down every answer but a good one means "still down"; while paused, every
error means "ask again later". The rows wait in the ledger's outbox meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    stop_never,
    wait_exponential,
    wait_random,
)

from jfsync.errors import (
    AuthRejectedError,
    BadRequestError,
    JfsyncError,
    NotFoundError,
    ServerError,
    is_retryable,
)
from jfsync.jellyfin.api import JellyfinClient
from jfsync.jellyfin.writeplan import plan_write
from jfsync.logs import FailureStreak
from jfsync.model import ALL_REGISTERS, Register, UserData
from jfsync.sync.ledger import Ledger, OutboxRow
from jfsync.sync.priority import LiveFirst
from jfsync.timing import Clock, backoff_delays

logger = logging.getLogger(__name__)

#: Rows taken from the outbox per round: one compare listing
#: (:data:`~jfsync.jellyfin.api.IDS_PER_REQUEST` ids) per user per round. A batch is read one
#: round ahead, and a user's change on the peer between that read and the row's write is
#: overwritten (Jellyfin has no conditional write): at 500 rows that window reached 0.37-0.43
#: s (median) and 0.58-0.78 s (max) in a 10,000-item burst, at 170 rows 0.13 s and 0.17 s,
#: with the burst's ratio to its floor unchanged in paired runs (1.41x against 1.39x).
BATCH_SIZE = 170
#: Writes in flight to one peer at once.
CONCURRENCY = 8
#: Recorded writes told to the watcher per step (the event loop is given back between).
REPORT_STEP = 100
#: Quick attempts of one write before the peer is treated as down.
QUICK_ATTEMPTS = 3
#: How long an idle pusher waits before looking at the outbox again without a wake-up
#: (rows whose retry time has come, rows queued by another process).
IDLE_POLL_S = 5.0
#: How often a paused peer (key refused) is asked again.
AUTH_RETRY_S = 300.0
#: Backoff of the down-peer probe.
PROBE_INITIAL_S = 1.0
PROBE_MAX_S = 60.0
#: Backoff of quick write retries.
RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 5.0
#: When a failed row is tried again after the peer came back or a retry failed.
ROW_RETRY_S = 30.0
#: When a row whose item the peer showed back to never-touched is compared again (the
#: catch-up of that user, asked for meanwhile, has decided what the server holds by then).
REGRESSION_RETRY_S = 5.0
#: Backoff after a round, probe or pause failed in a way that is not about the peer's
#: answers (the ledger locked, a bug): the pusher lives on and tries again.
FAULT_INITIAL_S = 0.5
FAULT_MAX_S = 60.0
#: How long :meth:`Pusher.drain` probes a peer that went down before it gives up on it.
DRAIN_DOWN_WAIT_S = 30.0
#: How often a peer may go down (and come back) during one :meth:`Pusher.drain`.
DRAIN_MAX_DOWNS = 3


#: A write-latency observer: the peer and the propagation latency of one write, in seconds.
WriteHook = Callable[[str, float], None]
#: Applies what was received of some (user, item) keys and not applied yet (the intake's
#: :meth:`~jfsync.sync.intake.Intake.apply_ahead`), before a compare read of them is applied.
AheadHook = Callable[[Sequence[tuple[str, str]]], Awaitable[None]]


@dataclass(slots=True)
class PeerStats:
    """What the status endpoint shows about one peer's delivery (no secrets)."""

    writes_done: int = 0
    writes_skipped: int = 0
    failures: int = 0
    dead_parked: int = 0
    down_since_ms: int | None = None
    pause_reason: str | None = None
    last_error: str | None = None
    last_write_ms: int | None = None
    latencies_s: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Delivered:
    """One write recorded as made: the row, the peer's state before it and after it, and when
    the ledger recorded it (wall ms)."""

    row: OutboxRow
    before: UserData
    after: UserData
    done_ms: int

    @property
    def latency_s(self) -> float:
        """Propagation latency: from when the change was first queued for this peer."""
        return max(0.0, (self.done_ms - self.row.created_ms) / 1000)


class DeliveryWatcher:
    """Told what became of each row a pusher handled; this base ignores everything.

    The one way to hear what delivery did: ``jfsync run`` subclasses it for the write-latency
    metrics and the activity feed, ``jfsync reconcile`` to report per item what it wrote, what
    failed and what the peer does not have. Called from the pusher's task; a method that raises
    is logged and changes nothing about delivery.
    """

    def written(self, peer: str, writes: Sequence[Delivered]) -> None:
        """Writes recorded as made (in a dry run: that would have been made)."""

    def failed(self, peer: str, row: OutboxRow, error: ServerError) -> None:
        """A write failed (after any quick retries); the row stays queued (parked on 400/404)."""

    def missing(self, peer: str, row: OutboxRow) -> None:
        """The item is not on the peer for that user: the row is parked, nothing is written."""

    def deferred(self, peer: str, rows: Sequence[OutboxRow]) -> None:
        """The peer shows these items back to never-touched: held until a catch-up decides."""


class Pusher:
    """Deliver the outbox of one peer."""

    def __init__(
        self,
        peer: str,
        ledger: Ledger,
        client: JellyfinClient,
        clock: Clock,
        *,
        batch_size: int = BATCH_SIZE,
        concurrency: int = CONCURRENCY,
        quick_attempts: int = QUICK_ATTEMPTS,
        idle_poll_s: float = IDLE_POLL_S,
        auth_retry_s: float = AUTH_RETRY_S,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = RETRY_MAX_S,
        probe_initial_s: float = PROBE_INITIAL_S,
        probe_max_s: float = PROBE_MAX_S,
        fault_initial_s: float = FAULT_INITIAL_S,
        fault_max_s: float = FAULT_MAX_S,
        on_progress: Callable[[], None] | None = None,
        on_regression: Callable[[str, str], None] | None = None,
        watcher: DeliveryWatcher | None = None,
        dry_run: bool = False,
        drain_down_wait_s: float = DRAIN_DOWN_WAIT_S,
        drain_max_downs: int = DRAIN_MAX_DOWNS,
        ahead: AheadHook | None = None,
        live: LiveFirst | None = None,
    ) -> None:
        self.peer = peer
        self.stats = PeerStats()
        self._ledger = ledger
        self._client = client
        self._clock = clock
        self._batch_size = batch_size
        self._concurrency = concurrency
        self._semaphore = asyncio.Semaphore(concurrency)
        self._quick_attempts = quick_attempts
        self._idle_poll_s = idle_poll_s
        self._auth_retry_s = auth_retry_s
        # Capped exponential backoff plus up to one initial step of random jitter.
        self._retry_wait = wait_exponential(
            multiplier=retry_initial_s, max=retry_max_s
        ) + wait_random(0, retry_initial_s)
        self._probe_wait = wait_exponential(
            multiplier=probe_initial_s, max=probe_max_s
        ) + wait_random(0, probe_initial_s)
        self._fault_initial_s = fault_initial_s
        self._fault_max_s = fault_max_s
        self._on_progress = on_progress
        #: Told (peer, user) when items of that user read back to never-touched (catch up).
        self._on_regression = on_regression
        self._watcher = watcher
        #: Read, compare and record as usual, but send no write (on a copy of the ledger).
        self._dry_run = dry_run
        self._drain_down_wait_s = drain_down_wait_s
        self._drain_max_downs = drain_max_downs
        #: Applies events received (of other servers too) but not applied yet, before a
        #: compare: an older change must not land after the peer's newer one read here.
        self._ahead = ahead
        #: Told while a round that delivers a live change is due or under way: catch-ups
        #: give way to it.
        self._live = live
        #: The release of the live-work hold taken by the last wake, until a round ends.
        self._live_hold: Callable[[], None] | None = None
        self._wake = asyncio.Event()
        #: Wakes so far: a batch compared ahead is compared again when rows were queued
        #: since (a change of one of its items may have replaced its row).
        self._wakes = 0
        #: The (user, item) keys of the batch being compared ahead (until its turn).
        self._compared_ahead: set[tuple[str, str]] = set()
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[tuple[str, str]] = set()
        #: (user, item) -> set once the batch writing it has recorded its writes (or failed).
        self._writing: dict[tuple[str, str], asyncio.Event] = {}
        #: The next batch and its compare read, fetched while the current one is written.
        self._prepared: asyncio.Task[_Prepared | None] | None = None
        #: The recording of the last batch's writes, while the next batch is written.
        self._recording: asyncio.Task[bool] | None = None
        #: Ids of the rows of a batch whose writes are being recorded (due until then).
        self._recording_ids: set[int] = set()
        #: The due rows a live change's apply read in its own transaction, for the next round.
        self._offered: list[OutboxRow] | None = None
        #: Set once the first batch after start was checked for interrupted writes and sent.
        self._recovered = asyncio.Event()
        self._accepting = True
        self._stop_requested = asyncio.Event()
        self._streak = FailureStreak(logger, f"→{peer}", clock)
        #: Failures of the pusher's own work (rounds, probes, pauses), apart from the peer's.
        self._faults = FailureStreak(logger, f"→{peer}", clock)

    def __repr__(self) -> str:
        return f"<Pusher →{self.peer}>"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start draining in a task owned by this pusher."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"jfsync-pusher[{self.peer}]")

    def wake(self, *, live: bool = False, keys: Collection[tuple[str, str]] | None = None) -> None:
        """Tell the pusher new rows may be due.

        With ``live`` the rows carry a live change (an event just applied): a running pusher
        then counts as live work (:mod:`jfsync.sync.priority`) from now to the end of its
        next round, unless its peer is down or paused (then no round is coming soon).

        ``keys`` are the (user, item) keys whose rows changed, when the caller knows them: a
        batch compared ahead is compared again before it is written only if one of its rows
        is among them (without ``keys``, always). A bulk action's later slices, applied while
        its first batches are read ahead, then no longer cost a second compare of each.
        """
        self._wake.set()
        if keys is None or not self._compared_ahead.isdisjoint(keys):
            self._wakes += 1
        if (
            live
            and self._live is not None
            and self._live_hold is None
            and self._task is not None
            and self._accepting
            and self.stats.down_since_ms is None
            and self.stats.pause_reason is None
        ):
            self._live_hold = self._live.hold()

    async def settled(self, keys: Iterable[tuple[str, str]]) -> None:
        """Wait until no write of these (user, item) keys is sent but not yet recorded.

        The peer may echo a write before jfsync has read the answer to it (its debounce can
        be short, and the echo travels on another connection). Applying such an echo first
        would take it for the peer's own change; the intake waits here instead, so the echo
        always finds the write recorded as pending.

        The intake calls it before it applies anything this peer said of those keys, so an
        event of an item of the batch compared ahead also makes that compare count as stale
        (the user may have changed on the peer what the batch would write).
        """
        ahead = self._compared_ahead
        for key in keys:
            if key in ahead:
                self._wakes += 1
            settled = self._writing.get(key)
            if settled is not None:
                await settled.wait()

    @property
    def in_flight(self) -> int:
        """Writes under way right now."""
        return len(self._in_flight)

    async def stop(self, grace_s: float) -> None:
        """Stop taking rows, let writes under way finish within ``grace_s``, then cancel."""
        self._accepting = False
        self._stop_requested.set()
        self._recovered.set()
        self._wake.set()
        task = self._task
        if task is None:
            return
        try:
            async with asyncio.timeout(grace_s):
                await asyncio.shield(task)
        except TimeoutError:
            logger.warning(
                "[→%s] %d writes still under way after %.1f s; they stay queued",
                self.peer,
                len(self._in_flight),
                grace_s,
            )
        finally:
            if not task.done():
                task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    async def drain(self) -> str | None:
        """Deliver every row due now, then return: the one-shot delivery of ``jfsync reconcile``.

        The rounds are those of the running pusher (compare read, intents, quick retries,
        read-ahead, parking). A peer that goes down is probed as usual for up to
        ``drain_down_wait_s``; when it answers, its rows are due again and the drain goes on
        (up to ``drain_max_downs`` times). A refused key pauses the peer, which ends the
        drain at once.
        Returns None when nothing due is left, else why delivery stopped; the rows not
        written stay queued. Not for a pusher that was started.
        """
        assert self._task is None, "drain() is for a pusher that is not running"
        downs = 0
        try:
            while self._accepting:
                try:
                    if not await self._round():
                        return None
                except _PeerPaused as paused:
                    self._pause(paused.error)
                    return self.stats.pause_reason
                except _PeerDown as down:
                    downs += 1
                    if downs > self._drain_max_downs:
                        return f"{self.peer} failed {downs} times: {down.error}"
                    wait_s = self._drain_down_wait_s
                    if not await self._wait_until_up(
                        down.error, until=self._clock.monotonic() + wait_s
                    ):
                        return (
                            f"{self.peer} did not answer for {wait_s:g} s: "
                            f"{self.stats.last_error or down.error}"
                        )
            return "stopped"
        finally:
            await self._drop_prepared()
            await self._finish_recording()

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        try:
            await self._loop()
        finally:
            self._release_live_hold()
            await self._drop_prepared()
            await self._finish_recording()

    def _release_live_hold(self) -> None:
        """No round is coming soon (stopping, peer down or paused, a fault): live work no
        more."""
        release, self._live_hold = self._live_hold, None
        if release is not None:
            release()

    async def _loop(self) -> None:
        """Run steps until stopped; a step that fails is retried after a capped backoff."""
        delays: Iterator[float] | None = None
        while self._accepting:
            self._wake.clear()
            try:
                did = await self._step()
            except Exception as err:  # noqa: BLE001 - logged and shown by _after_fault
                # Nothing but stop() ends delivery to this peer (a cancellation is not an
                # Exception): say it once, keep the rows, try again later.
                if delays is None:
                    delays = backoff_delays(self._fault_initial_s, self._fault_max_s)
                await self._after_fault(err, next(delays))
                continue
            delays = None
            self._faults.succeeded("delivery rounds work")
            if not did and self._accepting:
                await self._sleep_or_wake(self._idle_poll_s)

    async def _step(self) -> bool:
        """One round, then the wait it ended in (peer down: probe; key refused: pause)."""
        try:
            return await self._round()
        except _PeerDown as down:
            self._release_live_hold()
            await self._wait_until_up(down.error)
        except _PeerPaused as paused:
            self._release_live_hold()
            await self._wait_until_key_works(paused.error)
        return True

    async def _after_fault(self, err: Exception, delay_s: float) -> None:
        """Log and show a failed step (once per streak), then wait ``delay_s`` or a stop."""
        self._release_live_hold()
        if isinstance(err, JfsyncError):
            self.stats.last_error = str(err)
            self._faults.failed(f"delivery round failed; retrying in {delay_s:.1f} s", err)
        else:
            self.stats.failures += 1
            self.stats.last_error = f"unexpected error: {type(err).__name__}: {err}"
            self._faults.failed(
                f"delivery round failed unexpectedly; retrying in {delay_s:.1f} s",
                err,
                unexpected=True,
            )
        self._progress()
        await self._sleep_or_wake(delay_s, wake_on_rows=False)

    async def _round(self) -> bool:
        # The hold of the wakes so far covers this round; a wake during it, the next one.
        woken, self._live_hold = self._live_hold, None
        try:
            return await self._deliver_round()
        except BaseException:
            # Whatever went wrong (peer down, stop), a batch read ahead is read again later,
            # and the rows offered are asked for again.
            self._offered = None
            await self._drop_prepared()
            raise
        finally:
            if woken is not None:
                # A live change is live work until its writes are recorded, also when they
                # are recorded in the background.
                recording = self._recording
                if recording is None or recording.done():
                    woken()
                else:
                    recording.add_done_callback(lambda _: woken())

    async def _deliver_round(self) -> bool:
        prepared = await self._take_prepared()
        if prepared is None:
            # Nothing read ahead: the rows of a live change's apply, or the due rows but
            # those of the batch whose writes are being recorded (due until then).
            rows = self._take_offered() or await self._due_rows()
            if not rows:
                self._recovered.set()
                return False
            read: _Read | None = None
            ready: list[tuple[OutboxRow, UserData]] | None = None
        else:
            rows, read, ready, wakes = prepared
            self._offered = None  # the rows of this batch may be among them
            if ready is not None and wakes != self._wakes:
                # Rows were queued, or the peer told of one of these items, after the compare
                # ahead: a row may have been replaced meanwhile. The rows it left owed are
                # compared again (with the same read): each is written as the ledger has it
                # now, never its older value first.
                ready = await self._compare_again(ready, read)
        keys = [(row.user, row.item) for row in rows]
        self._in_flight.update(keys)
        try:
            if ready is None:
                owed = await self._ready(rows, read)
            else:
                owed = ready
            more = len(rows) == self._batch_size and self._accepting
            if more:
                # More rows wait: take the next batch, read the peer's state of it and
                # compare it while this one is written, so that neither the read nor the
                # compare holds up the writes.
                self._prepared = asyncio.create_task(
                    self._prepare([row.id for row in rows]),
                    name=f"jfsync-pusher[{self.peer}]-read-ahead",
                )
            # Recorded in the background while the next batch is written, once the rows of
            # the last process are settled (a catch-up waits for that, and must then find
            # every write of the first batch recorded).
            # A batch without a next one is recorded in the background too: a change that
            # arrives meanwhile is read, compared and written while that transaction runs.
            failures = await self._deliver_batch(owed, background=self._recovered.is_set())
            # The rows in flight when the last process stopped are settled now.
            self._recovered.set()
        finally:
            self._in_flight.difference_update(keys)
        for failure in failures:
            if isinstance(failure, _PeerPaused | _PeerDown):
                raise failure
        for failure in failures:
            if not isinstance(failure, JfsyncError):
                raise failure
        return True

    async def _ready(
        self, rows: Sequence[OutboxRow], read: _Read | None
    ) -> list[tuple[OutboxRow, UserData]]:
        """Read the peer's state of ``rows`` (unless ``read`` already holds it), settle what
        was received of them first, record interrupted writes and compare: the rows still
        owed, with the peer's state of each."""
        current, read_ms, read_seq = await self._read_current(rows) if read is None else read
        if self._ahead is not None:
            await self._ahead([(row.user, row.item) for row in rows])
        await self._recover_interrupted(rows, current)
        return await self._compare(rows, current, read_ms, read_seq)

    async def _compare_again(
        self, owed: Sequence[tuple[OutboxRow, UserData]], read: _Read
    ) -> list[tuple[OutboxRow, UserData]]:
        """Compare the rows a compare ahead left owed once more, with the same read."""
        rows = [row for row, _ in owed]
        current, read_ms, read_seq = read
        if self._ahead is not None:
            await self._ahead([(row.user, row.item) for row in rows])
        return await self._compare(rows, current, read_ms, read_seq)

    async def _prepare(self, writing: Sequence[int]) -> _Prepared | None:
        """Take the next due rows (but ``writing``, the ids of the rows being written, and
        those of a batch whose writes are still being recorded), read the peer's state of
        them and, once the rows of the last process were settled, compare them.

        The compare ahead works as the one of a round: the rows are disjoint from the ones
        being written, a row replaced after it is written as the ledger then has it (the
        write records what is still owed), and a read the ledger learnt something newer than
        is not applied (the row is read again in a later round).
        """
        now_ms = self._clock.wall_ms()
        exclude = [*writing, *self._recording_ids]
        rows = await self._ledger.due_rows(self.peer, self._batch_size, now_ms, exclude=exclude)
        if not rows:
            return None
        read = await self._read_current(rows)
        if not self._recovered.is_set():
            # The first batch after start is checked for interrupted writes first.
            return rows, read, None, self._wakes
        self._compared_ahead = {(row.user, row.item) for row in rows}
        wakes = self._wakes
        return rows, read, await self._ready(rows, read), wakes

    async def _take_prepared(self) -> _Prepared | None:
        """The batch read ahead, if there is one and its reads worked."""
        task, self._prepared = self._prepared, None
        if task is None:
            return None
        try:
            return await task
        except Exception as err:  # noqa: BLE001 - read again, and handled, by the round
            logger.debug("[→%s] reading ahead failed: %s", self.peer, err)
            return None
        finally:
            self._compared_ahead = set()

    async def _drop_prepared(self) -> None:
        task, self._prepared = self._prepared, None
        self._compared_ahead = set()
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _finish_recording(self) -> None:
        """Wait until the writes of the last batch are recorded (if they are being recorded)."""
        task, self._recording = self._recording, None
        if task is not None:
            await task

    async def _deliver_batch(
        self, owed: Sequence[tuple[OutboxRow, UserData]], *, background: bool = False
    ) -> list[Exception]:
        """Write a batch through ``concurrency`` lanes, then record it; return the failures.

        Each lane takes the next row as soon as its request is answered (no task per row).
        The done writes are recorded together once the lanes are through, in ONE transaction
        (pending echo + last-known per write): recording them while writes are still under
        way costs more, the SQLite thread then competing for the CPU with the writes. With
        ``background`` (the next batch is read and compared already) the round does not wait
        for that transaction: the next batch's writes go while it runs, and the round after
        waits for it before it records its own. The first failure that concerns the whole
        peer (down, key refused), and a stop, end the lanes taking more rows: those not tried
        stay queued as they are. A short batch written while rows are being queued reads the
        next one ahead too.
        """
        if owed and self._prepared is None and self._accepting and self._wake.is_set():
            # A short batch (the round read nothing ahead), but rows were queued since the
            # round began: a bulk action's first slice is written while the intake applies
            # the rest of it. The next batch is read and compared while this one is written,
            # as in a long backlog, instead of after it with nothing in flight meanwhile
            # (42-214 ms per such round in the 10k burst, its due rows waiting behind the
            # apply transactions on SQLite's thread). The round takes it as its read ahead.
            ahead = asyncio.create_task(  # noqa: RUF006 - kept as self._prepared
                self._prepare([row.id for row, _ in owed]),
                name=f"jfsync-pusher[{self.peer}]-read-ahead",
            )
            self._prepared = ahead
        failures: list[Exception] = []
        # By the row's place in the batch: the writes are recorded (and reported) in due order.
        done: list[tuple[OutboxRow, UserData] | None] = [None] * len(owed)
        rows = enumerate(owed)
        stopped = False
        # Set once this batch's writes are recorded: an echo of one waits for it (settled).
        recorded = asyncio.Event()
        ids = {row.id for row, _ in owed}

        async def lane() -> None:
            nonlocal stopped
            for index, (row, current) in rows:
                if not self._accepting:
                    return  # stopping: what is not sent yet stays queued
                self._writing[(row.user, row.item)] = recorded
                try:
                    async with self._semaphore:
                        written = await self._write(row, current)
                except Exception as err:  # noqa: BLE001 - every failure goes to the round
                    failures.append(err)
                    stopped = stopped or isinstance(err, _PeerDown | _PeerPaused)
                else:
                    if written:
                        done[index] = (row, current)
                if stopped:
                    return

        try:
            await asyncio.gather(*(lane() for _ in range(min(self._concurrency, len(owed)))))
        except BaseException:
            self._recorded(owed, recorded, ids)
            raise
        made = [write for write in done if write is not None]
        try:
            # One batch is recorded at a time, in due order.
            await self._finish_recording()
        except BaseException:
            self._recorded(owed, recorded, ids)
            raise
        self._recording_ids |= ids
        record = self._record(owed, made, recorded, ids, clear_error=not failures)
        if background and made and not stopped:
            self._recording = asyncio.create_task(record, name=f"jfsync-pusher[{self.peer}]-record")
        else:
            await record
        return failures

    async def _record(
        self,
        owed: Sequence[tuple[OutboxRow, UserData]],
        made: Sequence[tuple[OutboxRow, UserData]],
        recorded: asyncio.Event,
        ids: set[int],
        *,
        clear_error: bool,
    ) -> bool:
        """Record the writes ``made`` of a batch (pending echo + last-known) in one
        transaction and tell the watcher; then let the echoes of the batch be judged. Return
        whether it left any of the batch's rows due (a row replaced while it was written, a
        write not made or not recorded)."""
        try:
            if not made:
                return True
            acks = [(row, row.intended(current)) for row, current in made]
            done_ms = self._clock.wall_ms()
            try:
                done = await self._ledger.rows_written(acks, done_ms)
            except JfsyncError as err:
                # Unrecorded writes stay queued and are compared again (the peer already
                # holds them, so nothing is written twice).
                self.stats.last_error = str(err)
                self._faults.failed("recording writes failed; they are compared again", err)
                return True
            if clear_error:
                # Writes work again: say so, before the progress below wakes whoever waits.
                self.stats.last_error = None
            self._written(len(acks), done_ms)
            if self._watcher is not None:
                # In slices, the loop given back between: a batch of 500 (the batch size
                # then) told at once held it for 3-7 ms (metrics and the activity feed), and
                # the next batch's writes waited that long for their answers to be read.
                for start in range(0, len(made), REPORT_STEP):
                    if start:
                        await asyncio.sleep(0)
                    delivered = [
                        Delivered(row, current, after, done_ms)
                        for (row, current), (_, after) in zip(
                            made[start : start + REPORT_STEP],
                            acks[start : start + REPORT_STEP],
                            strict=True,
                        )
                    ]
                    self._tell(self._watcher.written, self.peer, delivered)
            return len(made) < len(owed) or not all(done)
        finally:
            self._recorded(owed, recorded, ids)

    def _recorded(
        self, owed: Sequence[tuple[OutboxRow, UserData]], recorded: asyncio.Event, ids: set[int]
    ) -> None:
        """A batch's writes are recorded (or never will be): its echoes may be judged."""
        recorded.set()
        self._recording_ids -= ids
        for row, _ in owed:
            key = (row.user, row.item)
            if self._writing.get(key) is recorded:
                del self._writing[key]

    async def _read_current(self, rows: Sequence[OutboxRow]) -> _Read:
        """Read the peer's state of every row's item, one listing per user; say when it was
        requested (the compare never applies it over something the ledger learnt later)."""
        read_ms = self._clock.wall_ms()
        read_seq = self._ledger.ticket()
        by_user: dict[str, list[OutboxRow]] = {}
        for row in rows:
            by_user.setdefault(row.remote_user_id or row.user, []).append(row)
        found: dict[tuple[str, str], UserData] = {}
        for remote_user, user_rows in by_user.items():
            wanted = {(r.remote_item_id or r.item): r for r in user_rows}
            try:
                states = await self._client.user_data_of(remote_user, wanted)
            except ServerError as err:
                raise self._classify(err) from err
            for remote_item, state in states.items():
                match = wanted.get(remote_item)
                if match is not None:
                    found[(match.user, match.item)] = state
        return found, read_ms, read_seq

    async def _recover_interrupted(
        self, rows: Sequence[OutboxRow], current: dict[tuple[str, str], UserData]
    ) -> None:
        """Record writes that reached the peer but were never recorded, before comparing.

        A write can be cut off after the peer applied it (jfsync killed before reading the
        answer) or half-way (the DELETE that clears a date went through, the POST did not).
        The peer then holds a state jfsync wrote, or a step towards it, while the ledger
        still has the state before: the compare would take it for the peer's own change and
        let it win over the change being delivered. Rows that may carry such a write are the
        first batch after start (in due order, exactly the rows in flight when the last
        process stopped) and rows whose earlier attempt failed. For those, each register
        whose value on the peer is the one a step of the write gives it (the intents recorded
        ahead by record_intents, so also for a write of a value the row has since been
        replaced with, and the row's own steps) is recorded as written (pending echo +
        last-known); any other difference is still the peer user's change, and the row keeps
        whatever is still owed.
        """
        suspects = list(rows) if not self._recovered.is_set() else [r for r in rows if r.attempts]
        landed: list[tuple[OutboxRow, UserData]] = []
        for row in suspects:
            state = current.get((row.user, row.item))
            if state is None:
                continue
            before = await self._ledger.last_known(self.peer, row.user, row.item)
            if before is None or state == before:
                continue
            # The row's own steps too: intents expire, and older ledgers have none.
            # Only writes made over the state the ledger still has: older entries may linger
            # (an echo lost in the stop) and must not explain the user's own changes.
            pending = await self._ledger.pending_echoes(*self._key(row))
            candidates = [p.state for p in pending if p.replaced == before]
            candidates += write_steps(before, row)
            # Register by register: the user may have changed another register on top.
            explained = before
            for register in ALL_REGISTERS:
                value = state.get(register)
                if value != before.get(register) and any(
                    c.get(register) == value for c in candidates
                ):
                    explained = explained.with_register(register, value)
            if explained != before:
                landed.append((row, explained))
        if landed:
            logger.info(
                "[→%s] %d writes reached the peer before an interruption; recorded",
                self.peer,
                len(landed),
            )
            # A version no row has: the ledger then keeps the registers still owed (the
            # behaviour of a row replaced mid-flight) instead of dropping the row.
            await self._ledger.rows_written(
                [(replace(row, version=-1), state) for row, state in landed],
                self._clock.wall_ms(),
            )

    def _key(self, row: OutboxRow) -> tuple[str, str, str]:
        return self.peer, row.user, row.item

    async def wait_recovered(self, timeout_s: float) -> bool:
        """Wait until the first batch after start was checked for interrupted writes and sent.

        A catch-up scan of the peer must not run before that: it could read a landed or
        half-done write as the user's change. Returns False when ``timeout_s`` passed first
        (peer down).
        """
        if self._recovered.is_set():
            return True
        sleeper = asyncio.ensure_future(self._clock.sleep(timeout_s))
        waiter = asyncio.ensure_future(self._recovered.wait())
        try:
            await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (sleeper, waiter):
                fut.cancel()
            await asyncio.gather(sleeper, waiter, return_exceptions=True)
        return self._recovered.is_set()

    async def _compare(
        self,
        rows: Sequence[OutboxRow],
        current: dict[tuple[str, str], UserData],
        read_ms: int,
        read_seq: int,
    ) -> list[tuple[OutboxRow, UserData]]:
        """Merge what the peer holds first and record the writes' intents (one transaction);
        return the rows still owed.

        Rows whose item is not in the peer's listing for that user are parked: the item does
        not exist there (or the user cannot see it); a newer change or retry_dead revives them.
        A row whose key the ledger learnt of after ``read_ms`` (an event arrived since the
        read, e.g. one read ahead) is neither compared nor written now: it stays due and is
        read again in the next round.
        """
        present: list[tuple[OutboxRow, UserData]] = []
        for row in rows:
            state = current.get((row.user, row.item))
            if state is not None:
                present.append((row, state))
                continue
            reason = f"item {row.remote_item_id or row.item} not found on {self.peer} for that user"
            await self._park(row, reason)
            if self._watcher is not None:
                self._tell(self._watcher.missing, self.peer, row)
        # The intents are written ahead in the same transaction: should jfsync stop mid-write,
        # what it finds on the peer later is known to be its own.
        regressed: list[OutboxRow] = []
        fresh = await self._ledger.observe_before_writes(
            present,
            self._clock.wall_ms(),
            intents=_steps_memo(),
            read_ms=read_ms,
            read_seq=read_seq,
            regressed=regressed,
        )
        if regressed:
            await self._defer_regressed(regressed)
        owed: list[tuple[OutboxRow, UserData]] = []
        for (_, state), still in zip(present, fresh, strict=True):
            if still is None:
                self.stats.writes_skipped += 1
            else:
                owed.append((still, state))
        if len(owed) < len(present):
            self._progress()
        return owed

    async def _defer_regressed(self, rows: Sequence[OutboxRow]) -> None:
        """Hold back rows whose item the peer shows back to never-touched; ask for a catch-up.

        A server that lost its data shows exactly that, and writing over it (or taking it as
        the user's edit) before the catch-up scan of that user has applied the reset guard
        would spread the loss or restore too little. The rows are tried again after
        ``REGRESSION_RETRY_S``; by then the catch-up has settled what the server holds.
        """
        retry_at = self._clock.wall_ms() + int(REGRESSION_RETRY_S * 1000)
        users = sorted({row.user for row in rows})
        logger.info(
            "[→%s] %d items read back to never-touched for %s; waiting for the catch-up of "
            "those users before writing them",
            self.peer,
            len(rows),
            ", ".join(users),
        )
        await self._ledger.rows_failed(
            rows, "waiting for the catch-up scan: the item reads as never touched", retry_at
        )
        if self._watcher is not None:
            self._tell(self._watcher.deferred, self.peer, rows)
        if self._on_regression is not None:
            for user in users:
                try:
                    self._on_regression(self.peer, user)
                except Exception:
                    logger.exception("[→%s] asking for a catch-up failed", self.peer)

    async def _write(self, row: OutboxRow, current: UserData) -> bool:
        """Write the row's registers (quick retries); False when it was parked instead."""
        remote_user = row.remote_user_id or row.user
        remote_item = row.remote_item_id or row.item

        async def send() -> None:
            # The answer is not decoded: what is recorded is the state meant (OutboxRow.intended).
            await self._client.write_user_data(
                remote_user, remote_item, row.desired, current, row.registers
            )

        if self._dry_run:
            return True  # recorded as made (in a copy of the ledger); nothing is sent
        try:
            try:
                await send()
            except ServerError as first:
                # Retries only once a write failed: building a retry loop for each of
                # thousands of writes that succeed costs more than the write itself.
                if not is_retryable(first) or self._quick_attempts < 2:
                    raise
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self._quick_attempts - 1),
                    wait=self._retry_wait,
                    retry=retry_if_exception(is_retryable),
                    sleep=self._clock.sleep,
                    reraise=True,
                ):
                    with attempt:
                        if attempt.retry_state.attempt_number == 1:
                            # The backoff before the first retry (tenacity waits the rest).
                            await self._clock.sleep(self._retry_wait(attempt.retry_state))
                        await send()
        except ServerError as err:
            self.stats.failures += 1
            self.stats.last_error = str(err)
            if self._watcher is not None:
                self._tell(self._watcher.failed, self.peer, row, err)
            if isinstance(err, NotFoundError | BadRequestError):
                await self._park(row, str(err))
                return False
            retry_at = self._clock.wall_ms() + int(ROW_RETRY_S * 1000)
            await self._ledger.row_failed(row, str(err), retry_at)
            raise self._classify(err) from err
        return True

    def _written(self, count: int, done_ms: int) -> None:
        """Count recorded writes (the watcher is told which, with their latency)."""
        self.stats.writes_done += count
        self.stats.last_write_ms = done_ms
        self._streak.succeeded("writes to the peer work")
        self._progress()

    async def _park(self, row: OutboxRow, reason: str) -> None:
        if await self._ledger.row_dead(row, reason):
            self.stats.dead_parked += 1
            logger.warning("[→%s] parked %s/%s: %s", self.peer, row.user, row.item, reason)
            self._progress()

    # ------------------------------------------------------------------ down and paused

    def _classify(self, err: ServerError) -> Exception:
        if isinstance(err, AuthRejectedError):
            return _PeerPaused(err)
        if is_retryable(err):
            return _PeerDown(err)
        return err

    async def _wait_until_up(self, error: ServerError, *, until: float | None = None) -> bool:
        """Probe the peer cheaply until it answers, then make its rows due again.

        Any answer but a good one means "still down": a proxy in front of a stopped server
        answers 502, 404 or its own HTML page, none of which says the server is back. With
        ``until`` (a time on the clock's monotonic scale), no probe starts after it: False
        is returned, the peer still counted as down. Also False when stopping.
        """
        self.stats.down_since_ms = self.stats.down_since_ms or self._clock.wall_ms()
        self.stats.last_error = str(error)
        self._streak.failed("peer unreachable; queueing and probing", error)
        self._progress()

        def give_up(_: RetryCallState) -> bool:
            return until is not None and self._clock.monotonic() >= until

        try:
            async for attempt in AsyncRetrying(
                stop=give_up if until is not None else stop_never,
                wait=self._probe_wait,
                retry=retry_if_exception_type(Exception),
                sleep=self._sleep_until_stop,
                before_sleep=self._still_down,
                reraise=True,
            ):
                with attempt:
                    if self._stopping():
                        return False
                    await self._client.public_info()
        except Exception:
            # The last probe failed when ``until`` had come: still down.
            if until is None:
                raise
            return False
        self.stats.down_since_ms = None
        self.stats.last_error = None  # what made it "down" is over: never shown after recovery
        self._streak.succeeded("peer reachable")
        self._progress()
        await self._ledger.reset_backoff(self.peer)
        return True

    def _still_down(self, attempt: RetryCallState) -> None:
        """Show why the last probe failed (the streak logs it at DEBUG)."""
        err = attempt.outcome.exception() if attempt.outcome is not None else None
        if err is None:
            return
        if isinstance(err, JfsyncError):
            self.stats.last_error = str(err)
            self._streak.failed("still down", err)
        else:
            self.stats.last_error = f"unexpected error: {type(err).__name__}: {err}"
            self._faults.failed("probing the peer failed unexpectedly", err, unexpected=True)
        self._progress()

    async def _sleep_until_stop(self, seconds: float) -> None:
        await self._sleep_or_wake(seconds, wake_on_rows=False)

    def _pause(self, error: ServerError) -> None:
        """Show the peer as paused, with why."""
        self.stats.pause_reason = (
            f"{self.peer} refused jfsync's API key ({error}); check servers[].api_key"
        )
        self._streak.failed("paused", self.stats.pause_reason)
        self._progress()

    async def _wait_until_key_works(self, error: ServerError) -> None:
        """Stay paused with a visible reason; ask again slowly until the key is accepted."""
        self._pause(error)
        while self._accepting:
            await self._sleep_or_wake(self._auth_retry_s, wake_on_rows=False)
            if self._stopping():
                return
            try:
                await self._client.system_info()
            except AuthRejectedError as err:
                self._streak.failed("still paused", err)
                continue
            except Exception as err:  # noqa: BLE001 - logged by the streaks below
                # Down, a proxy's 404 or HTML page, a bug: the key is not known to work yet.
                if isinstance(err, JfsyncError):
                    self.stats.last_error = str(err)
                    self._streak.failed("still paused; the peer did not answer", err)
                else:
                    self.stats.last_error = f"unexpected error: {type(err).__name__}: {err}"
                    self._faults.failed(
                        "asking a paused peer failed unexpectedly", err, unexpected=True
                    )
                self._progress()
                continue
            break
        self.stats.pause_reason = None
        self.stats.last_error = None
        self._streak.succeeded("API key accepted")
        self._progress()
        await self._ledger.reset_backoff(self.peer)

    async def _sleep_or_wake(self, seconds: float, *, wake_on_rows: bool = True) -> None:
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        event = self._wake if wake_on_rows else self._stop_requested
        waiter = asyncio.ensure_future(event.wait())
        waiting: set[asyncio.Future[object]] = {sleeper, waiter}  # type: ignore[arg-type]
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in waiting:
                fut.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)

    def _stopping(self) -> bool:
        return not self._accepting

    def _progress(self) -> None:
        if self._on_progress is not None:
            self._on_progress()

    def _tell(self, method: Callable[..., None], *args: object) -> None:
        """Tell the watcher; a watcher that fails must not undo or stop delivery."""
        try:
            method(*args)
        except Exception:
            logger.exception("[→%s] the delivery watcher failed", self.peer)

    # ------------------------------------------------------------------ the live path

    #: How many due rows an apply reads for :meth:`offer`: all of them or it is no live
    #: round (a backlog is taken in batches, in due order, as always).
    LIVE_ROWS = 32

    def offer(self, rows: list[OutboxRow]) -> None:
        """Hand over the due rows an apply read in its own transaction, right after it
        committed (:meth:`Ledger.apply_observations` with ``due``): the round this apply
        wakes starts from them instead of asking the ledger (one hop less per live change).

        Kept only while nothing can happen to them but what the round's compare sees
        anyway: no batch read ahead, the rows of the last process settled, the peer neither
        down nor paused, and fewer than :data:`LIVE_ROWS` (a backlog takes its rows in
        batches, in due order, as always). A round that takes rows any other way, or fails,
        forgets them. A row replaced since is compared and written as the ledger then has
        it; the rows of the batch in hand (being written, perhaps failing) and of a batch
        being recorded (when offered or when taken) are left to the round after, which finds
        them as that batch left them.
        """
        if (
            self._prepared is not None
            or not self._recovered.is_set()
            or self.stats.down_since_ms is not None
            or self.stats.pause_reason is not None
            or len(rows) >= min(self.LIVE_ROWS, self._batch_size)
        ):
            self._offered = None
            return
        recording = self._recording_ids
        writing = self._in_flight
        if recording or writing:
            rows = [
                row
                for row in rows
                if row.id not in recording and (row.user, row.item) not in writing
            ]
        self._offered = rows

    def _recording_ended(self, task: asyncio.Task[bool]) -> None:
        """A batch's writes are recorded: a running pusher that ended a round with nothing
        else due is woken if that left rows due (else a round would only find nothing)."""
        if task.cancelled() or task.exception() is not None or task.result():
            self._wake.set()

    def _take_offered(self) -> list[OutboxRow]:
        """The rows offered since the last round (but those being recorded), or none."""
        offered, self._offered = self._offered, None
        if not offered:
            return []
        recording = self._recording_ids
        return [row for row in offered if row.id not in recording] if recording else offered

    async def _due_rows(self) -> list[OutboxRow]:
        """The due rows but those of the batch being recorded.

        When those are all that is left, a running pusher ends the round with none, and the
        recording's end wakes it if it left rows due (a row replaced while it was written is
        due once the write is recorded): waiting here, a change applied meanwhile waited
        for the recording and then for one more read queued behind the ledger's other work
        (a live change traced at 15 ms instead of 8). A drain (no task of its own) waits for
        the recording and asks again, unless a live change offered its rows meanwhile (the
        round after takes the rest).
        """
        if self._recording is not None and self._recording.done():
            await self._finish_recording()
        rows = await self._ledger.due_rows(
            self.peer, self._batch_size, self._clock.wall_ms(), exclude=self._recording_ids
        )
        recording = self._recording
        if not rows and recording is not None:
            if self._task is not None and not recording.done():
                recording.add_done_callback(self._recording_ended)
                return rows
            await self._finish_recording()
            rows = self._take_offered()
            if rows:
                return rows
            rows = await self._ledger.due_rows(self.peer, self._batch_size, self._clock.wall_ms())
        if rows:
            self._offered = None  # these rows may be among them
        return rows


def write_steps(before: UserData, row: OutboxRow) -> list[UserData]:
    """The states the peer holds after each request of writing ``row`` over ``before``.

    The steps of :func:`jfsync.jellyfin.writeplan.plan_write`, which
    :meth:`JellyfinClient.apply_user_data` sends; ``[before]`` when nothing is to be sent.
    """
    plan = plan_write(before, row.desired, row.registers)
    return list(plan.steps) or [plan.result]


def _steps_memo() -> Callable[[OutboxRow, UserData], list[UserData]]:
    """:func:`write_steps` for one compare, made once per distinct (peer state, desired
    state, registers) by object identity: a bulk action's rows share a few interned states,
    and hashing two states per row for :func:`plan_write`'s cache cost a tenth of the drain's
    time on SQLite's thread. The memo lives for one call and holds the states it keys on (so
    their ids cannot be reused by other states meanwhile); the lists it hands out are only
    read."""
    memo: dict[tuple[int, int, frozenset[Register]], tuple[UserData, UserData, list[UserData]]]
    memo = {}

    def steps(row: OutboxRow, state: UserData) -> list[UserData]:
        key = (id(state), id(row.desired), row.registers)
        hit = memo.get(key)
        if hit is None:
            hit = memo[key] = (state, row.desired, write_steps(state, row))
        return hit[2]

    return steps


#: Rows taken ahead and the peer's state of each (by canonical user and item).
#: The peer's states of a batch's items, when they were requested and the ledger's ticket then.
_Read = tuple[dict[tuple[str, str], UserData], int, int]
#: A batch taken ahead: its rows, the peer's state of them, once compared the rows still owed
#: with the peer's state of each (None: compared by the round), and the pusher's wakes then.
_Prepared = tuple[list[OutboxRow], _Read, list[tuple[OutboxRow, UserData]] | None, int]


class _PeerDown(Exception):
    def __init__(self, error: ServerError) -> None:
        self.error = error
        super().__init__(str(error))


class _PeerPaused(Exception):
    def __init__(self, error: ServerError) -> None:
        self.error = error
        super().__init__(str(error))
