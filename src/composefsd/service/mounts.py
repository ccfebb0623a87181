"""Which images of a repository are in use: its composefs mounts in every mount
namespace, and pins.

GC must never remove an image, or an object of an image, that is mounted. What
counts as mounted, for :meth:`MountTracker.in_use`, is always a mount *of that
repository*: the same image mounted from another repository on the machine does
not hold this one's copy (:func:`composefsd.kernel.repomount.is_repository_mount`
decides, by the mount's data-only layer being the repository's ``objects/``).

* **Attached mounts**, in *any* mount namespace: every ``/proc/PID/mountinfo``
  this process may read, one per namespace (``/proc/PID/ns/mnt``), is parsed for
  ``composefs:<digest>`` sources, and the layer paths it shows are looked up below
  ``/proc/PID/root``. Nothing needs remembering for these: a daemon
  that restarts sees them again, whoever made them (``Mount`` with ``where``,
  ``composefsctl mount``, ``mount.composefs``, a container runtime in its own
  namespace).
* **Detached mounts handed out** (``Mount`` without ``where``): the client holds a
  mount fd it may attach later, somewhere we cannot see, or use as it is. Each one
  is recorded as a *pin*, a small JSON file
  ``<runtime dir>/pins/<digest>/<mount id>-<nanoseconds>`` (runtime dir:
  ``/run/composefsd`` for root, ``$XDG_RUNTIME_DIR/composefsd`` otherwise, else
  ``/tmp/composefsd-<uid>``; only a directory no other user can change is used,
  see :mod:`composefsd.service.runtime`), written *before* the fd leaves, so a
  restarted daemon still honours it. The pin names the repository's ``objects/``
  directory (path, device, inode): daemons of other repositories share the
  directory and ignore it (a pin without one, of an older daemon, counts for
  every repository). A pin stays live

  - for :data:`PIN_GRACE` seconds after it was made, whatever happens (the fd
    may sit in a socket buffer, where no process table shows it), and after that
  - as long as its mount id still shows up: as a composefs mount of that digest in
    some namespace's mountinfo (it was attached), or as the ``mnt_id`` of an open
    fd of some process (``/proc/PID/fdinfo``: the mount fd itself, or any file
    opened through it, since those all sit on that mount).

  A pin of another boot (``bootId`` differs) is dead. A dead pin is removed when
  it is next looked at (GC, RemoveImage, start-up). The kernel hands a freed
  ``mnt_id`` to the next mount made, anywhere on the system, so an fd whose
  fdinfo shows the pin's id is only taken as holding it if the mount it is on
  has the pin's unique mount id too (``mountIdUnique``, statx
  ``STATX_MNT_ID_UNIQUE``, Linux 6.8); a pin without one (an older kernel)
  errs on the safe side and stays while its id is seen. Reading another
  process's fdinfo needs ptrace access (root with CAP_SYS_PTRACE, or the same
  uid and no capabilities we lack): while the process a mount was handed to is
  alive and hidden from us, its pin is kept;
  other hidden processes are assumed not to hold it. What this cannot see, once
  the grace period is over: a process whose only hold on a detached mount is its
  working directory or a memory mapping, and a hidden process the fd was passed
  on to.

Racing a GC against a mount in flight (resolved, mounted, not yet attached or
pinned) is prevented by a gate: ``Mount`` holds it shared from before it resolves
the image until the mount is attached or pinned, and ``GarbageCollect`` and
``RemoveImage`` hold it exclusively while they decide what is in use and act on
it. Every method of this class is thread-safe.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import select
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from composefsd.dirs import make_dir
from composefsd.kernel.mountinfo import (
    ComposefsMount,
    composefs_mounts,
    list_composefs_mounts,
    parse_mountinfo,
)
from composefsd.kernel.repomount import ObjectsDirectory, is_repository_mount
from composefsd.kernel.syscalls import unique_mount_id
from composefsd.repository import Repository
from composefsd.service.runtime import default_runtime_dir, secure_directory

__all__ = [
    "PIN_GRACE",
    "MountTracker",
    "NamespaceMount",
    "Pin",
    "mount_id_of_fd",
]

log = logging.getLogger(__name__)

#: Seconds a pin of a detached mount is honoured whatever the liveness scan says.
PIN_GRACE = 300.0
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}|[0-9a-f]{128}")
_PIN_NAME = re.compile(r"([0-9]+)-([0-9]+)")
_TMP_PREFIX = ".tmp-"


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return None


def _fdinfo_mount_id(text: str) -> int | None:
    for line in text.splitlines():
        if line.startswith("mnt_id:"):
            try:
                return int(line[7:].strip())
            except ValueError:
                return None
    return None


def mount_id_of_fd(fd: int) -> int | None:
    """The id of the mount ``fd`` is on (``mnt_id`` of ``/proc/self/fdinfo/FD``)."""
    text = _read_text(f"/proc/self/fdinfo/{fd}")
    return None if text is None else _fdinfo_mount_id(text)


def _held(pin: Pin, fds: Iterable[str]) -> bool:
    """Whether one of ``fds`` (open fds whose fdinfo shows the pin's ``mnt_id``) is
    on the pinned mount itself rather than on a later mount given the freed id."""
    for fd in fds:
        if pin.mount_id_unique is None:
            return True
        try:
            unique = unique_mount_id(fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ESRCH):
                continue  # closed, or its process ended, since fdinfo was read
            return True  # cannot tell: keep the pin
        if unique is None or unique == pin.mount_id_unique:
            return True
    return False


def _pin_objects(value: object) -> ObjectsDirectory | None:
    """The ``objects`` of a pin file; None (counts everywhere) unless well formed."""
    if not isinstance(value, dict):
        return None
    path, dev, ino = value.get("path"), value.get("dev"), value.get("ino")
    if not isinstance(path, str) or not path.startswith("/"):
        return None
    if isinstance(dev, int) and isinstance(ino, int):
        return ObjectsDirectory(path, dev, ino)
    return ObjectsDirectory(path)


def _boot_id() -> str:
    return (_read_text("/proc/sys/kernel/random/boot_id") or "").strip()


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(slots=True, frozen=True)
class NamespaceMount:
    """A composefs mount and the mount namespace it was seen in."""

    mount: ComposefsMount
    #: ``mnt:[inode]``, as ``/proc/PID/ns/mnt`` reads.
    namespace: str
    #: Whether that is composefsd's own mount namespace.
    own: bool
    #: What the mount's layer paths are relative to: ``/proc/PID/root`` of the
    #: process its mountinfo was read from (empty: composefsd's own root).
    root: str = ""

    def describe(self) -> str:
        """Its mount point, with the namespace when it is not ours."""
        if self.own:
            return self.mount.mountpoint
        return f"{self.mount.mountpoint} (mount namespace {self.namespace})"


@dataclass(slots=True, frozen=True)
class Pin:
    """A detached mount of ``digest`` handed out (module notes)."""

    digest: str
    mount_id: int
    #: Wall clock (seconds since the epoch) and CLOCK_BOOTTIME when it was made.
    created: float
    boottime: float
    boot_id: str
    peer_pid: int | None
    peer_uid: int | None
    path: Path
    #: The mount's id that is never reused (None: the kernel cannot tell it).
    mount_id_unique: int | None = None
    #: The ``objects/`` of the repository it was handed out for (None: a pin that
    #: does not say, which counts for every repository).
    objects: ObjectsDirectory | None = None

    def of_repository(self, objects: ObjectsDirectory) -> bool:
        return self.objects is None or self.objects.same(objects)

    def describe(self) -> str:
        who = f" held by pid {self.peer_pid}" if self.peer_pid is not None else ""
        return f"detached mount {self.mount_id}{who}"


class _Gate:
    """A readers/writer lock that lets a waiting writer in before new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class MountTracker:
    """Composefs mounts across namespaces, and pins of detached mounts (module notes)."""

    def __init__(
        self,
        runtime_dir: str | os.PathLike[str] | None = None,
        *,
        grace: float = PIN_GRACE,
        proc: str = "/proc",
    ) -> None:
        self.runtime_dir = Path(runtime_dir) if runtime_dir is not None else default_runtime_dir()
        self.pin_dir = self.runtime_dir / "pins"
        self.grace = grace
        self._proc = proc
        self._lock = threading.Lock()
        self._gate = _Gate()
        self._boot_id = _boot_id()
        self._mounts_lock = threading.Lock()
        self._mounts_poll: select.poll | None = None
        self._mounts_fd: int | None = None
        self._own_mounts: tuple[ComposefsMount, ...] | None = None
        #: Counts the parses of the mount table: the same number, the same mounts.
        self._mounts_generation = 0

    # -- the gate ---------------------------------------------------------------------------
    def mounting(self) -> contextlib.AbstractContextManager[None]:
        """Held (shared) by a mount from before it resolves the image until it is
        attached or pinned."""
        return self._gate.shared()

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Held by GC and image removal while they decide what is in use."""
        return self._gate.exclusive()

    # -- mounts -----------------------------------------------------------------------------
    def own_mounts(self) -> list[ComposefsMount]:
        """The composefs mounts of composefsd's own mount namespace.

        Parsed again only when the mount table has changed: the kernel flags an
        open mountinfo file (POLLPRI) at every change, so Describe and ListMounts
        skip the parse (most of their time on a host with many mounts).
        """
        return list(self.own_mounts_parsed()[1])

    def own_mounts_parsed(self) -> tuple[int | None, tuple[ComposefsMount, ...]]:
        """:meth:`own_mounts` with the number of the parse they come from: the same
        number, the same mount table (None: not watched, parsed for this call)."""
        path = f"{self._proc}/self/mountinfo"
        with self._mounts_lock:
            if self._mounts_poll is None:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return None, tuple(list_composefs_mounts(path))
                self._mounts_poll = select.poll()
                self._mounts_poll.register(fd, select.POLLPRI | select.POLLERR)
                self._mounts_fd = fd
            elif self._own_mounts is not None and not self._mounts_poll.poll(0):
                return self._mounts_generation, self._own_mounts
            # The event is consumed by the poll: a change after it is seen next time.
            self._mounts_poll.poll(0)
            self._own_mounts = tuple(list_composefs_mounts(path))
            self._mounts_generation += 1
            return self._mounts_generation, self._own_mounts

    def own_mounts_now(self) -> tuple[int, tuple[ComposefsMount, ...]] | None:
        """:meth:`own_mounts_parsed` if that needs neither waiting (another thread
        holds the watch) nor parsing (the table changed), else None. For the event
        loop: it never blocks."""
        if not self._mounts_lock.acquire(blocking=False):
            return None
        try:
            mounts, poll = self._own_mounts, self._mounts_poll
            if mounts is None or poll is None:
                return None
            if poll.poll(0):
                # The poll consumed the change: the next own_mounts() must parse.
                self._own_mounts = None
                return None
            return self._mounts_generation, mounts
        finally:
            self._mounts_lock.release()

    def close(self) -> None:
        """Release the mountinfo watch (the tracker stays usable)."""
        with self._mounts_lock:
            if self._mounts_fd is not None:
                os.close(self._mounts_fd)
            self._mounts_fd = None
            self._mounts_poll = None
            self._own_mounts = None

    def all_mounts(self) -> list[NamespaceMount]:
        """Composefs mounts of every mount namespace this process can look into,
        each namespace read once; composefsd's own comes first.

        A namespace is known by ``/proc/PID/ns/mnt``. Reading that link needs ptrace
        access to the process (CAP_SYS_PTRACE for processes with capabilities we
        lack), ``mountinfo`` does not: where the link cannot be read, the mountinfo
        is read anyway and told apart from those read by their mounts' ids. A mount
        is in one namespace only, and a copy of it made for a new namespace gets an
        id of its own: a mountinfo whose ids are mostly those of one already read is
        that namespace again, read a moment later (mounts come and go meanwhile,
        and a freed id may be given to a mount elsewhere, hence "mostly").
        """
        out: list[NamespaceMount] = []
        seen: set[str] = set()
        # The mount ids of each namespace read, and whether its link was read.
        seen_ids: list[tuple[set[int], bool]] = []
        try:
            own_ns = os.readlink(f"{self._proc}/self/ns/mnt")
        except OSError:
            own_ns = ""
        for pid in self._pids(first="self"):
            try:
                ns = os.readlink(f"{self._proc}/{pid}/ns/mnt")
            except FileNotFoundError:
                continue
            except OSError:
                ns = ""
            if ns and ns in seen:
                continue
            text = _read_text(f"{self._proc}/{pid}/mountinfo")
            if text is None:
                continue  # gone, or not ours to read: another process of it may do
            entries = list(parse_mountinfo(text))
            ids = {e.mount_id for e in entries}
            if ns:
                seen.add(ns)
            if any(
                (not ns or not linked) and 2 * len(ids & earlier) > len(ids)
                for earlier, linked in seen_ids
            ):
                continue
            seen_ids.append((ids, bool(ns)))
            label = ns or f"of pid {pid}"
            own = pid == "self" or (bool(ns) and ns == own_ns)
            root = "" if pid == "self" else f"{self._proc}/{pid}/root"
            out.extend(NamespaceMount(m, label, own, root) for m in composefs_mounts(entries))
        return out

    def _pids(self, first: str | None = None) -> Iterator[str]:
        if first is not None:
            yield first
        try:
            names = os.listdir(self._proc)
        except OSError:
            return
        for name in names:
            if name.isdigit():
                yield name

    def _open_fds_on(self, mount_ids: set[int]) -> tuple[dict[int, list[str]], set[int]]:
        """The open fds (``/proc/PID/fd/N``) whose fdinfo ``mnt_id`` is one of
        ``mount_ids``, by that id, of every process we may look at; and the pids of
        processes whose fds we may not look at."""
        found: dict[int, list[str]] = {}
        hidden: set[int] = set()
        for pid in self._pids():
            base = f"{self._proc}/{pid}/fdinfo"
            try:
                fds = os.listdir(base)
            except PermissionError:
                hidden.add(int(pid))
                continue
            except OSError:
                continue
            for fd in fds:
                text = _read_text(f"{base}/{fd}")
                if text is not None:
                    mount_id = _fdinfo_mount_id(text)
                    if mount_id in mount_ids:
                        found.setdefault(mount_id, []).append(f"{self._proc}/{pid}/fd/{fd}")
        return found, hidden

    # -- pins -------------------------------------------------------------------------------
    def pin_detached(
        self,
        digest: str,
        mount_fd: int,
        *,
        peer_pid: int | None = None,
        peer_uid: int | None = None,
        objects: ObjectsDirectory | None = None,
    ) -> Pin:
        """Record that the detached mount ``mount_fd`` of image ``digest`` of the
        repository whose ``objects`` it shows is handed out. Raises OSError if the
        pin cannot be written (then do not hand it out)."""
        if not _HEX_DIGEST.fullmatch(digest):
            raise ValueError(f"not an image digest: {digest!r}")
        mount_id = mount_id_of_fd(mount_fd)
        if mount_id is None:
            raise OSError(errno.EINVAL, f"cannot read the mount id of fd {mount_fd}")
        try:
            mount_id_unique = unique_mount_id(f"/proc/self/fd/{mount_fd}")
        except OSError:
            mount_id_unique = None
        now_ns = time.time_ns()
        pin = Pin(
            digest=digest,
            mount_id=mount_id,
            created=now_ns / 1e9,
            boottime=_boottime(),
            boot_id=self._boot_id,
            peer_pid=peer_pid,
            peer_uid=peer_uid,
            path=self.pin_dir / digest / f"{mount_id}-{now_ns}",
            mount_id_unique=mount_id_unique,
            objects=objects,
        )
        data = json.dumps(
            {
                "digest": digest,
                "mountId": mount_id,
                "createdUSec": now_ns // 1000,
                "boottimeUSec": int(pin.boottime * 1e6),
                "bootId": pin.boot_id,
                "peerPid": peer_pid,
                "peerUid": peer_uid,
                "mountIdUnique": mount_id_unique,
                "objects": None
                if objects is None
                else {"path": objects.path, "dev": objects.dev, "ino": objects.ino},
            }
        ).encode()
        with self._lock:
            # Checked each time: a directory removed meanwhile (a tmp cleaner) could
            # have been made again by someone else.
            secure_directory(self.runtime_dir, 0o700)
            make_dir(self.pin_dir, 0o700, exist_ok=True)
            tmp = self.pin_dir / f"{_TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{now_ns}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            try:
                for attempt in range(3):
                    make_dir(pin.path.parent, 0o700, exist_ok=True)
                    try:
                        os.rename(tmp, pin.path)
                        break
                    except FileNotFoundError:
                        # Another daemon pruned the empty digest directory meanwhile.
                        if attempt == 2:
                            raise
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        log.info(
            "pinned image %s for detached mount %d handed to pid %s", digest, mount_id, peer_pid
        )
        return pin

    def _read_pins(self) -> list[Pin]:
        pins: list[Pin] = []
        try:
            digests = os.listdir(self.pin_dir)
        except FileNotFoundError:
            return pins
        except OSError as exc:
            log.warning("cannot read pins in %s: %s", self.pin_dir, exc.strerror)
            return pins
        for digest in digests:
            directory = self.pin_dir / digest
            if not _HEX_DIGEST.fullmatch(digest):
                continue
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for name in names:
                path = directory / name
                pin = self._parse_pin(digest, path)
                if pin is not None:
                    pins.append(pin)
        return pins

    def _parse_pin(self, digest: str, path: Path) -> Pin | None:
        text = _read_text(str(path))
        if text is None:
            return None
        try:
            doc = json.loads(text)
            mount_id = doc["mountId"]
            created = doc["createdUSec"] / 1e6
            boottime = doc["boottimeUSec"] / 1e6
            boot_id = doc["bootId"]
            if (
                doc.get("digest") != digest
                or not isinstance(mount_id, int)
                or not isinstance(boot_id, str)
            ):
                raise ValueError("fields")
        except (ValueError, KeyError, TypeError):
            # Unreadable: keep honouring it by its name, as long as its mount id lives.
            match = _PIN_NAME.fullmatch(path.name)
            if match is None:
                log.warning("ignoring malformed pin %s", path)
                return None
            mount_id = int(match.group(1))
            created = int(match.group(2)) / 1e9
            boottime = 0.0
            boot_id = self._boot_id
            doc = {}
        peer_pid = doc.get("peerPid")
        peer_uid = doc.get("peerUid")
        unique = doc.get("mountIdUnique")
        return Pin(
            digest=digest,
            mount_id=mount_id,
            created=created,
            boottime=boottime,
            boot_id=boot_id,
            peer_pid=peer_pid if isinstance(peer_pid, int) else None,
            peer_uid=peer_uid if isinstance(peer_uid, int) else None,
            path=path,
            mount_id_unique=unique if isinstance(unique, int) else None,
            objects=_pin_objects(doc.get("objects")),
        )

    def live_pins(self, mounts: Iterable[NamespaceMount] | None = None) -> list[Pin]:
        """Pins of detached mounts that may still be in use; dead ones are removed."""
        with self._lock:
            pins = self._read_pins()
            if not pins:
                return []
            now = _boottime()
            live: list[Pin] = []
            undecided: list[Pin] = []
            dead: list[Pin] = []
            for pin in pins:
                if pin.boot_id != self._boot_id:
                    dead.append(pin)
                elif self._age(pin, now) < self.grace:
                    live.append(pin)
                else:
                    undecided.append(pin)
            if undecided:
                attached = {
                    (m.mount.mount_id, m.mount.digest)
                    for m in (self.all_mounts() if mounts is None else mounts)
                }
                remaining = [p for p in undecided if (p.mount_id, p.digest) not in attached]
                live.extend(p for p in undecided if (p.mount_id, p.digest) in attached)
                if remaining:
                    open_fds, hidden_pids = self._open_fds_on({p.mount_id for p in remaining})
                    for pin in remaining:
                        if _held(pin, open_fds.get(pin.mount_id, ())):
                            live.append(pin)
                        elif pin.peer_pid in hidden_pids:
                            # The process it went to hides its fds from us.
                            log.debug("cannot tell whether pin %s is in use", pin.path)
                            live.append(pin)
                        else:
                            dead.append(pin)
            for pin in dead:
                self._remove_pin(pin)
            return live

    @staticmethod
    def _age(pin: Pin, now_boottime: float) -> float:
        if pin.boottime:
            return now_boottime - pin.boottime
        return time.time() - pin.created  # a pin without its boot time: by the wall clock

    def _remove_pin(self, pin: Pin) -> None:
        log.info("released pin of image %s (detached mount %d is gone)", pin.digest, pin.mount_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pin.path)
        with contextlib.suppress(OSError):
            os.rmdir(pin.path.parent)

    # -- what is in use ---------------------------------------------------------------------
    def in_use(self, repo: Repository) -> dict[str, list[str]]:
        """Every image digest of ``repo`` mounted from it or pinned for it, with
        where it is in use (mount points, namespace-qualified for other
        namespaces, or detached mounts). The one answer to "is it in use"."""
        mounts = self.all_mounts()
        objects = ObjectsDirectory.of(repo)
        out: dict[str, list[str]] = {}
        for m in mounts:
            if m.mount.digest is not None and is_repository_mount(
                repo, m.mount, root=m.root, objects=objects
            ):
                out.setdefault(m.mount.digest, []).append(m.describe())
        for pin in self.live_pins(mounts):
            if pin.of_repository(objects):
                out.setdefault(pin.digest, []).append(pin.describe())
        return out

    def rediscover(self, repo: Repository) -> dict[str, list[str]]:
        """What of ``repo`` is in use right now (logged); called once at start-up
        so that a restarted daemon says what it keeps protecting, and stale pins go."""
        found = self.in_use(repo)
        for digest, users in sorted(found.items()):
            log.info("image %s is in use: %s", digest, "; ".join(users))
        return found
