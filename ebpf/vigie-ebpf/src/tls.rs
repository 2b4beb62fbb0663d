//! Uprobes on OpenSSL: plaintext in and out of `SSL_read`/`SSL_write` (and their `_ex`
//! variants), and `SSL_free` as the end of a TLS connection.
//!
//! The `SSL*` is the connection's identity. Each record also carries a socket hint so the
//! agent can tie the `SSL*` to a TCP connection: a socket the thread used *during* the call
//! (libraries doing their own socket I/O, like nginx's) is certain; otherwise, for reads, the
//! socket the thread last received on before the call (memory-BIO servers such as Twisted
//! receive ciphertext, then decrypt it on the same thread). Hints are per record, never
//! latched: the agent decides what to believe.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use vigie_common::*;

use crate::{
    LAST_RECV_SOCK, LAST_SEND_SOCK, SSL_CALLS, TLS_PROCESSES, bump, capture_and_emit, emit_header, new_header,
};

#[inline(always)]
fn enter(ctx: &ProbeContext, kind: u32) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (Some(ssl), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else { return 0 };
    let len_out = if kind == SSL_READ_EX || kind == SSL_WRITE_EX { ctx.arg::<u64>(3).unwrap_or(0) } else { 0 };
    crate::mark_tls_seen();
    let _ = TLS_PROCESSES.insert(&((pid_tgid >> 32) as u32), &1, 0);
    let call = SslCall {
        ssl,
        buf,
        len_out,
        kind,
        _pad: 0,
        recv_before: unsafe { LAST_RECV_SOCK.get(&pid_tgid) }.copied().unwrap_or(0),
        send_before: unsafe { LAST_SEND_SOCK.get(&pid_tgid) }.copied().unwrap_or(0),
    };
    let _ = SSL_CALLS.insert(&pid_tgid, &call, 0);
    0
}

#[uprobe]
pub fn vigie_ssl_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, SSL_READ)
}

#[uprobe]
pub fn vigie_ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, SSL_READ_EX)
}

#[uprobe]
pub fn vigie_ssl_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, SSL_WRITE)
}

#[uprobe]
pub fn vigie_ssl_write_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, SSL_WRITE_EX)
}

/// Bytes the call moved: the return value, or `*len_out` for the `_ex` variants (which return
/// 1 on success).
#[inline(always)]
fn moved(ctx: &RetProbeContext, call: &SslCall) -> u64 {
    let ret: i64 = ctx.ret::<i64>();
    if call.kind == SSL_READ_EX || call.kind == SSL_WRITE_EX {
        if ret as i32 != 1 || call.len_out == 0 {
            return 0;
        }
        return unsafe { bpf_probe_read_user(call.len_out as *const u64) }.unwrap_or(0);
    }
    let ret = ret as i32;
    if ret > 0 { ret as u64 } else { 0 }
}

#[uretprobe]
pub fn vigie_ssl_return(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(call) = (unsafe { SSL_CALLS.get(&pid_tgid) }).copied() else {
        bump(COUNTER_SSL_CALL_LOST);
        crate::kernel_log!("SSL call return without its entry (SSL_CALLS evicted): bytes not counted");
        return 0;
    };
    let _ = SSL_CALLS.remove(&pid_tgid);
    let bytes = moved(&ctx, &call);
    if bytes == 0 {
        return 0;
    }
    let reading = call.kind == SSL_READ || call.kind == SSL_READ_EX;
    let kind = if reading { EVENT_TLS_RECV } else { EVENT_TLS_SEND };
    // The SSL* lives in one process: the tgid keeps identities of different processes apart.
    let mut header = new_header(kind, call.ssl, pid_tgid >> 32, 0, bytes);
    let (now, before) = if reading {
        (unsafe { LAST_RECV_SOCK.get(&pid_tgid) }.copied().unwrap_or(0), call.recv_before)
    } else {
        (unsafe { LAST_SEND_SOCK.get(&pid_tgid) }.copied().unwrap_or(0), call.send_before)
    };
    if now != before && now != 0 {
        header.flags |= FLAG_SOCK_DURING_CALL;
        header.sock_hint = now;
    } else if reading {
        header.sock_hint = before;
    }
    if reading {
        capture_and_emit(&header, call.buf, bytes);
    } else {
        emit_header(&header);
    }
    0
}

#[uprobe]
pub fn vigie_ssl_free(ctx: ProbeContext) -> u32 {
    let Some(ssl) = ctx.arg::<u64>(0) else { return 0 };
    let pid_tgid = bpf_get_current_pid_tgid();
    emit_header(&new_header(EVENT_TLS_CLOSE, ssl, pid_tgid >> 32, 0, 0));
    0
}
