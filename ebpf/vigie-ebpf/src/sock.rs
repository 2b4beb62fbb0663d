//! `sock:*` tracepoints: exact byte counts of every receive and send on watched sockets, and
//! the connection's close.
//!
//! `sock_recv_length` and `sock_send_length` fire inside `sock_recvmsg` and `sock_sendmsg`,
//! which every receive and send path goes through (read, recv*, readv, write, send*, writev,
//! sendfile and splice), so byte accounting does not depend on which syscall a server uses.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user},
    macros::tracepoint,
    maps::LruHashMap,
    programs::TracePointContext,
};
use vigie_common::*;

use crate::{
    CONNS, LAST_RECV_SOCK, LAST_SEND_SOCK, PENDING_READS, SERVER_TGIDS, TLS_PROCESSES, WATCHED_PORTS, bump,
    capture_and_emit, emit_header, is_server_process, layout, new_header,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const MSG_PEEK: i32 = 2;
const TCP_CLOSE: i32 = 7;

/// The fields `sock_send_length` and `sock_recv_length` share
/// (events/sock/sock_{send,recv}_length/format; the agent checks the offsets, see
/// `vigie_common::SOCK_TRACEPOINT_FIELDS`).
struct SockLength {
    sk: u64,
    ret: i32,
    flags: i32,
}

#[inline(always)]
fn read_sock_length(ctx: &TracePointContext) -> Option<SockLength> {
    let sk: u64 = unsafe { ctx.read_at(SOCK_LENGTH_SK) }.ok()?;
    let family: u16 = unsafe { ctx.read_at(SOCK_LENGTH_FAMILY) }.ok()?;
    let protocol: u16 = unsafe { ctx.read_at(SOCK_LENGTH_PROTOCOL) }.ok()?;
    let ret: i32 = unsafe { ctx.read_at(SOCK_LENGTH_RET) }.ok()?;
    let flags: i32 = unsafe { ctx.read_at(SOCK_LENGTH_FLAGS) }.ok()?;
    if protocol != IPPROTO_TCP || (family != AF_INET && family != AF_INET6) || ret <= 0 {
        return None;
    }
    Some(SockLength { sk, ret, flags })
}

/// In a process that uses SSL functions, remember which socket this thread just used: that is
/// how an `SSL*` is tied to its connection.
#[inline(always)]
pub fn note_tls_thread(map: &LruHashMap<u64, u64>, sk: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if unsafe { TLS_PROCESSES.get(&((pid_tgid >> 32) as u32)) }.is_some() {
        let _ = map.insert(&pid_tgid, &sk, 0);
    }
}

/// The connection this socket belongs to, if its local port is watched. First sight of a
/// socket registers it, so connections accepted before the agent started are picked up too.
#[inline(always)]
fn watched_conn(sk: u64) -> Option<*mut ConnInfo> {
    if let Some(info) = CONNS.get_ptr_mut(&sk) {
        return Some(info);
    }
    let offset = layout().map(|l| l.skc_num as u64).unwrap_or(SKC_NUM_OFFSET);
    let port: u16 = unsafe { bpf_probe_read_kernel((sk + offset) as *const u16) }.ok()?;
    unsafe { WATCHED_PORTS.get(&port) }?;
    let info = ConnInfo { start_ns: unsafe { bpf_ktime_get_ns() }, sent: 0, recvs: 0, port, _pad: 0 };
    // BPF_NOEXIST: another CPU may have registered it in the meantime; keep its entry.
    let _ = CONNS.insert(&sk, &info, 1);
    let entry = CONNS.get_ptr_mut(&sk);
    if entry.is_none() {
        bump(COUNTER_CONNS_FULL);
    }
    entry
}

/// A send of `bytes` on socket `sk` (either capture source): added to the connection's total,
/// which the next receive or close record carries (and the agent polls in between).
#[inline(always)]
pub fn on_send(sk: u64, bytes: u64) {
    let Some(conn) = watched_conn(sk) else { return };
    // SAFETY: a map value pointer, valid while the program runs; the add is atomic because
    // sends of one connection may run on several CPUs.
    // (The BPF target has no `AtomicU64::fetch_add`; the intrinsic with an unused result
    // compiles to BPF's atomic add.)
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            &raw mut (*conn).sent,
            bytes,
        )
    };
}

#[tracepoint]
pub fn vigie_sock_send(ctx: TracePointContext) -> u32 {
    let Some(s) = read_sock_length(&ctx) else { return 0 };
    note_tls_thread(&LAST_SEND_SOCK, s.sk);
    on_send(s.sk, s.ret as u64);
    0
}

/// Start and length of the first user buffer the receive wrote into.
#[inline(always)]
fn first_buffer(pending: &PendingRead) -> Option<(u64, u64)> {
    match pending.shape {
        SHAPE_BUF => Some((pending.addr, u64::MAX)),
        SHAPE_IOVEC => {
            let base: u64 = unsafe { bpf_probe_read_user(pending.addr as *const u64) }.ok()?;
            let len: u64 = unsafe { bpf_probe_read_user((pending.addr + 8) as *const u64) }.ok()?;
            Some((base, len))
        }
        SHAPE_MSGHDR => {
            // struct user_msghdr { void *msg_name; int msg_namelen; struct iovec *msg_iov; ... }
            let iov: u64 = unsafe { bpf_probe_read_user((pending.addr + 16) as *const u64) }.ok()?;
            let base: u64 = unsafe { bpf_probe_read_user(iov as *const u64) }.ok()?;
            let len: u64 = unsafe { bpf_probe_read_user((iov + 8) as *const u64) }.ok()?;
            Some((base, len))
        }
        _ => None,
    }
}

/// A receive of `bytes` on socket `sk` (either capture source). `from_exit` is the thread's
/// pending read when the caller already took it out of `PENDING_READS` (syscall source).
#[inline(always)]
pub fn on_recv(sk: u64, bytes: u64, from_exit: Option<PendingRead>) {
    let Some(conn) = watched_conn(sk) else { return };
    // SAFETY: map value pointer, valid while the program runs. Receives on one socket are
    // serialised by the socket lock, so `recvs` needs no atomic.
    let conn = unsafe { &mut *conn };
    conn.recvs = conn.recvs.wrapping_add(1);
    let mut header = new_header(EVENT_RECV, sk, conn.start_ns, conn.port, bytes);
    header.recv_seq = conn.recvs;
    header.sent_total = unsafe { core::ptr::read_volatile(&conn.sent) };

    let key = header.pid_tgid;
    let pending = match from_exit {
        Some(p) => Some(p),
        None => {
            let p = unsafe { PENDING_READS.get(&key) }.copied();
            if p.is_some() {
                let _ = PENDING_READS.remove(&key);
            }
            p
        }
    };
    let buffer = pending.as_ref().and_then(first_buffer);
    let Some((base, buf_len)) = buffer else {
        // A process the agent had not yet seen serving this port: from now on its receives
        // are remembered.
        let tgid = (key >> 32) as u32;
        if !is_server_process(tgid) {
            let _ = SERVER_TGIDS.insert(&tgid, &1, 0);
        }
        bump(COUNTER_NO_BUFFER);
        header.flags = FLAG_NO_BUFFER;
        emit_header(&header);
        return;
    };
    let mut want = bytes;
    if buf_len < want {
        // The rest went to later iovecs, which are not copied.
        want = buf_len;
    }
    capture_and_emit(&header, base, want);
}

#[tracepoint]
pub fn vigie_sock_recv(ctx: TracePointContext) -> u32 {
    let Some(s) = read_sock_length(&ctx) else { return 0 };
    if s.flags & MSG_PEEK != 0 {
        return 0;
    }
    note_tls_thread(&LAST_RECV_SOCK, s.sk);
    on_recv(s.sk, s.ret as u64, None);
    0
}

#[tracepoint]
pub fn vigie_sock_state(ctx: TracePointContext) -> u32 {
    let Ok(newstate) = (unsafe { ctx.read_at::<i32>(SET_STATE_NEWSTATE) }) else { return 0 };
    if newstate != TCP_CLOSE {
        return 0;
    }
    let Ok(sk) = (unsafe { ctx.read_at::<u64>(SET_STATE_SKADDR) }) else { return 0 };
    let Some(conn) = (unsafe { CONNS.get(&sk) }).copied() else { return 0 };
    let _ = CONNS.remove(&sk);
    let mut header = new_header(EVENT_CLOSE, sk, conn.start_ns, conn.port, 0);
    header.sent_total = conn.sent;
    header.recv_seq = conn.recvs;
    emit_header(&header);
    0
}
