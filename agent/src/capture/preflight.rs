//! `vigie check`: what this host offers vigie, line by line, and whether it can run.
//!
//! The decisive check is a trial: load and attach every program, then detach. File probes
//! (tracefs entries, BTF, capabilities) come first so that a failure says *why*.

use std::fmt::Write as _;
use std::path::Path;

use super::loader::{self, ATTACHMENTS, CaptureSource, SourceChoice, TRACEFS};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, but something an operator should know.
    Warn,
    /// vigie cannot run (or cannot do what was asked) until this is fixed.
    Fail,
}

#[derive(Debug)]
pub struct Line {
    pub status: Status,
    pub what: String,
    pub detail: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<Line>,
}

impl Report {
    fn push(&mut self, status: Status, what: impl Into<String>, detail: impl Into<String>) {
        self.lines.push(Line { status, what: what.into(), detail: detail.into() });
    }

    pub fn can_run(&self) -> bool {
        self.lines.iter().all(|l| l.status != Status::Fail)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for l in &self.lines {
            let tag = match l.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            let _ = writeln!(out, "[{tag}] {}: {}", l.what, l.detail);
        }
        let verdict = if self.can_run() {
            "vigie can run on this host"
        } else {
            "vigie cannot run on this host: fix the FAIL lines above"
        };
        let _ = writeln!(out, "{verdict}");
        out
    }
}

/// Kernel release as (major, minor), from uname.
pub fn kernel_version() -> Option<(u32, u32, String)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let release = release.trim().to_string();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor, release))
}

/// Effective capabilities of this process, from /proc/self/status.
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Probe the host. `ports` are the configured server ports; `trial` loads and attaches the
/// programs for real (needs privileges), which is the only proof that vigie can run.
pub fn check(ports: &[u16], key_file: &Path, trial: bool, choice: SourceChoice) -> Report {
    let mut r = Report::default();

    match kernel_version() {
        Some((maj, min, release)) if (maj, min) >= (6, 3) => r.push(
            Status::Ok,
            "kernel",
            format!("{release}: the socket capture source (sock:sock_{{send,recv}}_length, 6.3+) is expected"),
        ),
        Some((maj, min, release)) if (maj, min) >= (5, 8) => r.push(
            Status::Warn,
            "kernel",
            format!("{release}: older than 6.3, so byte counts come from the syscall capture source (it sees read/recv*/readv/write/send*/writev/sendfile/splice, not io_uring)"),
        ),
        Some((_, _, release)) => r.push(
            Status::Fail,
            "kernel",
            format!("{release}: vigie needs Linux 5.8 or later (BPF ring buffer)"),
        ),
        None => r.push(Status::Warn, "kernel", "could not read /proc/sys/kernel/osrelease"),
    }

    match super::btf::Btf::from_file(Path::new(super::btf::VMLINUX)).and_then(|b| super::btf::kernel_offsets(&b)) {
        Ok(layout) => r.push(
            Status::Ok,
            "BTF",
            format!(
                "{} present; struct offsets found (sock_common.skc_num at {})",
                super::btf::VMLINUX,
                layout.skc_num
            ),
        ),
        Err(e) => r.push(
            Status::Warn,
            "BTF",
            format!(
                "{e:#}: both capture sources need it (a receive's descriptor is checked against its socket with struct offsets from BTF)"
            ),
        ),
    }

    match std::fs::read_to_string("/sys/kernel/security/lockdown") {
        Ok(text) => {
            let mode = text.split_whitespace().find(|w| w.starts_with('[')).unwrap_or("?").trim_matches(['[', ']']);
            let status = if mode == "confidentiality" { Status::Fail } else { Status::Ok };
            let why = if mode == "confidentiality" {
                "reading kernel and user memory from BPF is refused: vigie cannot capture request heads"
            } else {
                "BPF may read kernel and user memory"
            };
            r.push(status, "lockdown", format!("{mode}: {why}"));
        }
        Err(_) => r.push(Status::Ok, "lockdown", "not available (no lockdown LSM)"),
    }

    match effective_caps() {
        Some(caps) => {
            let has = |bit: u32| caps & (1u64 << bit) != 0;
            let (sys_admin, bpf, perfmon, ptrace) = (has(21), has(39), has(38), has(19));
            let detail =
                format!("CAP_BPF={bpf} CAP_PERFMON={perfmon} CAP_SYS_ADMIN={sys_admin} CAP_SYS_PTRACE={ptrace}");
            if sys_admin || (bpf && perfmon) {
                r.push(Status::Ok, "capabilities", detail);
            } else {
                r.push(
                    Status::Fail,
                    "capabilities",
                    format!("{detail}: loading tracing programs needs CAP_BPF and CAP_PERFMON (or root)"),
                );
            }
        }
        None => r.push(Status::Warn, "capabilities", "could not read /proc/self/status"),
    }

    if loader::tracefs_ready() {
        r.push(Status::Ok, "tracefs", format!("mounted at {TRACEFS}"));
    } else {
        match loader::ensure_tracefs() {
            Ok(()) => r.push(Status::Ok, "tracefs", format!("was not mounted; mounted it at {TRACEFS}")),
            Err(e) => r.push(Status::Fail, "tracefs", format!("{e:#}")),
        }
    }

    let mut chosen = None;
    if loader::tracefs_ready() {
        match loader::choose_source(choice) {
            Ok((source, fallback)) => {
                chosen = Some(source);
                let detail = match (source, fallback) {
                    (CaptureSource::Sock, _) => {
                        "sock: sock:sock_{recv,send}_length count every socket call".to_string()
                    }
                    (CaptureSource::Syscalls, Some(why)) => {
                        format!("syscalls, as a fallback: the socket source is unavailable ({why})")
                    }
                    (CaptureSource::Syscalls, None) => "syscalls, as configured".to_string(),
                };
                let status = if source == CaptureSource::Sock { Status::Ok } else { Status::Warn };
                r.push(status, "capture source", detail);
            }
            Err(e) => r.push(Status::Fail, "capture source", format!("{e:#}")),
        }
        let missing = loader::missing_tracepoints();
        let mut seen: Vec<&str> = Vec::new();
        for a in ATTACHMENTS {
            if seen.contains(&a.name) {
                continue;
            }
            seen.push(a.name);
            let name = format!("tracepoint {}:{}", a.category, a.name);
            let needed = chosen.is_none_or(|s| a.used_by(s));
            let purpose = match a.need {
                loader::Need::Always => a.purpose.to_string(),
                loader::Need::Only(s) => format!("{}; {} source", a.purpose, s.name()),
            };
            match (missing.iter().any(|m| m.name == a.name), needed) {
                (true, true) => r.push(Status::Fail, name, format!("missing; needed for {purpose}")),
                (true, false) => {
                    r.push(Status::Ok, name, format!("missing; not needed by the chosen source ({purpose})"))
                }
                (false, _) => r.push(Status::Ok, name, format!("present ({purpose})")),
            }
        }
    }

    for (kind, path) in
        [("uprobes", "/sys/bus/event_source/devices/uprobe"), ("kprobes", "/sys/bus/event_source/devices/kprobe")]
    {
        if Path::new(path).exists() {
            r.push(Status::Ok, kind, "supported");
        } else if kind == "kprobes" {
            r.push(Status::Ok, kind, "not supported by this kernel (vigie does not need them)");
        } else {
            r.push(Status::Warn, kind, "not supported: TLS capture (uprobes on SSL_read/SSL_write) is unavailable");
        }
    }

    let listening = super::listeners::listening_ports();
    if ports.is_empty() {
        r.push(Status::Warn, "server ports", "none configured: give --server-port or --config");
    }
    for port in ports {
        if listening.contains(port) {
            r.push(Status::Ok, format!("server port {port}"), "a process is listening on it");
        } else {
            r.push(
                Status::Warn,
                format!("server port {port}"),
                "nothing listens on it yet (vigie will count it once something does)",
            );
        }
    }

    match crate::token::fingerprint_of_file(key_file) {
        Ok(Some(fp)) => r.push(
            Status::Ok,
            "key",
            format!(
                "{}: fingerprint {fp} (vigie_key_info; every host of a fleet must show the same)",
                key_file.display()
            ),
        ),
        Ok(None) => r.push(
            Status::Warn,
            "key",
            format!(
                "no key file at {} yet: the agent creates one at its first start, which suits a single host; \
                 hosts of a fleet share one key (docs/fleet.md)",
                key_file.display()
            ),
        ),
        Err(e) => r.push(Status::Fail, "key", format!("{e:#}: the agent would refuse to start")),
    }

    if trial {
        if !r.can_run() {
            r.push(Status::Fail, "trial load", "skipped: fix the lines above first");
        } else {
            match loader::load(&[u16::MAX], choice, false) {
                Ok(probes) => r.push(
                    Status::Ok,
                    "trial load",
                    format!(
                        "{} attachments of the {} source loaded, verified and attached, then detached",
                        probes.attached,
                        probes.source.name()
                    ),
                ),
                Err(e) => r.push(Status::Fail, "trial load", format!("{e:#}")),
            }
        }
    }
    r
}
