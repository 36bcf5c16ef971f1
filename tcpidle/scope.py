"""Where a selection's sockets are and how to reach them.

Owns, for one `Selector`, what the kernel is asked (families, the states
mask, the port filter compiled to INET_DIAG bytecode), the network
namespaces visited -- listed again at every scan (`netns.Watch`: with
--all-netns every one alive now; names and paths resolved again) -- and the
one place where a `diag.DiagSocket` is opened in a namespace (`open_diag`,
replaceable: the unit tier hands in a socket that replays recorded dumps).

Each dump keeps a descriptor of every namespace it reached in its `Scan`, so
that acting on the scan's verdicts (`batches`) reaches the namespaces that
were dumped, even if their names were deleted or reused since.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from . import diag, netns, selectors
from .model import Selector, Socket, Verdict

log = logging.getLogger("tcpidle")

# How a DiagSocket is opened: in the namespace of an open ns descriptor (None:
# the caller's own), its records labelled with the namespace's label.
OpenDiag = Callable[[Optional[int], object], diag.DiagSocket]
Namespaces = Union[None, Sequence[netns.Netns], Callable[[], netns.Listing]]


def open_diag(netns_fd: Optional[int], label) -> diag.DiagSocket:
    """A DiagSocket in the namespace `netns_fd` (None: our own)."""
    if netns_fd is None:
        return diag.DiagSocket()
    return diag.DiagSocket(netns_fd=netns_fd, netns_label=label)


class Scope:
    """The sockets a selector concerns, namespace by namespace.

    `namespaces`: None for the caller's own only (reported as netns=null), a
    list of `netns.Netns`, or a callable (`netns.Watch`) asked at every scan.
    """

    def __init__(self, selector: Selector, namespaces: Namespaces = None,
                 open_diag: OpenDiag = open_diag):
        self.selector = selector
        if namespaces is None:
            namespaces = [netns.own()]
        self.namespaces = namespaces if callable(namespaces) else list(namespaces)
        self._open = open_diag
        # diag.Storages whose values the dumps carry (evidence.InlineReader), or None
        self.storage: Optional[diag.Storages] = None
        self.families = selectors.selector_families(selector)
        self.states_mask = selectors.states_mask(selector.states)
        try:
            self.bytecode = selectors.compile_bytecode(selector)
        except selectors.BytecodeTooLong as exc:
            log.info("port filter too large for the kernel (%s): filtering in Python", exc)
            self.bytecode = b""

    # -- dumping ---------------------------------------------------------------

    def _each_namespace(self, scan) -> Iterator[diag.DiagSocket]:
        """A DiagSocket for each namespace of this scan in turn, its descriptor kept in `scan`."""
        for fd, label in self.namespace_fds(scan):
            try:
                nl = self._open(fd, label)
            except netns.NetnsGone as exc:  # listed mid `ip netns add`/`delete`
                self._skip(scan, netns.NetnsGone("network namespace %s is gone (%s)"
                                                 % (label, exc)))
                continue
            yield nl

    def namespace_fds(self, scan) -> Iterator[Tuple[Optional[int], object]]:
        """(descriptor, label) of each namespace of this scan in turn, the descriptor kept
        in `scan`; (None, None) is our own.  Also for the BPF destroy (kdestroy), which
        makes its iterator inside each.

        One that cannot be entered is skipped: said in the log, and in
        `scan.missing` when the user named it.
        """
        listing = self.namespaces() if callable(self.namespaces) else netns.Listing(self.namespaces)
        scan.named = listing.named
        scan.missing.extend(listing.missing)
        for text in listing.missing:
            log.warning("%s: skipped", text)
        for ns in listing.found:
            if ns.path is None:
                yield None, None
                continue
            try:
                fd = netns.open_fd(ns)
            except netns.NetnsGone as exc:
                self._skip(scan, exc)
                continue
            scan.keep_fd(ns.label, fd)
            yield fd, ns.label

    @staticmethod
    def _skip(scan, exc: Exception) -> None:
        """A listed namespace that cannot be entered now: missing when the user named
        it; under --all-netns it just ended between the listing and now."""
        if scan.named:
            scan.missing.append(str(exc))
            log.warning("%s: skipped", exc)
        else:
            log.info("%s: skipped", exc)

    def dump(self, scan) -> List[Tuple[Socket, int]]:
        """Every socket the kernel returns, with the CLOCK_MONOTONIC ns taken just before
        its namespace's dump; the namespaces' descriptors are kept in `scan`.

        "Now" is taken just before each namespace's dump: tcp_info ages are
        computed by the kernel while it dumps, so they can only be older
        than probe ages measured from that instant, and the merge rule
        compares like with like.  Taken after the dump, a 20-50 ms dump of a
        busy host would make every probe record look stale by more than a
        jiffy and lose the merge to tcp_info.
        """
        found: List[Tuple[Socket, int]] = []
        for nl in self._each_namespace(scan):
            with nl:
                now_ns = time.monotonic_ns()
                socks = nl.dump_sockets(self.families, self.states_mask, self.bytecode,
                                        storage=self.storage)
                found.extend((sk, now_ns) for sk in socks)
        return found

    def stream(self, scan, sink: Callable[[List[Socket], int], None]) -> int:
        """Like dump(), but each namespace's sockets go to `sink(sockets, now_ns)`
        chunk by chunk as the kernel sends them (diag.DumpDecoder), and none is
        kept here; returns how many there were.

        The sink only decides: nothing may be destroyed while a dump is read
        (see engine.py), and each dump is still read to its end.
        """
        seen = 0
        for nl in self._each_namespace(scan):
            with nl:
                now_ns = time.monotonic_ns()

                def chunk(socks: List[Socket], now_ns: int = now_ns) -> None:
                    sink(socks, now_ns)

                nl.dump_sockets(self.families, self.states_mask, self.bytecode,
                                storage=self.storage, sink=chunk)
                seen += nl.delivered
        return seen

    def dump_storages(self, sink: Optional[diag.Sink] = None) -> int:
        """Dump the selection once more for its inline BPF storage alone (no
        tcp_info): the re-check's fresh probe values.  Returns the sockets seen.
        `sink` has each chunk's sockets as they come (diag.DumpDecoder), the
        storages of that chunk in `self.storage.stores` meanwhile; without it
        they are all kept until the end."""
        seen = 0
        fds = NamespaceFds()
        try:
            for nl in self._each_namespace(fds):
                with nl:
                    got = nl.dump_sockets(self.families, self.states_mask, self.bytecode,
                                          want_info=False, storage=self.storage, sink=sink)
                    seen += nl.delivered if sink is not None else len(got)
        finally:
            fds.close()
        return seen

    def dump_batch_storages(self, nl: diag.DiagSocket, sockets: Sequence[Socket],
                            sink: diag.Sink) -> None:
        """Dump, through `nl` (the batch's namespace), the inline BPF storage of
        the selected sockets whose ports lie in the box of `sockets` (no
        tcp_info): a re-check's fresh probe values for one batch.

        Exact INET_DIAG lookups carry no storage (the kernel allocates the
        storage request only for dumps), so the re-check dumps.  Narrowed to
        the batch by bytecode, the kernel still walks its whole table but
        returns the batch and the selected sockets among it (batches() keeps
        each batch's ports together), not the whole selection: over all the
        batches, the selection is decoded at most once."""
        box = selectors.port_box(sockets)
        try:
            bytecode = selectors.compile_bytecode(self.selector, box)
        except selectors.BytecodeTooLong:  # the selection is filtered in Python anyway
            bytecode = selectors.compile_bytecode(Selector(), box)
        families = sorted({s.family for s in sockets})
        nl.dump_sockets(families, self.states_mask, bytecode, want_info=False,
                        storage=self.storage, sink=sink)

    def prime_cookies(self) -> int:
        """Dump the selected sockets once, so that each has its cookie; returns how many.

        The kernel numbers a socket (sock_gen_cookie) the first time someone
        asks, and an INET_DIAG dump asks for every socket it returns.  Probe
        hooks that read the number from the socket (raw tracepoint, kprobe)
        skip sockets never asked about; after this they see all of ours.
        """
        primed = 0
        fds = NamespaceFds()
        try:
            for nl in self._each_namespace(fds):
                with nl:
                    primed += len(nl.dump_sockets(self.families, self.states_mask, self.bytecode,
                                                  want_info=False))
        finally:
            fds.close()
        return primed

    # -- acting ----------------------------------------------------------------

    def batches(self, scan, victims: Sequence[Verdict], chunk: int = 256, by_port: bool = False
                ) -> Iterator[Tuple[Optional[diag.DiagSocket], List[Verdict]]]:
        """(DiagSocket, part) for each namespace's victims, `chunk` at a time.

        Each namespace is reached through the descriptor the scan opened, so
        the destroy goes to the namespace that was dumped even if its name
        was deleted (or given to another namespace) since.  None: the
        namespace could not be reached (its sockets went with it).

        by_port: each namespace's victims in (family, sport, dport) order, so
        that each batch is of one family (one table walk) and spans a narrow
        box of ports (dump_batch_storages).
        """
        groups: Dict[object, List[Verdict]] = {}
        for v in victims:
            groups.setdefault(v.socket.netns, []).append(v)
        for label, part in groups.items():
            if by_port:
                part.sort(key=_ports_of)
            if label is None:
                nl = self._open(None, None)
            else:
                fd = scan.fd_of(label)
                if fd is None:
                    log.warning("network namespace %s is gone: its %d connections are gone",
                                label, len(part))
                    yield None, part
                    continue
                nl = self._open(fd, label)
            with nl:
                for run in (_family_runs(part) if by_port else (part,)):
                    for lo in range(0, len(run), chunk):
                        yield nl, run[lo:lo + chunk]


def _ports_of(v: Verdict) -> Tuple[int, int, int]:
    return v.socket.family, v.socket.sport, v.socket.dport


def _family_runs(part: List[Verdict]) -> List[List[Verdict]]:
    """`part` (sorted by family first) cut where the family changes."""
    runs: List[List[Verdict]] = []
    for v in part:
        if not runs or runs[-1][-1].socket.family != v.socket.family:
            runs.append([])
        runs[-1].append(v)
    return runs


class NamespaceFds:
    """The namespaces one dump reached: label -> open descriptor; `missing` names
    those asked for that could not be reached.  close() releases them."""

    def __init__(self):
        self.missing: List[str] = []
        self.named = False  # whether the last listing was of namespaces the user named
        self._fds: Dict[object, int] = {}

    def keep_fd(self, label, fd: int) -> None:
        old = self._fds.pop(label, None)
        if old is not None:
            os.close(old)
        self._fds[label] = fd

    def fd_of(self, label) -> Optional[int]:
        return self._fds.get(label)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self):  # a Scan nobody closed (audit, tests): no descriptor leaks
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
