//! Loading the kernel programs and attaching them to their tracepoints.
//!
//! Every failure names the program and the tracepoint, and carries the kernel's verifier log
//! when there is one; a kernel that lacks a tracepoint vigie needs is reported with the full
//! list of what is missing before anything is loaded.

use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        RawTracePoint, TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeScope},
    },
};
use vigie_common::{COUNTER_COUNT, KernelLayout, WATCHED_PORT_WORDS, watched_port_slot};

/// Where the kernel's tracing filesystem is expected; aya looks there too.
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Where byte counts come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CaptureSource {
    /// `sock:sock_{recv,send}_length` (Linux 6.3+): every socket call whatever the syscall,
    /// sendfile and splice included; the socket is given, and a receive's buffer is read from
    /// the receiving task's saved registers. No `syscalls:*` tracepoint: another task on the
    /// host pays only for its own socket calls, a port check each (a two-byte read and an
    /// array lookup).
    Sock,
    /// `syscalls:sys_exit_*` of the receive and send calls, for older kernels: the socket is
    /// found from the file descriptor with BTF offsets; only the hooked syscalls are seen.
    Syscalls,
}

impl CaptureSource {
    pub fn name(self) -> &'static str {
        match self {
            CaptureSource::Sock => "sock",
            CaptureSource::Syscalls => "syscalls",
        }
    }
}

/// What the operator asked for: a source, or the best this kernel has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SourceChoice {
    #[default]
    Auto,
    Only(CaptureSource),
}

impl std::str::FromStr for SourceChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(SourceChoice::Auto),
            "sock" => Ok(SourceChoice::Only(CaptureSource::Sock)),
            "syscalls" => Ok(SourceChoice::Only(CaptureSource::Syscalls)),
            other => bail!("capture source {other:?}: expected \"auto\", \"sock\" or \"syscalls\""),
        }
    }
}

/// Which attachments a program belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    Always,
    Only(CaptureSource),
}

/// One program and the tracepoint it attaches to.
pub struct Attachment {
    pub program: &'static str,
    pub category: &'static str,
    pub name: &'static str,
    /// Why vigie needs it, for error messages and `vigie check`.
    pub purpose: &'static str,
    pub need: Need,
}

const fn always(
    program: &'static str,
    category: &'static str,
    name: &'static str,
    purpose: &'static str,
) -> Attachment {
    Attachment { program, category, name, purpose, need: Need::Always }
}
const fn sock(program: &'static str, category: &'static str, name: &'static str, purpose: &'static str) -> Attachment {
    Attachment { program, category, name, purpose, need: Need::Only(CaptureSource::Sock) }
}
const fn sys(program: &'static str, name: &'static str, purpose: &'static str) -> Attachment {
    Attachment { program, category: "syscalls", name, purpose, need: Need::Only(CaptureSource::Syscalls) }
}

/// Every attachment vigie can make. Those of the chosen source, and the `Always` ones, are all
/// required: without any of them some requests or bytes would go uncounted.
pub const ATTACHMENTS: &[Attachment] = &[
    always("vigie_sock_state", "sock", "inet_sock_set_state", "connection close"),
    always("vigie_fork", "sched", "sched_process_fork", "a server's new worker processes"),
    sock("vigie_sock_recv", "sock", "sock_recv_length", "every receive on a watched socket (Linux 6.3+)"),
    sock("vigie_sock_send", "sock", "sock_send_length", "every response byte sent on a watched socket (Linux 6.3+)"),
    sys("vigie_enter_read", "sys_enter_read", "request heads received with read()"),
    sys("vigie_enter_recvfrom", "sys_enter_recvfrom", "request heads received with recv()/recvfrom()"),
    sys("vigie_enter_readv", "sys_enter_readv", "request heads received with readv()"),
    sys("vigie_enter_recvmsg", "sys_enter_recvmsg", "request heads received with recvmsg()"),
    sys("vigie_exit_recv", "sys_exit_read", "bytes received with read()"),
    sys("vigie_exit_recv", "sys_exit_recvfrom", "bytes received with recv()/recvfrom()"),
    sys("vigie_exit_recv", "sys_exit_readv", "bytes received with readv()"),
    sys("vigie_exit_recv", "sys_exit_recvmsg", "bytes received with recvmsg()"),
    sys("vigie_enter_send", "sys_enter_write", "the socket of write()"),
    sys("vigie_enter_send", "sys_enter_sendto", "the socket of send()/sendto()"),
    sys("vigie_enter_send", "sys_enter_sendmsg", "the socket of sendmsg()"),
    sys("vigie_enter_send", "sys_enter_writev", "the socket of writev()"),
    sys("vigie_enter_send", "sys_enter_sendfile64", "the socket of sendfile()"),
    sys("vigie_enter_splice", "sys_enter_splice", "the socket of splice()"),
    sys("vigie_exit_send", "sys_exit_write", "bytes sent with write()"),
    sys("vigie_exit_send", "sys_exit_sendto", "bytes sent with send()/sendto()"),
    sys("vigie_exit_send", "sys_exit_sendmsg", "bytes sent with sendmsg()"),
    sys("vigie_exit_send", "sys_exit_writev", "bytes sent with writev()"),
    sys("vigie_exit_send", "sys_exit_sendfile64", "bytes sent with sendfile()"),
    sys("vigie_exit_send", "sys_exit_splice", "bytes sent with splice()"),
];

impl Attachment {
    /// The `sock:*` tracepoints are attached raw: their programs take the tracepoint's
    /// arguments, and the kernel skips them only when the same program is already running
    /// on the CPU (a classic tracepoint's, when any BPF program is; see the kernel side's
    /// `sock` module).
    pub fn raw(&self) -> bool {
        self.category == "sock"
    }

    pub fn used_by(&self, source: CaptureSource) -> bool {
        match self.need {
            Need::Always => true,
            Need::Only(s) => s == source,
        }
    }
}

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

/// The bench's floor (`cargo xtask bench`, `VIGIE_BENCH_FLOOR=1`): programs that return at once
/// take the place of every program at the same attachment points, so the bench can tell the
/// cost of the hooks themselves from vigie's work. Nothing is counted in this mode. With
/// `VIGIE_BENCH_FLOOR=entry` the uprobes go on function entries only (no return probes), which
/// tells an entry trap's cost from a return's.
pub const FLOOR_ENV: &str = "VIGIE_BENCH_FLOOR";
const FLOOR_TRACEPOINT: &str = "vigie_floor_tp";
const FLOOR_RAW_TRACEPOINT: &str = "vigie_floor_raw";
const FLOOR_UPROBE: &str = "vigie_floor_up";
const FLOOR_URETPROBE: &str = "vigie_floor_uret";

/// Every program the kernel object holds, once each: those of the attachments, the TLS
/// probes and the floor (a test checks the object against this list).
fn program_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = ATTACHMENTS
        .iter()
        .map(|a| a.program)
        .chain(SSL_ENTRY_PROGRAMS.iter().map(|(p, _)| *p))
        .chain([SSL_RETURN_PROGRAM, FLOOR_TRACEPOINT, FLOOR_RAW_TRACEPOINT, FLOOR_UPROBE, FLOOR_URETPROBE])
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

fn floor_mode() -> bool {
    std::env::var_os(FLOOR_ENV).is_some_and(|v| v == "1" || v == "entry")
}

fn floor_entries_only() -> bool {
    std::env::var_os(FLOOR_ENV).is_some_and(|v| v == "entry")
}

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
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "tracefs is not mounted at {TRACEFS} and mounting it failed: {err} (run `mount -t tracefs nodev {TRACEFS}` as root)"
        );
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

/// Why a capture source cannot run here, or `None` when it can.
pub fn source_unavailable(source: CaptureSource) -> Option<String> {
    let missing: Vec<String> = missing_tracepoints()
        .into_iter()
        .filter(|a| a.used_by(source))
        .map(|a| format!("{}:{}", a.category, a.name))
        .collect();
    if !missing.is_empty() {
        return Some(format!("this kernel lacks {}", missing.join(", ")));
    }
    // Both sources check a file descriptor against its socket (the socket source, that the
    // registers it reads belong to a receive on that socket) with offsets from BTF.
    if let Err(e) =
        super::btf::Btf::from_file(Path::new(super::btf::VMLINUX)).and_then(|b| super::btf::kernel_offsets(&b))
    {
        return Some(format!("it needs the kernel's BTF to find a file descriptor's socket: {e:#}"));
    }
    None
}

/// The source to use: the one asked for if it can run, else (auto) sock if this kernel has
/// its tracepoints, else syscalls. The reason for a fallback is returned for the log.
pub fn choose_source(choice: SourceChoice) -> Result<(CaptureSource, Option<String>)> {
    match choice {
        SourceChoice::Only(source) => match source_unavailable(source) {
            None => Ok((source, None)),
            Some(why) => bail!("capture source {}: {why}. Run `vigie check` for the full report.", source.name()),
        },
        SourceChoice::Auto => match source_unavailable(CaptureSource::Sock) {
            None => Ok((CaptureSource::Sock, None)),
            Some(sock_why) => match source_unavailable(CaptureSource::Syscalls) {
                None => Ok((CaptureSource::Syscalls, Some(sock_why))),
                Some(sys_why) => bail!(
                    "no capture source can run on this kernel: sock: {sock_why}; syscalls: {sys_why}. Run `vigie check` for the full report."
                ),
            },
        },
    }
}

/// This kernel's layouts for the kernel programs.
fn kernel_layout(source: CaptureSource) -> Result<vigie_common::KernelLayout> {
    let mut layout = super::btf::kernel_offsets(&super::btf::Btf::from_file(Path::new(super::btf::VMLINUX))?)?;
    layout.fork_child_pid = tracepoint_field_offset("sched", "sched_process_fork", "child_pid")?;
    layout.syscall_source = u32::from(source == CaptureSource::Syscalls);
    Ok(layout)
}

/// A field's offset in a tracepoint's record, from its tracefs format file.
fn tracepoint_field_offset(category: &str, name: &str, field: &str) -> Result<u32> {
    let path = Path::new(TRACEFS).join("events").join(category).join(name).join("format");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_field_offset(&text, field).with_context(|| format!("no field {field} in {}", path.display()))
}

fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';');
        let decl = parts.next()?.strip_prefix("field:")?;
        let declared = decl.split_whitespace().last()?.split('[').next()?;
        if declared != field {
            return None;
        }
        parts.find_map(|p| p.trim().strip_prefix("offset:")?.parse().ok())
    })
}

/// Loaded and attached programs plus the maps the agent reads.
pub struct Probes {
    /// Keeps programs, links and maps alive; dropping it detaches everything.
    ebpf: Ebpf,
    /// TLS targets attached so far (canonical paths).
    tls_targets: Vec<std::path::PathBuf>,
    events: Option<RingBuf<MapData>>,
    pub counters: PerCpuArray<MapData, u64>,
    conns: HashMap<MapData, u64, vigie_common::ConnInfo>,
    awake: Array<MapData, u32>,
    pub attached: usize,
    pub source: CaptureSource,
    /// The bench's floor: every attachment runs a program that does nothing.
    pub floor: bool,
    /// Uprobes attached for one server process each (discovery).
    tls_process_links: Vec<ProcessLinks>,
    /// The kernel's diagnostics, only when `kernel_log` is on.
    kernel_log: Option<KernelLogger>,
}

/// aya-log's reader of the kernel's log ring. It must outlive the programs' loads: dropping
/// it closes the ring's fd, which the programs refer to.
pub type KernelLogger = aya_log::EbpfLogger<KernelLogSink>;

/// Hands the kernel's log records to `tracing`, target `vigie::kernel`, so they reach the
/// agent's log with everything else (and `VIGIE_LOG` filters them).
pub struct KernelLogSink;

impl log::Log for KernelLogSink {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "vigie::kernel", "{message}"),
            log::Level::Warn => tracing::warn!(target: "vigie::kernel", "{message}"),
            log::Level::Info => tracing::info!(target: "vigie::kernel", "{message}"),
            log::Level::Debug => tracing::debug!(target: "vigie::kernel", "{message}"),
            log::Level::Trace => tracing::trace!(target: "vigie::kernel", "{message}"),
        }
    }

    fn flush(&self) {}
}

struct ProcessLinks {
    pid: u32,
    target: std::path::PathBuf,
    links: Vec<(&'static str, aya::programs::uprobe::UProbeLinkId)>,
}

impl Probes {
    /// The kernel's log reader (when `kernel_log` is on), handed once to whoever polls it.
    pub fn take_kernel_log(&mut self) -> Option<KernelLogger> {
        self.kernel_log.take()
    }

    /// The ring buffer, handed once to whoever polls it.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        self.events.take().context("the ring buffer was already taken")
    }

    /// Replace the set of watched server ports. The kernel checks the port before anything
    /// else, so connections already open on a port that is no longer watched stop being
    /// counted at once (their close is still reported).
    pub fn set_ports(&mut self, ports: &[u16]) -> Result<()> {
        let mut watched: Array<_, u64> =
            Array::try_from(self.ebpf.map_mut("WATCHED_PORTS").context("map WATCHED_PORTS missing")?)?;
        write_port_bitmap(&mut watched, ports)
    }

    /// Syscall source: tell the kernel which processes serve `ports` now (their receives are
    /// remembered). The kernel adds their forks itself; this scan catches servers that were
    /// running before vigie and after a port change.
    pub fn add_server_processes(&mut self, ports: &[u16]) -> Result<usize> {
        // Only the syscall source filters by process; the /proc walk is not free (every
        // process's descriptors), so the socket source does not pay it every 10 s.
        if self.source == CaptureSource::Sock {
            return Ok(0);
        }
        let pids = super::listeners::server_pids(ports);
        let mut servers: HashMap<_, u32, u8> =
            HashMap::try_from(self.ebpf.map_mut("SERVER_TGIDS").context("map SERVER_TGIDS missing")?)?;
        for pid in &pids {
            servers.insert(pid, 1, 0).with_context(|| format!("adding process {pid} to SERVER_TGIDS"))?;
        }
        Ok(pids.len())
    }

    /// Attach the OpenSSL uprobes to one file (shared library or executable). They fire in
    /// every process that maps it, including processes started later: simple, but every
    /// client on the host that uses the same libssl pays a trap per SSL call. Returns how many
    /// probes were attached; attaching the same file twice is a no-op.
    pub fn attach_tls(&mut self, path: &Path) -> Result<usize> {
        self.attach_tls_scoped(path, None)
    }

    /// Attach the OpenSSL uprobes to one file for one process only (the kernel then inserts
    /// the breakpoints in that process alone, so other processes mapping the same library pay
    /// nothing). Used for servers found by discovery. A no-op when already attached.
    pub fn attach_tls_process(&mut self, path: &Path, pid: u32) -> Result<usize> {
        self.attach_tls_scoped(path, Some(pid))
    }

    fn attach_tls_scoped(&mut self, path: &Path, pid: Option<u32>) -> Result<usize> {
        let canonical = std::fs::canonicalize(path).with_context(|| format!("TLS target {}", path.display()))?;
        if self.tls_targets.contains(&canonical) {
            return Ok(0);
        }
        if let Some(pid) = pid
            && self.tls_process_links.iter().any(|l| l.pid == pid && l.target == canonical)
        {
            return Ok(0);
        }
        let symbols = super::tls::find_ssl_symbols(&canonical)?;
        if !symbols.usable() {
            bail!(
                "TLS target {}: no SSL_read/SSL_write symbols (neither exported nor local); is it OpenSSL, or stripped?",
                path.display()
            );
        }
        let scope = || match pid.and_then(std::num::NonZeroU32::new) {
            Some(pid) => UProbeScope::OneProcess(pid),
            None => UProbeScope::AllProcesses,
        };
        let mut links = Vec::new();
        let floor = self.floor;
        let mut attach = |ebpf: &mut Ebpf, program: &'static str, function: &str, offset: u64| -> Result<()> {
            let program = match (floor, program) {
                (false, p) => p,
                (true, SSL_RETURN_PROGRAM) => FLOOR_URETPROBE,
                (true, _) => FLOOR_UPROBE,
            };
            let probe: &mut UProbe = ebpf.program_mut(program).context("uprobe program missing")?.try_into()?;
            let link =
                probe.attach(UProbeAttachLocation::AbsoluteOffset(offset), &canonical, scope()).with_context(|| {
                    format!(
                        "attaching {program} to {function} in {}{}",
                        canonical.display(),
                        pid.map(|p| format!(" for process {p}")).unwrap_or_default()
                    )
                })?;
            links.push((program, link));
            Ok(())
        };
        let mut result = Ok(());
        for (program, function) in SSL_ENTRY_PROGRAMS {
            let Some(offset) = symbols.get(function) else { continue };
            result = attach(&mut self.ebpf, program, function, offset);
            if result.is_ok() && *function != "SSL_free" && !(floor && floor_entries_only()) {
                result = attach(&mut self.ebpf, SSL_RETURN_PROGRAM, function, offset);
            }
            if result.is_err() {
                break;
            }
        }
        let attached = links.len();
        if let Err(e) = result {
            // All or nothing: half the probes would count reads without writes.
            self.detach_links(links);
            return Err(e);
        }
        self.attached += attached;
        match pid {
            None => {
                tracing::info!(target = %canonical.display(), probes = attached, "attached to OpenSSL in every process");
                self.tls_targets.push(canonical);
            }
            Some(pid) => {
                tracing::info!(target = %canonical.display(), pid, probes = attached, "attached to OpenSSL in a server process");
                let mut watched: HashMap<_, u32, u8> =
                    HashMap::try_from(self.ebpf.map_mut("FORK_WATCHED").context("map FORK_WATCHED missing")?)?;
                watched.insert(pid, 1, 0).with_context(|| format!("adding process {pid} to FORK_WATCHED"))?;
                self.tls_process_links.push(ProcessLinks { pid, target: canonical, links });
            }
        }
        Ok(attached)
    }

    /// A process with per-process TLS probes forked: give the child the same probes (pre-forking
    /// servers start new workers on reload; waiting for the next discovery would miss them).
    pub fn on_fork(&mut self, parent: u32, child: u32) -> usize {
        let targets: Vec<std::path::PathBuf> =
            self.tls_process_links.iter().filter(|l| l.pid == parent).map(|l| l.target.clone()).collect();
        let mut attached = 0;
        for target in targets {
            match self.attach_tls_process(&target, child) {
                Ok(n) => {
                    tracing::info!(parent, child, target = %target.display(), probes = n, "followed a fork of a TLS server process");
                    attached += n
                }
                // The child may have exited or exec'd already.
                Err(e) => {
                    tracing::debug!(parent, child, error = %format!("{e:#}"), "TLS probes for a forked server process")
                }
            }
        }
        attached
    }

    fn detach_links(&mut self, links: Vec<(&'static str, aya::programs::uprobe::UProbeLinkId)>) {
        for (program, link) in links {
            if let Some(probe) = self.ebpf.program_mut(program).and_then(|p| <&mut UProbe>::try_from(p).ok()) {
                let _ = probe.detach(link);
            }
        }
    }

    /// Detach the per-process probes of processes that are gone, so that a server whose
    /// workers come and go does not accumulate dead attachments.
    pub fn prune_exited_processes(&mut self) -> usize {
        let (gone, alive): (Vec<_>, Vec<_>) = std::mem::take(&mut self.tls_process_links)
            .into_iter()
            .partition(|l| !Path::new(&format!("/proc/{}", l.pid)).exists());
        self.tls_process_links = alive;
        let mut detached = 0;
        for l in gone {
            detached += l.links.len();
            self.detach_links(l.links);
        }
        self.attached -= detached;
        detached
    }

    /// Running totals of watched socket connections, for the agent's poll: given (socket
    /// address, start time, _), the (socket address, start time, bytes sent, receives) of each
    /// that is still the same connection in the kernel's map.
    pub fn conn_totals(&self, conns: &[(u64, u64, u32)]) -> Vec<(u64, u64, u64, u32)> {
        conns
            .iter()
            .filter_map(|&(sk, start_ns, _)| {
                let info = self.conns.get(&sk, 0).ok()?;
                (info.start_ns == start_ns).then_some((sk, info.start_ns, info.sent, info.recvs))
            })
            .collect()
    }

    /// Per loaded program, the runs the kernel skipped because another BPF program was
    /// already running on that CPU (`bpf_prog_info.recursion_misses`). A tracepoint that
    /// fires in an interrupt taken while one of vigie's programs runs (the final ACK of a
    /// close, processed in softirq) does not run it: that receive, send or close is not seen.
    /// The kernel counts those and nothing else can; kernels before 5.12 report 0.
    pub fn program_misses(&self) -> Vec<(&'static str, u64)> {
        program_names()
            .into_iter()
            .filter_map(|name| {
                let fd = self.ebpf.program(name)?.fd().ok()?;
                Some((name, recursion_misses(fd.as_fd()).ok()?))
            })
            .collect()
    }

    /// Tell the kernel whether the agent drains the ring on its timer (awake: no wakeups but
    /// for a backlog) or sleeps until the next record wakes it.
    pub fn set_awake(&mut self, awake: bool) -> Result<()> {
        self.awake.set(0, u32::from(awake), 0).context("writing AGENT_AWAKE")
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

/// The words of the watched-port bitmap for `ports` (`vigie_common::watched_port_slot`).
fn port_bitmap(ports: &[u16]) -> Vec<u64> {
    let mut words = vec![0u64; WATCHED_PORT_WORDS as usize];
    for &port in ports {
        let (word, bit) = watched_port_slot(port);
        words[word as usize] |= bit;
    }
    words
}

/// Write every word that changes, so a port change costs a few map writes, not 1,024.
fn write_port_bitmap(map: &mut Array<&mut MapData, u64>, ports: &[u16]) -> Result<()> {
    for (index, word) in port_bitmap(ports).into_iter().enumerate() {
        let index = index as u32;
        if map.get(&index, 0).context("reading WATCHED_PORTS")? != word {
            map.set(index, word, 0).with_context(|| format!("writing word {index} of WATCHED_PORTS"))?;
        }
    }
    Ok(())
}

/// Load the programs, tell them which ports to watch, and attach those of the chosen capture
/// source. `kernel_log` turns on the kernel's diagnostics on its rare paths (off, they cost a
/// load and a branch there, and no logger is set up).
pub fn load(ports: &[u16], choice: SourceChoice, kernel_log: bool) -> Result<Probes> {
    ensure_tracefs()?;
    let (source, fallback) = choose_source(choice)?;
    if let Some(why) = &fallback {
        tracing::warn!(source = source.name(), reason = %why, "falling back to the syscall capture source: sock:sock_{{recv,send}}_length are unavailable");
    }
    let layout = kernel_layout(source)?;

    // KERNEL_LOG lives in the object's read-only data: the verifier sees its value, so when
    // off the log calls are dead code it prunes.
    let mut ebpf =
        EbpfLoader::new().override_global("KERNEL_LOG", &u8::from(kernel_log), true).load(PROGRAMS).context(
            "loading vigie's eBPF object into the kernel (are you root, or do you have CAP_BPF and CAP_PERFMON?)",
        )?;
    // Before any program is loaded: the logger takes the log ring out of `ebpf`.
    let kernel_log = if kernel_log {
        Some(aya_log::EbpfLogger::init_with_logger(&mut ebpf, KernelLogSink).context("setting up the kernel log")?)
    } else {
        None
    };
    {
        let mut watched: Array<_, u64> =
            Array::try_from(ebpf.map_mut("WATCHED_PORTS").context("map WATCHED_PORTS missing from the eBPF object")?)?;
        write_port_bitmap(&mut watched, ports)?;
        let mut layout_map: Array<_, KernelLayout> =
            Array::try_from(ebpf.map_mut("LAYOUT").context("map LAYOUT missing from the eBPF object")?)?;
        layout_map.set(0, layout, 0).context("writing the kernel layout into LAYOUT")?;
    }

    let floor = floor_mode();
    if floor {
        tracing::warn!(
            env = FLOOR_ENV,
            "bench floor: programs that do nothing are attached in place of vigie's; nothing will be counted"
        );
    }
    let mut attached = 0;
    let mut loaded: Vec<&str> = Vec::new();
    for a in ATTACHMENTS.iter().filter(|a| a.used_by(source)) {
        let name = match (floor, a.raw()) {
            (false, _) => a.program,
            (true, false) => FLOOR_TRACEPOINT,
            (true, true) => FLOOR_RAW_TRACEPOINT,
        };
        let first = !loaded.contains(&name);
        let program = ebpf.program_mut(name).with_context(|| format!("program {name} missing from the eBPF object"))?;
        let what = || format!("program {name} for {}:{}", a.category, a.name);
        if a.raw() {
            let program: &mut RawTracePoint =
                program.try_into().with_context(|| format!("program {name} is not a raw tracepoint program"))?;
            if first {
                program.load().with_context(|| format!("loading {}", what()))?;
            }
            program.attach(a.name).with_context(|| format!("attaching {} (raw)", what()))?;
        } else {
            let program: &mut TracePoint =
                program.try_into().with_context(|| format!("program {name} is not a tracepoint program"))?;
            if first {
                program.load().with_context(|| format!("loading {}", what()))?;
            }
            program.attach(a.category, a.name).with_context(|| format!("attaching {}", what()))?;
        }
        if first {
            loaded.push(name);
        }
        attached += 1;
    }

    let uprobes: &[&str] = if floor { &[FLOOR_UPROBE, FLOOR_URETPROBE] } else { &[] };
    let real = SSL_ENTRY_PROGRAMS.iter().map(|(p, _)| *p).chain([SSL_RETURN_PROGRAM]);
    for program in uprobes.iter().copied().chain(real.filter(|_| !floor)) {
        let probe: &mut UProbe = ebpf
            .program_mut(program)
            .with_context(|| format!("program {program} missing from the eBPF object"))?
            .try_into()
            .with_context(|| format!("program {program} is not a uprobe program"))?;
        probe.load().with_context(|| format!("loading program {program}"))?;
    }

    let events = RingBuf::try_from(ebpf.take_map("EVENTS").context("map EVENTS missing")?)?;
    let counters = PerCpuArray::try_from(ebpf.take_map("COUNTERS").context("map COUNTERS missing")?)?;
    let conns = HashMap::try_from(ebpf.take_map("CONNS").context("map CONNS missing")?)?;
    let awake = Array::try_from(ebpf.take_map("AGENT_AWAKE").context("map AGENT_AWAKE missing")?)?;
    let mut probes = Probes {
        ebpf,
        tls_targets: Vec::new(),
        events: Some(events),
        counters,
        conns,
        awake,
        attached,
        source,
        floor,
        tls_process_links: Vec::new(),
        kernel_log,
    };
    probes.add_server_processes(ports)?;
    Ok(probes)
}

/// `bpf_prog_info.recursion_misses` of a loaded program (`BPF_OBJ_GET_INFO_BY_FD`).
fn recursion_misses(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // The command's part of `union bpf_attr`; the kernel requires the rest to be zero.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // SAFETY: plain integers and arrays of them; all-zero is a valid value.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: &raw mut info as u64,
    };
    // SAFETY: `attr` points at `info`, which outlives the call; the kernel writes at most
    // `info_len` bytes into it and reads nothing else.
    let ret = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &raw const attr, std::mem::size_of::<InfoAttr>())
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.recursion_misses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_bitmap_has_exactly_the_watched_ports_set() {
        let ports = [0u16, 63, 64, 8008, 8448, u16::MAX];
        let words = port_bitmap(&ports);
        assert_eq!(words.len(), 1024);
        let set: Vec<u16> = (0..=u16::MAX)
            .filter(|&p| {
                let (word, bit) = watched_port_slot(p);
                words[word as usize] & bit != 0
            })
            .collect();
        assert_eq!(set, ports);
        assert!(port_bitmap(&[]).iter().all(|&w| w == 0));
    }

    #[test]
    fn a_field_offset_is_read_from_either_fork_format() {
        let new = "\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        let old = "\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(new, "child_pid"), Some(20));
        assert_eq!(parse_field_offset(old, "child_pid"), Some(44));
        assert_eq!(parse_field_offset(old, "child_comm"), Some(28));
        assert_eq!(parse_field_offset(old, "parent_pid"), None);
    }

    #[test]
    fn every_program_of_the_object_is_named_once() {
        let object = aya_obj::Object::parse(PROGRAMS).expect("the embedded object parses");
        let mut in_object: Vec<&str> = object.programs.keys().map(String::as_str).collect();
        in_object.sort_unstable();
        assert_eq!(in_object, program_names());
    }

    #[test]
    fn capture_sources_are_named_and_parsed() {
        assert_eq!("auto".parse::<SourceChoice>().unwrap(), SourceChoice::Auto);
        assert_eq!("syscalls".parse::<SourceChoice>().unwrap(), SourceChoice::Only(CaptureSource::Syscalls));
        let err = "kprobes".parse::<SourceChoice>().unwrap_err();
        assert!(err.to_string().contains("\"sock\""), "{err}");
        // Each source has its byte counters for both directions.
        for source in [CaptureSource::Sock, CaptureSource::Syscalls] {
            let used: Vec<&str> = ATTACHMENTS.iter().filter(|a| a.used_by(source)).map(|a| a.name).collect();
            assert!(
                used.iter().any(|n| n.contains("recv")) && used.iter().any(|n| n.contains("send")),
                "{source:?}: {used:?}"
            );
        }
    }
}
