//! `sched:sched_process_fork`: a server process's children are server processes too.
//!
//! Pre-forking servers (nginx's workers, a Synapse worker respawned by its supervisor from a
//! watched parent) start receiving requests at once; waiting for the agent's next /proc scan
//! would lose the first request heads of each new worker.

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext};

use crate::{SERVER_TGIDS, is_server_process, layout};

#[tracepoint]
pub fn vigie_fork(ctx: TracePointContext) -> u32 {
    // The tracepoint runs in the parent.
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !is_server_process(parent) {
        return 0;
    }
    let Some(layout) = layout() else { return 0 };
    let Ok(child) = (unsafe { ctx.read_at::<i32>(layout.fork_child_pid as usize) }) else { return 0 };
    // A new thread of the same process has a child pid that is not a tgid: harmless, it ages
    // out of the LRU map.
    if child > 0 {
        let _ = SERVER_TGIDS.insert(&(child as u32), &1, 0);
    }
    0
}
