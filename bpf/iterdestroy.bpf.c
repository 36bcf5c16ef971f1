/* tcpidle's in-kernel destroy pass: a BPF TCP iterator (iter/tcp) that
 * decides and destroys each socket while the kernel holds its lock.
 *
 * Loaded by tcpidle/probe/iterdestroy.py (compiled by bcc, loaded with its own
 * BPF_PROG_LOAD: BPF_PROG_TYPE_TRACING, expected attach type BPF_TRACE_ITER,
 * attach_btf_id = vmlinux BTF id of bpf_iter_tcp).  One read() of the iterator
 * fd runs one pass over the TCP sockets of the network namespace the iterator
 * link was created in.
 *
 * Why it is exact: since Linux 6.5 the TCP iterator batches one hash bucket,
 * then calls this program for each full socket under lock_sock() (the owner
 * lock; lock_sock_fast() before, which would deadlock in tcp_abort()'s
 * bh_lock_sock()).  While the socket is owned, the receive path (under
 * bh_lock_sock) queues its segments on the socket's backlog instead of
 * processing them, and release_sock() processes that backlog after this
 * program: no segment is processed between the read of the receive stamp
 * below and bpf_sock_destroy().  A segment that arrives during the pass is
 * handled either before (and then seen here: the socket is spared) or after
 * the destroy (on a closed socket: dropped, answered with a reset).
 *
 * Configuration.  Only the running kernel's struct offsets are fixed at
 * compile time (-D OFF_*, from its BTF; no header struct layout is used,
 * fields are read with bpf_probe_read_kernel), so the compiled program is the
 * same for every selection and is compiled once per boot and kept (see
 * tcpidle/probe/itercache.py).  Everything a run decides is in maps, written
 * before each pass:
 *   config[0]     struct config below: families, states, which lists are
 *                 given (CFG_*), the idle threshold and limit in jiffies,
 *                 the kill cap
 *   sports, dports, excl_ports   port bitmaps (bit p%64 of word p/64)
 *   src_nets, dst_nets, excl_nets LPM tries of ::ffff:a.b.c.d / IPv6
 *   owners        socket inodes the owner selectors matched (resolved in
 *                 user space by the /proc walk)
 *   uids          socket uids (--uid)
 *   cookies       with CFG_COOKIES, only these sockets are looked at: the
 *                 victims user space chose (the idlest N under a kill cap,
 *                 a netlink batch SOCK_DESTROY refused); each is decided again
 *                 here under its lock, and one that no longer qualifies is
 *                 reported OUT_SPARED or OUT_LEFT instead of destroyed
 *   sk_activity   (built with -DTCPIDLE_ITER_STORAGE only) the probe's
 *                 per-socket storage (BPF_MAP_TYPE_SK_STORAGE, pinned by the
 *                 tracker; layout of bpf/tcpidle.bpf.c): no map of ours, the
 *                 pinned map's fd is written into the instructions at load
 *
 * The idle decision is idle.py's merge rule, on the socket under its lock.
 * What the socket holds: icsk_ack.lrcvtime (jiffies of the last data
 * segment; tcp_info's tcpi_last_data_recv) and, with CFG_IDLE_ANY,
 * tcp_sock.rcv_tstamp (last ACK; tcpi_last_ack_recv): one jiffy of
 * precision, unknown above limit_j.  With the probe's storage, its record's
 * bpf_ktime_get_ns() stamp (last_data_ns, or last_segment_ns with
 * CFG_IDLE_ANY) against bpf_ktime_get_ns() now (the same clock): ns
 * precision -- unless it is more than SLACK_NS (idle.JIFFY_SLACK_MS) older
 * than what the socket says (the probe missed traffic: detached, or a tracker
 * stopped), then the socket's jiffies win, as in user space.  A socket with
 * no record (or none with data yet) is decided on its jiffies alone.
 * bpf_sk_storage_get() without F_CREATE never adds a record: it returns
 * NULL for a socket without one (and for sockets that are not full sockets).
 * It is allowed in BPF_TRACE_ITER programs since Linux 5.11
 * (bpf_sk_storage_tracing_allowed), on the iterator's sock_common pointer
 * (bpf_sk_storage_get_tracing_proto takes a BTF sock_common); the probe's
 * receive hook updates the record under the socket's lock, which this pass
 * holds, so the record read here is the socket's last word.
 *
 * Output: one struct rec per socket acted on (selected and a victim), in the
 * iterator's seq output (bpf_seq_write).  Layout is decoded by
 * iterdestroy.decode_records; keep both in step.  counts[1] is the number of
 * sockets the selection matched, counts[0] the destroys against max_kills,
 * counts[2] the failed destroys whose error could not be kept in `errors`.
 *
 * The record is written BEFORE the destroy, and nothing is destroyed unless
 * it was written: when a socket's output does not fit the seq buffer (8
 * pages), bpf_seq_read() throws that output away and shows the same socket
 * again at the next read().  Written after the destroy, such a record would
 * be lost with the socket already gone (measured: 21 of 10,000 destroys
 * unreported).  So the record says what is about to be done, and a destroy
 * that fails is told in `errors` (cookie -> -errno), which user space reads
 * after the pass.
 */

#define KFUNC_SOCK_DESTROY 0x7ffff /* patched to a BPF_PSEUDO_KFUNC_CALL */

#define TCP_TIME_WAIT 6
#define TCP_LISTEN 10
#define TCP_SYN_SENT 2
#define TCP_NEW_SYN_RECV 12

#define OUT_DESTROYED 0
#define OUT_FAILED 1
#define OUT_DRY_RUN 2
#define OUT_CAPPED 3
#define OUT_NOT_FULL 4
#define OUT_SPARED 5 /* a chosen cookie, no longer idle enough: received since */
#define OUT_LEFT 6   /* a chosen cookie that left the selection (its state...) */

#define CFG_SPORTS (1 << 0)
#define CFG_DPORTS (1 << 1)
#define CFG_EXCL_PORTS (1 << 2)
#define CFG_SRC (1 << 3)
#define CFG_DST (1 << 4)
#define CFG_EXCL_NETS (1 << 5)
#define CFG_OWNERS (1 << 6)
#define CFG_UIDS (1 << 7)
#define CFG_COOKIES (1 << 8)
#define CFG_IDLE_ANY (1 << 9) /* idle counts from the last ACK too (--idle-metric any) */
#define CFG_DRY_RUN (1 << 10) /* decide and report, destroy nothing */

/* rec.idle_known bits */
#define IDLE_JIFFIES (1 << 0) /* idle_j is known (the socket's stamps, within limit_j) */
#define IDLE_BPF (1 << 1)     /* idle_ns is the probe's (else idle_j in ns) */
#define IDLE_RX (1 << 2)      /* last_rx_ns: age of the probe's last segment */

/* idle.JIFFY_SLACK_MS: how much older than the socket's jiffies the
 * probe's stamp may be before it is not believed */
#define SLACK_NS 10000000ULL

/* Keep in step with iterdestroy.CONFIG. */
struct config {
    u32 family_mask; /* bit 0 AF_INET, bit 1 AF_INET6 */
    u32 state_mask;  /* 1 << TCP state, as INET_DIAG's idiag_states */
    u32 flags;       /* CFG_* */
    u32 thresh_j;    /* idle threshold in jiffies (0: every selected socket) */
    u32 limit_j;     /* idle above this is unknown (0: no limit) */
    u32 pad;
    u64 max_kills;   /* destroys allowed in this pass (0: no cap) */
    u64 thresh_ns;   /* the same threshold in ns, for the probe's stamps */
    u64 jiffy_ns;    /* one jiffy in ns (1e9 / HZ) */
};

/* bcc 0.26's helpers.h declares bpf_get_socket_cookie() returning u32; the
 * kernel's returns u64.  Through bcc's prototype clang keeps the low 32 bits
 * only, and cookies past 2^32 would name other sockets: call it with the
 * kernel's type (as bpf/tcpidle.bpf.c does). */
static u64 (*tcpidle_get_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

struct tcpidle_iter_meta {
    void *seq;
    unsigned long long session_id;
    unsigned long long seq_num;
};
struct tcpidle_iter_tcp {
    struct tcpidle_iter_meta *meta;
    struct sock_common *sk_common;
    unsigned int uid;
};

struct rec {
    u64 cookie;
    u8 family;
    u8 state;
    u8 outcome;
    u8 idle_known;
    s32 err;
    u16 sport; /* host order */
    u16 dport; /* host order */
    u32 idle_j;
    u8 src[16];
    u8 dst[16];
    u32 uid;
    u32 pad;
    u64 inode; /* 0: no file holds it (orphan, TIME_WAIT, request) */
    u64 idle_ns;    /* the idle decided on (IDLE_BPF: the probe's; else idle_j in ns) */
    u64 last_rx_ns; /* IDLE_RX: since the probe's last segment of any kind */
};

struct lpm_key {
    u32 prefixlen;
    u8 addr[16]; /* IPv4 as ::ffff:a.b.c.d */
};

/* Sizes here are bcc's; tcpidle creates the maps itself at each load
 * (itercache.py), owners, uids and cookies sized for the run. */
BPF_ARRAY(config, struct config, 1);
BPF_ARRAY(sports, u64, 1024);
BPF_ARRAY(dports, u64, 1024);
BPF_ARRAY(excl_ports, u64, 1024);
BPF_LPM_TRIE(src_nets, struct lpm_key, u8, 1024);
BPF_LPM_TRIE(dst_nets, struct lpm_key, u8, 1024);
BPF_LPM_TRIE(excl_nets, struct lpm_key, u8, 1024);
BPF_HASH(owners, u64, u8, 1);
BPF_HASH(uids, u32, u8, 1);
BPF_HASH(cookies, u64, u8, 1);
BPF_ARRAY(counts, u64, 3);
BPF_HASH(errors, u64, s32, 4096);

#ifdef TCPIDLE_ITER_STORAGE
/* The probe's record (struct tcpidle_activity of bpf/tcpidle.bpf.c). */
struct activity {
    u64 last_segment_ns;
    u64 last_data_ns;
    u64 segments;
    u64 data_segments;
    u64 bytes;
};
/* bcc's BPF_SK_STORAGE spelled out, as bpf/tcpidle.bpf.c does: bcc creates
 * one at compile time (thrown away); the loader puts the pinned map there. */
struct sk_activity_table_t {
    int key;
    struct activity leaf;
    void *(*sk_storage_get)(void *, void *, int);
    int (*sk_storage_delete)(void *);
    u32 flags;
};
__attribute__((section("maps/sk_storage")))
struct sk_activity_table_t sk_activity = { .flags = BPF_F_NO_PREALLOC };
BPF_ANNOTATE_KV_PAIR(sk_activity, int, struct activity);
#endif

/* bcc resolves a map only where its name is written in the function, so
 * each lookup is spelled out below; these helpers do the rest. */
static __always_inline int bit_set(u64 *bits, u16 port)
{
    return bits && ((*bits >> (port & 63)) & 1);
}

static __always_inline void lpm_key_of(struct lpm_key *key, u8 *addr)
{
    key->prefixlen = 128;
    __builtin_memcpy(key->addr, addr, 16);
}

/* Write r with outcome `out`; on a full seq buffer undo the matched count:
 * the socket is shown again at the next read() and counted then. */
static __always_inline int emit(void *seq, struct rec *r, u8 out, u64 *matched)
{
    r->outcome = out;
    if (bpf_seq_write(seq, r, sizeof(*r))) {
        if (matched)
            *matched -= 1;
        return -1;
    }
    return 0;
}

int bpf_iter__tcp(struct tcpidle_iter_tcp *ctx)
{
    struct sock_common *skc = ctx->sk_common;
    void *seq = ctx->meta->seq;
    struct rec r = {};
    u16 family = 0;
    u8 state = 0;
    u32 addr4 = 0;
    u32 word = 0;
    u32 zero = 0, one = 1, two = 2;
    u64 *n;
    s32 err;
    void *sock_ptr = 0;
    struct lpm_key key = {};
    struct config *cfg;
    u32 flags;
    int chosen;

    if (!skc)
        return 0;
    cfg = config.lookup(&zero);
    if (!cfg)
        return 0;
    flags = cfg->flags;
    bpf_probe_read_kernel(&family, 2, (char *)skc + OFF_FAMILY);
    bpf_probe_read_kernel(&state, 1, (char *)skc + OFF_STATE);
    if (family == 2) {
        if (!(cfg->family_mask & 1))
            return 0;
    } else if (family == 10) {
        if (!(cfg->family_mask & 2))
            return 0;
    } else {
        return 0;
    }
    /* A chosen socket is looked up first: if it left the selection since
     * user space chose it, that is reported (OUT_LEFT), not ignored. */
    chosen = 0;
    if (flags & CFG_COOKIES) {
        r.cookie = tcpidle_get_socket_cookie(skc);
        if (!cookies.lookup(&r.cookie))
            return 0;
        chosen = 1;
    }

    r.family = family;
    r.state = state;
    r.uid = ctx->uid;
    bpf_probe_read_kernel(&r.sport, 2, (char *)skc + OFF_NUM);
    bpf_probe_read_kernel(&r.dport, 2, (char *)skc + OFF_DPORT);
    r.dport = (r.dport >> 8) | (r.dport << 8);
    if (family == 2) {
        r.src[10] = 0xff;
        r.src[11] = 0xff;
        r.dst[10] = 0xff;
        r.dst[11] = 0xff;
        bpf_probe_read_kernel(&addr4, 4, (char *)skc + OFF_RCV_SADDR);
        __builtin_memcpy(&r.src[12], &addr4, 4);
        bpf_probe_read_kernel(&addr4, 4, (char *)skc + OFF_DADDR);
        __builtin_memcpy(&r.dst[12], &addr4, 4);
    } else {
        bpf_probe_read_kernel(r.src, 16, (char *)skc + OFF_V6_RCV_SADDR);
        bpf_probe_read_kernel(r.dst, 16, (char *)skc + OFF_V6_DADDR);
    }

    if (state > 12 || !((cfg->state_mask >> state) & 1))
        goto unselected;
    if (flags & CFG_SPORTS) {
        word = r.sport >> 6;
        if (!bit_set(sports.lookup(&word), r.sport))
            goto unselected;
    }
    if (flags & CFG_DPORTS) {
        word = r.dport >> 6;
        if (!bit_set(dports.lookup(&word), r.dport))
            goto unselected;
    }
    if (flags & CFG_SRC) {
        lpm_key_of(&key, r.src);
        if (!src_nets.lookup(&key))
            goto unselected;
    }
    if (flags & CFG_DST) {
        lpm_key_of(&key, r.dst);
        if (!dst_nets.lookup(&key))
            goto unselected;
    }
    if (flags & CFG_EXCL_PORTS) {
        word = r.sport >> 6;
        if (bit_set(excl_ports.lookup(&word), r.sport))
            goto unselected;
        word = r.dport >> 6;
        if (bit_set(excl_ports.lookup(&word), r.dport))
            goto unselected;
    }
    if (flags & CFG_EXCL_NETS) {
        lpm_key_of(&key, r.src);
        if (excl_nets.lookup(&key))
            goto unselected;
        lpm_key_of(&key, r.dst);
        if (excl_nets.lookup(&key))
            goto unselected;
    }
    if ((flags & CFG_UIDS) && !uids.lookup(&r.uid))
        goto unselected;
    if (!chosen)
        r.cookie = tcpidle_get_socket_cookie(skc);

    /* TIME_WAIT and request sockets are not full sockets: the iterator does
     * not lock them, they have no receive stamps, and bpf_sock_destroy()
     * reads sk->sk_protocol, a member of the full struct sock that these
     * mini sockets do not have.  Never passed to it: reported, so user space
     * can hand them to SOCK_DESTROY. */
    if (state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV) {
        if (flags & CFG_OWNERS)
            goto unselected; /* no file holds them: no owner matches */
        n = counts.lookup(&one);
        if (n)
            *n += 1;
        if (cfg->thresh_j > 0)
            return 0; /* no idle time known: never a victim */
        emit(seq, &r, OUT_NOT_FULL, n);
        return 0;
    }

    /* sk->sk_socket, then the inode of the socket_alloc around it */
    bpf_probe_read_kernel(&sock_ptr, sizeof(sock_ptr), (char *)skc + OFF_SK_SOCKET);
    if (sock_ptr)
        bpf_probe_read_kernel(&r.inode, 8, (char *)sock_ptr + OFF_SOCKET_INO);
    if ((flags & CFG_OWNERS) && !owners.lookup(&r.inode))
        goto unselected;
    n = counts.lookup(&one);
    if (n)
        *n += 1;

    if (state != TCP_LISTEN && state != TCP_SYN_SENT) {
        u32 now = (u32)bpf_jiffies64();
        u32 lrcv = 0, ack = 0, idle;
        bpf_probe_read_kernel(&lrcv, 4, (char *)skc + OFF_LRCVTIME);
        idle = now - lrcv;
        if (flags & CFG_IDLE_ANY) {
            bpf_probe_read_kernel(&ack, 4, (char *)skc + OFF_RCV_TSTAMP);
            if (now - ack < idle)
                idle = now - ack;
        }
        if (!(cfg->limit_j > 0 && idle > cfg->limit_j)) {
            r.idle_j = idle;
            r.idle_known = IDLE_JIFFIES;
            r.idle_ns = (u64)idle * cfg->jiffy_ns;
        }
    }
#ifdef TCPIDLE_ITER_STORAGE
    {
        struct activity *a = sk_activity.sk_storage_get(skc, 0, 0);
        if (a) {
            u64 now_ns = bpf_ktime_get_ns();
            u64 stamp = (flags & CFG_IDLE_ANY) ? a->last_segment_ns : a->last_data_ns;
            if (a->last_segment_ns) {
                r.last_rx_ns = now_ns > a->last_segment_ns ? now_ns - a->last_segment_ns : 0;
                r.idle_known |= IDLE_RX;
            }
            if (stamp) {
                u64 probe_ns = now_ns > stamp ? now_ns - stamp : 0;
                /* believed unless older than what the socket says by more than the slack */
                if (!((r.idle_known & IDLE_JIFFIES) && probe_ns > r.idle_ns + SLACK_NS)) {
                    r.idle_ns = probe_ns;
                    r.idle_known |= IDLE_BPF;
                }
            }
        }
    }
#endif
    if (cfg->thresh_j > 0 &&
        !((r.idle_known & IDLE_BPF) ? r.idle_ns >= cfg->thresh_ns
                                    : ((r.idle_known & IDLE_JIFFIES) && r.idle_j >= cfg->thresh_j))) {
        if (chosen)
            emit(seq, &r, OUT_SPARED, n);
        return 0;
    }

    if (cfg->max_kills > 0) {
        u64 *k = counts.lookup(&zero);
        if (!k)
            return 0;
        if (*k >= cfg->max_kills) {
            emit(seq, &r, OUT_CAPPED, n);
            return 0;
        }
        *k += 1;
        if (emit(seq, &r, (flags & CFG_DRY_RUN) ? OUT_DRY_RUN : OUT_DESTROYED, n)) {
            *k -= 1;
            return 0; /* not written, not destroyed: shown again at the next read() */
        }
    } else if (emit(seq, &r, (flags & CFG_DRY_RUN) ? OUT_DRY_RUN : OUT_DESTROYED, n)) {
        return 0; /* not written, not destroyed: shown again at the next read() */
    }
    if (!(flags & CFG_DRY_RUN)) {
        err = ((int (*)(void *))KFUNC_SOCK_DESTROY)(skc);
        if (err && errors.update(&r.cookie, &err)) {
            n = counts.lookup(&two);
            if (n)
                *n += 1;
        }
    }
    return 0;

unselected:
    if (chosen)
        emit(seq, &r, OUT_LEFT, 0);
    return 0;
}
