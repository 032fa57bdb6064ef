"""Several hosts on one synced spool: heartbeats, who is live, and which host owns a task.

A sync tool (Syncthing, Dropbox, Unison, rsync) gives no locks and no atomic rename across
machines: a rename arrives as a delete and a create, seconds later. So hosts never race for
a task. Each daemon writes its own heartbeat, `.spoold/hosts/HOST-PID.json` (one writer),
and every host computes the same owner for each queued task and each dropped file from what
the spool says: rendezvous hashing of its id over the live hosts. Only the owner claims it.

The rules that keep that safe while views differ by a sync delay:
- a host is live while a heartbeat of its changed within `host_lease_s`, as seen here;
- a host claims nothing until every live host's heartbeat says it sees this one (so they
  have stopped claiming what is now its own);
- a task whose owner changed is claimed by its new owner only `handover_s` later (the old
  owner's last renames have arrived by then), unless the old owner went silent for a lease;
- a host silent for `running_lease_s` loses its running tasks too: another host re-runs them;
- a host takes the canonical result name only while it is in touch with every host it
  knows; otherwise it writes `ID@HOST.result.md`, so two answers never meet as a conflict copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from spoold import spool
from spoold.config import Settings
from spoold.spool import Spool

log = logging.getLogger("spoold")
FORGET_S = 86400.0  # a beat a day old by its own clock, unchanged for a lease here, is forgotten and removed


@dataclass(frozen=True)
class Beat:
    """One daemon's heartbeat: who it is, when it last beat (its clock), whom it counts as live, what it runs."""

    owner: str
    seq: int
    at: float
    sees: tuple[str, ...] = ()
    running: tuple[str, ...] = ()
    lease_s: float = 300.0
    running_lease_s: float = 900.0
    concurrency: int = 1
    since: float = 0.0

    @property
    def host(self) -> str:
        return spool.owner_host(self.owner)

    def as_json(self) -> dict[str, Any]:
        return {"owner": self.owner, "host": self.host, "seq": self.seq, "at": round(self.at, 3),
                "sees": list(self.sees), "running": list(self.running), "lease_s": self.lease_s,
                "running_lease_s": self.running_lease_s, "concurrency": self.concurrency, "since": round(self.since, 3)}


def _beat(raw: dict[str, Any]) -> Beat:
    return Beat(owner=str(raw["owner"]), seq=int(raw["seq"]), at=float(raw["at"]),
                sees=tuple(str(h) for h in raw.get("sees") or ()), running=tuple(str(t) for t in raw.get("running") or ()),
                lease_s=float(raw.get("lease_s", 300.0)), running_lease_s=float(raw.get("running_lease_s", 900.0)),
                concurrency=int(raw.get("concurrency", 1)), since=float(raw.get("since", 0.0)))


def read_beats(sp: Spool) -> list[Beat]:
    """Every heartbeat in the spool; one that is damaged or half-synced is skipped (the next one replaces it)."""
    out = []
    for owner in spool.beat_owners(sp):
        try:
            b = _beat(json.loads(spool.read_bytes(spool.beat_path(sp, owner), limit=65536)))
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if b.owner == owner:
            out.append(b)
    return out


def write_beat(sp: Spool, beat: Beat) -> None:
    """Rewrite our heartbeat: tmp + fsync + rename, by this daemon alone (no sync conflict is possible)."""
    path = spool.beat_path(sp, beat.owner)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    spool.rewrite(sp, path, (json.dumps(beat.as_json()) + "\n").encode(), sync_dir=False)


def drop_beat(sp: Spool, owner: str) -> None:
    """A clean stop: our tasks are back in the queue, so the others may take them after the handover."""
    spool.beat_path(sp, owner).unlink(missing_ok=True)


def rank(key: str, host: str) -> int:
    """Rendezvous weight of a host for a key: the same on every host, and a host's leaving moves only its keys."""
    return int.from_bytes(hashlib.blake2b(f"{host}\0{key}".encode(), digest_size=8).digest(), "big")


def owner_of(key: str, members: Sequence[str]) -> str:
    return max(members, key=lambda h: (rank(key, h), h))


@dataclass
class _Seen:
    seq: int
    changed_at: float  # our clock: when we first saw this beat, or saw it change
    beat: Beat
    dead: bool = False  # (our host's beats) its daemon was seen dead here


@dataclass(frozen=True)
class View:
    """Who owns what, as of one refresh: replaced whole, so a claim in another thread reads one consistent view."""

    host: str
    members: tuple[str, ...]
    earlier: tuple[tuple[str, ...], ...] = ()  # the members of every view that ended within a handover of now
    ready: bool = True  # every live host sees us (and our own heartbeat could be written)
    was_ready: bool = True  # ... and did in each of those views
    changed_at: float = 0.0  # when members or readiness last changed
    departed_stale: frozenset[str] = frozenset()  # hosts that left by going silent: their tasks move at once
    in_touch: bool = True  # every known host is live and sees us: the canonical result name is safe
    peers: bool = False  # another host has a heartbeat here

    @property
    def shared(self) -> bool:
        """Other hosts are on the spool, or may be (we wait to be seen): ownership decides what we take."""
        return self.peers or not self.ready

    def mine(self, key: str, handover_s: float, now: float | None = None) -> bool:
        """Whether this host may take a queued task (or a dropped file) now: it is the key's owner, and was
        in every view of the last handover_s, or that handover is over (an old owner's renames have
        arrived), or each old owner left by going silent a lease ago."""
        if not self.ready or owner_of(key, self.members) != self.host:
            return False
        now = time.time() if now is None else now
        if now - self.changed_at >= handover_s:
            return True
        return all((o == self.host and self.was_ready) or o in self.departed_stale
                   for o in {owner_of(key, members) for members in self.earlier})


@dataclass
class Membership:
    """A daemon's view of the hosts on its spool, refreshed from the heartbeats (one thread at a time).

    Times are this host's wall clock (it counts a laptop's sleep), from when this host saw a beat
    appear or change: another host's clock is never compared with ours, so clocks need not agree,
    and a beat that is old when first seen (we just started, or slept) counts as live for a lease.
    """

    host: str
    seen: dict[str, _Seen] = field(default_factory=dict)  # other hosts' beats, by owner
    ours: dict[str, _Seen] = field(default_factory=dict)  # our host's other daemons' beats, by owner
    view: View = field(init=False)
    refreshed_at: float = 0.0
    twin: str | None = None  # a daemon of another machine using our host id
    remove: list[str] = field(default_factory=list)  # beats to delete: a dead daemon's of ours, or forgotten ones

    def __post_init__(self) -> None:
        self.view = View(self.host, (self.host,))

    def refresh(self, beats: Iterable[Beat], settings: Settings, now: float | None = None, *,
                alive_here: Callable[[str], bool] = lambda owner: True, beat_ok: bool = True,
                own: tuple[str, int | None] | None = None) -> bool:
        """Fold the latest heartbeats in; True when who owns what changed. `alive_here` tells whether an owner
        of our host is a live daemon here; `beat_ok` False (our own beat could not be written) takes nothing
        while other hosts are there (they would soon count us as gone). `own`: our owner tag and the seq we
        last wrote (None: not known), to notice a machine with our host id and our pid writing our beat."""
        now = time.time() if now is None else now
        gap = bool(self.refreshed_at) and now - self.refreshed_at > settings.host_lease_s / 2  # we slept or stalled
        if gap:
            self.seen.clear()
        self.refreshed_at = now
        present, self.remove = set(), []
        for b in beats:
            if now - b.at > FORGET_S and now - self._changed(b, now) > settings.host_lease_s:
                self.remove.append(b.owner)  # silent for a day by its clock and unchanged here: forgotten
                continue
            if b.host == self.host:
                if own is not None and b.owner == own[0]:
                    if own[1] is not None and b.seq != own[1]:
                        self.twin = b.owner  # our very beat, rewritten by someone else
                else:
                    self._ours(b, now, settings, alive_here)
                continue  # our own host is live while we are; its other daemons race us by rename, locally
            present.add(b.owner)
            s = self.seen.get(b.owner)
            if s is None or s.seq != b.seq:
                self.seen[b.owner] = _Seen(b.seq, now, b)
        for gone in set(self.seen) - present:
            del self.seen[gone]
        live = [s.beat for s in self.seen.values() if now - s.changed_at <= settings.host_lease_s]
        members = tuple(sorted({self.host, *(b.host for b in live)}))
        ready = (beat_ok or not self.seen) and all(self.host in b.sees for b in live)  # alone, a beat is news to none
        known = {s.beat.host for s in self.seen.values()}
        old = self.view
        in_touch = not gap and ready and known <= set(members)
        if members == old.members and ready == old.ready:
            self.view = replace(old, in_touch=in_touch, peers=bool(self.seen))
            return False
        stale = frozenset(h for h in old.members if h not in members and any(s.beat.host == h for s in self.seen.values()))
        if now - old.changed_at < settings.handover_s:  # a change within a handover: every view in it counts
            earlier, was_ready = (*old.earlier, old.members), old.was_ready and old.ready
            stale = (stale | old.departed_stale) - set(members)  # a host back since is no longer gone
        else:
            earlier, was_ready = (old.members,), old.ready
        self.view = View(self.host, members, earlier=earlier, ready=ready, was_ready=was_ready, changed_at=now,
                         departed_stale=stale, in_touch=in_touch, peers=bool(self.seen))
        log.info("hosts on the spool: %s%s", ", ".join(members),
                 "" if ready else " (waiting until every live host sees this one)")
        return True

    def _changed(self, b: Beat, now: float) -> float:
        s = self.seen.get(b.owner) or self.ours.get(b.owner)
        return s.changed_at if s is not None and s.seq == b.seq else now

    def _ours(self, b: Beat, now: float, settings: Settings, alive_here: Callable[[str], bool]) -> None:
        """A beat under our host id: a daemon of ours (live, or dead and then removed once unchanged for a
        lease), or, if it keeps changing while no such daemon lives here, another machine using our id."""
        s = self.ours.get(b.owner)
        if alive_here(b.owner):
            self.ours[b.owner] = _Seen(b.seq, now, b)  # (a daemon of ours that dies between beats is not a twin)
        elif s is None or not s.dead:
            self.ours[b.owner] = _Seen(b.seq, now, b, dead=True)  # first seen dead: its last beat, from now on
        elif s.seq != b.seq:
            self.twin = b.owner  # it changed after its daemon was seen dead here: another machine writes it
        elif now - s.changed_at > settings.host_lease_s:
            self.remove.append(b.owner)
            del self.ours[b.owner]

    def handover_ends(self, settings: Settings) -> float:
        """When the handover after the last change ends (tasks that moved to us may be taken then)."""
        return self.view.changed_at + settings.handover_s

    def silent_for(self, host: str, now: float | None = None) -> float | None:
        """How long since any heartbeat of a host changed, as seen here; None if it has none (it never beat,
        or it stopped cleanly)."""
        now = time.time() if now is None else now
        times = [s.changed_at for s in list(self.seen.values()) if s.beat.host == host]
        return now - max(times) if times else None

    def beat(self, owner: str, seq: int, settings: Settings, running: Iterable[str], since: float) -> Beat:
        return Beat(owner=owner, seq=seq, at=time.time(), sees=self.view.members, running=tuple(sorted(running)),
                    lease_s=settings.host_lease_s, running_lease_s=settings.running_lease_s,
                    concurrency=settings.concurrency, since=since)


@dataclass(frozen=True)
class HostStatus:
    host: str
    owners: tuple[str, ...]
    age_s: float  # since its newest heartbeat, by its own clock
    live: bool
    running: tuple[str, ...]
    lease_s: float
    running_lease_s: float


def host_status(sp: Spool, now: float | None = None) -> list[HostStatus]:
    """The hosts on the spool for `spoold status`, from heartbeats alone (a one-shot reader has no memory)."""
    now = time.time() if now is None else now
    by_host: dict[str, list[Beat]] = {}
    for b in read_beats(sp):
        by_host.setdefault(b.host, []).append(b)
    out = []
    for host, beats in sorted(by_host.items()):
        newest = max(beats, key=lambda b: b.at)
        age = max(0.0, now - newest.at)
        out.append(HostStatus(host, tuple(b.owner for b in beats), age, age <= newest.lease_s,
                              tuple(sorted({t for b in beats for t in b.running})), newest.lease_s,
                              newest.running_lease_s))
    return out

