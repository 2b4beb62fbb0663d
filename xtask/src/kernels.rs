//! `cargo xtask kernels [--kernel 6.1,6.12] [--keep] [--results DIR] [--timeout SECS]`:
//! boot Debian's cloud kernels under qemu (TCG, no KVM) and, in each, run `vigie check` and
//! a capture smoke test whose per-token counts must equal the client's exactly.
//!
//! - Kernels are Debian's signed cloud images at pinned versions ([`KERNELS`]), fetched with
//!   `apt-get download` through a private apt configuration under `target/kernels/apt`
//!   (bullseye; bookworm, its security and backports suites; the host's apt sources are not touched)
//!   and cached under `target/kernels/`.
//! - The guest needs no module: a cloud kernel has the 8250 serial console, loopback, BPF,
//!   BTF and tracefs built in (it has no 9p at all, so the host tree is not shared). The
//!   initramfs carries busybox (static), the agent (`VIGIE_BIN`, default: build
//!   target/release/vigie), and the host's nginx and curl with the shared libraries `ldd`
//!   lists for them; `/init` is `kernels_init.sh`.
//! - The guest reports line by line on its second serial port; the host parses that report,
//!   compares vigie's `vigie_token_requests_total` / `vigie_token_response_bytes_total` per
//!   token label with curl's own counts (requests; header + body bytes received) and writes
//!   `RESULTS/<kernel>.json` (default `target/kernels/results`), the guest's console and
//!   report in `RESULTS/<kernel>/`; `--keep` keeps `RESULTS/initramfs.cpio`. Exit status non-zero when
//!   any kernel did not boot, `vigie check` did not run, or a count is not exact.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{root, sh, step, succeeds};

/// One Debian kernel of the matrix, pinned to an exact package version so that runs are
/// reproducible. When Debian drops a pinned version from its archive, `apt-get download`
/// fails and says so: pick a current one with `apt-cache madison` (see docs/kernels.md).
pub struct Kernel {
    pub name: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    pub suite: &'static str,
}

pub const KERNELS: &[Kernel] = &[
    // Debian 11's kernel: the oldest Debian still in the archive; it has the BPF ring buffer
    // (5.8+) and BTF, the floor of what vigie could support with a syscall capture source.
    Kernel { name: "5.10", package: "linux-image-5.10.0-32-cloud-amd64", version: "5.10.223-1", suite: "bullseye" },
    // Debian 12's own kernel: the oldest long-term kernel in a supported Debian, and older
    // than 6.3, so without sock:sock_{send,recv}_length.
    Kernel { name: "6.1", package: "linux-image-6.1.0-50-cloud-amd64", version: "6.1.176-1", suite: "bookworm" },
    // A recent long-term kernel (the one of Debian 13), from bookworm-backports.
    Kernel {
        name: "6.12",
        package: "linux-image-6.12.95+deb12-cloud-amd64",
        version: "6.12.95-1~bpo12+1",
        suite: "bookworm-backports",
    },
];

pub const APT_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static"];

const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
";

const INIT: &str = include_str!("kernels_init.sh");
const SERVER_PORT: u16 = 8008;
const METRICS_ADDR: &str = "127.0.0.1:9464";
const TOKENS: usize = 4;
const BIG_BYTES: u64 = 300_000;
const CPU: &str = "max,cx16=off";
const BINARIES: &[&str] = &["/usr/bin/curl", "/usr/sbin/nginx"];

struct Opts {
    kernels: Vec<&'static Kernel>,
    keep: bool,
    results: PathBuf,
    timeout: Duration,
    capture_source: Option<String>,
}

fn parse_args(args: &[String]) -> Result<Opts> {
    let mut opts = Opts {
        kernels: KERNELS.iter().collect(),
        keep: false,
        results: root().join("target/kernels/results"),
        timeout: Duration::from_secs(300),
        capture_source: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--kernel" => {
                let list = it.next().context("--kernel needs a list, e.g. 6.1,6.12")?;
                opts.kernels = list
                    .split(',')
                    .map(|n| {
                        KERNELS.iter().find(|k| k.name == n.trim()).with_context(|| {
                            let known: Vec<_> = KERNELS.iter().map(|k| k.name).collect();
                            format!("unknown kernel {n:?}; known: {}", known.join(", "))
                        })
                    })
                    .collect::<Result<_>>()?;
            }
            "--keep" => opts.keep = true,
            "--capture-source" => {
                let v = it.next().context("--capture-source needs auto, sock or syscalls")?;
                if !v.chars().all(|c| c.is_ascii_alphanumeric()) {
                    bail!("--capture-source {v:?}: a plain word (auto, sock, syscalls)");
                }
                opts.capture_source = Some(v.clone());
            }
            "--results" => opts.results = PathBuf::from(it.next().context("--results needs a directory")?),
            "--timeout" => {
                let s: u64 = it.next().context("--timeout needs seconds")?.parse().context("--timeout")?;
                opts.timeout = Duration::from_secs(s);
            }
            "--" => {}
            other => bail!(
                "unknown argument {other:?}; usage: cargo xtask kernels [--kernel 6.1,6.12] [--keep] [--results DIR] [--timeout SECS] [--capture-source auto|sock|syscalls]"
            ),
        }
    }
    Ok(opts)
}

pub fn run(args: &[String]) -> Result<()> {
    let opts = parse_args(args)?;
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !succeeds(Command::new("dpkg-query").args(["-W", "-f=${Status}", p])))
        .collect();
    if !missing.is_empty() {
        bail!("missing Debian packages {}: run `cargo xtask setup`", missing.join(" "));
    }
    let vigie = match std::env::var_os("VIGIE_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => crate::build_release()?,
    };
    if !vigie.is_file() {
        bail!("vigie binary {} does not exist (VIGIE_BIN)", vigie.display());
    }
    let base = root().join("target/kernels");
    fs::create_dir_all(&base)?;
    fs::create_dir_all(&opts.results)?;

    let t0 = Instant::now();
    step(&format!("Building the guest initramfs (busybox, {}, nginx, curl)", vigie.display()));
    let tokens = make_tokens(TOKENS);
    // Per results directory, so that two runs (two pytest sessions) do not share files.
    let initramfs = opts.results.join("initramfs.cpio");
    build_initramfs(&initramfs, &vigie, &tokens, opts.capture_source.as_deref())?;

    let sha = Command::new("sha256sum")
        .arg(&vigie)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).split(' ').next().unwrap_or("").to_string());
    let mut results = Vec::new();
    for k in &opts.kernels {
        let run_dir = opts.results.join(k.name);
        let _ = fs::remove_dir_all(&run_dir);
        fs::create_dir_all(&run_dir)?;
        let mut r = fetch_kernel(&base, k)
            .and_then(|kdir| {
                step(&format!("Booting {} ({} {}) under qemu TCG", k.name, k.package, k.version));
                boot(k, &kdir, &initramfs, &run_dir, &tokens, opts.timeout)
            })
            .unwrap_or_else(|e| {
                json!({"kernel": k.name, "package": k.package, "version": k.version, "ok": false,
                       "booted": false, "problems": [format!("{e:#}")]})
            });
        r["vigie_bin"] = json!(vigie.display().to_string());
        r["vigie_sha256"] = json!(sha);
        r["qemu_cpu"] = json!(CPU);
        r["capture_source_asked"] = json!(opts.capture_source);
        let path = opts.results.join(format!("{}.json", k.name));
        fs::write(&path, serde_json::to_string_pretty(&r)? + "\n")?;
        print_summary(&r, &run_dir, &path);
        results.push(r);
    }
    if !opts.keep {
        let _ = fs::remove_file(&initramfs);
    }
    let failed: Vec<&str> =
        results.iter().filter(|r| r["ok"] != json!(true)).map(|r| r["kernel"].as_str().unwrap_or("?")).collect();
    println!("kernel matrix: {} kernel(s) in {:.0} s", results.len(), t0.elapsed().as_secs_f64());
    if !failed.is_empty() {
        bail!("kernel(s) {} failed (see above and {})", failed.join(", "), opts.results.display());
    }
    Ok(())
}

// --- kernels ------------------------------------------------------------------------------

fn apt_options(apt: &Path) -> Vec<String> {
    vec![
        format!("-oDir::Etc::SourceList={}", apt.join("sources.list").display()),
        format!("-oDir::Etc::SourceParts={}", apt.join("sources.list.d").display()),
        format!("-oDir::State::Lists={}", apt.join("lists").display()),
        format!("-oDir::Cache={}", apt.join("cache").display()),
        "-oAPT::Sandbox::User=root".into(),
        "-q".into(),
    ]
}

/// The kernel's directory under target/kernels with `vmlinuz` and `config` extracted.
fn fetch_kernel(base: &Path, k: &Kernel) -> Result<PathBuf> {
    let kdir = base.join(format!("{}_{}", k.package, k.version.replace('~', "_")));
    if kdir.join("vmlinuz").is_file() && kdir.join("config").is_file() {
        step(&format!("Kernel {}: cached in {}", k.name, kdir.display()));
        return Ok(kdir);
    }
    let apt = base.join("apt");
    for d in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
        fs::create_dir_all(apt.join(d))?;
    }
    let fresh = fs::read_to_string(apt.join("sources.list")).ok().as_deref() != Some(SOURCES);
    if fresh {
        fs::write(apt.join("sources.list"), SOURCES)?;
        step(&format!("Kernel {}: fetching Debian's package lists into {}", k.name, apt.display()));
        sh(Command::new("apt-get").args(apt_options(&apt)).arg("update"))?;
    }
    let debs = base.join("debs");
    fs::create_dir_all(&debs)?;
    let arch = "amd64";
    let deb = debs.join(format!("{}_{}_{arch}.deb", k.package, k.version.replace(':', "%3a")));
    if !deb.is_file() {
        let spec = format!("{}={}", k.package, k.version);
        let download =
            || Command::new("apt-get").args(apt_options(&apt)).args(["download", &spec]).current_dir(&debs).status();
        if !download().map(|s| s.success()).unwrap_or(false) {
            step(&format!("Kernel {}: updating the private package lists ({})", k.name, apt.display()));
            sh(Command::new("apt-get").args(apt_options(&apt)).arg("update"))?;
            let ok = download().map(|s| s.success()).unwrap_or(false);
            if !ok {
                bail!(
                    "`apt-get download {spec}` failed: Debian may have dropped this pinned version from {}; \
                     list current ones with `apt-cache {} madison {}` and update KERNELS in xtask/src/kernels.rs",
                    k.suite,
                    apt_options(&apt).join(" "),
                    k.package
                );
            }
        }
        if !deb.is_file() {
            bail!("apt-get download succeeded but {} is not there", deb.display());
        }
    }
    step(&format!("Kernel {}: extracting vmlinuz and config from {}", k.name, deb.display()));
    let abi = k.package.strip_prefix("linux-image-").context("package name")?;
    let tmp = kdir.with_extension(format!("tmp{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    sh(Command::new("sh").arg("-c").arg(format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' './boot/vmlinuz-{abi}' './boot/config-{abi}'",
        deb.display(),
        tmp.display()
    )))?;
    fs::create_dir_all(&kdir)?;
    fs::rename(tmp.join(format!("boot/config-{abi}")), kdir.join("config"))?;
    fs::rename(tmp.join(format!("boot/vmlinuz-{abi}")), kdir.join("vmlinuz"))?;
    let _ = fs::remove_dir_all(&tmp);
    Ok(kdir)
}

// --- initramfs ----------------------------------------------------------------------------

/// A newc cpio archive written entry by entry (parents first).
struct Cpio {
    out: std::io::BufWriter<fs::File>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn create(path: &Path) -> Result<Self> {
        Ok(Cpio { out: std::io::BufWriter::new(fs::File::create(path)?), ino: 1, dirs: BTreeSet::new() })
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) -> Result<()> {
        let name = name.trim_start_matches('/');
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        let pad = |n: usize| (4 - n % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad(110 + name.len() + 1)])?;
        self.out.write_all(data)?;
        self.out.write_all(&[0u8; 3][..pad(data.len())])?;
        Ok(())
    }

    fn dir(&mut self, path: &str) -> Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.dirs.insert(path.to_string());
        self.entry(path, 0o040755, &[], (0, 0))
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        if let Some((parent, _)) = path.trim_start_matches('/').rsplit_once('/') {
            self.dir(parent)?;
        }
        self.entry(path, 0o100000 | mode, data, (0, 0))
    }

    fn finish(mut self) -> Result<()> {
        self.entry("TRAILER!!!", 0, &[], (0, 0))?;
        self.out.flush()?;
        Ok(())
    }
}

/// The shared libraries `ldd` names for a binary (paths as the dynamic loader looks them up).
fn ldd(bin: &str) -> Result<Vec<String>> {
    let out = Command::new("ldd").arg(bin).output().with_context(|| format!("running ldd {bin}"))?;
    if !out.status.success() {
        bail!("ldd {bin} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.trim().split(' ').next().unwrap_or(""),
            None => line.split(' ').next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(path.to_string());
        }
    }
    Ok(libs)
}

fn make_tokens(n: usize) -> Vec<String> {
    // Synapse's shape: syt_<base64 localpart>_<random>_<crc>; random part from the clock so
    // that each run uses new tokens.
    let mut x =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(7)
            | 1;
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rand = |len: usize| -> String {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                alphabet[(x % alphabet.len() as u64) as usize] as char
            })
            .collect()
    };
    let b64 = ["a2VybmVsMQ", "a2VybmVsMg", "a2VybmVsMw", "a2VybmVsNA", "a2VybmVsNQ", "a2VybmVsNg"];
    (0..n).map(|i| format!("syt_{}_{}_{}", b64[i % b64.len()], rand(20), rand(6))).collect()
}

fn build_initramfs(path: &Path, vigie: &Path, tokens: &[String], capture_source: Option<&str>) -> Result<()> {
    let mut c = Cpio::create(path)?;
    for d in ["dev", "proc", "sys", "tmp", "run", "root", "srv", "var/log/nginx", "var/lib/nginx"] {
        c.dir(d)?;
    }
    c.entry("dev/console", 0o020600, &[], (5, 1))?;
    c.file("init", 0o755, INIT.as_bytes())?;
    c.file("bin/busybox", 0o755, &fs::read("/bin/busybox").context("reading /bin/busybox (busybox-static)")?)?;
    c.file("usr/local/bin/vigie", 0o755, &fs::read(vigie).with_context(|| format!("reading {}", vigie.display()))?)?;
    let mut files: BTreeSet<String> = BINARIES.iter().map(|s| s.to_string()).collect();
    for b in BINARIES.iter().copied().chain([vigie.to_str().context("VIGIE_BIN is not UTF-8")?]) {
        files.extend(ldd(b)?);
    }
    for f in &files {
        // ldd names libraries by the path the loader opens (often a symlink): store the content.
        let data = fs::read(f).with_context(|| format!("reading {f}"))?;
        c.file(f, 0o755, &data)?;
    }
    c.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    c.file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;
    c.file("etc/nsswitch.conf", 0o644, b"passwd: files\ngroup: files\nhosts: files\n")?;
    c.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n")?;
    let nginx = format!(
        "daemon off;\nmaster_process off;\nuser root root;\nworker_processes 1;\npid /tmp/nginx/nginx.pid;\n\
         error_log /tmp/nginx/error.log;\nevents {{ worker_connections 64; }}\n\
         http {{\n  access_log /tmp/nginx/access.log;\n  client_body_temp_path /tmp/nginx/body;\n  \
         proxy_temp_path /tmp/nginx/proxy;\n  fastcgi_temp_path /tmp/nginx/fastcgi;\n  uwsgi_temp_path /tmp/nginx/uwsgi;\n  \
         scgi_temp_path /tmp/nginx/scgi;\n  default_type application/json;\n  keepalive_requests 1000;\n  \
         server {{\n    listen 127.0.0.1:{SERVER_PORT};\n    root /srv/www;\n    \
         location /_matrix/client/v1/media/ {{ default_type application/octet-stream; sendfile on; }}\n  }}\n}}\n"
    );
    c.file("etc/vigie-kernels/nginx.conf", 0o644, nginx.as_bytes())?;
    // SOURCE_ARGS: passed to `vigie check` and `vigie run` as they are (empty: the agent's default).
    let source_args = capture_source.map(|s| format!("--capture-source {s}")).unwrap_or_default();
    let params = format!(
        "PORT={SERVER_PORT}\nMETRICS={METRICS_ADDR}\nBIG_BYTES={BIG_BYTES}\nREADY_TIMEOUT=120\nSETTLE_SCRAPES=30\n\
         SOURCE_ARGS='{source_args}'\n"
    );
    c.file("etc/vigie-kernels/params", 0o644, params.as_bytes())?;
    c.file("etc/vigie-kernels/tokens", 0o600, tokens.iter().map(|t| format!("{t}\n")).collect::<String>().as_bytes())?;
    c.finish()
}

// --- boot and judge -----------------------------------------------------------------------

fn boot(
    k: &Kernel,
    kdir: &Path,
    initramfs: &Path,
    run_dir: &Path,
    tokens: &[String],
    timeout: Duration,
) -> Result<Value> {
    let console = run_dir.join("console.log");
    let report = run_dir.join("report.txt");
    let mut cmd = Command::new("qemu-system-x86_64");
    // cx16=off: Debian 12's qemu 7.2 mis-emulates `cmpxchg16b %gs:(...)` under TCG (garbage
    // EFLAGS, then a double fault in SLUB's per-CPU fast path: 6.12 dies within seconds, in
    // kmem_cache_alloc_noprof). Without CX16 the kernel takes its own cmpxchg16b emulation.
    cmd.args(["-accel", "tcg", "-cpu", CPU, "-smp", "1", "-m", "1024"])
        .args(["-nographic", "-no-reboot", "-monitor", "none", "-nodefaults"])
        .arg("-kernel")
        .arg(kdir.join("vmlinuz"))
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", report.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(run_dir.join("qemu.stderr"))?);
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if started.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let wall = started.elapsed().as_secs_f64();
    let text = fs::read_to_string(&report).unwrap_or_default().replace('\r', "");
    let mut r = judge(k, &text, tokens);
    r["wall_seconds"] = json!((wall * 10.0).round() / 10.0);
    r["qemu_exit"] = json!(status.and_then(|s| s.code()));
    r["config"] = kernel_config(&kdir.join("config"));
    r["console_log"] = json!(console.display().to_string());
    r["report"] = json!(report.display().to_string());
    // A kernel that oopsed or warned under the agent's programs is a finding, not noise.
    let console_text = fs::read_to_string(&console).unwrap_or_default();
    let alarms: Vec<&str> = console_text
        .lines()
        .filter(|l| ["Oops", "BUG:", "WARNING:", "Kernel panic", "double fault"].iter().any(|w| l.contains(w)))
        .take(10)
        .collect();
    r["kernel_alarms"] = json!(alarms);
    if !alarms.is_empty() {
        push_problem(&mut r, format!("the guest kernel oopsed or warned: {}", alarms[0].trim()));
    }
    if timed_out {
        push_problem(&mut r, format!("qemu was killed after the {} s timeout", timeout.as_secs()));
    }
    if r["problems"].as_array().is_some_and(|p| !p.is_empty()) {
        r["ok"] = json!(false);
        r["console_tail"] = json!(tail(&fs::read_to_string(&console).unwrap_or_default(), 60));
    }
    Ok(r)
}

fn push_problem(r: &mut Value, p: String) {
    r["problems"].as_array_mut().expect("problems is an array").push(json!(p));
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn kernel_config(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_default();
    let keys = [
        "CONFIG_DEBUG_INFO_BTF",
        "CONFIG_BPF_SYSCALL",
        "CONFIG_KPROBES",
        "CONFIG_UPROBE_EVENTS",
        "CONFIG_FTRACE_SYSCALLS",
        "CONFIG_NET_9P",
    ];
    let mut m = serde_json::Map::new();
    for k in keys {
        let v = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")).map(str::to_string))
            .unwrap_or_else(|| "n".into());
        m.insert(k.into(), json!(v));
    }
    Value::Object(m)
}

/// Parse the guest's report and compare vigie's figures with the client's.
fn judge(k: &Kernel, text: &str, tokens: &[String]) -> Value {
    let mut stages = serde_json::Map::new();
    let mut blocks: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut kv: BTreeMap<String, String> = BTreeMap::new();
    let mut errors = Vec::new();
    let mut tracepoints = serde_json::Map::new();
    // client index -> (requests, bytes, statuses)
    let mut client: BTreeMap<usize, (u64, u64, Vec<u64>)> = BTreeMap::new();
    let mut open: Option<String> = None;
    for line in text.lines() {
        if let Some(name) = &open {
            if line == format!("end {name}") {
                open = None;
            } else {
                blocks.entry(name.clone()).or_default().push(line.strip_prefix("| ").unwrap_or(line).to_string());
            }
            continue;
        }
        let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
        match key {
            "begin" => {
                open = Some(rest.to_string());
                blocks.entry(rest.to_string()).or_default();
            }
            "stage" => {
                if let Some((s, t)) = rest.split_once(' ') {
                    stages.insert(s.into(), json!(t.parse::<f64>().ok()));
                }
            }
            "error" => errors.push(rest.to_string()),
            "tracepoint" => {
                if let Some((tp, state)) = rest.split_once(' ') {
                    tracepoints.insert(tp.replace('/', ":"), json!(state == "present"));
                }
            }
            "client" => {
                // client I CODE SIZE_REQUEST SIZE_HEADER SIZE_DOWNLOAD NUM_CONNECTS
                let f: Vec<u64> = rest.split(' ').filter_map(|x| x.parse().ok()).collect();
                if f.len() == 6 {
                    let e = client.entry(f[0] as usize).or_default();
                    e.0 += 1;
                    e.1 += f[3] + f[4];
                    e.2.push(f[1]);
                } else {
                    errors.push(format!("unparsable client line: {line}"));
                }
            }
            _ => {
                kv.insert(key.to_string(), rest.to_string());
            }
        }
    }
    let mut r = json!({
        "kernel": k.name,
        "package": k.package,
        "version": k.version,
        "suite": k.suite,
        "ok": false,
        "problems": [],
        "uname": kv.get("uname"),
        "btf": kv.get("btf").map(|v| v == "yes"),
        "stages": stages,
        "tracepoints": tracepoints,
    });
    for e in errors {
        push_problem(&mut r, format!("guest: {e}"));
    }
    let formats: serde_json::Map<String, Value> = blocks
        .iter()
        .filter_map(|(name, lines)| name.strip_prefix("format:").map(|tp| (tp.replace('/', ":"), json!(lines))))
        .collect();
    r["tracepoint_formats"] = Value::Object(formats);
    let booted = r["stages"].get("init").is_some();
    r["booted"] = json!(booted);
    r["boot_seconds"] = r["stages"].get("init").cloned().unwrap_or(Value::Null);
    if !booted {
        push_problem(&mut r, "the guest never reached /init (see console_tail)".into());
        return r;
    }
    // vigie check
    let check_rc: Option<i64> = kv.get("check_rc").and_then(|v| v.parse().ok());
    let check_lines = blocks.get("check").cloned().unwrap_or_default();
    let count = |tag: &str| check_lines.iter().filter(|l| l.to_lowercase().starts_with(tag)).count();
    r["check"] = json!({
        "ran": check_rc.is_some(),
        "rc": check_rc,
        "ok_lines": count("[ok"),
        "warn_lines": count("[warn"),
        "fail_lines": count("[fail"),
        "failures": check_lines.iter().filter(|l| l.to_lowercase().starts_with("[fail")).collect::<Vec<_>>(),
        // The check's own "[warn] capture source: ..." line, not a log line that mentions it.
        "capture_source": check_lines.iter().find(|l| l.starts_with('[') && l.contains("] capture source:")),
        "verdict": check_lines.last(),
        "output": check_lines,
    });
    match check_rc {
        None => push_problem(&mut r, "`vigie check` did not run".into()),
        Some(0) => {}
        Some(rc) => {
            push_problem(&mut r, format!("`vigie check` exited {rc} (vigie says it cannot run on this kernel)"))
        }
    }
    // vigie run + smoke test
    let ready = kv.get("run_ready").map(String::as_str) == Some("yes");
    let mut smoke = json!({
        "agent_ready": ready,
        "agent_exit_before_ready": kv.get("run_exited").and_then(|v| v.parse::<i64>().ok()),
        "agent_stderr_tail": tail(&blocks.get("vigie_stderr").cloned().unwrap_or_default().join("\n"), 30),
        "server": format!("nginx (host binary) on 127.0.0.1:{SERVER_PORT}: a small JSON /sync body (writev) and a {BIG_BYTES}-byte media file (sendfile)"),
        "client": "curl: requests counted per transfer, response bytes = size_header + size_download",
        "exact": false,
        "tokens": [],
    });
    if !ready {
        push_problem(&mut r, "`vigie run` never became ready, so no capture smoke test ran".into());
        r["smoke"] = smoke;
        return r;
    }
    let labels = blocks.get("labels").cloned().unwrap_or_default();
    if labels.len() != tokens.len() {
        push_problem(&mut r, format!("`vigie token-hash` gave {} labels for {} tokens", labels.len(), tokens.len()));
        r["smoke"] = smoke;
        return r;
    }
    let (reqs, bytes) = token_sums(&blocks.get("metrics").cloned().unwrap_or_default());
    let mut exact = true;
    let mut rows = Vec::new();
    for (i, label) in labels.iter().enumerate() {
        let (creq, cbytes, statuses) = client.get(&i).cloned().unwrap_or_default();
        let vreq = reqs.get(label).copied().unwrap_or(0.0);
        let vbytes = bytes.get(label).copied().unwrap_or(0.0);
        if statuses.contains(&0) {
            push_problem(
                &mut r,
                format!("token {i}: a curl transfer failed (status 000): the client's counts are not the server's"),
            );
        }
        let same = creq > 0 && vreq == creq as f64 && vbytes == cbytes as f64;
        exact &= same;
        rows.push(json!({
            "index": i, "label": label, "statuses": statuses,
            "client_requests": creq, "vigie_requests": vreq,
            "client_bytes": cbytes, "vigie_bytes": vbytes, "exact": same,
        }));
        if !same {
            push_problem(
                &mut r,
                format!("token {i} ({label}): client {creq} requests / {cbytes} bytes, vigie {vreq} / {vbytes}"),
            );
        }
    }
    let others: f64 = reqs.iter().filter(|(l, _)| !labels.contains(l)).map(|(_, v)| v).sum::<f64>() + 0.0;
    smoke["other_labels_requests"] = json!(others);
    smoke["exact"] = json!(exact);
    smoke["tokens"] = json!(rows);
    smoke["scrapes"] = json!(kv.get("scrapes"));
    // vigie_capture_info{source="..."} 1, where the agent exports it.
    smoke["capture_source"] = json!(blocks.get("metrics").into_iter().flatten().find_map(|l| {
        let rest = l.strip_prefix("vigie_capture_info{")?;
        let v = rest.split("source=\"").nth(1)?;
        Some(v.split('"').next()?.to_string())
    }));
    smoke["agent_exit"] = json!(kv.get("vigie_exit").and_then(|v| v.parse::<i64>().ok()));
    smoke["agent_stderr_warnings"] = json!(kv.get("vigie_stderr_warnings").and_then(|v| v.parse::<i64>().ok()));
    r["smoke"] = smoke;
    if r["problems"].as_array().is_some_and(|p| p.is_empty()) && kv.contains_key("end-of-report") {
        r["ok"] = json!(true);
    } else if !kv.contains_key("end-of-report") {
        push_problem(&mut r, "the guest's report ended early (see console_tail)".into());
    }
    r
}

/// Per token label: the sums of vigie_token_requests_total and vigie_token_response_bytes_total.
fn token_sums(lines: &[String]) -> (BTreeMap<String, f64>, BTreeMap<String, f64>) {
    let mut reqs = BTreeMap::new();
    let mut bytes = BTreeMap::new();
    for line in lines {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let target = match name {
            "vigie_token_requests_total" => &mut reqs,
            "vigie_token_response_bytes_total" => &mut bytes,
            _ => continue,
        };
        let token = labels
            .split(',')
            .find_map(|kv| kv.trim().strip_prefix("token=\"").map(|v| v.trim_end_matches(['}', '"']).to_string()));
        if let Some(t) = token {
            *target.entry(t).or_insert(0.0) += value;
        }
    }
    (reqs, bytes)
}

fn print_summary(r: &Value, run_dir: &Path, path: &Path) {
    println!(
        "---- kernel {} ({}) ----",
        r["kernel"].as_str().unwrap_or("?"),
        r["uname"].as_str().unwrap_or("never booted")
    );
    println!(
        "  booted: {}  (init at {} s guest uptime; qemu wall {} s)",
        r["booted"], r["boot_seconds"], r["wall_seconds"]
    );
    if let Some(c) = r.get("check") {
        println!(
            "  vigie check: exit {}, {} ok / {} warn / {} fail",
            c["rc"], c["ok_lines"], c["warn_lines"], c["fail_lines"]
        );
        for f in c["failures"].as_array().into_iter().flatten() {
            println!("    {}", f.as_str().unwrap_or(""));
        }
        if let Some(s) = c["capture_source"].as_str() {
            println!("    {s}");
        }
    }
    if let Some(s) = r.get("smoke") {
        println!(
            "  smoke: agent ready {}, exact {}, capture source (vigie_capture_info) {}",
            s["agent_ready"], s["exact"], s["capture_source"]
        );
        for t in s["tokens"].as_array().into_iter().flatten() {
            println!(
                "    token {} {}: requests client {} vigie {}, bytes client {} vigie {}",
                t["index"],
                t["label"].as_str().unwrap_or(""),
                t["client_requests"],
                t["vigie_requests"],
                t["client_bytes"],
                t["vigie_bytes"]
            );
        }
        if s["agent_ready"] != json!(true) {
            for l in s["agent_stderr_tail"]
                .as_str()
                .unwrap_or("")
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                println!("    agent: {l}");
            }
        }
    }
    for p in r["problems"].as_array().into_iter().flatten() {
        println!("  PROBLEM: {}", p.as_str().unwrap_or(""));
    }
    println!(
        "  result: {}  (files: {}, {})",
        if r["ok"] == json!(true) { "PASS" } else { "FAIL" },
        path.display(),
        run_dir.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(vigie_bytes_token1: u64) -> String {
        format!(
            "stage init 3.1\nuname 6.12.95+deb12-cloud-amd64\nbegin check\n| [ok  ] BTF: present\n| vigie can run on this host\nend check\ncheck_rc 0\n\
             run_ready yes\n\
             client 0 200 166 244 108 1\nclient 0 200 182 258 300000 1\n\
             client 1 200 166 244 108 1\nclient 1 404 178 155 153 0\n\
             begin labels\n| 0123456789abcdef\n| fedcba9876543210\nend labels\n\
             begin metrics\n\
             | vigie_token_requests_total{{token=\"0123456789abcdef\",endpoint=\"sync\",vantage=\"socket\"}} 1\n\
             | vigie_token_requests_total{{token=\"0123456789abcdef\",endpoint=\"media\",vantage=\"socket\"}} 1\n\
             | vigie_token_response_bytes_total{{token=\"0123456789abcdef\",endpoint=\"sync\",vantage=\"socket\"}} 352\n\
             | vigie_token_response_bytes_total{{token=\"0123456789abcdef\",endpoint=\"media\",vantage=\"socket\"}} 300258\n\
             | vigie_token_requests_total{{token=\"fedcba9876543210\",endpoint=\"other\",vantage=\"socket\"}} 2\n\
             | vigie_token_response_bytes_total{{token=\"fedcba9876543210\",endpoint=\"other\",vantage=\"socket\"}} {vigie_bytes_token1}\n\
             end metrics\nvigie_exit 0\nstage done 9.0\nend-of-report\n"
        )
    }

    fn tokens() -> Vec<String> {
        vec!["syt_a".into(), "syt_b".into()]
    }

    #[test]
    fn exact_counts_pass() {
        let r = judge(&KERNELS[0], &report(352 + 308), &tokens());
        assert_eq!(r["problems"], json!([]), "{r:#}");
        assert_eq!(r["ok"], json!(true));
        assert_eq!(r["smoke"]["tokens"][0]["client_bytes"], json!(300_610));
        assert_eq!(r["smoke"]["tokens"][1]["vigie_requests"], json!(2.0));
    }

    #[test]
    fn one_byte_off_fails_and_says_which_token() {
        let r = judge(&KERNELS[0], &report(352 + 307), &tokens());
        assert_eq!(r["ok"], json!(false));
        let problems = r["problems"].to_string();
        assert!(problems.contains("token 1 (fedcba9876543210)"), "{problems}");
        assert_eq!(r["smoke"]["tokens"][0]["exact"], json!(true));
    }

    #[test]
    fn a_guest_that_never_ran_init_did_not_boot() {
        let r = judge(&KERNELS[0], "", &tokens());
        assert_eq!(r["booted"], json!(false));
        assert_eq!(r["ok"], json!(false));
    }
}
