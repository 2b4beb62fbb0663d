//! Records shared by vigie's kernel programs and its agent.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel writes it into the ring buffer or
//! maps, the agent reads the same bytes back. Keep it small and keep both sides in this file
//! so a layout change cannot reach only one of them.
#![no_std]

/// Most request bytes the kernel copies out of one receive: Synapse (Twisted) accepts request
/// heads of up to 16 KiB, so a head it serves is always seen whole. With 8 KiB, a client could
/// push its `Authorization` header past the copy with padding and hide its requests from
/// per-token accounting. Bodies are not needed past their first bytes: the agent counts them.
pub const MAX_CAPTURE: usize = 16384;

/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const RING_BYTES: u32 = 16 * 1024 * 1024;

/// While the agent is awake (traffic flowing), the kernel wakes it only past this many waiting
/// bytes; otherwise the agent drains the ring every `DRAIN_INTERVAL_MS`. Both bound the delay
/// of a record. A drain that finds nothing puts the agent to sleep until the next record.
pub const WAKEUP_BACKLOG: u64 = 1024 * 1024;
/// 50 ms: a wakeup of the agent costs tens of microseconds on a busy VM (measured 70 µs at
/// 80 records/s), so at a few hundred records a second, wakeups and not records were most of
/// its CPU; a record waits at most this long, far below the detector's 1 s tick, and a burst
/// past `WAKEUP_BACKLOG` still wakes the agent at once.
pub const DRAIN_INTERVAL_MS: u64 = 50;

/// Bounds of the kernel maps. Each map says in `ebpf/vigie-ebpf/src/main.rs` what happens when
/// it is full.
pub const MAX_CONNS: u32 = 65536;
pub const MAX_PENDING_READS: u32 = 16384;
pub const MAX_WATCHED_PORTS: u32 = 64;
/// `WATCHED_PORTS` is a bitmap over every port: 1024 words of 64 bits.
pub const WATCHED_PORT_WORDS: u32 = 1024;

/// Where a port's bit is in `WATCHED_PORTS`: (word index, mask).
#[inline(always)]
pub const fn watched_port_slot(port: u16) -> (u32, u64) {
    ((port >> 6) as u32, 1u64 << (port & 63))
}
pub const MAX_SSL_CALLS: u32 = 16384;
pub const MAX_TLS_PROCESSES: u32 = 4096;
pub const MAX_SERVER_PROCESSES: u32 = 4096;
pub const MAX_FORK_WATCHED: u32 = 4096;

/// `EventHeader::kind` values.
pub const EVENT_RECV: u32 = 1;
pub const EVENT_SEND: u32 = 2;
pub const EVENT_CLOSE: u32 = 3;
/// Plaintext returned by `SSL_read`/`SSL_read_ex` (`conn` is the `SSL*`, followed by a capture).
pub const EVENT_TLS_RECV: u32 = 4;
/// Plaintext accepted by `SSL_write`/`SSL_write_ex` (`conn` is the `SSL*`). Sends on watched
/// sockets are not records: the kernel adds them up per connection (`ConnInfo::sent`) and
/// receive and close records carry the running total (`EventHeader::sent_total`).
pub const EVENT_TLS_SEND: u32 = 5;
/// `SSL_free`: the TLS connection is over.
pub const EVENT_TLS_CLOSE: u32 = 6;
/// A process whose TLS probes are per process forked: `bytes` is the child's pid, `pid_tgid`
/// the parent's. The agent attaches the parent's probes to the child.
pub const EVENT_FORK: u32 = 7;

/// `EventHeader::flags` bits. (Bit 0 once said "the capture holds fewer bytes than the receive
/// moved": `captured < bytes` says the same, and the agent reads that; the bit is left unused.)
/// No buffer was known for this receive (a syscall vigie does not read buffers from, such as
/// io_uring_enter, recvmmsg or a 32-bit compat call; a descriptor that is not the socket; or,
/// with the syscall source, an evicted pending-read entry): bytes are exact, content is missing.
pub const FLAG_NO_BUFFER: u32 = 2;
/// TLS records: `sock_hint` is a socket the thread used *during* the SSL call (the library
/// does its own socket I/O, as nginx's does): certain. Without it, `sock_hint` is the socket
/// the thread last received on before the call (memory-BIO servers such as Twisted): a hint.
pub const FLAG_SOCK_DURING_CALL: u32 = 4;

/// Indices of the per-CPU counters in the `COUNTERS` map.
pub const COUNTER_RINGBUF_FULL: u32 = 0;
pub const COUNTER_CONNS_FULL: u32 = 1;
pub const COUNTER_CAPTURE_FAILED: u32 = 2;
pub const COUNTER_NO_BUFFER: u32 = 3;
/// An SSL call returned with no record of its entry (the entry was evicted from `SSL_CALLS`,
/// or the probe was attached mid-call): its plaintext record is lost.
pub const COUNTER_SSL_CALL_LOST: u32 = 4;
pub const COUNTER_COUNT: u32 = 5;

/// What the programs need to know about this kernel's layouts, read by the agent from tracefs
/// format files and BTF, and written once into the `LAYOUT` map before anything is attached.
/// Offsets are in bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// `child_pid` in `sched:sched_process_fork`'s record (its layout changed in 6.x).
    pub fork_child_pid: u32,
    /// 1 when the struct offsets below were read from BTF: the syscall capture source, which
    /// must find a file descriptor's socket itself, needs them.
    pub fd_walk: u32,
    /// `struct task_struct.files`, `files_struct.fdt`, `fdtable.max_fds`, `fdtable.fd`.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    /// `struct file.f_inode`, `inode.i_mode`, `file.private_data` (a `struct socket *` for sockets).
    pub file_inode: u32,
    pub inode_mode: u32,
    pub file_private_data: u32,
    /// `struct socket.type` and `socket.sk`.
    pub socket_type: u32,
    pub socket_sk: u32,
    /// `struct sock_common.skc_family` and `skc_num`.
    pub skc_family: u32,
    pub skc_num: u32,
    /// 1 when the syscall capture source is in use.
    pub syscall_source: u32,
    /// `struct sock.sk_socket` and `struct socket.file`: the socket source checks that the
    /// descriptor in the receiving syscall's registers is the socket the receive is on.
    pub sk_socket: u32,
    pub socket_file: u32,
    /// `struct sock.sk_protocol`: the socket programs register TCP sockets only.
    pub sk_protocol: u32,
}

/// One record in the ring buffer. `RECV` records are followed by `captured` bytes of payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventHeader {
    pub kind: u32,
    pub flags: u32,
    /// `pid_tgid` of the thread that did the I/O (tgid in the high half).
    pub pid_tgid: u64,
    /// Kernel address of the socket: with `conn_start_ns`, the connection's identity.
    pub conn: u64,
    /// When the kernel first saw this socket; tells a reused `struct sock` address apart.
    pub conn_start_ns: u64,
    pub ts_ns: u64,
    /// Bytes the socket call moved (exact, whatever was captured).
    pub bytes: u64,
    /// Payload bytes that follow this header.
    pub captured: u32,
    /// Local (server) port, host order; 0 for TLS records.
    pub port: u16,
    pub _pad: u16,
    /// TLS records: the socket the connection is believed to use (see FLAG_SOCK_DURING_CALL);
    /// 0 when unknown.
    pub sock_hint: u64,
    /// Socket records: bytes sent on this connection so far (`ConnInfo::sent`), read after the
    /// receive or at the close. The agent accounts the difference from the last total it saw.
    pub sent_total: u64,
    /// Socket receive records: this receive's number on its connection (`ConnInfo::recvs`).
    pub recv_seq: u32,
    pub _pad2: u32,
}

pub const EVENT_HEADER_LEN: usize = core::mem::size_of::<EventHeader>();

/// Where a thread's pending read will land, saved at `sys_enter_*`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PendingRead {
    /// User address: the buffer itself, an `iovec` array, or a `user_msghdr`.
    pub addr: u64,
    pub shape: u32,
    /// The file descriptor (the syscall capture source resolves it to a socket at exit).
    pub fd: u32,
}

pub const SHAPE_BUF: u32 = 1;
pub const SHAPE_IOVEC: u32 = 2;
pub const SHAPE_MSGHDR: u32 = 3;
/// A send in flight (syscall capture source only): `addr` is unused.
pub const SHAPE_SEND: u32 = 4;

/// An SSL call in flight on a thread, saved at the uprobe and read at the uretprobe.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SslCall {
    pub ssl: u64,
    pub buf: u64,
    /// `_ex` variants: where the library writes the byte count.
    pub len_out: u64,
    pub kind: u32,
    pub _pad: u32,
    /// The thread's last received-on and sent-on sockets when the call began.
    pub recv_before: u64,
    pub send_before: u64,
}

pub const SSL_READ: u32 = 1;
pub const SSL_READ_EX: u32 = 2;
pub const SSL_WRITE: u32 = 3;
pub const SSL_WRITE_EX: u32 = 4;

/// Per-connection state in the kernel: its identity, and the running totals that replace a
/// record per send (a small response took two or three send records; now it takes none).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnInfo {
    pub start_ns: u64,
    /// Bytes sent so far (added atomically by every send). Placed before `recvs` on purpose:
    /// the agent reads the entry in one copy, and seeing a new `recvs` with an old `sent` is
    /// the safe way round (see `Tracker::on_polled_total`).
    pub sent: u64,
    /// Receives so far.
    pub recvs: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Scratch space for one receive record (per CPU, never on the 512-byte BPF stack).
#[repr(C)]
pub struct RecvRecord {
    pub header: EventHeader,
    pub data: [u8; MAX_CAPTURE],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are plain old data with no padding holes the kernel leaves uninitialised
    // that the agent would interpret (padding fields are explicit).
    unsafe impl aya::Pod for super::ConnInfo {}
    unsafe impl aya::Pod for super::PendingRead {}
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::SslCall {}
    unsafe impl aya::Pod for super::KernelLayout {}
}
