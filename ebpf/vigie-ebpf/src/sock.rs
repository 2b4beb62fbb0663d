//! `sock:*` tracepoints: exact byte counts of every receive and send on watched sockets, and
//! the connection's close.
//!
//! `sock_recv_length` and `sock_send_length` fire inside `sock_recvmsg` and `sock_sendmsg`,
//! which every receive and send path goes through (read, recv*, readv, write, send*, writev,
//! sendfile and splice), so byte accounting does not depend on which syscall a server uses.
//!
//! They are attached as raw tracepoints, which take the tracepoint's arguments as they are
//! (`TP_PROTO(struct sock *sk, int ret, int flags)`; `inet_sock_set_state`'s
//! `(sk, oldstate, newstate)`) for two reasons:
//! - a classic tracepoint program runs only if no other BPF program is running on that CPU:
//!   a close whose final ACK is handled in an interrupt taken during one of these programs
//!   was skipped (the map-fill test measured 2 in 112,000 closes). A raw tracepoint program
//!   is skipped only when that same program is already running there.
//! - the kernel builds no trace record for them: `family` and `protocol`, which the record
//!   would have read from the socket for every call host-wide, are read here only when a
//!   socket on a watched port is first seen.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user, generated},
    macros::raw_tracepoint,
    maps::LruHashMap,
    programs::RawTracePointContext,
};
use vigie_common::*;

use crate::{
    CONNS, LAST_RECV_SOCK, LAST_SEND_SOCK, TLS_PROCESSES, bump, capture_and_emit, emit_header, layout, new_header,
    port_watched, tls_seen,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const MSG_PEEK: i32 = 2;
const TCP_CLOSE: i32 = 7;

/// The arguments `sock_send_length` and `sock_recv_length` share: `(struct sock *sk, int ret,
/// int flags)`, each widened to a u64 slot.
struct SockLength {
    sk: u64,
    ret: i32,
    flags: i32,
}

#[inline(always)]
fn read_sock_length(ctx: &RawTracePointContext) -> Option<SockLength> {
    let ret = ctx.arg::<u64>(1) as i32;
    if ret <= 0 {
        return None;
    }
    Some(SockLength { sk: ctx.arg::<u64>(0), ret, flags: ctx.arg::<u64>(2) as i32 })
}

/// An IPv4 or IPv6 TCP socket (these tracepoints fire for every socket type and family).
#[inline(always)]
fn is_inet_tcp(sk: u64, l: &KernelLayout) -> bool {
    let family: u16 = unsafe { bpf_probe_read_kernel((sk + l.skc_family as u64) as *const u16) }.unwrap_or(0);
    if family != AF_INET && family != AF_INET6 {
        return false;
    }
    let protocol: u16 = unsafe { bpf_probe_read_kernel((sk + l.sk_protocol as u64) as *const u16) }.unwrap_or(0);
    protocol == IPPROTO_TCP
}

/// In a process that uses SSL functions, remember which socket this thread just used: that is
/// how an `SSL*` is tied to its connection. `is_stream` is asked only then: the syscall source
/// knows its socket is one, the socket source reads it from the socket.
#[inline(always)]
pub fn note_tls_thread(map: &LruHashMap<u64, u64>, sk: u64, is_stream: impl FnOnce() -> bool) {
    if !tls_seen() {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if unsafe { TLS_PROCESSES.get(&((pid_tgid >> 32) as u32)) }.is_some() && is_stream() {
        let _ = map.insert(&pid_tgid, &sk, 0);
    }
}

/// `is_stream` of `note_tls_thread` for the socket source.
#[inline(always)]
fn tcp_socket(sk: u64) -> impl FnOnce() -> bool {
    move || layout().is_some_and(|l| is_inet_tcp(sk, l))
}

/// The connection this socket belongs to, if its local port is watched. First sight of a
/// socket registers it, so connections accepted before the agent started are picked up too.
///
/// The port comes first: most sockets these programs see are not watched (the load
/// generator's, the database's), and for them a two-byte read and an array lookup are cheaper
/// than a miss in `CONNS`, a hash lookup. A port the agent stops watching stops being counted
/// at once, on connections already open too; their close is still reported.
#[inline(always)]
fn watched_conn(sk: u64) -> Option<*mut ConnInfo> {
    // Written by the agent before anything is attached; both sources need it.
    let l = layout()?;
    let port: u16 = unsafe { bpf_probe_read_kernel((sk + l.skc_num as u64) as *const u16) }.ok()?;
    if !port_watched(port) {
        return None;
    }
    if let Some(info) = CONNS.get_ptr_mut(&sk) {
        return Some(info);
    }
    // Checked once per connection: an address in `CONNS` is a TCP socket's.
    if !is_inet_tcp(sk, l) {
        return None;
    }
    let info = ConnInfo { start_ns: unsafe { bpf_ktime_get_ns() }, sent: 0, recvs: 0, port, _pad: 0 };
    // BPF_NOEXIST: another CPU may have registered it in the meantime; keep its entry.
    let _ = CONNS.insert(&sk, &info, 1);
    let entry = CONNS.get_ptr_mut(&sk);
    if entry.is_none() {
        bump(COUNTER_CONNS_FULL);
        crate::kernel_log!("CONNS insert failed: a connection on port {} is not tracked", port);
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

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn vigie_sock_send(ctx: RawTracePointContext) -> i32 {
    let Some(s) = read_sock_length(&ctx) else { return 0 };
    note_tls_thread(&LAST_SEND_SOCK, s.sk, tcp_socket(s.sk));
    on_send(s.sk, s.ret as u64);
    0
}

/// Start and length of the first user buffer a receive wrote into, given where the syscall
/// was told to put it.
#[inline(always)]
pub fn first_buffer(shape: u32, addr: u64) -> Option<(u64, u64)> {
    match shape {
        SHAPE_BUF => Some((addr, u64::MAX)),
        SHAPE_IOVEC => {
            let base: u64 = unsafe { bpf_probe_read_user(addr as *const u64) }.ok()?;
            let len: u64 = unsafe { bpf_probe_read_user((addr + 8) as *const u64) }.ok()?;
            Some((base, len))
        }
        SHAPE_MSGHDR => {
            // struct user_msghdr { void *msg_name; int msg_namelen; struct iovec *msg_iov; ... }
            let iov: u64 = unsafe { bpf_probe_read_user((addr + 16) as *const u64) }.ok()?;
            let base: u64 = unsafe { bpf_probe_read_user(iov as *const u64) }.ok()?;
            let len: u64 = unsafe { bpf_probe_read_user((iov + 8) as *const u64) }.ok()?;
            Some((base, len))
        }
        _ => None,
    }
}

/// A receive of `bytes` on socket `sk` (either capture source); `buffer` is the first user
/// buffer it wrote into, when the caller could tell.
#[inline(always)]
pub fn on_recv(sk: u64, bytes: u64, buffer: impl FnOnce() -> Option<(u64, u64)>) {
    let Some(conn) = watched_conn(sk) else { return };
    // SAFETY: map value pointer, valid while the program runs. Receives on one socket are
    // serialised by the socket lock, so `recvs` needs no atomic.
    let conn = unsafe { &mut *conn };
    conn.recvs = conn.recvs.wrapping_add(1);
    let mut header = new_header(EVENT_RECV, sk, conn.start_ns, conn.port, bytes);
    header.recv_seq = conn.recvs;
    header.sent_total = unsafe { core::ptr::read_volatile(&conn.sent) };
    let Some((base, buf_len)) = buffer() else {
        bump(COUNTER_NO_BUFFER);
        crate::kernel_log!(
            "receive on port {} without a known user buffer: {} bytes counted, head not captured",
            conn.port,
            bytes
        );
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

// x86-64 syscall numbers of the receive calls whose buffer is known. A 32-bit (compat) or x32
// task's numbers differ (i386 read is 3, x86-64 close; x32 sets bit 30), so a compat receive
// matches none of these and is counted as having no buffer, as is a receive from a syscall
// that is not one of these at all (io_uring_enter, recvmmsg, or a kernel thread).
const NR_READ: u64 = 0;
const NR_READV: u64 = 19;
const NR_RECVFROM: u64 = 45;
const NR_RECVMSG: u64 = 47;

/// The syscall the current task is in, from its saved user registers, as (shape, fd, address
/// of the buffer, iovec or msghdr).
///
/// `sock_recv_length` fires inside the receiving task's syscall, after the data was copied to
/// the user buffer, so the registers the task entered the kernel with still name that buffer:
/// no `sys_enter_*` hook (which every task on the host would pay for) has to remember it.
#[inline(always)]
fn current_syscall() -> Option<(u32, u64, u64)> {
    // SAFETY: helpers with no preconditions; the task pointer is the kernel's own (trusted).
    // bpf_task_pt_regs exists since 5.15, sock_recv_length since 6.3.
    let regs = unsafe { generated::bpf_task_pt_regs(generated::bpf_get_current_task_btf()) } as u64;
    if regs == 0 {
        return None;
    }
    // struct pt_regs (x86-64): dx at 96, si at 104, di at 112, orig_ax (the syscall number) at
    // 120: one copy for the four.
    let r: [u64; 4] = unsafe { bpf_probe_read_kernel((regs + 96) as *const [u64; 4]) }.ok()?;
    let (si, di, nr) = (r[1], r[2], r[3]);
    let shape = match nr {
        NR_READ | NR_RECVFROM => SHAPE_BUF,
        NR_READV => SHAPE_IOVEC,
        NR_RECVMSG => SHAPE_MSGHDR,
        _ => return None,
    };
    Some((shape, di, si))
}

/// The receive's user buffer, when the current syscall is a receive on this very socket: the
/// file descriptor in its first argument must lead to `sk` (a task can reach `sock_recvmsg`
/// from other paths, io_uring's task work on the way out of an unrelated `read` for one).
#[inline(always)]
fn recv_buffer(sk: u64) -> Option<(u64, u64)> {
    let (shape, fd, addr) = current_syscall()?;
    if !crate::syscalls::fd_is_sock(fd as u32, sk) {
        return None;
    }
    first_buffer(shape, addr)
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn vigie_sock_recv(ctx: RawTracePointContext) -> i32 {
    let Some(s) = read_sock_length(&ctx) else { return 0 };
    if s.flags & MSG_PEEK != 0 {
        return 0;
    }
    note_tls_thread(&LAST_RECV_SOCK, s.sk, tcp_socket(s.sk));
    on_recv(s.sk, s.ret as u64, || recv_buffer(s.sk));
    0
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn vigie_sock_state(ctx: RawTracePointContext) -> i32 {
    if ctx.arg::<u64>(2) as i32 != TCP_CLOSE {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    let Some(conn) = (unsafe { CONNS.get(&sk) }).copied() else { return 0 };
    let _ = CONNS.remove(&sk);
    let mut header = new_header(EVENT_CLOSE, sk, conn.start_ns, conn.port, 0);
    header.sent_total = conn.sent;
    header.recv_seq = conn.recvs;
    emit_header(&header);
    0
}
