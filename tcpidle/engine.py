"""One pass of tcpidle: enumerate, merge, decide, act.

Owns the order of operations, which is where correctness lives:

1. The INET_DIAG dump is read to the end before anything is destroyed:
   destroying while the kernel walks its hash buckets shifts the chains under
   the dump's resume position, and `ss -K` / tcp_closer then miss sockets.
2. Each socket found is checked again in Python (`selectors.matches`): the
   kernel bytecode only narrows the dump, it is never trusted alone.
3. Owners are looked up in /proc only for sockets that will be shown or
   acted on (one pass, filtered by inode), and not at all when there are
   none: on a host with 100k sockets the walk costs about a second, which a
   tracker polling an idle selection should not pay every interval.  Owner
   selectors (--pid, --comm, --cgroup) need the walk over every match.
4. Victims are destroyed in batches by cookie-checked SOCK_DESTROY, and
   right before each batch the kernel is asked again about its victims (an
   exact, cookie-checked lookup; and their probe entries, with a probe to
   ask, `recheck`): one that left the selection (its state, typically) or
   received data since the scan is spared, and so is one that could not be
   asked about -- a verdict that cannot be confirmed is not acted on.  The
   window that peer tools leave open between dump and destroy shrinks to
   one batch.  After the destroy, the destroyed are looked up once more (an
   ack is not proof on kernels before 6.11).
5. Each batch's outcomes are handed to the caller (`act_batches`) as soon
   as the kernel answered, before the next batch is sent: `run_pass` reports
   them at once, so nothing done is lost to a later error or a signal, and
   a stop request ends the pass between two batches.  Nothing here prints.
6. Namespaces are reached through the descriptors the scan opened (kept
   in the Scan), so the destroy goes where the dump went.
7. EOPNOTSUPP (a kernel without CONFIG_INET_DIAG_DESTROY) switches this and
   every later pass to the /proc fallback, said once in the log.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from . import diag, idle, netns, procfs, report, selectors
from .errors import PrivilegeError, RuntimeFailure
from .model import Action, Activity, Outcome, Policy, Selector, Socket, Verdict

log = logging.getLogger("tcpidle")

ActivitySource = Callable[[], Dict[int, Activity]]
# Fresh entries of just these cookies (Probe.lookup / PinnedMap.lookup).
ActivityLookup = Callable[[Sequence[int]], Dict[int, Activity]]

GONE = object()  # a re-check's answer: the kernel no longer has that cookie at that 4-tuple
# Why the re-check spared a victim (Spare.reason starts with one of these).
RECEIVED = "received data after the scan"
LEFT_SELECTION = "left the selection (now %s)"
LEFT_SELECTION_OTHER = "left the selection"
NOT_RECHECKED = "not asked about again"
ACKED_BUT_REMAINS = ("the kernel acked SOCK_DESTROY but the socket remains (%s; an orphaned "
                     "socket on a kernel before 6.11, whose tcp_abort skips them)")


class Spare(NamedTuple):
    """A victim the re-check left alone, and why (a text starting with one of the
    reasons above)."""

    verdict: Verdict
    reason: str

    @property
    def kind(self) -> str:
        """The reason's short name, for counting: received-data, left-selection, not-rechecked."""
        if self.reason.startswith(RECEIVED):
            return "received-data"
        if self.reason.startswith(LEFT_SELECTION_OTHER):
            return "left-selection"
        return "not-rechecked"


@dataclass
class Batch:
    """What one destroy batch did: an Outcome per victim acted on, the victims spared.

    `fatal` is an error that ends the pass once this batch is reported
    (EPERM: no CAP_NET_ADMIN in that namespace).
    """

    outcomes: List[Outcome]
    spared: List[Spare]
    fatal: Optional[BaseException] = None


@dataclass
class Scan:
    """The result of enumerating and deciding: every matched socket's verdict.

    It holds a descriptor of every namespace it dumped (close() releases
    them), so that acting on its verdicts reaches the same namespaces even if
    their names were deleted or reused since.  `missing` names the
    namespaces asked for by name, path or pid that could not be dumped.
    """

    verdicts: List[Verdict]
    owners: Dict[int, list] = field(default_factory=dict)
    seen: int = 0  # sockets the kernel returned before the Python filter
    dump_ms: float = 0.0
    activity: Dict[int, Activity] = field(default_factory=dict)  # probe entries the verdicts used
    missing: List[str] = field(default_factory=list)
    _fds: Dict[object, int] = field(default_factory=dict, repr=False)  # netns label -> fd

    @property
    def victims(self) -> List[Verdict]:
        return [v for v in self.verdicts if v.idle]

    def open_diag(self, label) -> diag.DiagSocket:
        """A DiagSocket in the namespace the scan dumped as `label`."""
        if label is None:
            return diag.DiagSocket()
        fd = self._fds.get(label)
        if fd is None:
            raise netns.NetnsGone("network namespace %s is gone" % (label,))
        return diag.DiagSocket(netns_fd=fd, netns_label=label)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self):  # a Scan nobody closed (audit, tests): no descriptor leaks
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Engine:
    """Scans and acts for one selector and policy; keeps state across passes."""

    def __init__(
        self,
        selector: Selector,
        policy: Policy,
        activity: Optional[ActivitySource] = None,
        want_owners: bool = False,
        namespaces: Optional[Sequence[netns.Netns]] = None,
        recheck: Optional[ActivityLookup] = None,
    ):
        self.selector = selector
        self.policy = policy
        self.activity = activity
        self.recheck = recheck
        self.spared = 0  # victims spared by the re-check, over all passes
        self.interrupted = 0  # victims of the last pass not acted on: stopped before their batch
        self.want_owners = want_owners
        # None: the caller's own namespace only, reported as netns=null.  A
        # callable (netns.Watch) is asked for the namespaces at every scan.
        if namespaces is None:
            namespaces = [netns.own()]
        self.namespaces = namespaces if callable(namespaces) else list(namespaces)
        self.use_proc = policy.use_proc
        self.states_mask = selectors.states_mask(selector.states)
        try:
            self.bytecode = selectors.compile_bytecode(selector)
        except selectors.BytecodeTooLong as exc:
            log.info("port filter too large for the kernel (%s): filtering in Python", exc)
            self.bytecode = b""

    # -- enumerate and decide ------------------------------------------------

    def prime_cookies(self) -> int:
        """Dump the selected sockets once, so that each has its cookie; returns how many.

        The kernel numbers a socket (sock_gen_cookie) the first time someone
        asks, and an INET_DIAG dump asks for every socket it returns.  Probe
        hooks that read the number from the socket (raw tracepoint, kprobe)
        skip sockets never asked about; after this they see all of ours.
        """
        primed = 0
        scan = Scan([])
        try:
            for nl in self._diag_per_namespace(scan):
                with nl:
                    primed += len(nl.dump_sockets(selectors.selector_families(self.selector),
                                                  self.states_mask, self.bytecode, want_info=False))
        finally:
            scan.close()
        return primed

    def _diag_per_namespace(self, scan: Scan) -> Iterator[diag.DiagSocket]:
        """A DiagSocket for each namespace of this scan in turn, its descriptor kept in `scan`.

        The namespaces are listed again at every scan (`--all-netns`: every
        one alive now; names and paths resolved again, so a name deleted and
        made again is found).  One that cannot be entered is skipped: said in
        the log, and in `scan.missing` when the user named it.
        """
        listing = self.namespaces() if callable(self.namespaces) else netns.Listing(self.namespaces)
        scan.missing.extend(listing.missing)
        for text in listing.missing:
            log.warning("%s: skipped", text)
        for ns in listing.found:
            if ns.path is None:
                yield diag.DiagSocket()
                continue
            try:
                fd = netns.open_fd(ns)
            except netns.NetnsGone as exc:
                if listing.named:
                    scan.missing.append(str(exc))
                    log.warning("%s: skipped", exc)
                else:  # --all-netns: it ended between the listing and now
                    log.info("%s: skipped", exc)
                continue
            old = scan._fds.pop(ns.label, None)
            if old is not None:
                os.close(old)
            scan._fds[ns.label] = fd
            yield diag.DiagSocket(netns_fd=fd, netns_label=ns.label)

    def scan(self) -> Scan:
        started = time.monotonic()
        # (socket, now_ns) pairs.  "Now" is taken just before each namespace's
        # dump: tcp_info ages are computed by the kernel while it dumps, so
        # they can only be older than probe ages measured from that instant,
        # and the merge rule compares like with like.  Taken after the dump,
        # a 20-50 ms dump of a busy host would make every probe record look
        # stale by more than a jiffy and lose the merge to tcp_info.
        found = []
        scan = Scan([])
        try:
            for nl in self._diag_per_namespace(scan):
                with nl:
                    now_ns = time.monotonic_ns()
                    socks = nl.dump_sockets(selectors.selector_families(self.selector),
                                            self.states_mask, self.bytecode)
                    found.extend((sk, now_ns) for sk in socks)
            scan.dump_ms = (time.monotonic() - started) * 1000.0
            # Read after the dump: a socket that received data meanwhile has a
            # stamp newer than its "now", i.e. idle 0 -- the safe direction.
            activity = self.activity() if self.activity else {}
        except BaseException:
            scan.close()
            raise
        scan.verdicts = [
            idle.decide(sock, activity.get(sock.cookie), now_ns, self.policy)
            for sock, now_ns in found
            if selectors.matches(self.selector, sock)
        ]
        scan.seen, scan.activity = len(found), activity
        if self.selector.pids or self.selector.comms or self.selector.cgroups:
            self.attribute(scan, scan.verdicts, force=True)
            scan.verdicts = _filter_owners(scan.verdicts, scan.owners, self.selector)
        return scan

    def attribute(self, scan: Scan, verdicts: Sequence[Verdict], force: bool = False) -> None:
        """Add the owners of `verdicts` to `scan.owners` with one /proc pass (if any are missing)."""
        if not (self.want_owners or force):
            return
        missing = {v.socket.inode for v in verdicts if v.socket.inode} - set(scan.owners)
        if missing:
            found = procfs.owners_by_inode(missing)
            for inode in missing:
                scan.owners[inode] = found.get(inode, [])

    # -- act -------------------------------------------------------------------

    def act(self, scan: Scan) -> List[Outcome]:
        """Destroy (or pretend to) every victim of `scan`; one Outcome each.

        Victims the re-check leaves alone get no Outcome; `self.spared`
        counts them.  `act_batches` is the same, batch by batch.
        """
        return [o for batch in self.act_batches(scan) for o in batch.outcomes]

    def act_batches(self, scan: Scan, stop: Optional[Callable[[], bool]] = None
                    ) -> Iterator["Batch"]:
        """Act on the victims of `scan` a batch at a time, yielding each batch's result
        as soon as the kernel answered it.

        The caller reports each batch before the next is sent, so an error
        raised by a later batch (or a stop) never loses what earlier ones
        did.  `stop()` is asked before each batch: when true, the pass ends
        there and `self.interrupted` says how many victims were not acted on.
        """
        self.interrupted = 0
        victims = scan.victims
        if self.policy.max_kills is not None and len(victims) > self.policy.max_kills:
            log.warning(
                "%d idle connections, acting on the %d idlest (--max-kills-per-interval)",
                len(victims), self.policy.max_kills,
            )
            victims = sorted(victims, key=lambda v: -(v.idle_ms or 0.0))[: self.policy.max_kills]
        if not victims:
            return
        self.attribute(scan, victims)
        if self.policy.dry_run:
            yield Batch([self._outcome(v, Action.WOULD_DESTROY, None, scan.owners)
                         for v in victims], [])
            return
        done = 0
        for nl, part in self._batches(scan, victims):
            if stop is not None and stop():
                self.interrupted = len(victims) - done
                return
            done += len(part)
            if nl is None:  # its namespace vanished, and its sockets with it
                yield Batch([self._outcome(v, Action.GONE, None, scan.owners) for v in part], [])
                continue
            batch = self._act_on(scan, part, nl)
            self.spared += len(batch.spared)
            yield batch
            if batch.fatal is not None:
                raise batch.fatal

    def _act_on(self, scan: Scan, part: Sequence[Verdict], nl: diag.DiagSocket) -> "Batch":
        """Re-check one batch, destroy what still qualifies, look again at what was destroyed."""
        owners = scan.owners
        checked = self._recheck(scan, part, nl)
        outcomes: List[Outcome] = []
        spared: List[Spare] = []
        go: List[Verdict] = []
        for verdict, (fresh, reason) in zip(part, checked):
            if reason is GONE:
                outcomes.append(self._outcome(verdict, Action.GONE, None, owners))
            elif reason is not None:
                spared.append(Spare(verdict, reason))
            else:
                # Reported as the kernel saw it last (its state now, not the scan's).
                go.append(verdict._replace(socket=fresh) if fresh is not None else verdict)
        if not go:
            return Batch(outcomes, spared)
        if self.use_proc:
            return Batch(outcomes + self._fallback(go, owners), spared)
        errs = nl.destroy([v.socket for v in go])
        destroyed = [v for v, err in zip(go, errs) if err == 0]
        remains = self._still_there(destroyed, nl)
        unsupported: List[Verdict] = []
        fatal = None
        for verdict, err in zip(go, errs):
            if err == 0 and verdict.socket.cookie in remains:
                outcomes.append(self._outcome(verdict, Action.FAILED, ACKED_BUT_REMAINS % (
                    remains[verdict.socket.cookie].state_name), owners))
            elif err == 0:
                outcomes.append(self._outcome(verdict, Action.DESTROYED, None, owners))
            elif err == errno.ENOENT:
                outcomes.append(self._outcome(verdict, Action.GONE, None, owners))
            elif err == errno.EOPNOTSUPP:
                unsupported.append(verdict)
            elif err == errno.EPERM:
                outcomes.append(self._outcome(verdict, Action.FAILED, "SOCK_DESTROY: " + os.strerror(err), owners))
                fatal = PrivilegeError("SOCK_DESTROY refused (EPERM): need CAP_NET_ADMIN in this network namespace")
            else:
                outcomes.append(self._outcome(verdict, Action.FAILED, "SOCK_DESTROY: " + os.strerror(err), owners))
        if unsupported:
            log.warning(
                "SOCK_DESTROY is not supported by this kernel (CONFIG_INET_DIAG_DESTROY is off): "
                "falling back to /proc (%s)", self.policy.proc_action,
            )
            self.use_proc = True
            outcomes += self._fallback(unsupported, owners)
        return Batch(outcomes, spared, fatal)

    def _recheck(self, scan: Scan, part: Sequence[Verdict], nl: diag.DiagSocket
                 ) -> List[Tuple[Optional[Socket], object]]:
        """For each victim, asked right now: (the socket as the kernel sees it, why not to act).

        The reason is None to act, GONE when the kernel no longer has that
        cookie at that 4-tuple, else a text: the victim left the selection
        (its state, typically: an owner that exited with unsent data leaves
        FIN-WAIT-1, whose data a destroy would throw away), received data
        since the scan, or could not be asked about (then it is spared: a
        verdict that cannot be confirmed is not acted on).

        Two witnesses of receives, each compared with what it said at the
        scan: the kernel's tcp_info (an exact, cookie-checked INET_DIAG
        lookup per victim, batched) and, when a probe runs, the victim's BPF
        entry.  With -t 0 (every matching connection, idle or not) only the
        selection is checked.
        """
        try:
            now = nl.lookup([v.socket for v in part])
        except (RuntimeFailure, OSError) as exc:
            text = "not asked about again: INET_DIAG lookup failed (%s)" % _why(exc)
            return [(None, text) for _ in part]
        idle_check = self.policy.idle_time_ms > 0
        probe_now: Dict[int, Activity] = {}
        probe_failed = None
        if idle_check and self.recheck is not None:
            try:
                probe_now = self.recheck([v.socket.cookie for v in part])
            except OSError as exc:
                probe_failed = "not asked about again: re-reading the BPF map failed (%s)" % _why(exc)
        policy = self.policy
        out: List[Tuple[Optional[Socket], object]] = []
        for v, fresh in zip(part, now):
            if fresh == errno.ENOENT:
                out.append((None, GONE))
            elif not isinstance(fresh, Socket):
                out.append((None, "not asked about again: INET_DIAG lookup: %s"
                            % os.strerror(fresh)))
            elif not selectors.matches(self.selector, fresh):
                out.append((fresh, LEFT_SELECTION % fresh.state_name
                            if fresh.state != v.socket.state else LEFT_SELECTION_OTHER))
            elif idle_check and idle.tcp_info_received_since(v.socket, fresh, policy):
                out.append((fresh, RECEIVED))
            elif idle_check and probe_failed is not None:
                out.append((fresh, probe_failed))
            elif idle_check and idle.received_since(scan.activity.get(v.socket.cookie),
                                                    probe_now.get(v.socket.cookie), policy):
                out.append((fresh, RECEIVED))
            else:
                out.append((fresh, None))
        return out

    @staticmethod
    def _still_there(destroyed: Sequence[Verdict], nl: diag.DiagSocket) -> Dict[int, Socket]:
        """The destroyed victims the kernel still has, by cookie: looked up again.

        SOCK_DESTROY is acked 0 whenever tcp_abort ran, but before Linux 6.11
        tcp_abort did nothing to an orphaned socket (SOCK_DEAD: its owner had
        closed it, e.g. FIN-WAIT-1 with unsent data), which stayed.  Only a
        second look tells.  Only orphans can stay, and INET_DIAG reports an
        orphan with inode 0 (no file holds it: sock_i_ino of a socket without
        sk_socket), so only victims with inode 0 are looked at again: a kill
        of owned connections pays nothing for it.
        """
        destroyed = [v for v in destroyed if not v.socket.inode]
        if not destroyed:
            return {}
        try:
            again = nl.lookup([v.socket for v in destroyed])
        except (RuntimeFailure, OSError) as exc:
            log.warning("looking again at %d destroyed connections failed (%s): "
                        "trusting the kernel's acks", len(destroyed), _why(exc))
            return {}
        return {v.socket.cookie: sk for v, sk in zip(destroyed, again) if isinstance(sk, Socket)}

    def _batches(self, scan: Scan, victims: Sequence[Verdict], chunk: int = 256
                 ) -> Iterator[Tuple[Optional[diag.DiagSocket], List[Verdict]]]:
        """(DiagSocket, part) for each namespace's victims, `chunk` at a time.

        Each namespace is reached through the descriptor the scan opened, so
        the destroy goes to the namespace that was dumped even if its name
        was deleted (or given to another namespace) since.  None: the
        namespace could not be reached (its sockets went with it).
        """
        groups: Dict[object, List[Verdict]] = {}
        for v in victims:
            groups.setdefault(v.socket.netns, []).append(v)
        for label, part in groups.items():
            try:
                nl = scan.open_diag(label)
            except netns.NetnsGone as exc:
                log.warning("%s: its %d connections are gone", exc, len(part))
                yield None, part
                continue
            with nl:
                for lo in range(0, len(part), chunk):
                    yield nl, part[lo:lo + chunk]

    def _fallback(self, victims: Sequence[Verdict], owners) -> List[Outcome]:
        fresh = procfs.owners_by_inode({v.socket.inode for v in victims})
        rows = procfs.apply_fallback([v.socket for v in victims], self.policy.proc_action, fresh)
        return [
            Outcome(verdict, action, error, tuple(pids), tuple(comms), _cgroups(fresh, verdict))
            for verdict, (_sock, action, error, pids, comms) in zip(victims, rows)
        ]

    @staticmethod
    def _outcome(verdict: Verdict, action: str, error: Optional[str], owners) -> Outcome:
        held = owners.get(verdict.socket.inode)
        if not held:
            return Outcome(verdict, action, error)
        return Outcome(
            verdict, action, error,
            tuple(sorted({o.pid for o in held})),
            tuple(sorted({o.comm for o in held})),
            _cgroups(owners, verdict),
        )


def _cgroups(owners, verdict: Verdict) -> Tuple[str, ...]:
    return tuple(sorted({o.cgroup for o in owners.get(verdict.socket.inode, ()) if o.cgroup}))


def run_pass(engine: "Engine", as_json: bool, name: str, quiet_if_empty: bool = False,
             clock: Callable[[], float] = time.monotonic,
             on_batch: Optional[Callable[[Batch], None]] = None,
             stop: Optional[Callable[[], bool]] = None,
             ) -> Tuple[Scan, List[Outcome], float, int]:
    """One pass as the user sees it: scan, then per batch of victims acted on, its
    log lines, `on_batch` (event log, metrics) and its rows; a summary at the end.

    Each batch is reported as soon as the kernel answered it, so an error
    raised by a later batch, or a `stop()` (a signal) between batches, loses
    nothing that was done: the summary then says the pass was cut short,
    and the error propagates.  Shared by one-shot `kill` and every poll of
    `kill -i` and `track` (`name` prefixes the summary).  Returns (scan,
    outcomes, seconds taken, victims spared by the re-check).
    """
    started = clock()
    scan = engine.scan()
    outcomes: List[Outcome] = []
    spared: List[Spare] = []
    cut: Optional[str] = None
    try:
        for batch in engine.act_batches(scan, stop):
            outcomes.extend(batch.outcomes)
            spared.extend(batch.spared)
            report.log_batch(batch.outcomes, batch.spared)
            if on_batch is not None:
                on_batch(batch)
            report.show(batch.outcomes, as_json)
        if engine.interrupted:
            cut = "stopped by a signal"
    except BaseException as exc:
        cut = "stopped by an error (%s)" % (_why(exc) if isinstance(exc, Exception)
                                             else type(exc).__name__)
        raise
    finally:
        scan.close()
        elapsed = clock() - started
        if outcomes or spared or cut or not quiet_if_empty:
            left = 0
            if cut:
                planned = len(scan.victims)
                if engine.policy.max_kills is not None:
                    planned = min(planned, engine.policy.max_kills)
                left = max(0, planned - len(outcomes) - len(spared))
            report.summary_kill(outcomes, len(scan.verdicts), len(scan.victims), elapsed * 1000.0,
                                engine.policy.dry_run, prefix=name,
                                spared=[s.kind for s in spared], cut=cut, left=left)
    return scan, outcomes, elapsed, len(spared)


def _why(exc: BaseException) -> str:
    """An error as one short phrase for a log line."""
    if isinstance(exc, OSError) and exc.errno and not isinstance(exc, RuntimeFailure):
        return os.strerror(exc.errno)
    return " ".join(str(exc).split()) or type(exc).__name__


def _filter_owners(verdicts: List[Verdict], owners, selector: Selector) -> List[Verdict]:
    """Apply the owner selectors (--pid, --comm, --cgroup), which need the /proc map."""
    if not (selector.pids or selector.comms or selector.cgroups):
        return verdicts
    kept = []
    for verdict in verdicts:
        held = owners.get(verdict.socket.inode, ())
        if selector.pids and not any(o.pid in selector.pids for o in held):
            continue
        if selector.comms and not any(o.comm in selector.comms for o in held):
            continue
        if selector.cgroups and not any(
            (o.cgroup or "").startswith(prefix) for o in held for prefix in selector.cgroups
        ):
            continue
        kept.append(verdict)
    return kept


def require_privilege(what: str) -> None:
    """Refuse early, with one line, when CAP_NET_ADMIN is missing."""
    if not procfs.has_cap_net_admin():
        raise PrivilegeError("%s needs CAP_NET_ADMIN: run as root" % what)


__all__ = ["Engine", "Scan", "Batch", "Spare", "run_pass", "require_privilege", "RuntimeFailure"]
