//! `syscalls:*` tracepoints: the *syscall* capture source, for kernels without
//! `sock:sock_{recv,send}_length` (before 6.3).
//!
//! `sys_enter_*` of the receive and send calls remember, per server thread, where a receive
//! will land (`PENDING_READS`); `sys_exit_*` take the byte count, find the socket behind the
//! file descriptor by walking the current task's file table with offsets the agent read from
//! BTF, and copy the request's first bytes. It only sees the syscalls it hooks (read,
//! recvfrom, readv, recvmsg; write, sendto, sendmsg, writev, sendfile, splice), and enabling
//! any syscall tracepoint puts every task on the host on the slower syscall entry path.
//!
//! The *socket* source ([`crate::sock`]) attaches none of these: it reads the receive's
//! buffer from the task's saved registers, and checks the descriptor with [`fd_is_sock`].

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel},
    macros::tracepoint,
    programs::TracePointContext,
};
use vigie_common::*;

use crate::{
    LAST_RECV_SOCK, LAST_SEND_SOCK, PENDING_READS, TLS_PROCESSES, is_server_process, layout,
    sock::{first_buffer, note_tls_thread, on_recv, on_send},
};

/// Servers, and TLS processes (whose socket use ties an `SSL*` to its connection), are the
/// only processes whose calls matter: the rest of the machine pays one hash lookup.
#[inline(always)]
fn interesting(pid_tgid: u64) -> bool {
    let tgid = (pid_tgid >> 32) as u32;
    is_server_process(tgid) || (crate::tls_seen() && unsafe { TLS_PROCESSES.get(&tgid) }.is_some())
}

const MSG_PEEK: u64 = 2;

#[inline(always)]
fn remember(ctx: &TracePointContext, shape: u32, fd_at: usize) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !interesting(pid_tgid) {
        return 0;
    }
    // sys_enter_* layout: eight-byte arguments from offset 16.
    let Ok(fd) = (unsafe { ctx.read_at::<u64>(fd_at) }) else { return 0 };
    let addr = if shape == SHAPE_SEND { 0 } else { unsafe { ctx.read_at::<u64>(24) }.unwrap_or(0) };
    let pending = PendingRead { addr, shape, fd: fd as u32 };
    let _ = PENDING_READS.insert(&pid_tgid, &pending, 0);
    0
}

#[tracepoint]
pub fn vigie_enter_read(ctx: TracePointContext) -> u32 {
    remember(&ctx, SHAPE_BUF, 16)
}

/// A peek moves no bytes: not remembering it keeps the syscall source from counting them twice.
#[inline(always)]
fn peeks(ctx: &TracePointContext, flags_at: usize) -> bool {
    unsafe { ctx.read_at::<u64>(flags_at) }.is_ok_and(|f| f & MSG_PEEK != 0)
}

#[tracepoint]
pub fn vigie_enter_recvfrom(ctx: TracePointContext) -> u32 {
    // recvfrom(fd, buf, len, flags, ...)
    if peeks(&ctx, 40) {
        return 0;
    }
    remember(&ctx, SHAPE_BUF, 16)
}

#[tracepoint]
pub fn vigie_enter_readv(ctx: TracePointContext) -> u32 {
    remember(&ctx, SHAPE_IOVEC, 16)
}

#[tracepoint]
pub fn vigie_enter_recvmsg(ctx: TracePointContext) -> u32 {
    // recvmsg(fd, msg, flags)
    if peeks(&ctx, 32) {
        return 0;
    }
    remember(&ctx, SHAPE_MSGHDR, 16)
}

/// Syscall source: write, sendto, sendmsg, writev, sendfile64 (the socket is the first
/// argument).
#[tracepoint]
pub fn vigie_enter_send(ctx: TracePointContext) -> u32 {
    remember(&ctx, SHAPE_SEND, 16)
}

/// Syscall source: splice(fd_in, off_in, fd_out, ...), the socket is the third argument.
#[tracepoint]
pub fn vigie_enter_splice(ctx: TracePointContext) -> u32 {
    remember(&ctx, SHAPE_SEND, 32)
}

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const SOCK_STREAM: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

#[inline(always)]
fn read_at<T: Copy>(base: u64, offset: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.ok()
}

/// The `struct sock *` behind the current task's file descriptor, if it is a TCP socket.
/// The current task's `struct file *` for descriptor `fd`, through its file table; the one
/// walk both the syscall source and the socket source's descriptor check use.
#[inline(always)]
fn file_of_fd(l: &KernelLayout, fd: u32) -> Option<u64> {
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read_at(task, l.task_files)?;
    let fdt: u64 = read_at(files, l.files_fdt)?;
    let max_fds: u32 = read_at(fdt, l.fdt_max_fds)?;
    if fd >= max_fds {
        return None;
    }
    let array: u64 = read_at(fdt, l.fdt_fd)?;
    read_at(array, fd.wrapping_mul(8))
}

#[inline(always)]
fn sock_of_fd(fd: u32) -> Option<u64> {
    let l = layout()?;
    if l.fd_walk == 0 {
        return None;
    }
    let file = file_of_fd(l, fd)?;
    let inode: u64 = read_at(file, l.file_inode)?;
    let mode: u16 = read_at(inode, l.inode_mode)?;
    if mode & S_IFMT != S_IFSOCK {
        return None;
    }
    let socket: u64 = read_at(file, l.file_private_data)?;
    let kind: u16 = read_at(socket, l.socket_type)?;
    if kind != SOCK_STREAM {
        return None;
    }
    let sk: u64 = read_at(socket, l.socket_sk)?;
    let family: u16 = read_at(sk, l.skc_family)?;
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    Some(sk)
}

/// Whether the current task's file descriptor `fd` is the socket `sk`: the descriptor's file
/// must be the one the socket points back to (`sk->sk_socket->file`), which holds for a socket
/// and for nothing else, without checking the file's type.
#[inline(always)]
pub fn fd_is_sock(fd: u32, sk: u64) -> bool {
    let Some(l) = layout() else { return false };
    if l.fd_walk == 0 {
        return false;
    }
    let Some(file) = file_of_fd(l, fd) else { return false };
    let socket: Option<u64> = read_at(sk, l.sk_socket);
    let owner: Option<u64> = socket.and_then(|s| read_at(s, l.socket_file));
    file != 0 && owner == Some(file)
}

/// The pending call of this thread, taken out of the map, and the syscall's return value.
#[inline(always)]
fn finish(ctx: &TracePointContext) -> Option<(PendingRead, i64)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pending = *unsafe { PENDING_READS.get(&pid_tgid) }?;
    let _ = PENDING_READS.remove(&pid_tgid);
    // sys_exit_* layout: `long ret` at 16.
    let ret: i64 = unsafe { ctx.read_at(16) }.ok()?;
    Some((pending, ret))
}

/// Exit of read, recvfrom, readv, recvmsg (syscall source).
#[tracepoint]
pub fn vigie_exit_recv(ctx: TracePointContext) -> u32 {
    let Some((pending, ret)) = finish(&ctx) else { return 0 };
    if ret <= 0 || pending.shape == SHAPE_SEND {
        return 0;
    }
    let Some(sk) = sock_of_fd(pending.fd) else { return 0 };
    note_tls_thread(&LAST_RECV_SOCK, sk, || true);
    on_recv(sk, ret as u64, || first_buffer(pending.shape, pending.addr));
    0
}

/// Exit of write, sendto, sendmsg, writev, sendfile64, splice (syscall source).
#[tracepoint]
pub fn vigie_exit_send(ctx: TracePointContext) -> u32 {
    let Some((pending, ret)) = finish(&ctx) else { return 0 };
    if ret <= 0 || pending.shape != SHAPE_SEND {
        return 0;
    }
    let Some(sk) = sock_of_fd(pending.fd) else { return 0 };
    note_tls_thread(&LAST_SEND_SOCK, sk, || true);
    on_send(sk, ret as u64);
    0
}
