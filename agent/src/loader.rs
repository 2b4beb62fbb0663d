//! Loading the kernel programs and attaching them to their tracepoints.
//!
//! Every failure names the program and the tracepoint, and carries the kernel's verifier log
//! when there is one; a kernel that lacks a tracepoint vigie needs is reported with the full
//! list of what is missing before anything is loaded.

use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{TracePoint, UProbe, uprobe::{UProbeAttachLocation, UProbeScope}},
};
use vigie_common::COUNTER_COUNT;

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

/// Uprobe programs on OpenSSL: (program, function it enters). `vigie_ssl_return` is attached
/// as a uretprobe to each read and write function.
const SSL_ENTRY_PROGRAMS: &[(&str, &str)] = &[
    ("vigie_ssl_read", "SSL_read"),
    ("vigie_ssl_read_ex", "SSL_read_ex"),
    ("vigie_ssl_write", "SSL_write"),
    ("vigie_ssl_write_ex", "SSL_write_ex"),
    ("vigie_ssl_free", "SSL_free"),
];
const SSL_RETURN_PROGRAM: &str = "vigie_ssl_return";

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
    ebpf: Ebpf,
    /// TLS targets attached so far (canonical paths).
    tls_targets: Vec<std::path::PathBuf>,
    events: Option<RingBuf<MapData>>,
    pub counters: PerCpuArray<MapData, u64>,
    pub attached: usize,
}

impl Probes {
    /// The ring buffer, handed once to whoever polls it.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        self.events.take().context("the ring buffer was already taken")
    }

    /// Replace the set of watched server ports. Connections already known to the kernel stay
    /// watched until they close.
    pub fn set_ports(&mut self, ports: &[u16]) -> Result<()> {
        let mut watched: HashMap<_, u16, u8> =
            HashMap::try_from(self.ebpf.map_mut("WATCHED_PORTS").context("map WATCHED_PORTS missing")?)?;
        let old: Vec<u16> = watched.keys().filter_map(|k| k.ok()).collect();
        for port in old.iter().filter(|p| !ports.contains(p)) {
            watched.remove(port).with_context(|| format!("removing port {port} from WATCHED_PORTS"))?;
        }
        for port in ports.iter().filter(|p| !old.contains(p)) {
            watched.insert(port, 1, 0).with_context(|| format!("adding port {port} to WATCHED_PORTS"))?;
        }
        Ok(())
    }

    /// Attach the OpenSSL uprobes to one file (shared library or executable). They fire in
    /// every process that maps it, including processes started later. Returns how many
    /// probes were attached; attaching the same file twice is a no-op.
    pub fn attach_tls(&mut self, path: &Path) -> Result<usize> {
        let canonical = std::fs::canonicalize(path).with_context(|| format!("TLS target {}", path.display()))?;
        if self.tls_targets.contains(&canonical) {
            return Ok(0);
        }
        let symbols = crate::tls::find_ssl_symbols(&canonical)?;
        if !symbols.usable() {
            bail!(
                "TLS target {}: no SSL_read/SSL_write symbols (neither exported nor local); is it OpenSSL, or stripped?",
                path.display()
            );
        }
        let mut attached = 0;
        for (program, function) in SSL_ENTRY_PROGRAMS {
            let Some(offset) = symbols.get(function) else { continue };
            let probe: &mut UProbe = self.ebpf.program_mut(program).context("uprobe program missing")?.try_into()?;
            probe
                .attach(UProbeAttachLocation::AbsoluteOffset(offset), &canonical, UProbeScope::AllProcesses)
                .with_context(|| format!("attaching {program} to {function} in {}", canonical.display()))?;
            attached += 1;
            if *function != "SSL_free" {
                let ret: &mut UProbe =
                    self.ebpf.program_mut(SSL_RETURN_PROGRAM).context("uretprobe program missing")?.try_into()?;
                ret.attach(UProbeAttachLocation::AbsoluteOffset(offset), &canonical, UProbeScope::AllProcesses)
                    .with_context(|| format!("attaching {SSL_RETURN_PROGRAM} to the return of {function} in {}", canonical.display()))?;
                attached += 1;
            }
        }
        tracing::info!(target = %canonical.display(), probes = attached, "attached to OpenSSL");
        self.tls_targets.push(canonical);
        self.attached += attached;
        Ok(attached)
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

    for program in SSL_ENTRY_PROGRAMS.iter().map(|(p, _)| *p).chain([SSL_RETURN_PROGRAM]) {
        let probe: &mut UProbe = ebpf
            .program_mut(program)
            .with_context(|| format!("program {program} missing from the eBPF object"))?
            .try_into()
            .with_context(|| format!("program {program} is not a uprobe program"))?;
        probe.load().with_context(|| format!("loading program {program}"))?;
    }

    let events = RingBuf::try_from(ebpf.take_map("EVENTS").context("map EVENTS missing")?)?;
    let counters = PerCpuArray::try_from(ebpf.take_map("COUNTERS").context("map COUNTERS missing")?)?;
    Ok(Probes { ebpf, tls_targets: Vec::new(), events: Some(events), counters, attached })
}
