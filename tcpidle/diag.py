"""The only module that speaks INET_DIAG (NETLINK_SOCK_DIAG) to the kernel.

Owns three things:

* **dump**: `DiagSocket.dump()` sends one dump request (optionally carrying
  filter bytecode compiled by `tcpidle.selectors`) and reads the whole
  multipart answer: SOCK_DIAG_BY_FAMILY (`struct inet_diag_req_v2`) for one
  family, or the legacy TCPDIAG_GETSOCK (`struct inet_diag_req`) for both
  families in one walk of the kernel's hash tables (see `dump_sockets`);
* **decode**: `decode_dump()` turns the raw netlink messages into
  `model.Socket` records (pure, no I/O: the unit tests feed it recorded dumps);
* **destroy**: `DiagSocket.destroy()` sends batched SOCK_DESTROY requests, each
  carrying the dumped `inet_diag_sockid` unchanged, and matches every ack to
  its request.

Why raw `socket` + `struct` and not pyroute2: pyroute2's generic netlink
decoder was measured at ~15x slower than `ss` (1.8 s vs 0.12 s on 27k
sockets), while a lean struct decoder over the same messages matched `ss`.
The hot loop below therefore does one `Struct.unpack_from` per message plus
one per attribute it walks, caches address text, and creates no object per
message beyond the `Socket` itself.

Layouts used (include/uapi/linux/{netlink,inet_diag,sock_diag,tcp}.h):

    nlmsghdr        u32 len, u16 type, u16 flags, u32 seq, u32 pid      16 bytes
    inet_diag_sockid be16 sport, be16 dport, be32 src[4], be32 dst[4],
                     u32 if, u32 cookie[2]                              48 bytes
    inet_diag_req_v2 u8 family, u8 protocol, u8 ext, u8 pad,
                     u32 states, inet_diag_sockid id                    56 bytes
    inet_diag_req    u8 family, u8 src_len, u8 dst_len, u8 ext,
                     inet_diag_sockid id, u32 states, u32 dbs            60 bytes
    inet_diag_msg    u8 family, state, timer, retrans, inet_diag_sockid,
                     u32 expires, rqueue, wqueue, uid, inode            72 bytes
    rtattr           u16 len, u16 type, payload padded to 4
"""

from __future__ import annotations

import array
import errno
import logging
import os
import select
import socket
import struct
import sys
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from tcpidle import errors, netns
from tcpidle.model import AF_INET, AF_INET6, Socket, Vitals, fills_directly

log = logging.getLogger("tcpidle")

# --- constants (kernel uapi) --------------------------------------------------

NETLINK_SOCK_DIAG = 4
TCPDIAG_GETSOCK = 18  # legacy request type (struct inet_diag_req); see dump_sockets
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # acks carry only the request header, not its payload

SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32

INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_REQ_SK_BPF_STORAGES = 2  # request: nested SK_DIAG_BPF_STORAGE_REQ_MAP_FD (u32 fd)s
SK_DIAG_BPF_STORAGE_REQ_MAP_FD = 1
INET_DIAG_INFO = 2
INET_DIAG_SK_BPF_STORAGES = 20  # reply: nested SK_DIAG_BPF_STORAGE { MAP_ID, MAP_VALUE }
SK_DIAG_BPF_STORAGE = 1
SK_DIAG_BPF_STORAGE_MAP_ID = 2
SK_DIAG_BPF_STORAGE_MAP_VALUE = 3
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
IPPROTO_TCP = socket.IPPROTO_TCP
AF_UNSPEC = 0  # dump(): every family, in one walk

# The kernel does not look at idiag_states for SOCK_DESTROY (the lookup is by
# 4-tuple + interface, then the cookie is compared); ss sends all bits, so do we.
DESTROY_STATES = 0xFFFFFFFF

# struct tcp_info fields we read (include/uapi/linux/tcp.h; offsets checked
# with offsetof() against the uapi header):
#    2 u8  tcpi_retransmits    icsk_retransmits: RTO timeouts since new data was acked
#    3 u8  tcpi_probes         icsk_probes_out: keep-alive / zero-window probes unanswered
#    4 u8  tcpi_backoff        icsk_backoff
#   24 u32 tcpi_unacked        packets_out
#   44 u32 tcpi_last_data_sent (48 tcpi_last_ack_sent is never filled)
#   52 u32 tcpi_last_data_recv
#   56 u32 tcpi_last_ack_recv
#  100 u32 tcpi_total_retrans
#  228 u32 tcpi_snd_wnd        Linux >= 5.4 (commit 8f7baad7f035); a kernel sends
#                              the tcp_info it knows, so its length says which.
# Everything up to total_retrans is unchanged since Linux 2.6.
_TI_LAST_DATA_SENT = 44
_TI_LAST_ACK_RECV = 56
_TI_CORE_LEN = 104  # through tcpi_total_retrans
_TI_SND_WND_LEN = 232  # through tcpi_snd_wnd

# --- wire formats ---------------------------------------------------------------

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_msg: family, state, timer, retrans, the whole sockid as one
# 48-byte string (kept verbatim as Socket.raw_id), then expires, rqueue,
# wqueue, uid, inode.
_DIAG_MSG = struct.Struct("=BBBB48sIIIII")
# The sockid itself: ports stay raw (network order, swapped via _NTOHS),
# addresses as 16-byte strings, ifindex, then both cookie halves.
_SOCKID = struct.Struct("=HH16s16s4xII")
_RTATTR = struct.Struct("=HH")
_I32 = struct.Struct("=i")
_U32 = struct.Struct("=I")
# One unpack per socket: retransmits, probes, backoff @2-4, unacked @24,
# last_data_sent @44, last_data_recv @52, last_ack_recv @56, total_retrans
# @100 and (the long form) snd_wnd @228.  Pad bytes cost nothing to skip.
_TI_FULL = struct.Struct("=2xBBB19xI16xI4xII40xI124xI")
_TI_CORE = struct.Struct("=2xBBB19xI16xI4xII40xI")
# Kernels older than 2.6 stopped short of tcpi_total_retrans: times only.
_TI_TIMES = struct.Struct("=IxxxxII")  # sent @44, (ack_sent @48), recv @52, ack @56
_TI_SENT_ONLY = struct.Struct("=I")
_TI_SENT_RECV = struct.Struct("=IxxxxI")
_REQ_V2 = struct.Struct("=IHHII BBBxI")  # nlmsghdr + inet_diag_req_v2 minus the sockid
_REQ_V1_HEAD = struct.Struct("=IHHII BBBB")  # nlmsghdr + inet_diag_req up to the sockid
_REQ_V1_TAIL = struct.Struct("=II")  # inet_diag_req after the sockid: states, dbs

NLMSGHDR_LEN = 16
DIAG_MSG_LEN = 72
SOCKID_LEN = 48
REQ_V2_LEN = 56
REQ_V1_LEN = 60
_MSG_MIN = NLMSGHDR_LEN + DIAG_MSG_LEN  # 88
_REQUEST_MSG_LEN = NLMSGHDR_LEN + REQ_V2_LEN  # 72

# Ports arrive in network byte order; a table lookup is the cheapest swap
# (built as an array: 2 ms at import instead of 5 ms for a list).
_NTOHS = array.array("H", range(65536))
if sys.byteorder == "little":
    _NTOHS.byteswap()

# Receive buffer we ask for with SO_RCVBUFFORCE (root) or SO_RCVBUF (capped by
# net.core.rmem_max).  The kernel doubles the value for bookkeeping overhead.
DEFAULT_RCVBUF = 8 << 20
# Send buffer of the request socket (destroys and lookups): one sendmsg()
# carries a whole batch (72 bytes a request) and netlink refuses a message
# larger than sk_sndbuf with EMSGSIZE.
REQUEST_SNDBUF = 2 << 20
# A single recv() of a dump returns one skb of at most ~32 KiB; a destroy
# batch's acks are read in bulk.  64 KiB leaves room and MSG_TRUNC tells us
# if it ever is not enough.
_RECV_SIZE = 1 << 16

# Kernel memory one ack costs in our receive queue: the skb truesize of a
# 36-byte NLMSG_ERROR (small data area + struct sk_buff + skb_shared_info),
# not its length.  Measured ~832 bytes on x86_64 / 6.18 by overflowing a
# known buffer (see test_dropped_acks_are_never_reported_as_success); 1024
# leaves a margin.  Used to size destroy batches so every ack fits the
# receive buffer; if this is ever wrong, dropped acks are detected and retried.
_ACK_TRUESIZE = 1024
# Likewise for the answer to an exact lookup: one inet_diag_msg with
# tcp_info, ~340 bytes of data in a skb of its own (truesize ~1.3 KiB).
_REPLY_TRUESIZE = 2048


class MalformedDump(errors.RuntimeFailure, ValueError):
    """The bytes are not a well-formed INET_DIAG dump (truncated or corrupt).

    Raised by the decoder instead of returning garbage.
    """


# --- decoding --------------------------------------------------------------------

_FILLED_FIELDS = frozenset((
    "cookie", "family", "state", "src", "sport", "dst", "dport", "inode", "uid",
    "raw_id", "last_data_recv_ms", "last_ack_recv_ms", "last_data_sent_ms", "netns", "vitals",
))


# model.fills_directly: the decoder fills each Socket's __dict__ at once.
_FAST_FILL = fills_directly(Socket, _FILLED_FIELDS)


def _decode_messages(
    buf,
    start: int,
    end: int,
    out: List[Socket],
    netns: Optional[str],
    seq: Optional[int],
    cache: Dict[bytes, str],
    stores: Optional[Dict[int, Dict[int, bytes]]] = None,
) -> int:
    """Decode the netlink messages in buf[start:end], appending to `out`.

    `stores` (a dict) collects each socket's BPF socket storages, when the
    request asked for them (INET_DIAG_REQ_SK_BPF_STORAGES): cookie -> {map
    id: raw value}; without it the walk of a record's attributes stops at
    tcp_info, as before.

    Returns the offset just past NLMSG_DONE once it is seen (the dump is
    complete), else -1.  Messages whose seq differs from `seq` (when given)
    are stale answers to an earlier request and are skipped.  Raises
    NetlinkError for NLMSG_ERROR and MalformedDump for anything that does
    not parse: every length is checked against what is left before use.
    """
    # Locals for speed: this loop runs once per socket.
    hdr_unpack = _NLMSGHDR.unpack_from
    msg_unpack = _DIAG_MSG.unpack_from
    id_unpack = _SOCKID.unpack
    rta_unpack = _RTATTR.unpack_from
    full_unpack = _TI_FULL.unpack_from
    core_unpack = _TI_CORE.unpack_from
    tuple_new = tuple.__new__
    ntohs = _NTOHS
    ntop = socket.inet_ntop
    append = out.append
    new = Socket.__new__
    setattr_ = object.__setattr__
    cache_get = cache.get
    fast = _FAST_FILL
    off = start
    while off < end:
        if end - off < NLMSGHDR_LEN:
            raise MalformedDump(
                "truncated netlink header at offset %d (%d bytes left)" % (off, end - off)
            )
        nlen, ntype, _flags, nseq, _pid = hdr_unpack(buf, off)
        if nlen < NLMSGHDR_LEN or nlen > end - off:
            raise MalformedDump(
                "netlink message at offset %d claims %d bytes, %d available" % (off, nlen, end - off)
            )
        nxt = off + ((nlen + 3) & ~3)
        if seq is not None and nseq != seq:
            off = nxt
            continue
        # Records carry the request's type: SOCK_DIAG_BY_FAMILY or TCPDIAG_GETSOCK.
        if ntype == SOCK_DIAG_BY_FAMILY or ntype == TCPDIAG_GETSOCK:
            if nlen < _MSG_MIN:
                raise MalformedDump(
                    "inet_diag_msg at offset %d is %d bytes, need %d" % (off, nlen, _MSG_MIN)
                )
            (family, state, timer, tretrans, raw_id, expires, rqueue, wqueue, uid,
             inode) = msg_unpack(buf, off + NLMSGHDR_LEN)
            sport, dport, src, dst, c0, c1 = id_unpack(raw_id)
            if family == AF_INET:
                ksrc = src[:4]
                kdst = dst[:4]
            elif family == AF_INET6:
                ksrc = src
                kdst = dst
            else:
                raise MalformedDump("inet_diag_msg at offset %d has family %d" % (off, family))
            s = cache_get(ksrc)
            if s is None:
                s = cache[ksrc] = ntop(family, ksrc)
            d = cache_get(kdst)
            if d is None:
                d = cache[kdst] = ntop(family, kdst)
            sent = recv = ack = None
            rtx = probes = backoff = unacked = total = wnd = None
            a = off + _MSG_MIN
            mend = off + nlen
            while a + 4 <= mend:
                alen, atype = rta_unpack(buf, a)
                if alen < 4 or alen > mend - a:
                    raise MalformedDump(
                        "attribute at offset %d claims %d bytes, %d left in message"
                        % (a, alen, mend - a)
                    )
                if atype == INET_DIAG_INFO:
                    plen = alen - 4
                    if plen >= _TI_SND_WND_LEN:
                        (rtx, probes, backoff, unacked, sent, recv, ack, total,
                         wnd) = full_unpack(buf, a + 4)
                    elif plen >= _TI_CORE_LEN:  # Linux < 5.4: no snd_wnd
                        rtx, probes, backoff, unacked, sent, recv, ack, total = core_unpack(buf, a + 4)
                    else:
                        sent, recv, ack = _decode_short_info(buf, a + 4, plen)
                    if stores is None:
                        break
                elif stores is not None and atype & NLA_TYPE_MASK == INET_DIAG_SK_BPF_STORAGES:
                    stores[c0 | (c1 << 32)] = _decode_storages(buf, a + 4, a + alen)
                a += (alen + 3) & ~3
            # tuple.__new__ skips the NamedTuple's Python-level __new__ (0.1 us, not 0.3).
            vitals = tuple_new(Vitals, (timer, tretrans, expires, rqueue, wqueue, unacked, rtx,
                                        total, backoff, probes, wnd))
            if fast:
                # model.filled, inlined: this runs once per socket.
                sk = new(Socket)
                setattr_(
                    sk,
                    "__dict__",
                    {
                        "cookie": c0 | (c1 << 32),
                        "family": family,
                        "state": state,
                        "src": s,
                        "sport": ntohs[sport],
                        "dst": d,
                        "dport": ntohs[dport],
                        "inode": inode,
                        "uid": uid,
                        "raw_id": raw_id,
                        "last_data_recv_ms": recv,
                        "last_ack_recv_ms": ack,
                        "last_data_sent_ms": sent,
                        "netns": netns,
                        "vitals": vitals,
                    },
                )
            else:
                sk = Socket(
                    cookie=c0 | (c1 << 32), family=family, state=state, src=s,
                    sport=ntohs[sport], dst=d, dport=ntohs[dport], inode=inode, uid=uid,
                    raw_id=raw_id, last_data_recv_ms=recv, last_ack_recv_ms=ack,
                    last_data_sent_ms=sent, netns=netns, vitals=vitals,
                )
            append(sk)
        elif ntype == NLMSG_DONE:
            # A dump's DONE carries an int: 0, or a negative errno if the
            # kernel gave up part way.
            if nlen >= NLMSGHDR_LEN + 4:
                (err,) = _I32.unpack_from(buf, off + NLMSGHDR_LEN)
                if err < 0:
                    raise errors.NetlinkError(-err, "INET_DIAG dump ended with an error")
            return nxt
        elif ntype == NLMSG_ERROR:
            if nlen < NLMSGHDR_LEN + 4:
                raise MalformedDump("truncated NLMSG_ERROR at offset %d" % off)
            (err,) = _I32.unpack_from(buf, off + NLMSGHDR_LEN)
            if err != 0:
                raise errors.NetlinkError(-err, "INET_DIAG dump request")
        elif ntype == NLMSG_OVERRUN:
            raise errors.NetlinkError(errno.ENOBUFS, "INET_DIAG dump overrun")
        # NLMSG_NOOP and anything unknown: skip.
        off = nxt
    if off != end:
        raise MalformedDump("netlink padding runs past the end of the buffer")
    return -1


# The usual INET_DIAG_SK_BPF_STORAGES payload, one map's value: SK_DIAG_BPF_STORAGE
# {u16 len, u16 type} holding MAP_ID {len 8, type, u32 id} then MAP_VALUE {len, type}.
_ONE_STORAGE = struct.Struct("=HHHHIHH")
_ONE_STORAGE_LEN = 16  # the three headers and the map id, before the value


def _decode_storages(buf, p: int, end: int) -> Dict[int, bytes]:
    """INET_DIAG_SK_BPF_STORAGES' payload: {map id: value bytes}."""
    if end - p >= _ONE_STORAGE_LEN:
        # One map's value (the probe's), laid out as the kernel writes it
        # (bpf_sk_storage_diag_put): read with one unpack instead of the walk.
        slen, stype, ilen, itype, map_id, vlen, vtype = _ONE_STORAGE.unpack_from(buf, p)
        if (slen == end - p and stype & NLA_TYPE_MASK == SK_DIAG_BPF_STORAGE
                and ilen == 8 and itype & NLA_TYPE_MASK == SK_DIAG_BPF_STORAGE_MAP_ID
                and vtype & NLA_TYPE_MASK == SK_DIAG_BPF_STORAGE_MAP_VALUE
                and vlen == slen - 12 and vlen >= 4):
            return {map_id: bytes(buf[p + _ONE_STORAGE_LEN:p + 12 + vlen])}
    out: Dict[int, bytes] = {}
    while p + 4 <= end:
        alen, atype = _RTATTR.unpack_from(buf, p)
        if alen < 4 or alen > end - p:
            raise MalformedDump("BPF storage attribute at offset %d claims %d bytes" % (p, alen))
        if atype & NLA_TYPE_MASK == SK_DIAG_BPF_STORAGE:
            map_id, value = None, None
            q, qend = p + 4, p + alen
            while q + 4 <= qend:
                blen, btype = _RTATTR.unpack_from(buf, q)
                if blen < 4 or blen > qend - q:
                    raise MalformedDump("BPF storage entry at offset %d claims %d bytes"
                                        % (q, blen))
                btype &= NLA_TYPE_MASK
                if btype == SK_DIAG_BPF_STORAGE_MAP_ID and blen >= 8:
                    (map_id,) = _U32.unpack_from(buf, q + 4)
                elif btype == SK_DIAG_BPF_STORAGE_MAP_VALUE:
                    value = bytes(buf[q + 4:q + blen])
                q += (blen + 3) & ~3
            if map_id is not None and value is not None:
                out[map_id] = value
        p += (alen + 3) & ~3
    return out


def storage_request_attr(map_fds: Sequence[int]) -> bytes:
    """INET_DIAG_REQ_SK_BPF_STORAGES asking for the storages of these map fds."""
    inner = b"".join(_RTATTR.pack(8, SK_DIAG_BPF_STORAGE_REQ_MAP_FD) + _U32.pack(fd)
                     for fd in map_fds)
    return _RTATTR.pack(4 + len(inner), INET_DIAG_REQ_SK_BPF_STORAGES) + inner


def _decode_short_info(buf, p: int, plen: int):
    """(last_data_sent, last_data_recv, last_ack_recv) of a tcp_info shorter
    than tcpi_total_retrans (ancient kernels); what it lacks is None."""
    p += _TI_LAST_DATA_SENT
    if plen >= _TI_LAST_ACK_RECV + 4:
        return _TI_TIMES.unpack_from(buf, p)
    if plen >= _TI_LAST_DATA_SENT + 12:  # no last_ack_recv
        return _TI_SENT_RECV.unpack_from(buf, p) + (None,)
    if plen >= _TI_LAST_DATA_SENT + 4:
        return _TI_SENT_ONLY.unpack_from(buf, p) + (None, None)
    return None, None, None


def decode_dump(buf, netns: Optional[str] = None) -> List[Socket]:
    """Decode a complete INET_DIAG dump (netlink messages up to NLMSG_DONE).

    `buf` is any bytes-like object holding the messages exactly as received
    (several recv() results concatenated).  Returns one Socket per
    SOCK_DIAG_BY_FAMILY message, tagged with `netns`.  Raises MalformedDump
    if the bytes are truncated or corrupt, or if NLMSG_DONE is missing, and
    errors.NetlinkError if the dump carries an error.
    """
    decoder = DumpDecoder(netns=netns)
    done = decoder.feed(buf)
    if not done:
        raise MalformedDump("dump ends without NLMSG_DONE (truncated)")
    return decoder.sockets


# Where a streamed dump's sockets go: called with the sockets of each received
# chunk (one recv(), ~70-100 records), in order, while the dump goes on.
Sink = Callable[[List[Socket]], None]


class DumpDecoder:
    """Incremental decoder: feed it each recv() result until it reports done.

    Netlink never splits a message across two datagrams, so each chunk is a
    whole number of messages; the decoder keeps no partial state besides the
    address-text cache and the list of sockets found.

    With a `sink` it keeps no list either: each chunk's sockets are handed
    to the sink as soon as they are decoded (a fresh list each time, the
    sink's to keep or drop), so a dump of 100k sockets never holds more
    than one chunk's records; `delivered` counts them.
    """

    __slots__ = ("sockets", "netns", "seq", "done", "_cache", "stores", "sink", "delivered")

    def __init__(self, netns: Optional[str] = None, seq: Optional[int] = None,
                 stores: Optional[Dict[int, Dict[int, bytes]]] = None,
                 sink: Optional[Sink] = None):
        self.sockets: List[Socket] = []
        self.netns = netns
        self.seq = seq
        self.done = False
        self._cache: Dict[bytes, str] = {}
        self.stores = stores  # see _decode_messages
        self.sink = sink
        self.delivered = 0

    def feed(self, chunk, length: Optional[int] = None) -> bool:
        """Decode chunk[:length]; returns True once NLMSG_DONE was seen."""
        if self.done:
            raise MalformedDump("data after NLMSG_DONE")
        end = len(chunk) if length is None else length
        stop = _decode_messages(chunk, 0, end, self.sockets, self.netns, self.seq, self._cache,
                                self.stores)
        if self.sink is not None and self.sockets:
            got, self.sockets = self.sockets, []
            self.delivered += len(got)
            self.sink(got)
        if stop >= 0:
            if stop < end:
                raise MalformedDump("%d bytes after NLMSG_DONE" % (end - stop))
            self.done = True
        return self.done


# --- requests --------------------------------------------------------------------


def build_dump_request(
    family: int, states_mask: int, bytecode: bytes = b"", want_info: bool = True, seq: int = 1,
    storage_fds: Sequence[int] = (),
) -> bytes:
    """One dump request for TCP sockets of `family` (AF_UNSPEC: of every family).

    AF_INET / AF_INET6: SOCK_DIAG_BY_FAMILY with `struct inet_diag_req_v2`.
    AF_UNSPEC: TCPDIAG_GETSOCK with the older `struct inet_diag_req`, the
    only request the kernel answers with both families from one walk
    (inet_diag_dump_compat sets sdiag_family = AF_UNSPEC; the v2 handlers
    are registered per family and refuse AF_UNSPEC).  Both carry the same
    ext bits, state mask and bytecode, and are answered with the same
    inet_diag_msg records.

    `storage_fds` (BPF_MAP_TYPE_SK_STORAGE map fds) make each record carry
    the socket's values in those maps (INET_DIAG_SK_BPF_STORAGES, Linux 5.7
    on); the kernel refuses the whole dump with EPERM without CAP_BPF or
    CAP_SYS_ADMIN.
    """
    ext = (1 << (INET_DIAG_INFO - 1)) if want_info else 0
    attr = b""
    if bytecode:
        alen = 4 + len(bytecode)
        attr = _RTATTR.pack(alen, INET_DIAG_REQ_BYTECODE) + bytecode + b"\0" * (-alen & 3)
    if storage_fds:
        attr += storage_request_attr(storage_fds)
    # A zero sockid: dumps ignore it (the bytecode does the filtering).
    if family == AF_UNSPEC:
        total = NLMSGHDR_LEN + REQ_V1_LEN + len(attr)
        head = _REQ_V1_HEAD.pack(
            total, TCPDIAG_GETSOCK, NLM_F_REQUEST | NLM_F_DUMP, seq, 0, AF_UNSPEC, 0, 0, ext,
        )
        return head + b"\0" * SOCKID_LEN + _REQ_V1_TAIL.pack(states_mask & 0xFFFFFFFF, 0) + attr
    total = NLMSGHDR_LEN + REQ_V2_LEN + len(attr)
    head = _REQ_V2.pack(
        total, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0,
        family, IPPROTO_TCP, ext, states_mask & 0xFFFFFFFF,
    )
    return head + b"\0" * SOCKID_LEN + attr


def _pack_request(buf: bytearray, off: int, sock: Socket, seq: int, msgtype: int = SOCK_DESTROY,
                  flags: int = NLM_F_REQUEST | NLM_F_ACK, ext: int = 0) -> None:
    """A request about one socket (SOCK_DESTROY, or an exact lookup) carrying its sockid."""
    _REQ_V2.pack_into(
        buf, off, _REQUEST_MSG_LEN, msgtype, flags, seq, 0,
        sock.family, IPPROTO_TCP, ext, DESTROY_STATES,
    )
    raw = sock.raw_id
    if len(raw) != SOCKID_LEN:
        raise ValueError("Socket.raw_id must be the 48-byte inet_diag_sockid, got %d" % len(raw))
    buf[off + 24 : off + _REQUEST_MSG_LEN] = raw


def _open_netlink(netns_fd: Optional[int], rcvbuf: int, sndbuf: int = 0) -> socket.socket:
    """A NETLINK_SOCK_DIAG socket, created inside `netns_fd` if given.

    A netlink socket belongs to the namespace of the thread that created it,
    forever; so entering the namespace just for socket() is enough, and the
    thread goes straight back (setns(CLONE_NEWNET) affects this thread only).
    """
    if netns_fd is None:
        return _new_netlink(rcvbuf, sndbuf)
    with netns.entered_fd(netns_fd):
        return _new_netlink(rcvbuf, sndbuf)


def _new_netlink(rcvbuf: int, sndbuf: int) -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    try:
        for force, plain, size in (
            (SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf),
            (SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf),
        ):
            if size <= 0:
                continue
            try:
                # FORCE ignores net.core.[rw]mem_max but needs CAP_NET_ADMIN.
                s.setsockopt(socket.SOL_SOCKET, force, size)
            except PermissionError:
                s.setsockopt(socket.SOL_SOCKET, plain, size)
        s.bind((0, 0))
    except BaseException:
        s.close()
        raise
    return s


# --- the socket ------------------------------------------------------------------

BytecodeSource = Union[None, bytes, Mapping[int, bytes], Callable[[int], bytes]]

# How a kernel without the legacy request answers it: no compat handler
# registered (EOPNOTSUPP), an unknown message type (EINVAL), no handler (ENOENT).
_LEGACY_REFUSED = frozenset((errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT))


def _bytecode_for(source: BytecodeSource, family: int) -> bytes:
    if source is None:
        return b""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if callable(source):
        return source(family) or b""
    return source.get(family, b"") or b""


def _note_fallback(exc: errors.NetlinkError) -> None:
    log.info(
        "kernel refused the one-walk dump of both families (%s): dumping per family", exc)


class Storages:
    """BPF socket storage maps whose values the dumps carry inline.

    Given to DiagSocket.dump_sockets(storage=...): each dump request then
    carries INET_DIAG_REQ_SK_BPF_STORAGES with these map fds (any fd of the
    map: bcc's, or one opened from its bpffs pin), and each record's values
    land in `stores` (cookie -> {map id: raw value}), until the user clears
    it.  The kernel refuses the whole dump with EPERM unless the caller has
    CAP_BPF or CAP_SYS_ADMIN: the first refusal sets `refused` (said once in
    the log) and the dumps go on without the attribute.  Exact lookups
    (DiagSocket.lookup) never carry the storages: the kernel attaches them
    to dump replies only (measured on 6.18).
    """

    def __init__(self, map_fds: Sequence[int]):
        self.map_fds = tuple(map_fds)
        self.stores: Dict[int, Dict[int, bytes]] = {}
        self.refused: Optional[str] = None

    def refuse(self, exc: BaseException) -> None:
        self.refused = ("the kernel refused the BPF storage in INET_DIAG dumps (%s; needs "
                        "CAP_BPF or CAP_SYS_ADMIN)" % os.strerror(getattr(exc, "errno", 0)
                                                                 or errno.EPERM))
        log.warning("%s: plain dumps, idle from tcp_info", self.refused)


class DiagSocket:
    """Owns the NETLINK_SOCK_DIAG sockets of one network namespace.

    One socket for dumps, a second one for requests about given sockets --
    SOCK_DESTROY and the exact lookups of the re-check -- so their answers
    never interleave with a dump.  `netns_fd`, if given, is an open
    /proc/.../ns/net or /run/netns/NAME descriptor: the sockets are created in
    that namespace and stay bound to it.  `netns_label` is copied into every
    Socket.netns.  Use as a context manager.  Not thread-safe: one
    DiagSocket per thread.  `open_socket(netns_fd, rcvbuf, sndbuf)` makes
    its netlink sockets (the unit tier's fake kernel hands in its own,
    tests/lab/fake_netlink.py).
    """

    # False once the kernel refused the one-walk dump of both families
    # (TCPDIAG_GETSOCK); shared by every DiagSocket of the process.
    single_walk = True

    def __init__(
        self,
        netns_fd: Optional[int] = None,
        netns_label: Optional[str] = None,
        rcvbuf: int = DEFAULT_RCVBUF,
        open_socket: Optional[Callable[[Optional[int], int, int], socket.socket]] = None,
    ):
        self.netns_label = netns_label
        self._seq = 0
        self._open_socket = open_socket or _open_netlink
        self._dump_sock = self._open_socket(netns_fd, rcvbuf, 0)
        try:
            self._request_sock = self._open_socket(netns_fd, rcvbuf, REQUEST_SNDBUF)
            self._setup_acks(self._request_sock)
        except BaseException:
            self._dump_sock.close()
            raise
        self._netns_fd = None if netns_fd is None else os.dup(netns_fd)
        # Destroy and lookup requests whose answer the kernel dropped (receive
        # queue overflow); they were retried.  Kept for tests and diagnostics.
        self.lost_answers = 0
        # Dump requests sent (each one walk of the kernel's hash tables).
        self.walks = 0
        # Sockets the last dump handed to its sink (dump(sink=...)).
        self.delivered = 0
        self._rcvbuf = rcvbuf
        self._buf = bytearray(_RECV_SIZE)
        self._view = memoryview(self._buf)

    @staticmethod
    def _setup_acks(s: socket.socket) -> None:
        # CAP_ACK: an error ack carries only the 16-byte header of the request
        # instead of a copy of all of it, so acks stay small and uniform.
        # NETLINK_EXT_ACK is left off on purpose: we report errnos only, and
        # its TLVs (error text, offsets) would only make error acks larger.
        try:
            s.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        except OSError:
            pass  # pre-4.3 kernels: full acks, still correct, just bigger

    # -- lifecycle --

    def close(self) -> None:
        for s in (self._dump_sock, self._request_sock):
            if s is not None:
                s.close()
        self._dump_sock = self._request_sock = None
        if self._netns_fd is not None:
            os.close(self._netns_fd)
            self._netns_fd = None

    def __enter__(self) -> "DiagSocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _next_seq(self, n: int = 1) -> int:
        """Reserve n consecutive sequence numbers; returns the first."""
        if self._seq + n >= 0xFFFFFFFF:
            self._seq = 0
        first = self._seq + 1
        self._seq += n
        return first

    @property
    def receive_buffer(self) -> int:
        """The request socket's receive buffer as the kernel accounts it."""
        return self._request_sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    # -- dump --

    def dump(
        self, family: int, states_mask: int, bytecode: bytes = b"", want_info: bool = True,
        storage: Optional[Storages] = None, sink: Optional[Sink] = None,
    ) -> List[Socket]:
        """All TCP sockets of `family` whose state bit is set in `states_mask`.

        `states_mask` has bit (1 << TcpState) per wanted state.  The whole
        multipart answer is read before returning, so nothing can be
        destroyed while the kernel is still walking its hash tables (ss -K
        does that and misses sockets).  `storage`: see Storages.  `sink`:
        the sockets go to it chunk by chunk as they arrive (DumpDecoder),
        and the list returned is empty; `delivered` then says how many.
        """
        if storage is not None and storage.refused is None:
            try:
                return self._dump(family, states_mask, bytecode, want_info, None, storage, sink)
            except errors.NetlinkError as e:
                if e.errno not in (errno.EPERM, errno.EACCES) or self.delivered:
                    raise  # a refusal comes before any record: a sink never sees one twice
                storage.refuse(e)
            except errors.PrivilegeError as e:
                if self.delivered:
                    raise
                storage.refuse(e)
        return self._dump(family, states_mask, bytecode, want_info, None, sink=sink)

    def dump_raw(
        self, family: int, states_mask: int, bytecode: bytes = b"", want_info: bool = True
    ) -> bytes:
        """Like dump(), but return the answer's netlink messages verbatim.

        For recording test fixtures (tests/lab/record_dump.py) and debugging;
        decode_dump() of the result gives what dump() would have returned.
        """
        raw: List[bytes] = []
        self._dump(family, states_mask, bytecode, want_info, raw)
        return b"".join(raw)

    def _dump(self, family, states_mask, bytecode, want_info, raw: Optional[List[bytes]],
              storage: Optional[Storages] = None, sink: Optional[Sink] = None):
        if self._dump_sock is None:
            raise ValueError("DiagSocket is closed")
        seq = self._next_seq()
        req = build_dump_request(family, states_mask, bytecode, want_info, seq,
                                 storage.map_fds if storage is not None else ())
        decoder = DumpDecoder(netns=self.netns_label, seq=seq,
                              stores=storage.stores if storage is not None else None, sink=sink)
        self.delivered = 0
        sock = self._dump_sock
        try:
            sock.send(req)
            self.walks += 1
            buf, view = self._buf, self._view
            recv_into = sock.recv_into
            trunc = socket.MSG_TRUNC
            feed = decoder.feed
            # Dumps are flow-controlled (the kernel fills the next skb only
            # once we have read the last), so unlike acks they cannot overrun.
            while True:
                n = recv_into(buf, 0, trunc)
                if n > len(buf):
                    raise MalformedDump(
                        "netlink message of %d bytes does not fit the %d-byte buffer" % (n, len(buf))
                    )
                if raw is not None:
                    raw.append(bytes(view[:n]))
                if feed(view, n):
                    break
        except OSError as e:
            self._reset_dump_socket()
            if e.errno in (errno.EPERM, errno.EACCES):
                raise errors.PrivilegeError("INET_DIAG dump: %s" % os.strerror(e.errno))
            raise errors.NetlinkError(e.errno or errno.EIO, "INET_DIAG dump") from e
        except BaseException:
            # A half-read dump leaves the kernel mid-walk on this socket; a new
            # socket is the cleanest way to get rid of it.
            self._reset_dump_socket()
            raise
        finally:
            self.delivered = decoder.delivered
        return decoder.sockets

    def _reset_dump_socket(self) -> None:
        old = self._dump_sock
        self._dump_sock = self._open_socket(self._netns_fd, self._rcvbuf, 0)
        old.close()

    def dump_sockets(
        self,
        families: Iterable[int],
        states_mask: int,
        bytecode_for_family: BytecodeSource = None,
        want_info: bool = True,
        storage: Optional[Storages] = None,
        sink: Optional[Sink] = None,
    ) -> List[Socket]:
        """The TCP sockets of `families` (AF_INET, AF_INET6 or both) in one list
        (or, with a `sink`, handed to it chunk by chunk: see dump()).

        `bytecode_for_family` is None, one bytecode for both, a mapping
        family -> bytecode, or a callable family -> bytecode.

        Both families with one bytecode are dumped in **one walk**
        (AF_UNSPEC, see build_dump_request), else AF_INET then AF_INET6.
        Why it matters: IPv4 and IPv6 sockets share one established hash,
        and unless a namespace was given a private one
        (net.ipv4.tcp_child_ehash_entries) that hash is the host's: a dump
        visits every socket of every namespace to find its own.  Two
        per-family dumps visit them all twice; with ten namespaces of 4,000
        sockets, one walk takes the kernel's share of an enumeration from
        ~310 ms to ~180 ms.  A kernel that refuses the legacy request is
        asked per family from then on.
        """
        asked = set(families)
        wanted = [fam for fam in (AF_INET, AF_INET6) if fam in asked]
        codes = {fam: _bytecode_for(bytecode_for_family, fam) for fam in wanted}
        if len(wanted) == 2 and codes[AF_INET] == codes[AF_INET6] and DiagSocket.single_walk:
            try:
                return self.dump(AF_UNSPEC, states_mask, codes[AF_INET], want_info, storage, sink)
            except errors.NetlinkError as e:
                if e.errno not in _LEGACY_REFUSED or self.delivered:
                    raise
                refused = e
            out = self._dump_each(wanted, codes, states_mask, want_info, storage, sink)
            # Only now is it the request, not its bytecode, the kernel refused.
            DiagSocket.single_walk = False
            _note_fallback(refused)
            return out
        return self._dump_each(wanted, codes, states_mask, want_info, storage, sink)

    def _dump_each(self, wanted, codes, states_mask, want_info, storage=None,
                   sink=None) -> List[Socket]:
        out: List[Socket] = []
        delivered = 0
        for fam in wanted:
            out.extend(self.dump(fam, states_mask, codes[fam], want_info, storage, sink))
            delivered += self.delivered
        self.delivered = delivered
        return out

    # -- destroy --

    def destroy(self, sockets: Sequence[Socket], batch: int = 256) -> List[int]:
        """SOCK_DESTROY each socket; returns one errno per socket (0 = destroyed).

        ENOENT: no socket with that 4-tuple *and cookie* any more (gone, or the
        tuple was reused by another connection, which is left alone).
        EOPNOTSUPP: the kernel lacks CONFIG_INET_DIAG_DESTROY.  EPERM: no
        CAP_NET_ADMIN in the socket's namespace.

        Requests go `batch` per sendmsg(): the kernel handles every message of
        one send synchronously and queues one ack each, so a batch costs one
        syscall plus the reads of its acks.  Batches are kept small enough
        for all their acks to fit the receive buffer.  If acks are dropped
        anyway (ENOBUFS) the unanswered requests are sent once more, alone;
        a socket whose answer was never seen is reported as ENOBUFS, never as
        destroyed.  A retried request whose first ack was lost may report
        ENOENT for a socket the first request destroyed: either way it is gone.
        """
        return self._exchange(sockets, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 0,
                              _ACK_TRUESIZE, batch)  # type: ignore[return-value]

    def lookup(self, sockets: Sequence[Socket], batch: int = 256) -> List[Union[Socket, int]]:
        """Each socket as the kernel sees it now (tcp_info included), or an errno.

        One exact SOCK_DIAG_BY_FAMILY request per socket, carrying its dumped
        sockid, cookie included: the kernel looks the 4-tuple up and answers
        ENOENT unless the socket found has that cookie.  Batched like
        destroy(); a request whose answer was lost is reported as ENOBUFS.
        """
        ext = 1 << (INET_DIAG_INFO - 1)
        return self._exchange(sockets, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, ext,
                              _REPLY_TRUESIZE, batch)

    def _exchange(self, sockets: Sequence[Socket], msgtype: int, flags: int, ext: int,
                  truesize: int, batch: int) -> List[Union[Socket, int]]:
        """One request per socket, carrying its sockid; one answer each, by seq.

        An answer is an errno from NLMSG_ERROR (0: an ack), or a Socket when
        the kernel replied with a record; ENOBUFS if never answered, even alone.
        """
        if self._request_sock is None:
            raise ValueError("DiagSocket is closed")
        n = len(sockets)
        results: List[Union[Socket, int, None]] = [None] * n
        if n == 0:
            return []
        # Every answer of a batch must fit the receive buffer, and the batch
        # itself the send buffer (less netlink's 32-byte allowance).
        fit_answers = self.receive_buffer // truesize - 1
        sndbuf = self._request_sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        fit_send = (sndbuf - 32) // _REQUEST_MSG_LEN
        size = max(1, min(batch, fit_answers, fit_send))
        request = (msgtype, flags, ext)
        lost: List[int] = []
        for lo in range(0, n, size):
            idx = range(lo, min(n, lo + size))
            lost.extend(self._exchange_batch(sockets, idx, results, request))
        if lost:
            # Second chance, one request per send: an answer cannot be crowded out.
            for i in lost:
                self._exchange_batch(sockets, [i], results, request)
        return [errno.ENOBUFS if r is None else r for r in results]  # type: ignore[misc]

    def _exchange_batch(
        self, sockets: Sequence[Socket], idx: Sequence[int],
        results: List[Union[Socket, int, None]], request: tuple,
    ) -> List[int]:
        """Send one batch, read its answers; returns the indexes left unanswered."""
        msgtype, flags, ext = request
        what = "SOCK_DESTROY" if msgtype == SOCK_DESTROY else "INET_DIAG lookup"
        count = len(idx)
        first = self._next_seq(count)
        req = bytearray(count * _REQUEST_MSG_LEN)
        for j, i in enumerate(idx):
            _pack_request(req, j * _REQUEST_MSG_LEN, sockets[i], first + j, msgtype, flags, ext)
        sock = self._request_sock
        try:
            sent = sock.send(req)
        except OSError as e:
            raise errors.NetlinkError(e.errno or errno.EIO, what + " send") from e
        if sent != len(req):  # netlink sends are all or nothing; be sure
            raise errors.NetlinkError(errno.EMSGSIZE, what + " short send")
        pending = count
        overrun = False
        buf, view = self._buf, self._view
        hdr_unpack = _NLMSGHDR.unpack_from
        i32_unpack = _I32.unpack_from
        # Records are copied out as they come (one per recv) and decoded
        # together at the end: one decoder call per batch, not per answer.
        records = bytearray()
        record_of: List[int] = []
        while pending:
            try:
                # The kernel answered every request before send() returned;
                # only a dropped answer can leave us waiting, so do not block
                # except for a short grace period below.
                got = sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if overrun:
                    break
                # Not expected (answers are queued synchronously); allow a moment.
                r, _, _ = select.select([sock], [], [], 1.0)
                if not r:
                    break
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    # Answers were dropped: the queue overflowed.  Keep reading
                    # what did arrive; the rest are reported unanswered.
                    overrun = True
                    continue
                raise errors.NetlinkError(e.errno or errno.EIO, what + " answer") from e
            off = 0
            while off + NLMSGHDR_LEN <= got:
                nlen, ntype, _flags, nseq, _pid = hdr_unpack(view, off)
                if nlen < NLMSGHDR_LEN or off + nlen > got:
                    raise MalformedDump("malformed %s answer at offset %d" % (what, off))
                j = (nseq - first) & 0xFFFFFFFF
                if j < count and results[idx[j]] is None:
                    if ntype == NLMSG_ERROR and nlen >= NLMSGHDR_LEN + 4:
                        results[idx[j]] = -i32_unpack(view, off + NLMSGHDR_LEN)[0]
                        pending -= 1
                    elif ntype == SOCK_DIAG_BY_FAMILY:
                        records += view[off:min(got, off + ((nlen + 3) & ~3))]
                        record_of.append(idx[j])
                        results[idx[j]] = -1  # answered; the Socket is filled in below
                        pending -= 1
                off += (nlen + 3) & ~3
        if record_of:
            decoded: List[Socket] = []
            _decode_messages(records, 0, len(records), decoded, self.netns_label, None, {})
            if len(decoded) != len(record_of):
                raise MalformedDump("%s: %d records decoded from %d answers"
                                    % (what, len(decoded), len(record_of)))
            for i, sk in zip(record_of, decoded):
                results[i] = sk
        if not pending:
            return []
        self.lost_answers += pending
        return [i for i in idx if results[i] is None]


def dump_sockets(
    families: Iterable[int],
    states_mask: int,
    bytecode_for_family: BytecodeSource = None,
    want_info: bool = True,
    netns_fd: Optional[int] = None,
    netns_label: Optional[str] = None,
) -> List[Socket]:
    """Open a DiagSocket (in `netns_fd` if given), dump AF_INET then AF_INET6, close."""
    with DiagSocket(netns_fd=netns_fd, netns_label=netns_label) as ds:
        return ds.dump_sockets(families, states_mask, bytecode_for_family, want_info)
