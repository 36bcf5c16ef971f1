"""One pass of tcpidle: dump, merge, decide, act; what happened is returned.

Owns the order of operations, which is where correctness lives:

1. The INET_DIAG dump is read to the end before anything is destroyed
   (`Scope.dump`): destroying while the kernel walks its hash buckets shifts
   the chains under the dump's resume position, and `ss -K` / tcp_closer
   then miss sockets.  The sockets are *decided* while it streams
   (`Scope.stream`: each chunk as it arrives, when the probe's records come
   inline or there is no probe), and only what acting and reporting need
   is kept (`tcpidle.tally`): the victims, the exposed, the counts.
2. Each socket found is checked again in Python (`selectors.matches`): the
   kernel bytecode only narrows the dump, it is never trusted alone.
3. Owners are looked up in /proc only for sockets that will be shown or
   acted on (one pass, filtered by inode), and not at all when there are
   none: on a host with 100k sockets the walk costs about a second, which a
   tracker polling an idle selection should not pay every interval.  Owner
   selectors (--pid, --comm, --cgroup; `selectors.owned_by`) need the walk
   over every match.
4. Victims are destroyed in batches by cookie-checked SOCK_DESTROY, and
   right before each batch the kernel is asked again about its victims (an
   exact, cookie-checked lookup; and their probe records, when the
   `Evidence` has a probe): one that left the selection (its state, typically) or
   received data since the scan is spared, and so is one that could not be
   asked about -- a verdict that cannot be confirmed is not acted on.  The
   window that peer tools leave open between dump and destroy shrinks to
   one batch.  After the destroy, the destroyed are looked up once more (an
   ack is not proof on kernels before 6.11).
5. Each batch's outcomes are handed to the caller (`act_batches`) as soon
   as the kernel answered, before the next batch is sent: `passes.run_pass`
   has them reported at once, so nothing done is lost to a later error or a
   signal, and a stop request ends the pass between two batches.  Nothing
   here prints.
6. Namespaces are reached through the descriptors the scan opened (kept
   in the Scan, `Scope.batches`), so the destroy goes where the dump went.
7. EOPNOTSUPP (a kernel without CONFIG_INET_DIAG_DESTROY) switches this and
   every later pass (`--destroy-with auto`, the default) to the BPF iterator
   where the kernel has bpf_sock_destroy (Linux >= 6.5: each batch's victims,
   by cookie, decided again and destroyed under their locks; kdestroy), else
   to the /proc fallback; said once in the log.  `--destroy-with netlink`
   forces SOCK_DESTROY: EOPNOTSUPP is then a failure of each victim;
   `--destroy-with bpf` (kill -i, track, --verdict, --middlebox: what a
   one-shot in-kernel pass cannot decide or repeat) sends every batch to the
   iterator from the start, after the same re-check.
8. With `Policy.keepalive` (tcpidle keepalive, track --keepalive) the same
   pass arms keep-alive in its victims instead (`tcpidle.retrofit`: the
   owner's descriptor duplicated, checked, setsockopt), after the same
   re-check; a socket whose keep-alive timer is armed is no victim, and one
   this engine armed is not tried again by a later poll.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field
from itertools import repeat
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from . import diag, idle, selectors
from .errors import PrivilegeError, RuntimeFailure
from .evidence import Evidence
from .model import (NO_OWNERS, Action, Activity, Outcome, OwnerSummary, Policy, Socket, TcpState,
                    Verdict)
from .scope import NamespaceFds, Scope
from .tally import Tally

log = logging.getLogger("tcpidle")

BATCH = 256  # victims per destroy batch (Scope.batches' chunk)
# ... when each batch's re-check dumps for the probe's inline storage: that
# dump walks the whole TCP table however few it returns (~6 ms at 20k
# sockets), so it is paid once per 1,024 victims (a batch's lookups and
# destroys, ~15 ms, are the window it covers) instead of once per 256.
DUMPED_BATCH = 1024

GONE = object()  # a re-check's answer: the kernel no longer has that cookie at that 4-tuple
# Why the re-check spared a victim (Spare.reason starts with one of these).
RECEIVED = "received data after the scan"
LEFT_SELECTION = "left the selection (now %s)"
LEFT_SELECTION_OTHER = "left the selection"
NOT_RECHECKED = "not asked about again"
# Inline storage lives as long as its socket: a record the scan had and the
# re-check's dump lacks is a dump that missed it, not news -- spared.
NO_FRESH_RECORD = NOT_RECHECKED + ": the re-check's dump did not carry its probe record"
VERDICT_CHANGED = "its verdict changed (now %s)"  # --verdict / --middlebox no longer holds
ACKED_BUT_REMAINS = ("the kernel acked SOCK_DESTROY but the socket remains (%s; an orphaned "
                     "socket on a kernel before 6.11, whose tcp_abort skips them)")
# Sockets that are no full socket (no owner, no tcp_info): some kernels'
# tcp_abort() refuses them with EOPNOTSUPP; TIME_WAIT ends by itself (60 s).
MINISOCK_STATES = frozenset((TcpState.TIME_WAIT, TcpState.NEW_SYN_RECV))
MINISOCK_REFUSED = ("this kernel cannot destroy a %s socket (SOCK_DESTROY: EOPNOTSUPP for "
                    "sockets that are not full sockets); it ends by itself")


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
        if self.reason.startswith(VERDICT_CHANGED[:18]):
            return "verdict-changed"
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
    # Keep-alive retrofit: each pidfd_getfd the kernel refused (fallback.AttachRefused),
    # said once per owner at the end of the pass; those victims' outcomes are `failed`.
    refused: List[BaseException] = field(default_factory=list)


@dataclass
class Scan:
    """The result of enumerating and deciding: the matched sockets' verdicts.

    `verdicts` holds every matched socket's verdict, or None when the pass
    kept only what it acts on (`Engine.scan(every=False)`, the kill pass);
    `tally` (tcpidle.tally) always has the victims, the counts and the
    exposed.  It holds a descriptor of every namespace it dumped
    (`reached`; close() releases them), so that acting on its verdicts
    reaches the same namespaces even if their names were deleted or reused
    since.  `missing` names the namespaces asked for by name, path or pid
    that could not be dumped.
    """

    verdicts: Optional[List[Verdict]]
    owners: Dict[int, OwnerSummary] = field(default_factory=dict)  # by socket inode
    seen: int = 0  # sockets the kernel returned before the Python filter
    dump_ms: float = 0.0
    # probe records the verdicts used, by cookie (without every verdict: the victims')
    records: Dict[int, Activity] = field(default_factory=dict)
    taken_ns: Dict[int, int] = field(default_factory=dict)  # by cookie: when judged (find only)
    reached: NamespaceFds = field(default_factory=NamespaceFds, repr=False)
    tally: Optional[Tally] = None  # None only in a hand-made Scan: then made of `verdicts`

    def __post_init__(self):
        if self.tally is None and self.verdicts is not None:
            self.tally = Tally.of(self.verdicts, self.records)

    @property
    def victims(self) -> List[Verdict]:
        return self.tally.victims

    @property
    def matched(self) -> int:
        return self.tally.matched

    @property
    def missing(self) -> List[str]:
        return self.reached.missing

    @property
    def named(self) -> bool:
        return self.reached.named

    @named.setter
    def named(self, value: bool) -> None:
        self.reached.named = value

    def keep_fd(self, label, fd: int) -> None:
        self.reached.keep_fd(label, fd)

    def fd_of(self, label) -> Optional[int]:
        return self.reached.fd_of(label)

    def close(self) -> None:
        self.reached.close()


class Engine:
    """Scans and acts for one scope, policy and evidence; keeps state across passes.

    Built once per command with everything it needs; the state it keeps is
    what it learnt (SOCK_DESTROY unsupported: the /proc fallback from then
    on) and counts: the victims spared over all passes, and those of the
    last pass a stop request left alone (`interrupted`).
    """

    def __init__(
        self,
        scope: Scope,
        policy: Policy,
        evidence: Optional[Evidence] = None,
        want_owners: bool = False,
    ):
        self.scope = scope
        self.selector = scope.selector
        self.policy = policy
        self.evidence = evidence if evidence is not None else Evidence()
        self.want_owners = want_owners
        self.use_proc = policy.use_proc
        # kdestroy.ChosenDestroy: with --destroy-with bpf, or once SOCK_DESTROY said EOPNOTSUPP
        self.in_kernel = None
        if policy.destroy_with == "bpf" and policy.keepalive is None:
            self.in_kernel = self._chosen_destroy()  # loads at its first batch
        self.spared = 0  # victims spared by the re-check, over all passes
        self.interrupted = 0  # victims of the last pass not acted on: stopped before their batch
        # Keep-alive retrofit: the cookies this engine armed (or found armed by their
        # owner), never tried again by a later poll; kept for the sockets still matched.
        self.armed: set = set()

    # -- enumerate and decide ------------------------------------------------

    def scan(self, every: bool = True) -> Scan:
        """Dump, merge, decide; the owner selectors applied (one /proc walk) when given.

        Each socket is decided as its chunk of the dump arrives, when the
        evidence allows (records read inline in the dump, or no probe), and
        counted into the scan's Tally; `every=False` (the kill pass) keeps
        only what acting on the scan and reporting it need, never a verdict
        per socket.  A probe's map is read after the whole dump: its sockets
        are decided then.  Owner selectors need the /proc walk over every
        match, so they keep every verdict until it is done.
        """
        started = time.monotonic()
        selector, policy = self.selector, self.policy
        by_owner = selectors.needs_owners(selector)
        armed = self.armed if self.policy.keepalive is not None and self.armed else None
        # With owner selectors the tally is made after the owner filter, below.
        tally = Tally(every=every or by_owner, armed=None if by_owner else armed)
        records_seen: Dict[int, Activity] = {}  # every record, kept for every=True
        matches, decide, add = selectors.matches, idle.decide, tally.add
        evidence = self.evidence
        scan = Scan(None, tally=tally)

        def judge(found: Iterable[Tuple[Socket, int]], records: Dict[int, Activity]) -> None:
            get = records.get
            for sock, now_ns in found:
                if matches(selector, sock):
                    record = get(sock.cookie)
                    add(decide(sock, record, now_ns, policy), record)

        try:
            if evidence.streams:
                def chunk(socks: List[Socket], now_ns: int) -> None:
                    records = evidence.take()
                    if every:
                        records_seen.update(records)
                    judge(zip(socks, repeat(now_ns)), records)

                scan.seen = self.scope.stream(scan, chunk)
                scan.dump_ms = (time.monotonic() - started) * 1000.0
                evidence.snapshot()  # ends the dump (its records' count); each chunk took its own
            else:
                found = self.scope.dump(scan)
                scan.dump_ms = (time.monotonic() - started) * 1000.0
                # Read after the dump: a socket that received data meanwhile has a
                # stamp newer than its "now", i.e. idle 0 -- the safe direction.
                records_seen = self.evidence.snapshot()
                scan.seen = len(found)
                judge(found, records_seen)
                del found
        except BaseException:
            scan.close()
            raise
        if by_owner:
            self._attribute(scan, tally.verdicts, force=True)
            owned = [v for v in tally.verdicts
                     if selectors.owned_by(selector, scan.owners.get(v.socket.inode, NO_OWNERS))]
            tally = scan.tally = Tally.of(owned, tally.records, every=every, armed=armed)
        scan.verdicts = tally.verdicts
        scan.records = records_seen if every else tally.records
        if self.policy.middlebox is not None:
            # Whose connections a middlebox dropped or will: the report and the
            # tracker's gauges name them.  Only those, so a quiet host walks
            # /proc for nothing.
            self._attribute(scan, tally.exposed, force=True)
        if armed is not None:
            # A tracker arms each connection once: one it armed shows the
            # keep-alive timer from then on, except while a retransmission is
            # pending, which hides it (INET_DIAG shows one timer).
            self.armed &= tally.still_armed
        return scan

    def survey(self, shown: Optional[Callable[[Scan], List[Verdict]]] = None,
               owners_needed: bool = False) -> Scan:
        """audit's pass: scan, and with owners wanted (or needed: grouping by owner), the
        owners of those shown -- the victims, or `shown(scan)`."""
        scan = self.scan()
        self._attribute(scan, shown(scan) if shown is not None else scan.victims,
                        force=owners_needed)
        return scan

    def find(self, pick: Callable[[List[Socket]], List[Socket]]) -> Scan:
        """explain's pass: dump the scope, and decide (with the policy and the evidence)
        the sockets `pick` chooses among all the dump returned -- not the selector's
        matches: explain says whether the selector would match.  `scan.taken_ns` keeps
        the instant each was judged at, so that its clauses can be judged again alike."""
        scan = Scan([])
        try:
            found = self.scope.dump(scan)
            records = self.evidence.snapshot()
        except BaseException:
            scan.close()
            raise
        now_of = {id(sock): now_ns for sock, now_ns in found}
        chosen = pick([sock for sock, _ in found])
        scan.verdicts = [idle.decide(sock, records.get(sock.cookie), now_of[id(sock)], self.policy)
                         for sock in chosen]
        scan.taken_ns = {sock.cookie: now_of[id(sock)] for sock in chosen}
        scan.seen, scan.records = len(found), records
        scan.tally = Tally.of(scan.verdicts, records, every=True)
        return scan

    def _attribute(self, scan: Scan, verdicts: Sequence[Verdict], force: bool = False) -> None:
        """Add the owners of `verdicts` to `scan.owners` with one /proc pass (if any are missing)."""
        if not (self.want_owners or force):
            return
        missing = {v.socket.inode for v in verdicts if v.socket.inode} - set(scan.owners)
        if missing:
            from . import owners  # only with -p or an owner selector: kill and audit start faster

            scan.owners.update(owners.summaries_by_inode(missing))

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
        self._attribute(scan, victims)
        if self.policy.dry_run:
            would = Action.WOULD_DESTROY if self.policy.keepalive is None else \
                Action.WOULD_SET_KEEPALIVE
            yield Batch([self._outcome(v, would, None, scan.owners) for v in victims], [])
            return
        done = 0
        by_port = self.evidence.dumps_to_recheck and self.policy.idle_time_ms > 0
        for nl, part in self.scope.batches(scan, victims, DUMPED_BATCH if by_port else BATCH,
                                           by_port=by_port):
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
        if self.policy.keepalive is not None:
            armed, refused = self._retrofit(go)
            return Batch(outcomes + armed, spared, refused=refused)
        if self.in_kernel is not None:
            return self._destroy_in_kernel(scan, go, outcomes, spared)
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
            elif err == errno.EOPNOTSUPP and verdict.socket.state in MINISOCK_STATES:
                # A kernel with SOCK_DESTROY whose tcp_abort() takes full
                # sockets only (Debian's 5.10, measured by the lab) refuses a
                # TIME_WAIT socket so: a fact about that socket, not a
                # kernel without SOCK_DESTROY, and no owner holds one, so
                # /proc could do nothing either.
                outcomes.append(self._outcome(verdict, Action.FAILED, MINISOCK_REFUSED % (
                    verdict.socket.state_name,), owners))
            elif err == errno.EOPNOTSUPP:
                unsupported.append(verdict)
            elif err == errno.EPERM:
                outcomes.append(self._outcome(verdict, Action.FAILED, "SOCK_DESTROY: " + os.strerror(err), owners))
                fatal = PrivilegeError("SOCK_DESTROY refused (EPERM): need CAP_NET_ADMIN in this network namespace")
            else:
                outcomes.append(self._outcome(verdict, Action.FAILED, "SOCK_DESTROY: " + os.strerror(err), owners))
        if unsupported:
            return self._unsupported(scan, unsupported, Batch(outcomes, spared, fatal))
        return Batch(outcomes, spared, fatal)

    def _unsupported(self, scan: Scan, victims: List[Verdict], batch: "Batch") -> "Batch":
        """SOCK_DESTROY answered EOPNOTSUPP: the next backend, for these and every later batch.

        The BPF iterator goes before /proc: it needs no rights over the
        owners (pidfd_getfd needs ptrace rights over each) and it decides
        each socket under its lock.  Forced netlink has no next backend."""
        from . import kdestroy

        text = "SOCK_DESTROY is not supported by this kernel (CONFIG_INET_DIAG_DESTROY is off)"
        if self.policy.destroy_with == "netlink":
            batch.outcomes += [self._outcome(v, Action.FAILED, text + " (--destroy-with netlink)",
                                             scan.owners) for v in victims]
            return batch
        reason = kdestroy.unavailable()
        if reason is None:
            log.warning("%s: destroying in the kernel from now on (BPF TCP iterator + "
                        "bpf_sock_destroy, each victim decided again under its lock)", text)
            self.in_kernel = self._chosen_destroy()
            return self._destroy_in_kernel(scan, victims, batch.outcomes, batch.spared,
                                           batch.fatal)
        log.warning("%s, nor is the BPF iterator (%s): falling back to /proc (%s)",
                    text, reason, self.policy.proc_action)
        self.use_proc = True
        batch.outcomes += self._fallback(victims, scan.owners)
        return batch

    def _chosen_destroy(self):
        """The iterator for victims chosen here, reading the probe's storage where the
        evidence has it (so that it decides again as the scan did)."""
        from . import kdestroy

        return kdestroy.ChosenDestroy(self.selector, self.policy, BATCH,
                                      kdestroy.storage_fd_of(self.evidence))

    def _destroy_in_kernel(self, scan: Scan, victims: List[Verdict], outcomes: List[Outcome],
                           spared: List[Spare], fatal=None) -> "Batch":
        """One iterator pass in the victims' namespace, given their cookies."""
        from .probe import ProbeUnavailable

        label = victims[0].socket.netns
        fd = scan.fd_of(label) if label is not None else None
        try:
            acted, kept, not_full = self.in_kernel.destroy(victims, fd)
        except (ProbeUnavailable, OSError) as exc:
            text = "the BPF iterator failed (%s)" % why(exc)
            return Batch(outcomes + [self._outcome(v, Action.FAILED, text, scan.owners)
                                     for v in victims], spared, fatal)
        outcomes = outcomes + [self._outcome(v, action, err, scan.owners)
                               for v, action, err in acted]
        for v, what in kept:
            spared.append(Spare(v, RECEIVED + " (decided again in the kernel)"
                                if what == "spared" else LEFT_SELECTION_OTHER))
        if not_full:  # TIME_WAIT, request sockets: neither SOCK_DESTROY nor the kfunc
            outcomes += self._fallback(not_full, scan.owners)
        return Batch(outcomes, spared, fatal)

    def close(self) -> None:
        """Release what a pass loaded (the BPF iterator, if SOCK_DESTROY sent us there)."""
        if self.in_kernel is not None:
            self.in_kernel.close()
            self.in_kernel = None

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
            text = "not asked about again: INET_DIAG lookup failed (%s)" % why(exc)
            return [(None, text) for _ in part]
        idle_check = self.policy.idle_time_ms > 0
        probe_now: Dict[int, Activity] = {}
        probe_failed = None
        if idle_check and self.evidence.present:
            try:
                probe_now = self.evidence.lookup([v.socket.cookie for v in part],
                                                 batch=(nl, [v.socket for v in part]))
            except OSError as exc:
                probe_failed = "not asked about again: re-reading the BPF map failed (%s)" % why(exc)
        policy = self.policy
        judged = policy.verdicts is not None or policy.middlebox is not None
        inline = idle_check and probe_failed is None and self.evidence.dumps_to_recheck
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
            elif inline and v.socket.cookie in scan.records and v.socket.cookie not in probe_now:
                out.append((fresh, NO_FRESH_RECORD))
            elif idle_check and idle.received_since(scan.records.get(v.socket.cookie),
                                                    probe_now.get(v.socket.cookie), policy):
                out.append((fresh, RECEIVED))
            elif judged and not (again := idle.decide(fresh, probe_now.get(fresh.cookie),
                                                      time.monotonic_ns(), policy)).victim:
                # Chosen for its verdict (or for being past a middlebox's
                # timeout), which the fresh evidence no longer gives: a "dead"
                # peer whose ACK arrived since the scan is alive.
                out.append((fresh, VERDICT_CHANGED % (
                    again.health.verdict if policy.verdicts is not None else again.exposure)))
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
                        "trusting the kernel's acks", len(destroyed), why(exc))
            return {}
        return {v.socket.cookie: sk for v, sk in zip(destroyed, again) if isinstance(sk, Socket)}

    def _fallback(self, victims: Sequence[Verdict], held: Dict[int, OwnerSummary]) -> List[Outcome]:
        """The /proc fallback, with the holders as they are now (their fds are needed)."""
        from . import fallback, owners  # only --use-proc, or a kernel without SOCK_DESTROY

        fresh = owners.owners_by_inode({v.socket.inode for v in victims})
        results = fallback.apply_fallback([v.socket for v in victims], self.policy.proc_action, fresh)
        return [Outcome(verdict, r.action, r.error, *r.owners) for verdict, r in zip(victims, results)]

    def _retrofit(self, victims: Sequence[Verdict]) -> Tuple[List[Outcome], list]:
        """Keep-alive armed in each victim through its owner's descriptor (tcpidle.retrofit),
        with the holders as they are now; the outcomes, and the refused pidfd_getfd calls."""
        from . import owners, retrofit  # tcpidle keepalive, track --keepalive

        fresh = owners.owners_by_inode({v.socket.inode for v in victims})
        done = retrofit.apply_keepalive([v.socket for v in victims], self.policy.keepalive, fresh)
        for v, r in zip(victims, done.results):
            if r.action in (Action.KEEPALIVE_SET, Action.KEEPALIVE_ON):
                self.armed.add(v.socket.cookie)
        return ([Outcome(v, r.action, r.error, *r.owners) for v, r in zip(victims, done.results)],
                done.refused)

    @staticmethod
    def _outcome(verdict: Verdict, action: str, error: Optional[str],
                 held: Dict[int, OwnerSummary]) -> Outcome:
        return Outcome(verdict, action, error, *held.get(verdict.socket.inode, NO_OWNERS))


def why(exc: BaseException) -> str:
    """An error as one short phrase for a log line."""
    if isinstance(exc, OSError) and exc.errno and not isinstance(exc, RuntimeFailure):
        return os.strerror(exc.errno)
    return " ".join(str(exc).split()) or type(exc).__name__


__all__ = ["Engine", "Scan", "Batch", "Spare", "why", "RuntimeFailure"]
