//! Programs that return at once, for `cargo xtask bench`'s floor mode: attached to the same
//! tracepoints and uprobes as the real ones, they measure what the attachment points alone cost
//! on a host (the tracepoint's or the trap's entry and exit), against which vigie's own work is
//! judged. Never attached by a normal agent.

use aya_ebpf::{
    macros::{raw_tracepoint, tracepoint, uprobe, uretprobe},
    programs::{ProbeContext, RawTracePointContext, RetProbeContext, TracePointContext},
};

#[tracepoint]
pub fn vigie_floor_tp(_ctx: TracePointContext) -> u32 {
    0
}

/// For the raw tracepoints (`sock:*`); the tracepoint each attaches to is given at attach time.
#[raw_tracepoint]
pub fn vigie_floor_raw(_ctx: RawTracePointContext) -> i32 {
    0
}

#[uprobe]
pub fn vigie_floor_up(_ctx: ProbeContext) -> u32 {
    0
}

#[uretprobe]
pub fn vigie_floor_uret(_ctx: RetProbeContext) -> u32 {
    0
}
