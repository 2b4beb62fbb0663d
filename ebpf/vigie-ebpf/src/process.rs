//! `sched:sched_process_fork`: a server process's children are server processes too.
//!
//! Pre-forking servers (nginx's workers, a Synapse worker respawned by its supervisor from a
//! watched parent) start receiving requests at once; waiting for the agent's next /proc scan
//! would lose the first request heads of each new worker.

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext};

use vigie_common::EVENT_FORK;

use crate::{FORK_WATCHED, SERVER_TGIDS, emit_header, layout, new_header};

#[tracepoint]
pub fn vigie_fork(ctx: TracePointContext) -> u32 {
    // The tracepoint runs in the parent.
    let pid_tgid = bpf_get_current_pid_tgid();
    let parent = (pid_tgid >> 32) as u32;
    // Read the values, not just the pointers' presence: LLVM would otherwise OR the two
    // pointers together, which the verifier refuses.
    let server = unsafe { SERVER_TGIDS.get(&parent) }.copied().unwrap_or(0) != 0;
    let tls = unsafe { FORK_WATCHED.get(&parent) }.copied().unwrap_or(0) != 0;
    if !server && !tls {
        return 0;
    }
    let Some(layout) = layout() else { return 0 };
    let Ok(child) = (unsafe { ctx.read_at::<i32>(layout.fork_child_pid as usize) }) else { return 0 };
    // A new thread (not a new process) has a child pid that is a thread id, not a tgid: that
    // is harmless in SERVER_TGIDS (it ages out) and the agent ignores it for TLS.
    if child <= 0 || child as u32 == pid_tgid as u32 {
        return 0;
    }
    if server {
        let _ = SERVER_TGIDS.insert(&(child as u32), &1, 0);
    }
    if tls {
        emit_header(&new_header(EVENT_FORK, 0, 0, 0, child as u64));
    }
    0
}
