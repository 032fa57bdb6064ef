"""Real sync engines on loopback, for tests of several hosts sharing one spool.

A spool shared by a file-sync tool sees what no single-host test shows: files that arrive late,
renames that arrive as a delete and a create, conflict copies, a host cut off for a while.  These
helpers start the real tools a user would run, confined to 127.0.0.1 and to private directories:

    hosts, sync = start_hosts("syncthing", tmp_path, 3, local_dirs=["tmp"])   # or "unison"
    with sync:
        (hosts[0] / "x").write_text("1")
        sync.wait_synced()     # in step everywhere, trees equal (tmp/ left out)
        sync.pause(2)          # host 2 cut off from the others (it keeps its own changes)
        ...
        sync.resume(2)

or, engine by engine, `start_syncthing(base, folders, ignore_lines=[...])` (one instance per
folder, each connected to all others) and `start_unison(folders, ignore=[...])` (a star: folder
0 is the hub, one `unison -repeat` process per other folder).  tree() and conflict_copies() read a
host's folder for assertions.

Each engine's processes are stopped by their pids (SIGTERM, then SIGKILL) on `stop()`, which is
safe to call twice; each logs to a file under its private directory, whose tail goes into every
failure message.  Waiting polls the engines themselves (Syncthing's REST API, Unison's pass
reports on stdout), never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POLL_S = 0.2  # external processes: polling their API this often costs them little

# Names the engines keep inside a synced folder for themselves; never part of a host's tree.
_INTERNAL = re.compile(
    r"(^|/)(\.stfolder(/|$)|\.stignore$|\.stversions(/|$)|\.syncthing\..*\.tmp$|~syncthing~.*\.tmp$"
    r"|\.unison\.[^/]*$)"
)
# Syncthing: NAME.sync-conflict-20260101-120000-ABCDEFG.EXT; Unison (-copyonconflict):
# "NAME (conflict_on_2026-01-01).EXT", "NAME (conflict #1_on_2026-01-01).EXT", and an edit that lost to a
# deletion: "NAME (conflict_on_2026-01-01_was_deleted).EXT".
_CONFLICT = re.compile(r"\.sync-conflict-\d{8}-\d{6}-[A-Z2-7]{7}|\ \(conflict(\ \#\d+)?_on_\d{4}-\d{2}-\d{2}(_was_deleted)?\)")


def internal(rel: str) -> bool:
    """True for an engine's own bookkeeping file (markers, ignore files, temporaries)."""
    return bool(_INTERNAL.search(rel))


def tree(folder: Path, skip: Callable[[str], bool] | None = None) -> dict[str, bytes]:
    """A host's files as {relative posix path: content}, without the engines' own files or what `skip` says.

    Files only: directories are implied by their files (neither engine is asked to keep empty ones
    in step here).  A file that vanishes while being read (an engine's temporary) is left out."""
    out: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath, name)
            rel = p.relative_to(folder).as_posix()
            if internal(rel) or (skip is not None and skip(rel)):
                continue
            try:
                out[rel] = p.read_bytes()
            except (FileNotFoundError, IsADirectoryError):
                pass
    return out


def conflict_copies(folder: Path) -> list[str]:
    """Relative paths of Syncthing's `.sync-conflict-…` and Unison's `(conflict…_on_…)` copies."""
    return sorted(rel for rel in tree(folder) if _CONFLICT.search(rel.rsplit("/", 1)[-1]))


def tree_differences(trees: dict[int, dict[str, bytes]]) -> dict[str, list[int]]:
    """Paths whose content is not the same on every host, each with the hosts that hold it."""
    paths = sorted(set().union(*trees.values())) if trees else []
    diff = {}
    for rel in paths:
        values = {t.get(rel) for t in trees.values()}
        if len(values) > 1:
            diff[rel] = [i for i, t in trees.items() if rel in t]
    return diff


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open together, so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def _private_env(home: Path, **extra: str) -> dict[str, str]:
    """A child's environment: its own HOME and XDG dirs (nothing read from or written to the user's), no proxy."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local/share"),
               XDG_STATE_HOME=str(home / ".local/state"), XDG_CACHE_HOME=str(home / ".cache"), LANG="C.UTF-8", **extra)
    return env


def _stop_procs(procs: Iterable[subprocess.Popen[bytes] | None], timeout: float = 10.0) -> None:
    """SIGTERM each process by its pid (all at once: each takes a moment to shut down), SIGKILL any that
    lingers past `timeout`, and reap them all."""
    live = [p for p in procs if p is not None]
    for p in live:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait()


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (for asserting that stop() really stopped something)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------
# Syncthing

# Everything that would reach past loopback or phone home, off before the first start; and
# quick reconnection after a pause.  Written into config.xml because Syncthing acts on these
# the moment it starts (announcing, listening on 0.0.0.0:22000), before any REST call could.
_ST_OPTIONS = {
    "globalAnnounceEnabled": "false",
    "localAnnounceEnabled": "false",
    "relaysEnabled": "false",
    "natEnabled": "false",
    "urAccepted": "-1",
    "urInitialDelayS": "86400",
    "crashReportingEnabled": "false",
    "autoUpgradeIntervalH": "0",
    "startBrowser": "false",
    "announceLANAddresses": "false",
    "reconnectionIntervalS": "5",  # the least Syncthing 1.19 accepts (it raises 1 to 5)
    "stunKeepaliveStartS": "0",
    "progressUpdateIntervalS": "-1",
}

# The shared folder, identical on every instance: watcher-driven with the shortest delay, a
# frequent rescan as a safety net, quick retries after a failed pull, every conflict kept.
ST_FOLDER = {
    "type": "sendreceive",
    "fsWatcherEnabled": True,
    "fsWatcherDelayS": 1,
    "rescanIntervalS": 10,
    "pullerPauseS": 1,
    "order": "alphabetic",
    "maxConflicts": -1,
    "ignorePerms": False,
    "ignoreDelete": False,
    "modTimeWindowS": 0,
    "paused": False,
}


@dataclass
class SyncthingNode:
    """One Syncthing instance: its home (config, keys, database, log) and the folder it shares."""

    index: int
    home: Path
    folder: Path
    device_id: str
    api_key: str
    api_port: int
    listen_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.listen_port}"


class SyncthingError(AssertionError):
    pass


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class SyncthingCluster:
    """N Syncthing instances on loopback sharing one folder id; see start_syncthing()."""

    nodes: list[SyncthingNode]
    folder_id: str
    paused: set[int] = field(default_factory=set)
    skip: Callable[[str], bool] | None = None  # paths tests leave out of tree comparisons by default
    resumptions: int = 0

    # -- plumbing ---------------------------------------------------------------------------

    def rest(self, i: int, method: str, path: str, body: object = None, timeout: float = 10.0, **query: str) -> Any:
        """One REST call to instance i; the decoded JSON answer (None for an empty one)."""
        node = self.nodes[i]
        url = f"http://127.0.0.1:{node.api_port}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={"X-API-Key": node.api_key})
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with _NO_PROXY.open(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise SyncthingError(f"{method} {path} {query} on instance {i}: HTTP {e.code} {e.read()[:300]!r}") from None
        return json.loads(raw) if raw.strip() else None

    def logs(self) -> str:
        """The tail of every instance's log, for failure messages."""
        return "\n".join(f"--- syncthing {n.index} ({n.log_path}):\n{_tail(n.log_path)}" for n in self.nodes)

    def fail(self, message: str) -> SyncthingError:
        return SyncthingError(f"{message}\n{self.logs()}")

    def _check_alive(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is not None:
                raise self.fail(f"syncthing {n.index} exited with {n.proc.returncode}")

    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes]

    def active(self) -> list[int]:
        """The instances not cut off by pause()."""
        return [n.index for n in self.nodes if n.index not in self.paused]

    # -- state ------------------------------------------------------------------------------

    def connected(self, i: int) -> set[int]:
        """The instances that instance i has a live connection to."""
        conns = self.rest(i, "GET", "/rest/system/connections")["connections"]
        by_id = {n.device_id: n.index for n in self.nodes}
        return {by_id[d] for d, c in conns.items() if d in by_id and c.get("connected")}

    def status(self, i: int) -> dict[str, Any]:
        return self.rest(i, "GET", "/rest/db/status", folder=self.folder_id)

    def completion(self, i: int, j: int) -> dict[str, Any]:
        """How complete instance i believes instance j's copy of the folder is."""
        return self.rest(i, "GET", "/rest/db/completion", folder=self.folder_id, device=self.nodes[j].device_id)

    def scan(self, i: int) -> None:
        """Have instance i rescan now (returns when the scan is done), so a test need not wait on the watcher."""
        self.rest(i, "POST", "/rest/db/scan", timeout=60, folder=self.folder_id)

    def _unsynced(self, among: list[int]) -> tuple[str | None, dict[int, dict[str, Any]]]:
        """Why `among` are not in step yet (None when they are), and each one's folder status."""
        statuses: dict[int, dict[str, Any]] = {}
        for i in among:
            links = self.connected(i)
            missing = [j for j in among if j != i and j not in links]
            if missing:
                return f"instance {i} not connected to {missing}", statuses
            st = self.status(i)
            statuses[i] = st
            if st["state"] != "idle":
                return f"instance {i} is {st['state']}", statuses
            if st.get("pullErrors") or st.get("errors") or st.get("error"):
                errors = self.rest(i, "GET", "/rest/folder/errors", folder=self.folder_id)
                return f"instance {i} has errors: {st.get('error')!r} {errors}", statuses
            if st["needTotalItems"]:
                return f"instance {i} needs {st['needTotalItems']} items", statuses
            for j in among:
                if j != i:
                    c = self.completion(i, j)
                    if c["completion"] < 100 or c["needItems"] or c["needDeletes"]:
                        return f"instance {i} sees instance {j} at {c['completion']:.1f}% ({c['needItems']} items, {c['needDeletes']} deletes needed)", statuses
        globals_ = {(s["globalFiles"], s["globalDirectories"], s["globalDeleted"], s["globalBytes"]) for s in statuses.values()}
        if len(globals_) > 1:
            return f"instances disagree on the global state: {globals_}", statuses
        return None, statuses

    def _local_only(self, i: int, rel: str) -> bool:
        """True if instance i keeps `rel` to itself: its index does not have it, or has it as ignored."""
        try:
            info = self.rest(i, "GET", "/rest/db/file", folder=self.folder_id, file=rel)
        except SyncthingError as e:
            if "404" in str(e):
                return True
            raise
        local = info.get("local") or {}
        return bool(local.get("ignored") or local.get("invalid"))

    def tree_differences(self, among: list[int], skip: Callable[[str], bool] | None = None) -> dict[str, list[int]]:
        """Paths not the same on all of `among`, leaving out what Syncthing itself keeps local (ignored)."""
        diff = tree_differences({i: tree(self.nodes[i].folder, skip) for i in among})
        return {rel: holders for rel, holders in diff.items()
                if not all(self._local_only(i, rel) for i in holders)}

    def wait_synced(self, timeout: float = 30.0, skip: Callable[[str], bool] | None = None,
                    among: Iterable[int] | None = None) -> None:
        """Block until `among` (default: every instance not paused) are in step.

        In step: each one connected to the others, its folder idle with nothing needed and no pull
        errors, each sure the others are 100% complete, all agreeing on the global state, a fresh
        rescan everywhere finding nothing new, and the files on disk equal (outside `skip`, by
        default the cluster's, and what Syncthing ignores).  Each instance is made to rescan
        first, so a change a test just made is seen at once rather than after the watcher's delay."""
        idx = sorted(self.active() if among is None else among)
        skip = self.skip if skip is None else skip
        deadline = time.monotonic() + timeout
        why: str | None = "not checked"
        for i in idx:
            self.scan(i)
        while True:
            self._check_alive()
            why, statuses = self._unsynced(idx)
            if why is None:
                before = {i: s["sequence"] for i, s in statuses.items()}
                for i in idx:
                    self.scan(i)
                why, statuses = self._unsynced(idx)
                if why is None:
                    after = {i: s["sequence"] for i, s in statuses.items()}
                    if after != before:
                        why = f"a rescan found changes ({before} -> {after})"
                    else:
                        diff = self.tree_differences(idx, skip)
                        if not diff:
                            return
                        why = f"trees differ: {dict(list(diff.items())[:10])}"
            if time.monotonic() > deadline:
                raise self.fail(f"instances {idx} not in step after {timeout} s: {why}")
            time.sleep(POLL_S)

    def wait_links(self, timeout: float = 30.0) -> None:
        """Block until every pair of instances that pause() has not cut is connected, and every cut pair is not."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            wrong = []
            for n in self.nodes:
                want = {j for j in self.active() if j != n.index} if n.index not in self.paused else set()
                have = self.connected(n.index)
                if have != want:
                    wrong.append(f"{n.index}: connected to {sorted(have)}, want {sorted(want)}")
            if not wrong:
                return
            if time.monotonic() > deadline:
                raise self.fail(f"connections not as wanted after {timeout} s: {'; '.join(wrong)}")
            time.sleep(POLL_S)

    # -- partitions -------------------------------------------------------------------------

    def pause(self, i: int) -> None:
        """Cut instance i off from all others (each side pauses the other device); i keeps scanning its folder."""
        self.paused.add(i)
        for j in range(len(self.nodes)):
            if j != i:
                # The dialing side first: paused, it does not redial the moment the other side drops
                # the connection, a dial that would be refused and leave the address to the
                # reconnection timer (5 s) for when the pair is resumed.
                dialer, listener = (i, j) if _dials(i, j) else (j, i)
                self.rest(dialer, "POST", "/rest/system/pause", device=self.nodes[listener].device_id)
                self.rest(listener, "POST", "/rest/system/pause", device=self.nodes[dialer].device_id)
        self.wait_links()

    def resume(self, i: int) -> None:
        """Reconnect instance i to every instance not itself paused; returns once connected.

        Instance i rescans first, as a host away for longer than its watcher's delay would have:
        what it did while cut off is in its index before it hears what the others did."""
        self.scan(i)
        self.paused.discard(i)
        for j in self.active():
            if j != i:
                # The listening side first: the dialer dials the moment it is resumed, and a dial
                # refused by a still-paused device waits for the reconnection timer.
                dialer, listener = (i, j) if _dials(i, j) else (j, i)
                self.rest(listener, "POST", "/rest/system/resume", device=self.nodes[dialer].device_id)
                # Syncthing 1.19 dials a resumed device at once only 3 times in 2 minutes (a dropped
                # connection also counts), otherwise when the address's reconnection timer (at
                # least 5 s) runs out.  An address it has never dialed it dials at once: so each
                # resumption spells the same address anew (the query is ignored when dialing).
                self.resumptions += 1
                address = f"{self.nodes[listener].address}?resumption={self.resumptions}"
                self.rest(dialer, "PATCH", f"/rest/config/devices/{self.nodes[listener].device_id}",
                          {"paused": False, "addresses": [address]})
        self.wait_links()

    # -- lifetime ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every instance by its pid and reap it; safe to call again."""
        _stop_procs(n.proc for n in self.nodes)

    def __enter__(self) -> SyncthingCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _dials(i: int, j: int) -> bool:
    """Whether instance i dials instance j: in each pair only the lower index does.  The other knows
    the address as "dynamic", which with discovery off means never dialing.  When two Syncthing
    1.19 instances dial each other at the same moment, each can wait on the Hello of the connection
    the other has not got to yet (one connection is handled at a time): 20 s lost to the Hello
    timeout, seen in about one start in five here."""
    return i < j


def _st_env(home: Path) -> dict[str, str]:
    """No default folder, no upgrades, no monitor process; one core each and no hashing benchmark at start
    (STHASHING picks the implementation, which skips the second of CPU the benchmark costs)."""
    return _private_env(home, STNODEFAULTFOLDER="1", STNOUPGRADE="1", STNORESTART="1", GOMAXPROCS="1",
                        STHASHING="minio")


def _generate(home: Path, env: dict[str, str]) -> str:
    """Keys and a default config in `home`; the new device id."""
    out = subprocess.run(["syncthing", "generate", f"--home={home}", "--no-default-folder"],
                         capture_output=True, text=True, env=env, timeout=60)
    m = re.search(r"Device ID: ([A-Z0-9-]{63})", out.stdout + out.stderr)
    if out.returncode or not m:
        raise SyncthingError(f"syncthing generate failed ({out.returncode}): {out.stdout}{out.stderr}")
    return m.group(1)


def _confine_config(config: Path, api_port: int, listen_port: int) -> str:
    """Loopback-only GUI and listener, no discovery, relays, NAT, reporting or upgrades; the API key."""
    doc = ET.parse(config)
    root = doc.getroot()
    gui = root.find("gui")
    options = root.find("options")
    assert gui is not None and options is not None
    _set(gui, "address", f"127.0.0.1:{api_port}")
    api_key = gui.findtext("apikey") or secrets.token_urlsafe(24)
    _set(gui, "apikey", api_key)
    for tag in ("listenAddress", "globalAnnounceServer", "stunServer"):
        for el in options.findall(tag):
            options.remove(el)
    ET.SubElement(options, "listenAddress").text = f"tcp://127.0.0.1:{listen_port}"
    for tag, value in _ST_OPTIONS.items():
        _set(options, tag, value)
    doc.write(config)
    return api_key


def _set(parent: ET.Element, tag: str, text: str) -> None:
    el = parent.find(tag)
    if el is None:
        el = ET.SubElement(parent, tag)
    el.text = text


def start_syncthing(base: Path, folders: list[Path], *, folder_id: str = "spool", ignore_lines: list[str] | None = None,
                    rescan_s: int = 10, watcher_delay_s: int = 1, folder_settings: dict[str, Any] | None = None,
                    skip: Callable[[str], bool] | None = None, timeout: float = 60.0) -> SyncthingCluster:
    """Start one Syncthing per folder (homes under `base`), all sharing `folder_id`, and wait until in step.

    Devices are added by explicit loopback address, the folder on every instance by REST (ST_FOLDER,
    then `folder_settings` over it); `ignore_lines` become each folder's `.stignore` before
    Syncthing first looks at it.  `skip` is wait_synced()'s default for comparing trees."""
    if shutil.which("syncthing") is None:
        raise SyncthingError("syncthing is not on PATH")
    base.mkdir(parents=True, exist_ok=True)
    ports = free_ports(2 * len(folders))
    nodes = []
    for i, folder in enumerate(folders):
        home = base / f"st{i}"
        home.mkdir(parents=True, exist_ok=True)
        env = _st_env(home)
        device_id = _generate(home, env)
        api_key = _confine_config(home / "config.xml", ports[2 * i], ports[2 * i + 1])
        nodes.append(SyncthingNode(i, home, folder, device_id, api_key, ports[2 * i], ports[2 * i + 1],
                                   home / "syncthing.log"))
        folder.mkdir(parents=True, exist_ok=True)
        if ignore_lines is not None:
            (folder / ".stignore").write_text("".join(line + "\n" for line in ignore_lines))
    cluster = SyncthingCluster(nodes, folder_id, skip=skip)
    try:
        for n in nodes:
            env = _st_env(n.home)
            with open(n.log_path, "ab") as log:
                # --no-restart: one process (no monitor parent), so its pid is the one to stop.
                n.proc = subprocess.Popen(
                    ["syncthing", "serve", f"--home={n.home}", "--no-browser", "--no-restart", "--no-upgrade",
                     "--logflags=6", "--logfile=-"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=n.home)
        deadline = time.monotonic() + timeout
        for n in nodes:
            while True:
                cluster._check_alive()
                try:
                    cluster.rest(n.index, "GET", "/rest/system/ping", timeout=2)
                    break
                except (OSError, SyncthingError):
                    if time.monotonic() > deadline:
                        raise cluster.fail(f"syncthing {n.index}'s REST API not up after {timeout} s") from None
                    time.sleep(POLL_S)
        # Listeners learn of their dialers before the dialers start dialing (see _dials), so no first
        # dial is turned away as from an unknown device and left to the reconnection timer.
        for n in reversed(nodes):
            cluster.rest(n.index, "PATCH", f"/rest/config/devices/{n.device_id}", {"name": f"host{n.index}"})
            for other in nodes:
                if other is not n:
                    cluster.rest(n.index, "PUT", f"/rest/config/devices/{other.device_id}", {
                        "deviceID": other.device_id, "name": f"host{other.index}",
                        "addresses": [other.address] if _dials(n.index, other.index) else ["dynamic"],
                        "autoAcceptFolders": False, "compression": "metadata", "paused": False})
        for n in nodes:
            cluster.rest(n.index, "PUT", f"/rest/config/folders/{folder_id}", {
                **ST_FOLDER, "id": folder_id, "label": folder_id, "path": str(n.folder),
                "rescanIntervalS": rescan_s, "fsWatcherDelayS": watcher_delay_s, **(folder_settings or {}),
                "devices": [{"deviceID": m.device_id} for m in nodes]})
        cluster.wait_links(timeout=max(1.0, deadline - time.monotonic()))
        cluster.wait_synced(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        cluster.stop()
        raise
    return cluster


# ---------------------------------------------------------------------------------------------
# Unison


@dataclass
class UnisonPass:
    """One pass of `unison -repeat`, timed by when its report lines arrived."""

    started: float
    ended: float | None = None
    changed: bool = True  # anything but "Nothing to do" counts as a change (conservative)
    summary: str = ""


@dataclass
class UnisonSpoke:
    """One `unison HUB SPOKE -repeat N` process; `index` is the spoke's folder index (1..n-1)."""

    index: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    passes: list[UnisonPass] = field(default_factory=list)
    reader: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class UnisonError(AssertionError):
    pass


@dataclass
class UnisonLoop:
    """Folders kept in step by Unison as a star: folder 0 is the hub, one process per other folder."""

    folders: list[Path]
    state_dir: Path
    args: list[str]
    spokes: dict[int, UnisonSpoke]
    paused: set[int] = field(default_factory=set)
    ignore: list[str] = field(default_factory=list)
    skip: Callable[[str], bool] | None = None  # paths tests leave out of tree comparisons by default
    all_pids: list[int] = field(default_factory=list)  # every process ever started, for asserting all are gone

    def _env(self) -> dict[str, str]:
        return _private_env(self.state_dir / "home", UNISON=str(self.state_dir / "unison"), UNISONLOCALHOSTNAME="spoold-test")

    def _start(self, spoke: UnisonSpoke) -> None:
        log = open(spoke.log_path, "ab")
        cmd = ["unison", str(self.folders[0]), str(self.folders[spoke.index]), *self.args,
               "-logfile", str(self.state_dir / f"unison-{spoke.index}.actions.log")]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=self._env(), cwd=self.state_dir)
        spoke.proc = proc
        self.all_pids.append(proc.pid)
        spoke.reader = threading.Thread(target=self._read, args=(spoke, proc, log), daemon=True)
        spoke.reader.start()

    @staticmethod
    def _read(spoke: UnisonSpoke, proc: subprocess.Popen[bytes], log: Any) -> None:
        """Log the process's output and time its passes by the lines that open and close each."""
        assert proc.stdout is not None
        with log:
            for raw in proc.stdout:
                now = time.monotonic()
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace")
                with spoke.lock:
                    current = spoke.passes[-1] if spoke.passes and spoke.passes[-1].ended is None else None
                    if "Looking for changes" in line:
                        spoke.passes.append(UnisonPass(started=now))
                    elif current is not None and ("Nothing to do" in line or "Synchronization " in line):
                        current.ended = now
                        current.changed = "Nothing to do" not in line
                        current.summary = line.strip()

    def logs(self) -> str:
        return "\n".join(f"--- unison spoke {s.index} ({s.log_path}):\n{_tail(s.log_path)}" for s in self.spokes.values())

    def fail(self, message: str) -> UnisonError:
        return UnisonError(f"{message}\n{self.logs()}")

    def running(self) -> list[UnisonSpoke]:
        return [s for s in self.spokes.values() if s.proc is not None]

    def active(self) -> list[int]:
        """Folders currently kept in step: the hub and its running spokes (none while the hub is paused)."""
        spokes = [s.index for s in self.running()]
        return [0, *spokes] if spokes else ([] if 0 in self.paused else [0])

    def pids(self) -> list[int]:
        return [s.pid for s in self.running()]

    def wait_synced(self, timeout: float = 30.0, skip: Callable[[str], bool] | None = None,
                    compare_trees: bool | None = None) -> None:
        """Block until the hub and every running spoke are in step.

        In step: after the later of this call and the end of the last pass that changed anything
        (on any spoke), every running spoke has begun and finished a pass that found nothing to
        do.  Nothing can change after that: a change is made only by a test (before this call) or
        by a pass that found something.  Then the trees must be equal, outside `skip` (default:
        the loop's); with ignore patterns and no `skip` at all they are not compared, as Unison's
        patterns are not re-implemented here."""
        called = time.monotonic()
        deadline = called + timeout
        skip = self.skip if skip is None else skip
        compare = (not self.ignore or skip is not None) if compare_trees is None else compare_trees
        why = ""
        while True:
            spokes = self.running()
            if not spokes:
                return  # everything paused: nothing is being kept in step
            for s in spokes:
                assert s.proc is not None
                if s.proc.poll() is not None:
                    raise self.fail(f"unison spoke {s.index} exited with {s.proc.returncode}")
            with contextlib.ExitStack() as stack:
                for s in spokes:
                    stack.enter_context(s.lock)
                ends = [p.ended for s in spokes for p in s.passes if p.changed and p.ended is not None]
                since = max([called, *ends])
                behind = [s.index for s in spokes
                          if not any(not p.changed and p.ended is not None and p.started > since for p in s.passes)]
            if not behind:
                if not compare:
                    return
                diff = tree_differences({i: tree(self.folders[i], skip) for i in self.active()})
                if not diff:
                    return
                why = f"passes quiet but trees differ: {dict(list(diff.items())[:10])}"
                called = time.monotonic()  # look again after a further quiet pass
            else:
                why = f"spokes {behind} have not had a quiet pass since the last change"
            if time.monotonic() > deadline:
                raise self.fail(f"unison not in step after {timeout} s: {why}")
            time.sleep(POLL_S)

    def pause(self, i: int) -> None:
        """Cut folder i off: stop its spoke's process (for the hub, every spoke's)."""
        self.paused.add(i)
        self._halt([s for s in self.spokes.values() if s.index == i or i == 0])

    def _halt(self, spokes: list[UnisonSpoke]) -> None:
        """Stop these spokes' processes; a pass cut short counts as one that changed something
        (it may have propagated part of its work without recording it in its archive)."""
        _stop_procs(s.proc for s in spokes)
        now = time.monotonic()
        for s in spokes:
            s.proc = None
            if s.reader is not None:
                s.reader.join(5)
            with s.lock:
                for p in s.passes:
                    if p.ended is None:
                        p.ended, p.changed, p.summary = now, True, "stopped mid-pass"

    def resume(self, i: int) -> None:
        """Reconnect folder i: restart the processes that neither it nor the hub being paused holds back."""
        self.paused.discard(i)
        for s in self.spokes.values():
            if s.proc is None and s.index not in self.paused and 0 not in self.paused:
                self._start(s)

    def stop(self) -> None:
        """Stop every process by its pid and reap it; safe to call again."""
        self._halt(list(self.spokes.values()))

    def __enter__(self) -> UnisonLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# What a user running Unison continuously would set: no questions, modification times kept,
# the newer side wins a conflict and the loser is kept as a conflict copy.  `-repeat watch`
# needs unison-fsmonitor, which Debian's unison package does not ship: the loop polls instead.
UNISON_ARGS = ["-batch", "-auto", "-times", "-prefer", "newer", "-copyonconflict", "-ui", "text", "-dumbtty",
               "-contactquietly"]


def start_unison(folders: list[Path], *, state_dir: Path | None = None, interval_s: float = 1.0,
                 ignore: Iterable[str] = (), extra_args: Iterable[str] = (), skip: Callable[[str], bool] | None = None,
                 timeout: float = 60.0) -> UnisonLoop:
    """Keep `folders` in step with `unison -repeat`: folder 0 is the hub, one process per other folder.

    `ignore` holds Unison patterns ("Name tmp", "Path running/*.partial", "Regex …"), given to every
    process.  Unison's archives and logs live in `state_dir` (default: next to the hub), never ~/.unison.
    `interval_s` is rounded up to whole seconds (Unison's -repeat takes an integer).  `skip` is
    wait_synced()'s default for comparing trees.  Returns once the first passes have brought the
    folders in step."""
    if len(folders) < 2:
        raise ValueError("unison needs at least two folders")
    if shutil.which("unison") is None:
        raise UnisonError("unison is not on PATH")
    state = state_dir or folders[0].parent / "unison-state"
    for d in (state / "unison", state / "home", *folders):
        d.mkdir(parents=True, exist_ok=True)
    patterns = list(ignore)
    args = [*UNISON_ARGS, "-repeat", str(max(1, -int(-interval_s // 1))), *extra_args]
    for pattern in patterns:
        args += ["-ignore", pattern]
    spokes = {i: UnisonSpoke(i, state / f"unison-{i}.log") for i in range(1, len(folders))}
    loop = UnisonLoop(list(folders), state, args, spokes, ignore=patterns, skip=skip)
    try:
        for s in spokes.values():
            loop._start(s)
        loop.wait_synced(timeout)
    except BaseException:
        loop.stop()
        raise
    return loop



# ---------------------------------------------------------------------------------------------
# Either engine

ENGINES = ("syncthing", "unison")
Engine = SyncthingCluster | UnisonLoop


def start_hosts(engine: str, base: Path, n: int = 3, *, local_dirs: Iterable[str] = ("tmp",),
                timeout: float = 60.0) -> tuple[list[Path], Engine]:
    """n empty host folders under `base` kept in step by `engine` ("syncthing" or "unison"), with
    the top-level directories `local_dirs` left unsynced on each host (a spool's tmp/).

    The same scenario can then run on both engines; both answer wait_synced(timeout, skip),
    pause(i), resume(i), active(), pids() and stop()."""
    dirs = [d.strip("/") for d in local_dirs]
    hosts = [base / f"host{i}" for i in range(n)]
    for h in hosts:
        h.mkdir(parents=True, exist_ok=True)
    skip = (lambda rel: any(rel == d or rel.startswith(d + "/") for d in dirs)) if dirs else None
    if engine == "syncthing":
        return hosts, start_syncthing(base / "engine", hosts, ignore_lines=[f"/{d}" for d in dirs], skip=skip,
                                      timeout=timeout)
    if engine == "unison":
        return hosts, start_unison(hosts, state_dir=base / "engine", ignore=[f"Path {d}" for d in dirs], skip=skip,
                                   timeout=timeout)
    raise ValueError(f"unknown sync engine {engine!r}; known: {ENGINES}")
