//! vigie's kernel programs.
//!
//! They record facts about connections: which connection, how many bytes each socket call or
//! SSL call moved, and the first bytes of what was received. They decide nothing about HTTP,
//! tokens or Matrix; the agent does all of that. One module per program type:
//! - [`sock`]: `sock:*`, exact byte counts on watched sockets and their close; the receive's
//!   buffer comes from the receiving task's saved registers (Linux 6.3+, no syscall hook);
//! - [`syscalls`]: on kernels without `sock:sock_{recv,send}_length` (before 6.3),
//!   `sys_enter_*`/`sys_exit_*` of the receive and send calls as the byte source;
//! - [`process`]: `sched:sched_process_fork`, so a server's new workers are known at once;
//! - [`floor`]: programs that do nothing, for the bench's floor (cost of the hooks alone);
//! - [`tls`]: uprobes on OpenSSL's `SSL_read`/`SSL_write` (and `_ex`, `SSL_free`): plaintext.
//!
//! Only tracepoints and uprobes: this design must not need kprobes or fentry.
#![no_std]
#![no_main]
// Atomic add on a map value (a connection's running send total).
#![feature(core_intrinsics)]
#![allow(internal_features)]
// aya-ebpf's maps take `impl Borrow<K>`; a key passed by reference stays one stack slot the
// verifier already knows, so the kernel code keeps `&key` rather than follow this lint.
#![allow(clippy::needless_borrows_for_generic_args)]

mod floor;
mod process;
mod sock;
mod syscalls;
mod tls;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated},
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
use vigie_common::*;

/// Every event for the agent. When it is full the event is dropped and `COUNTERS` says so.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// Local ports to watch, one bit per port (`vigie_common::watched_port_slot`); filled by the
/// agent. A bitmap in an array rather than a hash: every socket program on the host asks it
/// first, mostly about sockets vigie does not watch (a load generator's, a database's), and an
/// array lookup is a few instructions the verifier inlines where a hash lookup is a helper
/// call that hashes the key.
#[map]
static WATCHED_PORTS: Array<u64> = Array::with_max_entries(WATCHED_PORT_WORDS, 0);

#[inline(always)]
fn port_watched(port: u16) -> bool {
    let (word, bit) = watched_port_slot(port);
    WATCHED_PORTS.get(word).is_some_and(|w| w & bit != 0)
}

/// Known server-side connections, keyed by `struct sock` address. Entries leave at TCP_CLOSE.
/// LRU so that a close the agent never saw (a socket from before a restart) cannot pin an entry
/// forever; an evicted live connection comes back with a new start time on its next I/O.
#[map]
static CONNS: LruHashMap<u64, ConnInfo> = LruHashMap::with_max_entries(MAX_CONNS, 0);

/// Syscall source only: where each thread's current receive lands. LRU: a thread that exits leaves its entry to be
/// evicted; the next `sys_enter_*` of the same thread overwrites it.
#[map]
static PENDING_READS: LruHashMap<u64, PendingRead> = LruHashMap::with_max_entries(MAX_PENDING_READS, 0);

/// SSL calls in flight, per thread, from the uprobe to the uretprobe. LRU: a thread killed
/// inside a call leaves an entry that ages out.
#[map]
static SSL_CALLS: LruHashMap<u64, SslCall> = LruHashMap::with_max_entries(MAX_SSL_CALLS, 0);

/// Syscall source: processes that serve a watched port: only their receives are worth
/// remembering at `sys_enter_*`, which fires for every read on the machine. Seeded by the
/// agent from /proc, completed by the kernel at a server's fork. LRU: a process that exits
/// ages out.
#[map]
static SERVER_TGIDS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(MAX_SERVER_PROCESSES, 0);

/// Processes with per-process TLS probes (set by the agent): their forks are reported
/// (`EVENT_FORK`) so the agent can attach the child before long. LRU: exited processes age out.
#[map]
static FORK_WATCHED: LruHashMap<u32, u8> = LruHashMap::with_max_entries(MAX_FORK_WATCHED, 0);

/// This kernel's layouts (`vigie_common::KernelLayout`), written by the agent before attaching.
#[map]
static LAYOUT: Array<KernelLayout> = Array::with_max_entries(1, 0);

#[inline(always)]
fn layout() -> Option<&'static KernelLayout> {
    LAYOUT.get(0)
}

#[inline(always)]
fn is_server_process(tgid: u32) -> bool {
    unsafe { SERVER_TGIDS.get(&tgid) }.is_some()
}

/// Processes that call SSL functions: only their threads' socket use is remembered below.
#[map]
static TLS_PROCESSES: LruHashMap<u32, u8> = LruHashMap::with_max_entries(MAX_TLS_PROCESSES, 0);

/// Nonzero once any SSL probe has fired (set by the probe itself, before its first insert
/// into `TLS_PROCESSES`): until then no socket program has a TLS process to look up, and an
/// agent with no TLS vantage never pays that lookup on every send and receive of the host.
#[map]
static TLS_SEEN: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
fn tls_seen() -> bool {
    TLS_SEEN.get(0).is_some_and(|v| *v != 0)
}

/// Called by every SSL probe: the store happens once, so the flag's cache line is not written
/// by every call on every CPU.
#[inline(always)]
fn mark_tls_seen() {
    if let Some(v) = TLS_SEEN.get_ptr_mut(0) {
        // SAFETY: a map value pointer, valid while the program runs; a racing second store
        // writes the same value.
        unsafe {
            if core::ptr::read_volatile(v) == 0 {
                core::ptr::write_volatile(v, 1);
            }
        }
    }
}

/// The socket each thread of a TLS process last received on / sent on (any port), to tie an
/// `SSL*` to its connection.
#[map]
static LAST_RECV_SOCK: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_SSL_CALLS, 0);
#[map]
static LAST_SEND_SOCK: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_SSL_CALLS, 0);

/// Drop and failure counters (indices in `vigie_common::COUNTER_*`).
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// One receive record per CPU: too large for the stack.
#[map]
static SCRATCH: PerCpuArray<RecvRecord> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's count after the bump (0 if the slot is missing).
#[inline(always)]
fn bump(counter: u32) -> u64 {
    if let Some(value) = COUNTERS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe {
            *value += 1;
            return *value;
        }
    }
    0
}

/// Nonzero when the operator asked for kernel diagnostics (`kernel_log`); the agent sets it
/// at load time. Volatile: a constant the compiler folded would make the flag useless.
#[unsafe(no_mangle)]
static KERNEL_LOG: u8 = 0;

#[inline(always)]
fn log_enabled() -> bool {
    // SAFETY: a plain read of a global the agent wrote before the programs were loaded.
    unsafe { core::ptr::read_volatile(&KERNEL_LOG) != 0 }
}

/// An operator diagnostic (aya-log, read by the agent when `kernel_log` is on). Only on rare
/// paths: when off it costs one load and a branch there, and nothing on the hot path. Never
/// pass captured bytes: a line must not be able to carry a token.
macro_rules! kernel_log {
    ($($arg:tt)+) => {
        if $crate::log_enabled() {
            // The context argument is unused by aya-log-ebpf 0.2 (records go to its ring).
            aya_log_ebpf::warn!((), $($arg)+)
        }
    };
}
pub(crate) use kernel_log;

/// A record the EVENTS ring had no room for: counted, and logged at the 1st, 2nd, 4th, 8th...
/// drop on a CPU, so a burst cannot flood the log ring.
#[inline(always)]
fn ring_full(kind: u32) {
    let n = bump(COUNTER_RINGBUF_FULL);
    // The throttle inside the flag's branch: when off, this path pays only the load and branch.
    if log_enabled() && n & n.wrapping_sub(1) == 0 {
        aya_log_ebpf::warn!((), "EVENTS ring buffer full: record kind {} dropped ({} drops on this cpu)", kind, n);
    }
}

#[inline(always)]
fn new_header(kind: u32, conn: u64, conn_start_ns: u64, port: u16, bytes: u64) -> EventHeader {
    EventHeader {
        kind,
        flags: 0,
        pid_tgid: bpf_get_current_pid_tgid(),
        conn,
        conn_start_ns,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        bytes,
        captured: 0,
        port,
        _pad: 0,
        sock_hint: 0,
        sent_total: 0,
        recv_seq: 0,
        _pad2: 0,
    }
}

/// 1 while the agent drains the ring on its timer, 0 while it sleeps (set by the agent).
#[map]
static AGENT_AWAKE: Array<u32> = Array::with_max_entries(1, 0);

/// Wake the agent only when it needs it: a wakeup per record costs more than the record (an
/// IPI, a VM exit under a hypervisor). While the agent is awake it drains the ring every
/// `vigie_common::DRAIN_INTERVAL_MS` and is woken early only past `WAKEUP_BACKLOG` waiting
/// bytes; while it sleeps, the ring's own rule applies (wake when this record is the first the
/// agent has not read), so an idle agent sleeps until traffic comes.
#[inline(always)]
fn output_flags() -> u64 {
    const BPF_RB_ADAPTIVE_WAKEUP: u64 = 0;
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    const BPF_RB_AVAIL_DATA: u64 = 0;
    if EVENTS.query(BPF_RB_AVAIL_DATA) > WAKEUP_BACKLOG {
        return BPF_RB_FORCE_WAKEUP;
    }
    if AGENT_AWAKE.get(0).copied().unwrap_or(0) != 0 { BPF_RB_NO_WAKEUP } else { BPF_RB_ADAPTIVE_WAKEUP }
}

#[inline(always)]
fn emit_header(h: &EventHeader) {
    if EVENTS.output::<EventHeader>(h, output_flags()).is_err() {
        ring_full(h.kind);
    }
}

/// Emit `header` followed by up to `MAX_CAPTURE` bytes copied from user address `base`
/// (`want` is how many bytes are there). Copy failures still emit the header: bytes are
/// counted even when content is lost.
#[inline(always)]
fn capture_and_emit(header: &EventHeader, base: u64, want: u64) {
    let Some(record) = SCRATCH.get_ptr_mut(0) else {
        emit_header(header);
        return;
    };
    // SAFETY: per-CPU scratch slot, exclusively ours while this program runs.
    let record = unsafe { &mut *record };
    record.header = *header;
    let mut want = want;
    if want > MAX_CAPTURE as u64 {
        want = MAX_CAPTURE as u64;
    }
    // Re-derive a bound the verifier can follow through the helper call.
    let len = (want as u32) & (2 * MAX_CAPTURE as u32 - 1);
    if len == 0 || len > MAX_CAPTURE as u32 {
        emit_header(&record.header);
        return;
    }
    let rc = unsafe {
        generated::bpf_probe_read_user(record.data.as_mut_ptr().cast(), len, base as *const core::ffi::c_void)
    };
    if rc != 0 {
        bump(COUNTER_CAPTURE_FAILED);
        kernel_log!("receive head not readable from user memory: port {} len {} error {}", header.port, len, rc);
        emit_header(&record.header);
        return;
    }
    record.header.captured = len;
    let total = (EVENT_HEADER_LEN as u64 + len as u64) & 0xffff;
    if total > core::mem::size_of::<RecvRecord>() as u64 {
        return;
    }
    // SAFETY: `total` is at most the size of the record it points into.
    let bytes = unsafe { core::slice::from_raw_parts((record as *const RecvRecord).cast::<u8>(), total as usize) };
    if EVENTS.output::<[u8]>(bytes, output_flags()).is_err() {
        ring_full(header.kind);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
