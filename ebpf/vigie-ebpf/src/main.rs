//! vigie's kernel programs.
//!
//! They record facts about the server side of TCP connections on watched local ports: which
//! connection, how many bytes each socket call moved, and the first bytes of what was received.
//! They decide nothing about HTTP, tokens or Matrix; the agent does all of that.
//!
//! Sources (tracepoints only: this design must not need kprobes or fentry):
//! - `syscalls:sys_enter_{read,readv,recvfrom,recvmsg}` remember, per thread, where the
//!   receive will land. They fire for every process; the cost is one map update.
//! - `sock:sock_recv_length` and `sock:sock_send_length` fire inside `sock_recvmsg` and
//!   `sock_sendmsg`, which every receive and send path goes through (read, recv*, readv,
//!   write, send*, writev, sendfile and splice). They give the socket and the exact byte
//!   count, so byte accounting never depends on which syscall the server prefers.
//! - `sock:inet_sock_set_state` to `TCP_CLOSE` ends a connection.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        generated,
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use vigie_common::*;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const MSG_PEEK: i32 = 2;
const TCP_CLOSE: i32 = 7;
/// `offsetof(struct sock_common, skc_num)` on every kernel since 2.6; the agent overrides it
/// from BTF when the running kernel says otherwise.
const DEFAULT_SKC_NUM_OFFSET: u64 = 14;

/// Every event for the agent. When it is full the event is dropped and `COUNTERS` says so.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// Local ports to watch; filled by the agent.
#[map]
static WATCHED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_WATCHED_PORTS, 0);

/// Known server-side connections, keyed by `struct sock` address. Entries leave at TCP_CLOSE.
/// LRU so that a close the agent never saw (a socket from before a restart) cannot pin an entry
/// forever; an evicted live connection comes back with a new start time on its next I/O.
#[map]
static CONNS: LruHashMap<u64, ConnInfo> = LruHashMap::with_max_entries(MAX_CONNS, 0);

/// Where each thread's current receive lands. LRU: a thread that exits leaves its entry to be
/// evicted; the next `sys_enter_*` of the same thread overwrites it.
#[map]
static PENDING_READS: LruHashMap<u64, PendingRead> =
    LruHashMap::with_max_entries(MAX_PENDING_READS, 0);

/// Drop and failure counters (indices in `vigie_common::COUNTER_*`).
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// Values the agent computes at load time (indices in `vigie_common::CONFIG_*`).
#[map]
static CONFIG: Array<u64> = Array::with_max_entries(CONFIG_COUNT, 0);

/// One receive record per CPU: too large for the stack.
#[map]
static SCRATCH: PerCpuArray<RecvRecord> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn bump(counter: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn remember_read(ctx: &TracePointContext, shape: u32) -> u32 {
    // sys_enter_* layout: fd at 16, then the first pointer argument at 24.
    let Ok(addr) = (unsafe { ctx.read_at::<u64>(24) }) else {
        return 0;
    };
    let pending = PendingRead { addr, shape, _pad: 0 };
    let _ = PENDING_READS.insert(&bpf_get_current_pid_tgid(), &pending, 0);
    0
}

#[tracepoint]
pub fn vigie_enter_read(ctx: TracePointContext) -> u32 {
    remember_read(&ctx, SHAPE_BUF)
}

#[tracepoint]
pub fn vigie_enter_recvfrom(ctx: TracePointContext) -> u32 {
    remember_read(&ctx, SHAPE_BUF)
}

#[tracepoint]
pub fn vigie_enter_readv(ctx: TracePointContext) -> u32 {
    remember_read(&ctx, SHAPE_IOVEC)
}

#[tracepoint]
pub fn vigie_enter_recvmsg(ctx: TracePointContext) -> u32 {
    remember_read(&ctx, SHAPE_MSGHDR)
}

/// The fields `sock_send_length` and `sock_recv_length` share.
struct SockLength {
    sk: u64,
    ret: i32,
    flags: i32,
}

#[inline(always)]
fn read_sock_length(ctx: &TracePointContext) -> Option<SockLength> {
    // Layout from events/sock/sock_{send,recv}_length/format.
    let sk: u64 = unsafe { ctx.read_at(8) }.ok()?;
    let family: u16 = unsafe { ctx.read_at(16) }.ok()?;
    let protocol: u16 = unsafe { ctx.read_at(18) }.ok()?;
    let ret: i32 = unsafe { ctx.read_at(20) }.ok()?;
    let flags: i32 = unsafe { ctx.read_at(24) }.ok()?;
    if protocol != IPPROTO_TCP || (family != AF_INET && family != AF_INET6) || ret <= 0 {
        return None;
    }
    Some(SockLength { sk, ret, flags })
}

/// The connection this socket belongs to, if its local port is watched. First sight of a
/// socket registers it, so connections accepted before the agent started are picked up too.
#[inline(always)]
fn watched_conn(sk: u64) -> Option<ConnInfo> {
    if let Some(info) = unsafe { CONNS.get(&sk) } {
        return Some(*info);
    }
    let offset = match CONFIG.get(CONFIG_SKC_NUM_OFFSET) {
        Some(&o) if o != 0 => o,
        _ => DEFAULT_SKC_NUM_OFFSET,
    };
    let port: u16 = unsafe { bpf_probe_read_kernel((sk + offset) as *const u16) }.ok()?;
    unsafe { WATCHED_PORTS.get(&port) }?;
    let info = ConnInfo { start_ns: unsafe { bpf_ktime_get_ns() }, port, _pad: [0; 3] };
    if CONNS.insert(&sk, &info, 0).is_err() {
        bump(COUNTER_CONNS_FULL);
    }
    Some(info)
}

#[inline(always)]
fn header(kind: u32, sk: u64, conn: &ConnInfo, bytes: u64) -> EventHeader {
    EventHeader {
        kind,
        flags: 0,
        pid_tgid: bpf_get_current_pid_tgid(),
        conn: sk,
        conn_start_ns: conn.start_ns,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        bytes,
        captured: 0,
        port: conn.port,
        _pad: 0,
    }
}

#[inline(always)]
fn emit_header(h: &EventHeader) {
    if EVENTS.output::<EventHeader>(h, 0).is_err() {
        bump(COUNTER_RINGBUF_FULL);
    }
}

#[tracepoint]
pub fn vigie_sock_send(ctx: TracePointContext) -> u32 {
    let Some(s) = read_sock_length(&ctx) else { return 0 };
    let Some(conn) = watched_conn(s.sk) else { return 0 };
    emit_header(&header(EVENT_SEND, s.sk, &conn, s.ret as u64));
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

#[tracepoint]
pub fn vigie_sock_recv(ctx: TracePointContext) -> u32 {
    let Some(s) = read_sock_length(&ctx) else { return 0 };
    if s.flags & MSG_PEEK != 0 {
        return 0;
    }
    let Some(conn) = watched_conn(s.sk) else { return 0 };
    let Some(record) = SCRATCH.get_ptr_mut(0) else { return 0 };
    // SAFETY: per-CPU scratch slot, exclusively ours while this program runs.
    let record = unsafe { &mut *record };
    record.header = header(EVENT_RECV, s.sk, &conn, s.ret as u64);

    let key = record.header.pid_tgid;
    let buffer = match unsafe { PENDING_READS.get(&key) } {
        Some(p) => first_buffer(p),
        None => None,
    };
    let _ = PENDING_READS.remove(&key);
    let Some((base, buf_len)) = buffer else {
        bump(COUNTER_NO_BUFFER);
        record.header.flags = FLAG_NO_BUFFER;
        emit_header(&record.header);
        return 0;
    };

    let mut want = s.ret as u64;
    if buf_len < want {
        want = buf_len;
        record.header.flags |= FLAG_CAPTURE_PARTIAL;
    }
    if want > MAX_CAPTURE as u64 {
        want = MAX_CAPTURE as u64;
        record.header.flags |= FLAG_CAPTURE_PARTIAL;
    }
    // Re-derive a bound the verifier can follow through the helper call.
    let len = (want as u32) & (2 * MAX_CAPTURE as u32 - 1);
    if len == 0 || len > MAX_CAPTURE as u32 {
        emit_header(&record.header);
        return 0;
    }
    let rc = unsafe {
        generated::bpf_probe_read_user(
            record.data.as_mut_ptr().cast(),
            len,
            base as *const core::ffi::c_void,
        )
    };
    if rc != 0 {
        bump(COUNTER_CAPTURE_FAILED);
        record.header.flags |= FLAG_CAPTURE_PARTIAL;
        emit_header(&record.header);
        return 0;
    }
    record.header.captured = len;
    let total = (EVENT_HEADER_LEN as u64 + len as u64) & 0xffff;
    if total > core::mem::size_of::<RecvRecord>() as u64 {
        return 0;
    }
    // SAFETY: `total` is at most the size of the record it points into.
    let bytes =
        unsafe { core::slice::from_raw_parts((record as *const RecvRecord).cast::<u8>(), total as usize) };
    if EVENTS.output::<[u8]>(bytes, 0).is_err() {
        bump(COUNTER_RINGBUF_FULL);
    }
    0
}

#[tracepoint]
pub fn vigie_sock_state(ctx: TracePointContext) -> u32 {
    let Ok(newstate) = (unsafe { ctx.read_at::<i32>(20) }) else { return 0 };
    if newstate != TCP_CLOSE {
        return 0;
    }
    let Ok(sk) = (unsafe { ctx.read_at::<u64>(8) }) else { return 0 };
    let Some(conn) = (unsafe { CONNS.get(&sk) }).copied() else { return 0 };
    let _ = CONNS.remove(&sk);
    emit_header(&header(EVENT_CLOSE, sk, &conn, 0));
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
