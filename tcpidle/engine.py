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
   ask, `recheck`): one that received data since the scan is spared, its
   verdict being older than the data.  The window that peer tools leave
   open between dump and destroy shrinks to one batch.
5. EOPNOTSUPP (a kernel without CONFIG_INET_DIAG_DESTROY) switches this and
   every later pass to the /proc fallback, said once in the log.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from . import diag, idle, netns, procfs, report, selectors
from .errors import PrivilegeError, RuntimeFailure
from .model import Action, Activity, Outcome, Policy, Selector, Socket, Verdict

log = logging.getLogger("tcpidle")

ActivitySource = Callable[[], Dict[int, Activity]]
SPARED = object()  # a victim's answer in _destroy: received data after the scan, left alone
# Fresh entries of just these cookies (Probe.lookup / PinnedMap.lookup).
ActivityLookup = Callable[[Sequence[int]], Dict[int, Activity]]


@dataclass
class Scan:
    """The result of enumerating and deciding: every matched socket's verdict."""

    verdicts: List[Verdict]
    owners: Dict[int, list] = field(default_factory=dict)
    seen: int = 0  # sockets the kernel returned before the Python filter
    dump_ms: float = 0.0
    activity: Dict[int, Activity] = field(default_factory=dict)  # probe entries the verdicts used

    @property
    def victims(self) -> List[Verdict]:
        return [v for v in self.verdicts if v.idle]


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
        self.want_owners = want_owners
        # None: the caller's own namespace only, reported as netns=null.
        self.namespaces = list(namespaces) if namespaces is not None else [netns.own()]
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
        for nl in self._diag_per_namespace():
            with nl:
                primed += len(nl.dump_sockets(selectors.selector_families(self.selector),
                                              self.states_mask, self.bytecode, want_info=False))
        return primed

    def _diag_per_namespace(self) -> Iterator[diag.DiagSocket]:
        """A DiagSocket for each namespace in turn; vanished ones are skipped, said once."""
        for ns in self.namespaces:
            try:
                yield _open_diag(ns)
            except netns.NetnsGone as exc:
                log.warning("%s: skipped", exc)

    def scan(self) -> Scan:
        started = time.monotonic()
        # (socket, now_ns) pairs.  "Now" is taken just before each namespace's
        # dump: tcp_info ages are computed by the kernel while it dumps, so
        # they can only be older than probe ages measured from that instant,
        # and the merge rule compares like with like.  Taken after the dump,
        # a 20-50 ms dump of a busy host would make every probe record look
        # stale by more than a jiffy and lose the merge to tcp_info.
        found = []
        for nl in self._diag_per_namespace():
            with nl:
                now_ns = time.monotonic_ns()
                socks = nl.dump_sockets(selectors.selector_families(self.selector),
                                        self.states_mask, self.bytecode)
                found.extend((sk, now_ns) for sk in socks)
        dump_ms = (time.monotonic() - started) * 1000.0
        # Read after the dump: a socket that received data meanwhile has a
        # stamp newer than its "now", i.e. idle 0 -- the safe direction.
        activity = self.activity() if self.activity else {}
        verdicts = [
            idle.decide(sock, activity.get(sock.cookie), now_ns, self.policy)
            for sock, now_ns in found
            if selectors.matches(self.selector, sock)
        ]
        scan = Scan(verdicts, {}, seen=len(found), dump_ms=dump_ms, activity=activity)
        if self.selector.pids or self.selector.comms or self.selector.cgroups:
            self.attribute(scan, verdicts, force=True)
            scan.verdicts = _filter_owners(verdicts, scan.owners, self.selector)
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

        Victims that received data after the scan are spared (see
        `_woken`) and get no Outcome; `self.spared` counts them.
        """
        victims = scan.victims
        if self.policy.max_kills is not None and len(victims) > self.policy.max_kills:
            log.warning(
                "%d idle connections, acting on the %d idlest (--max-kills-per-interval)",
                len(victims), self.policy.max_kills,
            )
            victims = sorted(victims, key=lambda v: -(v.idle_ms or 0.0))[: self.policy.max_kills]
        if not victims:
            return []
        self.attribute(scan, victims)
        if self.policy.dry_run:
            return [self._outcome(v, Action.WOULD_DESTROY, None, scan.owners) for v in victims]
        # -t 0 acts on every matching connection, idle or not: nothing to ask again.
        recheck = self.policy.idle_time_ms > 0
        if self.use_proc:
            kept, woken = victims, []
            if recheck:
                flags = self._in_chunks(victims, lambda nl, part: self._woken(scan, part, nl))
                # A vanished namespace answers ENOENT, not True: its sockets are kept.
                kept = [v for v, woke in zip(victims, flags) if woke is not True]
                woken = [v for v, woke in zip(victims, flags) if woke is True]
            self._note_spared(woken)
            return self._fallback(kept, scan.owners)
        return self._destroy(victims, scan, recheck)

    def _woken(self, scan: Scan, part: Sequence[Verdict], nl: diag.DiagSocket) -> List[bool]:
        """For each victim: did it receive since the scan?  Asked right now.

        Two witnesses, each compared with what it said at the scan: the
        kernel's tcp_info (an exact, cookie-checked INET_DIAG lookup per
        victim, batched) and, when a probe runs, the victim's BPF entry.
        One that fails leaves the other, or the scan's verdict, standing.
        """
        try:
            now = nl.lookup([v.socket for v in part])
        except (RuntimeFailure, OSError) as exc:
            log.warning("asking the kernel again before destroying failed (%s): "
                        "acting on the scan's verdicts", exc)
            now = [None] * len(part)
        unanswered = [a for a in now if isinstance(a, int) and a != errno.ENOENT]
        if unanswered:  # ENOENT is a victim gone meanwhile; anything else is news
            log.warning("%d of %d victims could not be asked about again (%s): acting on "
                        "the scan's verdicts for them", len(unanswered), len(part),
                        os.strerror(unanswered[0]))
        probe_now: Dict[int, Activity] = {}
        if self.recheck is not None:
            try:
                probe_now = self.recheck([v.socket.cookie for v in part])
            except OSError as exc:
                log.warning("re-reading the BPF map before destroying failed (%s): "
                            "acting on the scan's verdicts", exc)
        policy = self.policy
        return [
            (isinstance(fresh, Socket) and idle.tcp_info_received_since(v.socket, fresh, policy))
            or idle.received_since(scan.activity.get(v.socket.cookie),
                                   probe_now.get(v.socket.cookie), policy)
            for v, fresh in zip(part, now)
        ]

    def _note_spared(self, woken: Sequence[Verdict]) -> None:
        """Count and log the victims left alone because they woke up."""
        if woken:
            self.spared += len(woken)
            log.info("spared %d connection%s that received data after the scan: %s",
                     len(woken), "" if len(woken) == 1 else "s",
                     " ".join("cookie=%d" % v.socket.cookie for v in woken[:10])
                     + (" ..." if len(woken) > 10 else ""))

    def _destroy(self, victims: Sequence[Verdict], scan: Scan, recheck: bool) -> List[Outcome]:
        """Ask again and destroy, batch by batch: the window between the
        re-check and the destroy of a victim is one batch."""

        def work(nl: diag.DiagSocket, part: Sequence[Verdict]) -> list:
            woken = self._woken(scan, part, nl) if recheck else [False] * len(part)
            errs = iter(nl.destroy([v.socket for v, woke in zip(part, woken) if not woke]))
            return [SPARED if woke else next(errs) for woke in woken]

        owners = scan.owners
        results = self._in_chunks(victims, work)
        outcomes: List[Optional[Outcome]] = []
        unsupported: List[Tuple[int, Verdict]] = []  # (slot in outcomes, victim)
        woken: List[Verdict] = []
        for verdict, err in zip(victims, results):
            if err is SPARED:
                woken.append(verdict)
            elif err == 0:
                outcomes.append(self._outcome(verdict, Action.DESTROYED, None, owners))
            elif err == errno.ENOENT:
                outcomes.append(self._outcome(verdict, Action.GONE, None, owners))
            elif err == errno.EOPNOTSUPP:
                unsupported.append((len(outcomes), verdict))
                outcomes.append(None)
            elif err == errno.EPERM:
                raise PrivilegeError("SOCK_DESTROY refused (EPERM): need CAP_NET_ADMIN in this network namespace")
            else:
                outcomes.append(self._outcome(verdict, Action.FAILED, "SOCK_DESTROY: " + os.strerror(err), owners))
        self._note_spared(woken)
        if unsupported:
            log.warning(
                "SOCK_DESTROY is not supported by this kernel (CONFIG_INET_DIAG_DESTROY is off): "
                "falling back to /proc (%s)", self.policy.proc_action,
            )
            self.use_proc = True
            redo = self._fallback([verdict for _slot, verdict in unsupported], owners)
            for (slot, _verdict), outcome in zip(unsupported, redo):
                outcomes[slot] = outcome
        return outcomes  # type: ignore[return-value]

    def _in_chunks(self, victims: Sequence[Verdict], work, chunk: int = 256) -> list:
        """work(DiagSocket, part) for each namespace's victims, `chunk` at a time, one
        answer per victim, in order.  A namespace that vanished since the scan took
        its sockets with it: they are answered ENOENT."""
        by_label = {ns.label: ns for ns in self.namespaces}
        results: list = [errno.ENOENT] * len(victims)
        groups: Dict[object, List[int]] = {}
        for i, v in enumerate(victims):
            groups.setdefault(v.socket.netns, []).append(i)
        for label, indices in groups.items():
            try:
                nl = _open_diag(by_label[label])
            except netns.NetnsGone as exc:
                log.warning("%s: its %d connections are gone", exc, len(indices))
                continue
            with nl:
                for lo in range(0, len(indices), chunk):
                    part = indices[lo:lo + chunk]
                    for i, answer in zip(part, work(nl, [victims[i] for i in part])):
                        results[i] = answer
        return results

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
             clock: Callable[[], float] = time.monotonic
             ) -> Tuple[Scan, List[Outcome], float, int]:
    """One pass as the user sees it: scan, act, a log line per outcome, the rows, a summary.

    Shared by one-shot `kill` and every poll of `kill -i` and `track`
    (`name` prefixes the summary).  Returns (scan, outcomes, seconds taken,
    victims spared by the re-check).
    """
    started = clock()
    scan = engine.scan()
    spared_before = engine.spared
    outcomes = engine.act(scan)
    elapsed = clock() - started
    spared = engine.spared - spared_before
    for outcome in outcomes:
        report.log_outcome(outcome)
    report.show(outcomes, as_json)
    if outcomes or spared or not quiet_if_empty:
        report.summary_kill(outcomes, len(scan.verdicts), len(scan.victims), elapsed * 1000.0,
                            engine.policy.dry_run, prefix=name, spared=spared)
    return scan, outcomes, elapsed, spared


def _open_diag(ns: netns.Netns) -> diag.DiagSocket:
    """A DiagSocket bound to `ns`, its records labelled with the namespace's label."""
    if ns.path is None:
        return diag.DiagSocket()
    fd = netns.open_fd(ns)
    try:
        return diag.DiagSocket(netns_fd=fd, netns_label=ns.label)
    finally:
        os.close(fd)


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


__all__ = ["Engine", "Scan", "run_pass", "require_privilege", "RuntimeFailure"]
