//! `syscalls:sys_enter_*` for the receive calls: remember where each thread's receive will
//! land, so that `sock:sock_recv_length` (which knows the socket but not the buffer) can copy
//! the request's first bytes.

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext};
use vigie_common::*;

use crate::PENDING_READS;

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

