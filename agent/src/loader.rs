//! Loading the kernel programs and attaching them to their tracepoints.
//!
//! Every failure names the program and the tracepoint, and carries the kernel's verifier log
//! when there is one; a kernel that lacks a tracepoint vigie needs is reported with the full
//! list of what is missing before anything is loaded.

use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use vigie_common::{CONFIG_SKC_NUM_OFFSET, COUNTER_COUNT};

/// Where the kernel's tracing filesystem is expected; aya looks there too.
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// One program and the tracepoint it attaches to.
pub struct Attachment {
    pub program: &'static str,
    pub category: &'static str,
    pub name: &'static str,
    /// Why vigie needs it, for error messages and `vigie check`.
    pub purpose: &'static str,
}

/// Every attachment vigie makes. All are required: without any of them some requests or
/// bytes would go uncounted.
pub const ATTACHMENTS: &[Attachment] = &[
    Attachment { program: "vigie_enter_read", category: "syscalls", name: "sys_enter_read", purpose: "request bytes received with read()" },
    Attachment { program: "vigie_enter_recvfrom", category: "syscalls", name: "sys_enter_recvfrom", purpose: "request bytes received with recv()/recvfrom()" },
    Attachment { program: "vigie_enter_readv", category: "syscalls", name: "sys_enter_readv", purpose: "request bytes received with readv()" },
    Attachment { program: "vigie_enter_recvmsg", category: "syscalls", name: "sys_enter_recvmsg", purpose: "request bytes received with recvmsg()" },
    Attachment { program: "vigie_sock_recv", category: "sock", name: "sock_recv_length", purpose: "every receive on a watched socket (Linux 6.3+)" },
    Attachment { program: "vigie_sock_send", category: "sock", name: "sock_send_length", purpose: "every response byte sent on a watched socket (Linux 6.3+)" },
    Attachment { program: "vigie_sock_state", category: "sock", name: "inet_sock_set_state", purpose: "connection close" },
];

/// The compiled kernel programs, embedded so the agent is one binary.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vigie"));

/// Mount tracefs when it is not there, as aya's tracepoint attach needs it.
pub fn ensure_tracefs() -> Result<()> {
    if tracefs_ready() {
        return Ok(());
    }
    let target = std::ffi::CString::new(TRACEFS)?;
    let fstype = std::ffi::CString::new("tracefs")?;
    let source = std::ffi::CString::new("nodev")?;
    // SAFETY: plain mount(2) with NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!("tracefs is not mounted at {TRACEFS} and mounting it failed: {err} (run `mount -t tracefs nodev {TRACEFS}` as root)");
    }
    tracing::info!(path = TRACEFS, "mounted tracefs");
    Ok(())
}

pub fn tracefs_ready() -> bool {
    Path::new(TRACEFS).join("events").is_dir()
}

/// The attachments whose tracepoint this kernel does not have.
pub fn missing_tracepoints() -> Vec<&'static Attachment> {
    let events = Path::new(TRACEFS).join("events");
    ATTACHMENTS.iter().filter(|a| !events.join(a.category).join(a.name).is_dir()).collect()
}

/// Loaded and attached programs plus the maps the agent reads.
pub struct Probes {
    /// Keeps programs, links and maps alive; dropping it detaches everything.
    _ebpf: Ebpf,
    events: Option<RingBuf<MapData>>,
    pub counters: PerCpuArray<MapData, u64>,
    pub attached: usize,
}

impl Probes {
    /// The ring buffer, handed once to whoever polls it.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        self.events.take().context("the ring buffer was already taken")
    }

    /// Kernel-side counters (`vigie_common::COUNTER_*`), summed over CPUs.
    pub fn counters(&self) -> [u64; COUNTER_COUNT as usize] {
        let mut out = [0u64; COUNTER_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }
}

/// Load the programs, tell them which ports to watch, and attach them all.
pub fn load(ports: &[u16]) -> Result<Probes> {
    if ports.is_empty() {
        bail!("no server port to watch: give --server-port (or server_ports in the config file)");
    }
    ensure_tracefs()?;
    let missing = missing_tracepoints();
    if !missing.is_empty() {
        let list: Vec<String> = missing
            .iter()
            .map(|a| format!("{}:{} ({})", a.category, a.name, a.purpose))
            .collect();
        bail!(
            "this kernel lacks tracepoints vigie needs: {}. Run `vigie check` for the full report.",
            list.join(", ")
        );
    }

    let mut ebpf = Ebpf::load(PROGRAMS).context("loading vigie's eBPF object into the kernel (are you root, or do you have CAP_BPF and CAP_PERFMON?)")?;
    {
        let mut watched: HashMap<_, u16, u8> = HashMap::try_from(
            ebpf.map_mut("WATCHED_PORTS").context("map WATCHED_PORTS missing from the eBPF object")?,
        )?;
        for port in ports {
            watched.insert(port, 1, 0).with_context(|| format!("adding port {port} to WATCHED_PORTS"))?;
        }
        let mut config: Array<_, u64> =
            Array::try_from(ebpf.map_mut("CONFIG").context("map CONFIG missing from the eBPF object")?)?;
        config.set(CONFIG_SKC_NUM_OFFSET, 14, 0).context("writing CONFIG")?;
    }

    let mut attached = 0;
    for a in ATTACHMENTS {
        let program: &mut TracePoint = ebpf
            .program_mut(a.program)
            .with_context(|| format!("program {} missing from the eBPF object", a.program))?
            .try_into()
            .with_context(|| format!("program {} is not a tracepoint program", a.program))?;
        program
            .load()
            .with_context(|| format!("loading program {} for {}:{}", a.program, a.category, a.name))?;
        program
            .attach(a.category, a.name)
            .with_context(|| format!("attaching program {} to {}:{}", a.program, a.category, a.name))?;
        attached += 1;
    }

    let events = RingBuf::try_from(ebpf.take_map("EVENTS").context("map EVENTS missing")?)?;
    let counters = PerCpuArray::try_from(ebpf.take_map("COUNTERS").context("map COUNTERS missing")?)?;
    Ok(Probes { _ebpf: ebpf, events: Some(events), counters, attached })
}
