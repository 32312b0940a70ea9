"""The one emulator cluster of the suite: N emulators on loopback and jfsync between them.

:class:`Cluster` holds the emulators (by server name, in config order), the :class:`Config`
syncing them, the running :class:`SyncService` (restartable on the same ledger), optional
:class:`SocketGate` proxies and anything else a suite attaches (a status server, an HTTP
session). The ``start_cluster`` fixture (in ``tests/conftest.py``) hands out
:class:`ClusterFactory`; calling it (:meth:`ClusterFactory.start`) starts the emulators it is given, builds the config with
:func:`tests.support.config.make_config`, starts jfsync with millisecond retry delays and waits
until every user's socket is live; at teardown everything it started is stopped, newest first.
The suites' ``make_cluster``/``make_stack`` fixtures are presets of it, and their
``Cluster``/``Stack`` classes subclasses adding suite vocabulary.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from jfsync.config import Config
from jfsync.emulator import Emulator, WriteRecord
from jfsync.model import UserData
from jfsync.service import SyncService
from jfsync.sync.identity import ItemIdentity
from jfsync.timing import Clock, ManualClock, backoff_delays
from tests.support.config import API_KEY, make_config
from tests.support.gate import SocketGate
from tests.support.waiting import WAIT_S, Predicate, bound

USER = "alice"
#: Small emulator echo debounce: real time is unavoidable there, so keep it short.
DEBOUNCE_S = 0.02
#: Pushers that wait in real time as little as possible.
FAST_PUSHER: dict[str, Any] = {
    "retry_initial_s": 0.005,
    "retry_max_s": 0.02,
    "probe_initial_s": 0.01,
    "probe_max_s": 0.05,
    "auth_retry_s": 0.05,
    "idle_poll_s": 1.0,
    "fault_initial_s": 0.01,
    "fault_max_s": 0.05,
}


def fast_delays() -> Any:
    """Reconnect delays for subscribers in tests (tens of milliseconds)."""
    return backoff_delays(base_s=0.01, cap_s=0.05)


FAST_SUBSCRIBER: dict[str, Any] = {"delays": fast_delays}

Closer = Callable[[], Awaitable[None]]


async def service_connected(
    service: SyncService, users: int | None = None, timeout_s: float = WAIT_S
) -> None:
    """Wait until every server of ``service`` has its users' sockets live (resync done).

    ``users``: how many users each server must have connected (default: all it syncs).
    """

    def ready() -> bool:
        return bool(service.links) and all(
            link.subscribers
            and (users is None or len(link.subscribers) == users)
            and all(str(s.status.state) == "connected" for s in link.subscribers.values())
            for link in service.links.values()
        )

    await service.wait_for(ready, bound(timeout_s))


class Cluster:
    """Emulators and the jfsync service replicating between them."""

    def __init__(
        self,
        emus: Sequence[Emulator],
        config: Config,
        *,
        gates: Mapping[str, SocketGate] | None = None,
        manual_clocks: Mapping[str, ManualClock] | None = None,
        service_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.servers: dict[str, Emulator] = {e.server_name: e for e in emus}
        self.config = config
        self.gates = dict(gates or {})
        #: Emulators whose clock the test drives (their pushes flush only on advance).
        self.manual_clocks = dict(manual_clocks or {})
        self.service_options: dict[str, Any] = dict(service_options or {})
        self._service: SyncService | None = None
        #: Every service started on this cluster (all are stopped at teardown).
        self.services: list[SyncService] = []
        #: The clock of the running service (``None``: the system clock).
        self.clock: Clock | None = None
        #: Extra things to close at teardown (before the services), newest first.
        self.closers: list[Closer] = []
        #: Leaf item ids of the first emulator (the same on all when built from one seed).
        self.items: list[str] = [item.id for item in emus[0].leaf_items()]

    # --- the service ---------------------------------------------------------------------

    @property
    def service(self) -> SyncService:
        """The running service."""
        assert self._service is not None, "jfsync is not running on this cluster"
        return self._service

    @service.setter
    def service(self, service: SyncService | None) -> None:
        # A test may swap in a service it built; teardown stops it too.
        if service is not None and service not in self.services:
            self.services.append(service)
        self._service = service

    @property
    def running(self) -> bool:
        """Tell whether a service is running on the cluster."""
        return self._service is not None

    async def start_service(
        self,
        *,
        config: Config | None = None,
        clock: Clock | None = None,
        connect: bool = True,
        identity: Callable[[SyncService], ItemIdentity] | None = None,
        **options: Any,
    ) -> SyncService:
        """Start jfsync on the cluster's config and ledger (again, after a stop).

        ``options`` override the cluster's service options (``subscriber_options``,
        ``pusher_options``, ``reconcile_options``); ``identity`` builds the service's identity
        (it needs the service's ledger and clock).
        """
        if config is not None:
            self.config = config
        self.clock = clock
        service = SyncService(self.config, clock=clock, **{**self.service_options, **options})
        if identity is not None:
            service.identity = identity(service)
        self.service = service
        await service.start()
        if connect:
            await self.wait_connected()
        return service

    async def stop_service(self) -> None:
        """Stop jfsync (the emulators keep running)."""
        if self._service is not None:
            await self._service.stop()
            self._service = None

    def svc(self) -> SyncService:
        """The running service."""
        return self.service

    async def wait(self, predicate: Predicate, timeout_s: float = WAIT_S) -> None:
        """Wait until ``predicate`` holds, re-checked whenever jfsync applies or writes."""
        await self.service.wait_for(predicate, bound(timeout_s))

    async def wait_connected(self, users: int | None = None) -> None:
        """Wait until every synced user of every server has a live socket (resync done).

        ``users``: how many users each server must have connected (default: all it syncs).
        """

        await service_connected(self.service, users)

    # --- what the servers hold -----------------------------------------------------------

    def emu(self, server: str | Emulator) -> Emulator:
        """The emulator called ``server`` (an emulator is returned as it is)."""
        return server if isinstance(server, Emulator) else self.servers[server]

    def data(self, server: str | Emulator, item: str, user: str = USER) -> UserData:
        """What ``server`` holds for the user and item."""
        emu = self.emu(server)
        return emu.user_data(emu.user_id(user), item)

    def change(self, server: str | Emulator, item: str, user: str = USER, **kw: Any) -> UserData:
        """Change the user's data on ``server`` as a user there would (it echoes)."""
        emu = self.emu(server)
        return emu.save_user_data(emu.user_id(user), item, **kw)

    def holds(
        self, server: str | Emulator, item: str, expected: UserData, user: str = USER
    ) -> bool:
        """Tell whether ``server`` holds ``expected``."""
        return self.data(server, item, user) == expected

    def writes(
        self, server: str | Emulator, items: Iterable[str] | None = None
    ) -> list[WriteRecord]:
        """Successful user-data writes ``server`` received (for ``items`` only, if given)."""
        wanted = None if items is None else set(items)
        return [
            w
            for w in self.emu(server).writes
            if w.status < 300 and (wanted is None or w.item_id in wanted)
        ]

    # --- teardown --------------------------------------------------------------------------

    async def close(self) -> None:
        """Close what was attached, stop every service, close the gates; errors after all."""
        errors: list[BaseException] = []
        steps: list[Closer] = [*reversed(self.closers)]
        steps += [s.stop for s in reversed(self.services)]
        steps += [g.close for g in self.gates.values()]
        for step in steps:
            try:
                await step()
            except Exception as err:  # close the rest, then report
                errors.append(err)
        self.closers.clear()
        self._service = None
        if errors:
            raise errors[0]


C = TypeVar("C", bound=Cluster)


class ClusterFactory:
    """Starts clusters for one test; :meth:`close` stops all of them and their emulators."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.clusters: list[Cluster] = []
        self.emulators: list[Emulator] = []
        self.gates: list[SocketGate] = []

    async def gate(self, upstream_port: int) -> SocketGate:
        """A started :class:`SocketGate` in front of that port, closed at teardown."""
        gate = SocketGate(upstream_port)
        await gate.start()
        self.gates.append(gate)
        return gate

    async def start_emulators(self, emus: Iterable[Emulator]) -> None:
        """Start the emulators not listening yet; each is closed at teardown."""
        for emu in emus:
            if emu not in self.emulators:
                self.emulators.append(emu)
            if not emu.is_listening:
                await emu.start()

    async def start(
        self,
        emus: Sequence[Emulator],
        *,
        cls: type[C] = Cluster,  # type: ignore[assignment]
        gated: Iterable[str] = (),
        url_of: Callable[[Emulator], str] | None = None,
        api_key: str | Mapping[str, str] = API_KEY,
        ledger: Path | None = None,
        sync: Mapping[str, Any] | None = None,
        manual_clocks: Mapping[str, ManualClock] | None = None,
        before_start: Callable[[C], None] | None = None,
        start: bool = True,
        connect: bool = True,
        clock: Clock | None = None,
        subscriber_options: Mapping[str, Any] | None = None,
        pusher_options: Mapping[str, Any] | None = None,
        reconcile_options: Mapping[str, Any] | None = None,
        service_options: Mapping[str, Any] | None = None,
        **config: Any,
    ) -> C:
        """Start ``emus`` and jfsync between them (config order = list order).

        ``gated`` puts a :class:`SocketGate` in front of those servers (jfsync talks through
        it); ``url_of`` picks any other URL; ``config`` keys go to
        :func:`tests.support.config.config_dict` (``users``, ``status``, ``server_extra``…)
        and ``sync`` keys into the ``sync`` section (shutdown grace 2 s by default).
        ``before_start`` sees the cluster before jfsync starts; ``start=False`` leaves jfsync
        stopped, ``connect=False`` does not wait for the sockets.
        """
        await self.start_emulators(emus)
        gates: dict[str, SocketGate] = {}
        for name in gated:
            gate = SocketGate(next(e for e in emus if e.server_name == name).port)
            await gate.start()
            gates[name] = gate

        def url(emu: Emulator) -> str:
            if emu.server_name in gates:
                return gates[emu.server_name].url
            return url_of(emu) if url_of is not None else emu.url

        path = ledger or self.tmp_path / f"ledger-{len(self.clusters)}.db"
        servers = {emu.server_name: url(emu) for emu in emus}
        raw_config = make_config(
            servers,
            ledger=path,
            api_key=api_key,
            timeout_s=5,
            sync={"shutdown_grace": 2, **(sync or {})},
            **config,
        )
        options: dict[str, Any] = {
            "subscriber_options": dict(subscriber_options or FAST_SUBSCRIBER),
            "pusher_options": {**FAST_PUSHER, **(pusher_options or {})},
        }
        if reconcile_options is not None:
            options["reconcile_options"] = dict(reconcile_options)
        options.update(service_options or {})
        cluster = cls(
            emus, raw_config, gates=gates, manual_clocks=manual_clocks, service_options=options
        )
        self.clusters.append(cluster)
        if before_start is not None:
            before_start(cluster)
        if start:
            await cluster.start_service(clock=clock, connect=connect)
        return cluster

    __call__ = start

    async def close(self) -> None:
        """Stop every cluster (newest first), then close every gate and emulator."""
        errors: list[BaseException] = []
        for cluster in reversed(self.clusters):
            try:
                await cluster.close()
            except Exception as err:
                errors.append(err)
        for gate in reversed(self.gates):
            try:
                await gate.close()
            except Exception as err:
                errors.append(err)
        for emu in reversed(self.emulators):
            try:
                await emu.close()
            except Exception as err:
                errors.append(err)
        if errors:
            raise errors[0]


#: What the ``start_cluster`` fixture hands out: call it to start a cluster.
StartCluster = ClusterFactory
