"""The oracle of the model-based replication test: every user action and what must survive it.

:class:`Model` records every user action (server, user, item, register, value, round) and,
per register, which actions are certainly before which. The final value a register may show on
every server, once things are quiet, is the value of one of its *candidates*: the actions no
other action on that register is certainly after. An action is certainly after another when

* it was made on the same server later (that server shows the later one; jfsync reads servers
  in order),
* it was made in a later *round*: rounds are separated by a quiet barrier (every action of the
  round observed, every write made and echoed) and then at least 1 s on jfsync's clock, so
  the design's "actions at least 1 s apart are ordered by real time" applies,
* it was made on a server that then showed a value jfsync wrote there (the design's "an action
  a user makes after their server shows jfsync's write always beats that write"): the write's
  source is the action whose value it carries (values are unique by construction except the
  favourite flag and "unplayed"; when several actions could be the source, only what every
  one of them is certainly after counts), and everything before that source is before too.

Inside one round, actions on different servers with no such link are concurrent: any of them
may win, but every server must show the same one. That is deliberately looser than "1 s apart
on the clock" inside a round: jfsync stamps a change when it *observes* it, and in a round the
test makes it observe late on purpose (socket down, peer down, jfsync stopped, a scan in flight).

Net no-ops. A user who toggles a register and toggles it back on one server inside one 500 ms
debounce leaves that server showing what it showed before, and the one pushed event shows that
too: no replicator can observe it. Such pairs are ACCEPTED here, not excluded: the second
action's value is the one the server showed before the first, which jfsync already had, or
had not received yet from a concurrent action of the same round, so every acceptable outcome
stays acceptable; the model needs no special case and the schedule does not avoid them.

A wiped server (:meth:`Model.wiped`) is not a user action: it changes what that server shows
(to the default, with no known source) but never what the model expects.

The schedule log (:attr:`Model.log`) keeps every action and every situation the test created,
in order, for the failure report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jfsync.model import PlayState, Register, UserData

Value = bool | float | PlayState | None
#: (user, item, register): one register of one user's item, on every server.
RegKey = tuple[str, str, Register]


@dataclass(frozen=True)
class Action:
    """One user action on one register of one server."""

    index: int
    round: int
    server: str
    user: str
    item: str
    register: Register
    value: Value
    #: What the user did (``favourite on``, ``playback stop at 1234 s``, ...).
    what: str
    #: The situation the schedule made it in (``after jfsync's write``, ``while b is down``).
    situation: str
    #: Indexes of the actions on the same register this one is certainly after.
    after: frozenset[int] = frozenset()

    def describe(self) -> str:
        """One line for the schedule listing."""
        return (
            f"#{self.index} r{self.round} {self.server} {self.user} {self.item[:6]} "
            f"{self.register}: {self.what} -> {show(self.value)} [{self.situation}]"
        )


def show(value: Value) -> str:
    """A short readable register value."""
    if isinstance(value, PlayState):
        date = "-" if value.last_played_s is None else str(value.last_played_s % 100_000)
        pos = value.position_ticks // 10_000_000
        return f"(played={int(value.played)} n={value.play_count} date..{date} pos={pos}s)"
    return repr(value)


@dataclass
class _Shown:
    """What one server shows for one register, and which actions the value may come from."""

    value: Value
    #: Action indexes the value may come from; empty when unknown (initial, wiped).
    sources: frozenset[int] = frozenset()


@dataclass
class Model:
    """Every user action of a schedule and the outcome each register may end in."""

    servers: list[str]
    actions: list[Action] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    round: int = 0
    _by_key: dict[RegKey, list[Action]] = field(default_factory=dict)
    _shown: dict[tuple[str, RegKey], _Shown] = field(default_factory=dict)

    # ------------------------------------------------------------------ recording

    def note(self, text: str) -> None:
        """Log a situation (server down, crash, wipe, ...) in the schedule."""
        self.log.append(f"   r{self.round} {text}")

    def next_round(self) -> None:
        """Start a new round (after a quiet barrier and >= 1 s on jfsync's clock)."""
        self.round += 1
        self.log.append(f"-- round {self.round}")

    def record(
        self,
        server: str,
        user: str,
        item: str,
        register: Register,
        value: Value,
        what: str,
        situation: str,
    ) -> Action:
        """Record a user action made on ``server`` just now; return it."""
        key = (user, item, register)
        earlier = self._by_key.setdefault(key, [])
        after: set[int] = set()
        for other in earlier:
            if other.round < self.round or other.server == server:
                after.add(other.index)
                after |= other.after
        shown = self._shown.get((server, key))
        if shown is not None and shown.sources:
            # The server shows a value jfsync wrote (or the user's own): whatever every
            # possible source is certainly after, this action is after too.
            common: set[int] | None = None
            for source in shown.sources:
                before = {source} | self.actions[source].after
                common = before if common is None else common & before
            after |= common or set()
        action = Action(
            len(self.actions),
            self.round,
            server,
            user,
            item,
            register,
            value,
            what,
            situation,
            frozenset(after),
        )
        self.actions.append(action)
        earlier.append(action)
        self._shown[(server, key)] = _Shown(value, frozenset({action.index}))
        self.log.append("   " + action.describe())
        return action

    def jfsync_wrote(self, server: str, user: str, item: str, state: UserData) -> None:
        """Track what ``server`` shows after one of jfsync's writes landed there."""
        for register in Register:
            key = (user, item, register)
            value = state.get(register)
            shown = self._shown.get((server, key))
            if shown is not None and shown.value == value:
                continue  # unchanged: it still comes from where it came from
            if shown is None and value == UserData().get(register):
                continue
            sources = frozenset(a.index for a in self._by_key.get(key, []) if a.value == value)
            self._shown[(server, key)] = _Shown(value, sources)

    def wiped(self, server: str, users: list[str]) -> None:
        """``server`` lost the user data of ``users`` (not a user action)."""
        for (name, key), _ in list(self._shown.items()):
            if name == server and key[0] in users:
                self._shown[(name, key)] = _Shown(UserData().get(key[2]))

    # ------------------------------------------------------------------ the oracle

    def candidates(self, user: str, item: str, register: Register) -> list[Action]:
        """The actions on a register that no other action on it is certainly after."""
        actions = self._by_key.get((user, item, register), [])
        beaten: set[int] = set()
        for action in actions:
            beaten |= action.after
        return [a for a in actions if a.index not in beaten]

    def acceptable(self, user: str, item: str, register: Register) -> list[Value]:
        """The values every server may end with (the default when nobody touched it)."""
        found = self.candidates(user, item, register)
        if not found:
            return [UserData().get(register)]
        values: list[Value] = []
        for action in found:
            if action.value not in values:
                values.append(action.value)
        return values

    def actions_on(self, user: str, item: str) -> list[Action]:
        """Every action on any register of (user, item)."""
        return [a for a in self.actions if a.user == user and a.item == item]

    def check(
        self, shown: dict[str, dict[tuple[str, str], UserData]], users: list[str], items: list[str]
    ) -> list[str]:
        """Compare what every server shows with the model; return one line per problem.

        ``shown`` is server -> (user, item) -> state. A register is wrong when the servers
        disagree or when the value they agree on is not acceptable.
        """
        problems = []
        for user in users:
            for item in items:
                for register in Register:
                    values = {s: shown[s][(user, item)].get(register) for s in self.servers}
                    ok = self.acceptable(user, item, register)
                    agree = len({repr(v) for v in values.values()}) == 1
                    if agree and next(iter(values.values())) in ok:
                        continue
                    got = ", ".join(f"{s}={show(v)}" for s, v in values.items())
                    want = " or ".join(show(v) for v in ok)
                    why = "servers disagree" if not agree else "a user's action is lost"
                    cands = ", ".join(f"#{a.index}" for a in self.candidates(user, item, register))
                    problems.append(
                        f"{user} {item[:6]} {register}: {why}: expected {want} "
                        f"(latest actions: {cands or 'none'}); servers show {got}"
                    )
        return problems
