//! `cargo xtask bench [OPTIONS]`: what vigie costs, measured on this machine, in one run.
//!
//! 1. Overhead on a busy plaintext HTTP/1.1 server: nginx (`xtask/bench/nginx.conf`, one
//!    worker pinned to CPU 0) under wrk (`xtask/bench/request.lua`, pinned to CPU 1), small
//!    (99 B) and large (1 MiB) responses, alternately without and with `vigie run
//!    --server-port`; medians, and vigie's request count against wrk's.
//! 2. The same over TLS, vigie attached to nginx's libssl with `--tls-discover-port` (probes in
//!    the server's processes only).
//!    Each nginx run alternates without vigie, the *floor* (the agent with
//!    `VIGIE_BENCH_FLOOR`: programs that return at once on the same hooks) and with vigie.
//! 3. Synapse itself (`xtask/bench/synapse_seed.py`: seeded, history pages and syncs with real
//!    users' tokens), plaintext and through its own TLS listener, without and with vigie.
//! 4. The userspace pipeline alone (`agent/examples/pipeline_bench.rs`): records/s on one
//!    core, and resident memory per tracked token.
//! 5. Kernel map memory (`bpftool map show`, every map the agent's file descriptors hold).
//! 6. Ring-buffer loss at the highest request rate wrk reaches here.
//! 7. What a task vigie does not watch pays per socket call (an AF_UNIX ping-pong), without
//!    vigie, with the floor and with vigie.
//!
//! Options: `--duration SECS` (per load run, default 10), `--runs N` (runs per mode and
//! case, default 3), `--only plain,tls,synapse,pipeline,loss,bystander,idle`, `--connections N` (default 64),
//! `--loss-connections N` (default 256), `--synapse-connections N` (default 16), `--nice N` (priority of nginx, wrk and vigie, default
//! -10: the machine may be shared), `--vigie-bin PATH` (measure another build of the agent),
//! `--keep` (keep the temporary directory).
//!
//! All traffic stays on 127.0.0.1. Every process started here gets a parent-death signal and
//! is stopped when the bench ends, fails or is interrupted (Ctrl-C, SIGTERM).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{build_release, root, setup, step};

const SMALL_PATH: &str = "/_matrix/client/v3/sync?since=s72594_4483_1934&timeout=30000";
const LARGE_PATH: &str = "/_matrix/media/v3/download/bench.example/large";
const LARGE_BYTES: usize = 1 << 20;
/// nginx runs on this CPU, wrk on the other one.
const NGINX_CPU: &str = "0";
const WRK_CPU: &str = "1";
/// A run during which processes other than the bench's used more than this much CPU (percent
/// of one core) is run again once, time permitting.
const NOISY_PERCENT: f64 = 15.0;
/// A run during which the hypervisor took more than this much of the vCPUs from the guest
/// (`steal` in /proc/stat, percent of one core) is disturbed too: other tenants of the host
/// slow every process of the guest alike, which no process list inside it shows.
const NOISY_STEAL_PERCENT: f64 = 5.0;
/// No more reruns of noisy runs after this much time, to keep the bench around 10 minutes.
const RERUN_BUDGET: Duration = Duration::from_secs(360);
/// At most this much waiting, in all, for the machine to be quiet before runs.
const QUIET_BUDGET: Duration = Duration::from_secs(120);

// Targets (issue 13 for the plaintext and Synapse figures).
const PLAIN_RPS_LOSS_MAX: f64 = 5.0;
/// Server CPU (nginx + agent) vigie may add per plaintext 99 B request, and its cost against the
/// floor (programs that return at once on the same attachment points).
const PLAIN_ADDED_CPU_MAX_US: f64 = 1.5;
const FLOOR_RATIO_MAX: f64 = 2.0;
/// The load generator's CPU per request may change this much with vigie (it is not watched).
const WRK_CPU_CHANGE_MAX: f64 = 3.0;
const SYNAPSE_CPU_RATIO_MAX: f64 = 1.01;
const SYNAPSE_TLS_CPU_RATIO_MAX: f64 = 1.03;
const SYNAPSE_RPS_RATIO_MIN: f64 = 0.99;
const SYNAPSE_P99_RATIO_MAX: f64 = 1.05;
const PLAIN_P99_INCREASE_MAX: f64 = 5.0;
const TLS_RPS_LOSS_MAX: f64 = 8.0;
const PIPELINE_RECORDS_MIN: f64 = 1_000_000.0;
const BYTES_PER_TOKEN_MAX: f64 = 512.0;
const NO_LOSS_BELOW_RPS: f64 = 50_000.0;

// ---------------------------------------------------------------------------------------------
// Signals and processes.

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

const SIGKILL: i32 = 9;
const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;
const PR_SET_PDEATHSIG: i32 = 1;
const SC_CLK_TCK: i32 = 2;

unsafe extern "C" {
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    fn kill(pid: i32, sig: i32) -> i32;
    fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
    fn sysconf(name: i32) -> i64;
}

extern "C" fn on_signal(_: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleep in small steps, giving up when interrupted.
fn nap(d: Duration) -> Result<()> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        check_interrupted()?;
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
    }
    check_interrupted()
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    done: Option<ExitStatus>,
}

impl Proc {
    /// `death`: the signal the child gets if this process dies without cleaning up.
    fn spawn(name: &str, cmd: &mut Command, log: &Path, death: i32) -> Result<Proc> {
        check_interrupted()?;
        let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                prctl(PR_SET_PDEATHSIG, death as u64, 0, 0, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc { name: name.into(), child, log: log.into(), done: None })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        if self.done.is_none() {
            self.done = self.child.try_wait().ok().flatten();
        }
        self.done
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Wait for the process to exit on its own, at most `timeout`.
    fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Ok(status);
            }
            if Instant::now() > until {
                bail!("{} did not finish within {timeout:?}", self.name);
            }
            check_interrupted()?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        // SAFETY: plain kill(2) on our own child's pid, which we have not reaped yet.
        unsafe { kill(self.pid() as i32, SIGTERM) };
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.done = self.child.wait().ok();
        self.done
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The temporary directory: nginx's files, certificate, logs. Removed at the end.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("bench: kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Restores `kernel.bpf_stats_enabled` when dropped.
struct BpfStats {
    previous: Option<String>,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> BpfStats {
        let previous = std::fs::read_to_string(BPF_STATS).ok();
        let _ = std::fs::write(BPF_STATS, "1");
        BpfStats { previous }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(p) = &self.previous {
            let _ = std::fs::write(BPF_STATS, p.trim());
        }
    }
}

/// The scheduler's autogroup of this session, given the bench's priority while it runs.
///
/// With `kernel.sched_autogroup_enabled` (the default on Debian), CPU is shared fairly between
/// sessions first and by nice only within one: other sessions' work at `nice 10` takes as much
/// CPU from the bench as it would at nice 0, and the bench's own `nice -10` is no help. The
/// autogroup's nice is what weighs against other sessions. Restored when dropped.
struct Autogroup {
    previous: Option<i32>,
}

const AUTOGROUP: &str = "/proc/self/autogroup";

impl Autogroup {
    fn set(nice: i32) -> Autogroup {
        // "/autogroup-14 nice 0"
        let previous = std::fs::read_to_string(AUTOGROUP)
            .ok()
            .and_then(|t| t.split_whitespace().last().and_then(|v| v.parse().ok()));
        if previous.is_some() && std::fs::write(AUTOGROUP, nice.to_string()).is_ok() {
            println!("  (this session's scheduler autogroup set to nice {nice} for the bench)");
        }
        Autogroup { previous }
    }
}

impl Drop for Autogroup {
    fn drop(&mut self) {
        if let Some(p) = self.previous {
            let _ = std::fs::write(AUTOGROUP, p.to_string());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Options.

struct Options {
    duration: u64,
    runs: usize,
    only: BTreeSet<String>,
    connections: u32,
    loss_connections: u32,
    synapse_connections: u32,
    keep: bool,
    nice: i32,
    /// Benchmark this agent binary instead of building the workspace's.
    vigie_bin: Option<PathBuf>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            duration: 10,
            runs: 3,
            only: ["plain", "tls", "synapse", "pipeline", "loss", "bystander", "idle"]
                .into_iter()
                .map(String::from)
                .collect(),
            connections: 64,
            loss_connections: 256,
            synapse_connections: 16,
            keep: false,
            nice: -10,
            vigie_bin: None,
        };
        let mut it = args.iter().filter(|a| *a != "--");
        while let Some(a) = it.next() {
            let mut value = || it.next().with_context(|| format!("{a} needs a value"));
            match a.as_str() {
                "--duration" => o.duration = value()?.parse().context("--duration SECS")?,
                "--runs" => o.runs = value()?.parse().context("--runs N")?,
                "--connections" => o.connections = value()?.parse().context("--connections N")?,
                "--loss-connections" => o.loss_connections = value()?.parse().context("--loss-connections N")?,
                "--synapse-connections" => {
                    o.synapse_connections = value()?.parse().context("--synapse-connections N")?
                }
                "--only" => o.only = value()?.split(',').map(|s| s.trim().to_string()).collect(),
                "--keep" => o.keep = true,
                "--nice" => o.nice = value()?.parse().context("--nice N")?,
                "--vigie-bin" => o.vigie_bin = Some(PathBuf::from(value()?)),
                _ => bail!(
                    "usage: cargo xtask bench [--duration SECS] [--runs N] [--only plain,tls,synapse,pipeline,loss,bystander,idle] \
                     [--connections N] [--loss-connections N] [--synapse-connections N] [--nice N] [--vigie-bin PATH] [--keep]"
                ),
            }
        }
        if o.duration < 2 || o.runs < 1 {
            bail!("--duration must be at least 2 and --runs at least 1");
        }
        Ok(o)
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn http_get(port: u16, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") => Ok(body.into()),
        _ => bail!("GET {path} on port {port}: {}", out.lines().next().unwrap_or("no answer")),
    }
}

/// Sum of the samples of `name` whose labels contain every `needles` fragment.
fn metric(text: &str, name: &str, needles: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            (n == name && needles.iter().all(|x| labels.contains(x))).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { sysconf(SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Fields of /proc/PID/stat after the command name (index 0 is field 3, `state`).
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    stat_fields(&pid.to_string()).map_or(0, |f| f[11] + f[12])
}

/// CPU ticks the whole machine spent busy (user, nice, system, irq, softirq).
fn machine_busy_ticks() -> u64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> =
        text.lines().next().unwrap_or("").split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0)).collect();
    [0, 1, 2, 5, 6].iter().map(|&i| f.get(i).copied().unwrap_or(0)).sum()
}

fn vm_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn ms(us: f64) -> String {
    format!("{:.2} ms", us / 1000.0)
}

fn command_line(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Some(text.lines().next().unwrap_or("").trim().to_string())
}

// ---------------------------------------------------------------------------------------------
// The processes under test.

struct Bench {
    opts: Options,
    vigie_bin: PathBuf,
    work: WorkDir,
    bench_dir: PathBuf,
    started: Instant,
    seq: u32,
    quiet_waited: Duration,
    loss_reference: Option<f64>,
}

impl Bench {
    fn next_tag(&mut self, what: &str) -> String {
        self.seq += 1;
        format!("{:03}-{what}", self.seq)
    }

    fn dir(&self) -> &Path {
        &self.work.path
    }

    /// `prog` under `nice -n N` (the bench's priority) and, with `cpus`, `taskset -c CPUS`.
    fn launcher(&self, cpus: Option<&str>, prog: &str) -> Command {
        let mut argv: Vec<String> = Vec::new();
        if self.opts.nice != 0 {
            argv.extend(["nice".into(), "-n".into(), self.opts.nice.to_string()]);
        }
        if let Some(c) = cpus {
            argv.extend(["taskset".into(), "-c".into(), c.into()]);
        }
        argv.push(prog.into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd
    }

    /// Before a load run: wait (a while) for the machine to be quiet: little CPU used by
    /// others, and no other vigie agent's programs attached (another engineer's tests: their
    /// tracepoints fire in our nginx too). Returns the number of such programs still there.
    fn wait_quiet(&mut self) -> Result<usize> {
        let tck = clk_tck() as f64;
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let a = machine_busy_ticks();
            nap(Duration::from_secs(1))?;
            let load = machine_busy_ticks().saturating_sub(a) as f64 / tck * 100.0;
            let others = vigie_progs_not_ours(None);
            if load < NOISY_PERCENT && others == 0 {
                return Ok(0);
            }
            if Instant::now() > until || self.quiet_waited > QUIET_BUDGET {
                println!(
                    "  (machine not quiet: {load:.0}% of a core busy, {others} programs of other vigie agents attached; going ahead)"
                );
                return Ok(others);
            }
            self.quiet_waited += Duration::from_secs(1);
        }
    }

    fn prepare_files(&self) -> Result<()> {
        let d = self.dir();
        std::fs::create_dir_all(d.join("www"))?;
        std::fs::create_dir_all(d.join("tmp"))?;
        // nginx's workers run as an unprivileged user: they must read the tree.
        for p in [d.to_path_buf(), d.join("www"), d.join("tmp")] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        }
        std::fs::write(
            d.join("www/small.json"),
            "{\"next_batch\":\"s72594_4483_1934\",\"rooms\":{},\"presence\":{\"events\":[]},\"account_data\":{\"events\":[]}}\n",
        )?;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let large: Vec<u8> = (0..LARGE_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(d.join("www/large.bin"), large)?;
        for f in ["www/small.json", "www/large.bin"] {
            std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o644))?;
        }
        Ok(())
    }

    fn make_cert(&self) -> Result<()> {
        let d = self.dir();
        if d.join("cert.pem").exists() {
            return Ok(());
        }
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"])
            .arg("-keyout")
            .arg(d.join("key.pem"))
            .arg("-out")
            .arg(d.join("cert.pem"))
            .output()
            .context("running openssl")?;
        if !out.status.success() {
            bail!("openssl req failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// nginx in the foreground; `cpus`: pin master and workers with taskset.
    fn start_nginx(&mut self, tls: bool, workers: u32, cpus: Option<&str>) -> Result<Server> {
        let d = self.dir().to_path_buf();
        let port = free_port()?;
        let template = std::fs::read_to_string(self.bench_dir.join("nginx.conf"))?;
        let tls_line = if tls {
            self.make_cert()?;
            let t = std::fs::read_to_string(self.bench_dir.join("tls.conf"))?;
            std::fs::write(d.join("tls.conf"), t.replace("@DIR@", &d.to_string_lossy()))?;
            format!("include {}/tls.conf;", d.display())
        } else {
            String::new()
        };
        let conf = template
            .replace("@WORKERS@", &workers.to_string())
            .replace("@DIR@", &d.to_string_lossy())
            .replace("@PORT@", &port.to_string())
            .replace("@LISTEN_SSL@", if tls { "ssl" } else { "" })
            .replace("@TLS@", &tls_line);
        let tag = self.next_tag(if tls { "nginx-tls" } else { "nginx" });
        let conf_path = d.join(format!("{tag}.conf"));
        std::fs::write(&conf_path, conf)?;
        let mut cmd = self.launcher(cpus, "nginx");
        cmd.arg("-e").arg(d.join("error.log")).arg("-c").arg(&conf_path).arg("-p").arg(&d);
        let mut proc = Proc::spawn("nginx", &mut cmd, &d.join(format!("{tag}.log")), SIGTERM)?;
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = proc.exited() {
                bail!("nginx exited ({status}):\n{}", proc.log_tail());
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if Instant::now() > until {
                bail!("nginx did not listen on 127.0.0.1:{port} within 10 s");
            }
            nap(Duration::from_millis(50))?;
        }
        let lua = self.bench_dir.join("request.lua");
        let conns = self.opts.connections;
        Ok(Server { proc, port, tls, lua, conns, name: "nginx" })
    }

    /// `floor`: the agent attaches programs that return at once instead of its own (see
    /// `loader::FLOOR_ENV`).
    fn start_vigie(&mut self, watch: &Watch, floor: Option<&str>) -> Result<Vigie> {
        let d = self.dir().to_path_buf();
        let metrics_port = free_port()?;
        let bin = self.vigie_bin.to_string_lossy().into_owned();
        let mut cmd = self.launcher(None, &bin);
        cmd.arg("run");
        match watch {
            Watch::Port(p) => cmd.arg("--server-port").arg(p.to_string()),
            Watch::Tls(p) => cmd.arg("--tls-discover-port").arg(p.to_string()),
        };
        cmd.arg("--metrics-addr").arg(format!("127.0.0.1:{metrics_port}")).arg("--key-file").arg(d.join("vigie.key"));
        if let Some(f) = floor {
            cmd.env("VIGIE_BENCH_FLOOR", f);
        }
        let tag = self.next_tag(if floor.is_some() { "floor" } else { "vigie" });
        let mut proc = Proc::spawn("vigie", &mut cmd, &d.join(format!("{tag}.log")), SIGTERM)?;
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = proc.exited() {
                bail!("vigie exited ({status}):\n{}", proc.log_tail());
            }
            if let Ok(text) = http_get(metrics_port, "/metrics")
                && metric(&text, "vigie_probes_attached", &[]) > 0.0
            {
                break;
            }
            if Instant::now() > until {
                bail!("vigie was not ready within 30 s:\n{}", proc.log_tail());
            }
            nap(Duration::from_millis(50))?;
        }
        Ok(Vigie { proc, metrics_port })
    }

    fn wrk(&mut self, lua: &Path, url: &str, threads: u32, conns: u32, secs: u64, cpus: Option<&str>) -> Result<Wrk> {
        let mut cmd = self.launcher(cpus, "wrk");
        cmd.arg(format!("-t{threads}")).arg(format!("-c{conns}")).arg(format!("-d{secs}s"));
        cmd.args(["--timeout", "10s", "-s"]).arg(lua).arg(url);
        let tag = self.next_tag("wrk");
        let log = self.dir().join(format!("{tag}.out"));
        let mut proc = Proc::spawn("wrk", &mut cmd, &log, SIGKILL)?;
        let status = proc.wait(Duration::from_secs(secs + 30))?;
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        if !status.success() {
            bail!("wrk failed ({status}):\n{out}");
        }
        let line =
            out.lines().find(|l| l.starts_with("BENCH ")).with_context(|| format!("no BENCH line from wrk:\n{out}"))?;
        let field = |k: &str| -> f64 {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN)
        };
        let w = Wrk {
            requests: field("requests") as u64,
            duration_s: field("duration_us") / 1e6,
            p50_us: field("p50_us"),
            p99_us: field("p99_us"),
            errors: field("errors") as u64,
        };
        if w.requests == 0 {
            bail!("wrk completed no request:\n{out}");
        }
        Ok(w)
    }
}

/// The server under load: nginx, or the seeder whose child is Synapse (CPU is counted for the
/// process and its children).
struct Server {
    proc: Proc,
    port: u16,
    tls: bool,
    /// wrk's script: what to send.
    lua: PathBuf,
    conns: u32,
    name: &'static str,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", if self.tls { "https" } else { "http" }, self.port)
    }
}

enum Watch {
    Port(u16),
    /// The TLS port to discover the server's OpenSSL from.
    Tls(u16),
}

struct Vigie {
    proc: Proc,
    metrics_port: u16,
}

impl Vigie {
    fn scrape(&self) -> Result<String> {
        http_get(self.metrics_port, "/metrics")
    }

    /// Wait until the agent has read everything the kernel queued: its request count stops
    /// moving. Returns the last scrape.
    fn drained(&self, vantage: &str) -> Result<String> {
        let needle = format!("vantage=\"{vantage}\"");
        let until = Instant::now() + Duration::from_secs(15);
        let mut last = f64::NAN;
        nap(Duration::from_millis(300))?;
        loop {
            let text = self.scrape()?;
            let now =
                metric(&text, "vigie_token_requests_total", &[&needle]) + metric(&text, "vigie_events_total", &[]);
            if now == last || Instant::now() > until {
                return Ok(text);
            }
            last = now;
            nap(Duration::from_millis(300))?;
        }
    }
}

struct Wrk {
    requests: u64,
    duration_s: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

impl Wrk {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.duration_s
    }
}

/// One load run.
struct Run {
    /// 1-minute load average when the run started (the machine is shared).
    loadavg: f64,
    wrk: Wrk,
    /// Programs of other vigie agents attached during the run (see `Bench::wait_quiet`).
    other_agents: usize,
    /// CPU used by processes other than nginx, wrk and vigie, percent of one core.
    foreign: f64,
    /// CPU time the hypervisor gave to someone else, percent of one core.
    steal: f64,
    nginx_cpu: f64,
    vigie_cpu: f64,
    wrk_cpu: f64,
    /// Seconds between the CPU snapshots around wrk (the CPU percentages are of this).
    window_s: f64,
    /// Requests vigie counted (with vigie only).
    counted: u64,
    events: [u64; 3],
    lost: u64,
    client_connections: u64,
    vigie_rss: u64,
    maps: Vec<(String, u64)>,
    progs: Vec<(String, u64, u64)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Without,
    /// Programs that return at once on vigie's attachment points: the hooks' own cost.
    Floor,
    /// The floor with uprobes on function entries only (TLS): an entry trap's cost alone.
    FloorEntry,
    With,
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

impl Run {
    /// CPU microseconds per completed request of a process that used `pct` % of a core.
    fn us_per_request(&self, pct: f64) -> f64 {
        pct / 100.0 * self.window_s * 1e6 / self.wrk.requests as f64
    }

    fn noisy(&self) -> bool {
        self.foreign > NOISY_PERCENT || self.steal > NOISY_STEAL_PERCENT || self.other_agents > 0
    }
}

struct CpuSnap {
    at: Instant,
    /// Whole machine, user + nice ticks.
    machine_user: u64,
    /// Whole machine, steal ticks (the eighth field of /proc/stat's `cpu` line).
    machine_steal: u64,
    /// nginx master and workers, utime + stime, and utime alone.
    nginx: u64,
    nginx_user: u64,
    vigie: u64,
    vigie_user: u64,
    /// This process's reaped children (wrk, once waited for).
    reaped: u64,
    reaped_user: u64,
    /// Every other user-space process alive now, by (pid, start time): utime + stime.
    others: std::collections::HashMap<(u64, u64), u64>,
}

fn cpu_snap(nginx: u32, vigie: Option<u32>) -> CpuSnap {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> =
        text.lines().next().unwrap_or("").split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0)).collect();
    let me = u64::from(std::process::id());
    let (nginx, vigie) = (u64::from(nginx), vigie.map_or(0, u64::from));
    let mut snap = CpuSnap {
        at: Instant::now(),
        machine_user: f.first().copied().unwrap_or(0) + f.get(1).copied().unwrap_or(0),
        machine_steal: f.get(7).copied().unwrap_or(0),
        nginx: 0,
        nginx_user: 0,
        vigie: 0,
        vigie_user: 0,
        reaped: 0,
        reaped_user: 0,
        others: Default::default(),
    };
    if let Some(f) = stat_fields("self") {
        snap.reaped = f[13] + f[14];
        snap.reaped_user = f[13];
    }
    let Ok(dir) = std::fs::read_dir("/proc") else { return snap };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(pid) = name.parse::<u64>() else { continue };
        let Some(f) = stat_fields(&name) else { continue };
        let (ppid, user, total, start) = (f[1], f[11], f[11] + f[12], f[19]);
        if pid == nginx || ppid == nginx {
            snap.nginx += total;
            snap.nginx_user += user;
        } else if pid == vigie {
            snap.vigie = total;
            snap.vigie_user = user;
        } else if pid != me && ppid != me && pid != 2 && ppid != 2 {
            // Kernel threads (children of kthreadd) are left out: ours cause most of theirs.
            snap.others.insert((pid, start), total);
        }
    }
    snap
}

impl CpuSnap {
    /// CPU ticks other work used between `before` and `self`: the larger of what the live
    /// processes other than ours used, and the machine's user time not ours (which also sees
    /// processes that came and went, such as compilers).
    fn foreign_since(&self, before: &CpuSnap) -> u64 {
        let scanned: u64 =
            self.others.iter().filter_map(|(k, t)| before.others.get(k).map(|b| t.saturating_sub(*b))).sum();
        let ours_user = (self.nginx_user.saturating_sub(before.nginx_user))
            + self.vigie_user.saturating_sub(before.vigie_user)
            + self.reaped_user.saturating_sub(before.reaped_user);
        let user = self.machine_user.saturating_sub(before.machine_user).saturating_sub(ours_user);
        scanned.max(user)
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel side: the agent's maps and programs, found through its own file descriptors.

/// `map_id` or `prog_id` values of the BPF objects `pid` holds open.
fn bpf_ids(pid: u32, kind: &str) -> BTreeSet<u64> {
    let key = format!("{kind}_id:");
    let mut ids = BTreeSet::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for e in dir.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            if let Some(id) = text.lines().find_map(|l| l.strip_prefix(&key)).and_then(|v| v.trim().parse().ok()) {
                ids.insert(id);
            }
        }
    }
    ids
}

/// Programs named `vigie_*` that belong to another agent than `ours`.
fn vigie_progs_not_ours(ours: Option<u32>) -> usize {
    let mine = ours.map(|p| bpf_ids(p, "prog")).unwrap_or_default();
    let Ok(out) = Command::new("bpftool").args(["prog", "show"]).output() else { return 0 };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace) && l.contains(" name vigie_"))
        .filter_map(|l| l.split_once(':')?.0.trim().parse::<u64>().ok())
        .filter(|id| !mine.contains(id))
        .count()
}

/// (name, bytes_memlock) of every map the agent holds open (its own file descriptors, so no
/// list of names can drift from the programs), from `bpftool map show`.
fn agent_maps(pid: u32) -> Vec<(String, u64)> {
    let ids = bpf_ids(pid, "map");
    let Ok(out) = Command::new("bpftool").args(["map", "show"]).output() else { return vec![] };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut maps = Vec::new();
    let mut current: Option<(u64, String)> = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace)
            && let Some((id, rest)) = line.split_once(':')
            && let Ok(id) = id.trim().parse::<u64>()
        {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let name = words.iter().position(|w| *w == "name").and_then(|i| words.get(i + 1)).unwrap_or(&"");
            current = Some((id, name.to_string()));
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "memlock")
            && let Some((id, name)) = current.take()
            && ids.contains(&id)
        {
            let bytes = words.get(i + 1).and_then(|v| v.trim_end_matches('B').parse().ok()).unwrap_or(0);
            maps.push((name, bytes));
        }
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.1));
    maps
}

/// (name, run_cnt, run_time_ns) of the agent's programs (needs kernel.bpf_stats_enabled).
fn agent_progs(pid: u32) -> Vec<(String, u64, u64)> {
    let ids = bpf_ids(pid, "prog");
    let Ok(out) = Command::new("bpftool").args(["prog", "show"]).output() else { return vec![] };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut progs = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with(char::is_whitespace)) {
        let Some((id, rest)) = line.split_once(':') else { continue };
        let Ok(id) = id.trim().parse::<u64>() else { continue };
        if !ids.contains(&id) {
            continue;
        }
        let words: Vec<&str> = rest.split_whitespace().collect();
        let after = |k: &str| words.iter().position(|w| *w == k).and_then(|i| words.get(i + 1)).copied();
        let name = after("name").unwrap_or("?").to_string();
        let cnt = after("run_cnt").and_then(|v| v.parse().ok()).unwrap_or(0);
        let ns = after("run_time_ns").and_then(|v| v.parse().ok()).unwrap_or(0);
        progs.push((name, cnt, ns));
    }
    progs.sort_by_key(|p| std::cmp::Reverse(p.2));
    progs
}

// ---------------------------------------------------------------------------------------------
// Sections.

struct Case {
    label: &'static str,
    tls: bool,
    path: &'static str,
}

struct CaseResult {
    case: Case,
    without: Vec<Run>,
    floor: Vec<Run>,
    floor_entry: Vec<Run>,
    with: Vec<Run>,
    /// Runs per request of each floor program (one counting run with kernel.bpf_stats_enabled).
    hooks: Vec<(String, f64)>,
}

impl CaseResult {
    fn med(runs: &[Run], f: impl Fn(&Run) -> f64) -> f64 {
        median(runs.iter().map(f).collect())
    }
}

impl Bench {
    fn load_run(&mut self, nginx: &Server, case: &Case, mode: Mode, conns: u32, n: usize) -> Result<Run> {
        self.wait_quiet()?;
        let load = loadavg();
        let vigie = if mode != Mode::Without {
            let watch = if case.tls { Watch::Tls(nginx.port) } else { Watch::Port(nginx.port) };
            let floor = match mode {
                Mode::Floor => Some("1"),
                Mode::FloorEntry => Some("entry"),
                _ => None,
            };
            Some(self.start_vigie(&watch, floor)?)
        } else {
            None
        };
        let vigie_pid = vigie.as_ref().map(|v| v.proc.pid());
        let before = cpu_snap(nginx.proc.pid(), vigie_pid);
        let wrk = self.wrk(&nginx.lua, &nginx.url(case.path), 1, conns, self.opts.duration, Some(WRK_CPU))?;
        let after_wrk = cpu_snap(nginx.proc.pid(), vigie_pid);
        let other_agents = vigie_progs_not_ours(vigie_pid);
        let tck = clk_tck() as f64;
        let secs = after_wrk.at.duration_since(before.at).as_secs_f64();
        let pct = |ticks: u64| ticks as f64 / tck / secs * 100.0;
        let mut run = Run {
            loadavg: load,
            other_agents,
            foreign: pct(after_wrk.foreign_since(&before)),
            steal: pct(after_wrk.machine_steal.saturating_sub(before.machine_steal)),
            nginx_cpu: pct(after_wrk.nginx.saturating_sub(before.nginx)),
            vigie_cpu: 0.0,
            wrk_cpu: pct(after_wrk.reaped.saturating_sub(before.reaped)),
            window_s: secs,
            wrk,
            counted: 0,
            events: [0; 3],
            lost: 0,
            client_connections: 0,
            vigie_rss: 0,
            maps: vec![],
            progs: vec![],
        };
        if let Some(mut v) = vigie {
            if mode != Mode::With {
                run.vigie_cpu = cpu_ticks(v.proc.pid()).saturating_sub(before.vigie) as f64 / tck / secs * 100.0;
                v.proc.stop();
            } else {
                let vantage = if case.tls { "tls" } else { "socket" };
                let text = v.drained(vantage)?;
                // vigie's CPU until it had caught up, per second of load.
                run.vigie_cpu = cpu_ticks(v.proc.pid()).saturating_sub(before.vigie) as f64 / tck / secs * 100.0;
                run.counted = metric(&text, "vigie_token_requests_total", &[&format!("vantage=\"{vantage}\"")]) as u64;
                run.events = [
                    metric(&text, "vigie_events_total", &["kind=\"recv\""]) as u64,
                    metric(&text, "vigie_events_total", &["kind=\"send\""]) as u64,
                    metric(&text, "vigie_events_total", &["kind=\"close\""]) as u64,
                ];
                run.lost = metric(&text, "vigie_events_lost_total", &[]) as u64;
                run.client_connections = metric(&text, "vigie_tls_client_connections_total", &[]) as u64;
                run.vigie_rss = vm_rss(v.proc.pid());
                run.maps = agent_maps(v.proc.pid());
                run.progs = agent_progs(v.proc.pid());
                if let Some(status) = v.proc.exited() {
                    bail!("vigie exited during the run ({status}):\n{}", v.proc.log_tail());
                }
                v.proc.stop();
            }
        }
        let w = &run.wrk;
        let mut line = format!(
            "  {:<24} run {n} {:<14} {:>9} req/s  p50 {:>9}  p99 {:>9}  {} {:>3.0}% CPU {:.1} µs/req, wrk {:.1} µs/req",
            case.label,
            match mode {
                Mode::Without => "without vigie:",
                Mode::Floor => "floor:",
                Mode::FloorEntry => "floor, entries:",
                Mode::With => "with vigie:",
            },
            thousands(w.rps()),
            ms(w.p50_us),
            ms(w.p99_us),
            nginx.name,
            run.nginx_cpu,
            run.us_per_request(run.nginx_cpu),
            run.us_per_request(run.wrk_cpu)
        );
        if mode == Mode::Floor || mode == Mode::FloorEntry {
            let _ = write!(line, "  agent {:.1} µs/req", run.us_per_request(run.vigie_cpu));
        }
        if mode == Mode::With {
            let diff = run.counted as i64 - w.requests as i64;
            let _ = write!(
                line,
                "  vigie {:>3.0}% CPU {:.1} µs/req  counted {} vs wrk {} ({diff:+})  lost {}",
                run.vigie_cpu,
                run.us_per_request(run.vigie_cpu),
                thousands(run.counted as f64),
                thousands(w.requests as f64),
                run.lost
            );
        }
        let _ =
            write!(line, "  [load average {:.2}, other load {:.0}%, steal {:.1}%", run.loadavg, run.foreign, run.steal);
        if run.other_agents > 0 {
            let _ = write!(line, ", {} programs of other vigie agents", run.other_agents);
        }
        let _ = write!(line, "{}]", if run.noisy() { ", NOISY" } else { "" });
        if w.errors > 0 {
            let _ = write!(line, "  wrk errors {}", w.errors);
        }
        println!("{line}");
        Ok(run)
    }

    /// A run, and once more if other processes disturbed it (time permitting); keeps the
    /// quieter of the two.
    fn clean_run(&mut self, nginx: &Server, case: &Case, mode: Mode, n: usize) -> Result<Run> {
        let run = self.load_run(nginx, case, mode, nginx.conns, n)?;
        if run.noisy() && self.started.elapsed() < RERUN_BUDGET {
            println!("  (that run was disturbed by other work on the machine: running it again)");
            let again = self.load_run(nginx, case, mode, nginx.conns, n)?;
            let score = |r: &Run| r.foreign + r.steal + 100.0 * r.other_agents as f64;
            return Ok(if score(&again) < score(&run) { again } else { run });
        }
        Ok(run)
    }

    fn overhead(&mut self, tls: bool) -> Result<Vec<CaseResult>> {
        let (small, large) =
            if tls { ("TLS, 99 B body", "TLS, 1 MiB body") } else { ("plaintext, 99 B body", "plaintext, 1 MiB body") };
        step(&format!(
            "Overhead, {}: nginx (1 worker, CPU {NGINX_CPU}) under wrk (-t1 -c{} -d{}s, CPU {WRK_CPU}), {} runs without and with vigie, alternating",
            if tls {
                "TLS (vigie --tls-discover-port: probes in nginx's processes)"
            } else {
                "plaintext HTTP/1.1 (vigie --server-port)"
            },
            self.opts.connections,
            self.opts.duration,
            self.opts.runs
        ));
        let nginx = self.start_nginx(tls, 1, Some(NGINX_CPU))?;
        let mut results = Vec::new();
        for case in [Case { label: small, tls, path: SMALL_PATH }, Case { label: large, tls, path: LARGE_PATH }] {
            // Warm-up: page cache, TLS session setup, nginx's buffers.
            self.wrk(&nginx.lua, &nginx.url(case.path), 1, self.opts.connections, 2, Some(WRK_CPU))?;
            let mut r =
                CaseResult { case, without: vec![], floor: vec![], floor_entry: vec![], with: vec![], hooks: vec![] };
            for n in 1..=self.opts.runs {
                let case = &r.case;
                let a = self.clean_run(&nginx, case, Mode::Without, n)?;
                let f = self.clean_run(&nginx, case, Mode::Floor, n)?;
                if tls {
                    let e = self.clean_run(&nginx, case, Mode::FloorEntry, n)?;
                    r.floor_entry.push(e);
                }
                let b = self.clean_run(&nginx, case, Mode::With, n)?;
                r.without.push(a);
                r.floor.push(f);
                r.with.push(b);
            }
            r.hooks = self.hook_counts(&nginx, &r.case)?;
            results.push(r);
        }
        Ok(results)
    }

    /// Synapse itself, seeded (`xtask/bench/synapse_seed.py`), under wrk sending history pages
    /// and syncs with real users' tokens; plaintext, then Synapse's own TLS listener. Synapse
    /// (one reactor thread) is pinned to the nginx CPU, wrk to the other.
    fn synapse(&mut self) -> Result<Vec<CaseResult>> {
        step(&format!(
            "Synapse: seeded, wrk -t1 -c{} -d{}s of history pages and syncs with real users' tokens, {} runs without and with vigie, alternating; plaintext then Synapse's TLS listener",
            self.opts.synapse_connections, self.opts.duration, self.opts.runs
        ));
        let python = root().join("tests/.venv/bin/python");
        if !python.exists() {
            bail!("{} is missing: run `cargo xtask setup`", python.display());
        }
        let mut results = Vec::new();
        for tls in [false, true] {
            let tag = self.next_tag(if tls { "synapse-tls" } else { "synapse" });
            let dir = self.dir().join(&tag);
            std::fs::create_dir_all(&dir)?;
            let lua = dir.join("synapse.lua");
            let mut cmd = self.launcher(Some(NGINX_CPU), &python.to_string_lossy());
            cmd.arg(self.bench_dir.join("synapse_seed.py")).arg("--dir").arg(&dir).arg("--lua").arg(&lua);
            if tls {
                cmd.arg("--tls");
            }
            let log = self.dir().join(format!("{tag}.log"));
            let mut proc = Proc::spawn("synapse seeder", &mut cmd, &log, SIGTERM)?;
            let until = Instant::now() + Duration::from_secs(600);
            let port = loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if let Some(line) = text.lines().find(|l| l.starts_with("SYNAPSE_READY ")) {
                    for l in text.lines().filter(|l| l.starts_with("seeded ")) {
                        println!("  {l}");
                    }
                    let port = line
                        .split_whitespace()
                        .find_map(|kv| kv.strip_prefix("port="))
                        .and_then(|v| v.parse::<u16>().ok())
                        .context("SYNAPSE_READY without a port")?;
                    break port;
                }
                if let Some(status) = proc.exited() {
                    bail!("the Synapse seeder exited ({status}):\n{}", proc.log_tail());
                }
                if Instant::now() > until {
                    bail!("Synapse was not seeded within 10 minutes:\n{}", proc.log_tail());
                }
                nap(Duration::from_millis(200))?;
            };
            let server = Server { proc, port, tls, lua, conns: self.opts.synapse_connections, name: "synapse" };
            let label = if tls { "Synapse TLS listener" } else { "Synapse plaintext" };
            let case = Case { label, tls, path: "/" };
            self.wrk(&server.lua, &server.url("/"), 1, server.conns, 3, Some(WRK_CPU))?;
            let mut r =
                CaseResult { case, without: vec![], floor: vec![], floor_entry: vec![], with: vec![], hooks: vec![] };
            for n in 1..=self.opts.runs {
                let a = self.clean_run(&server, &r.case, Mode::Without, n)?;
                let b = self.clean_run(&server, &r.case, Mode::With, n)?;
                r.without.push(a);
                r.with.push(b);
            }
            results.push(r);
        }
        Ok(results)
    }

    /// How often each hook runs per request: the floor's programs, counted by the kernel
    /// (kernel.bpf_stats_enabled, which adds its own cost, so this run is not timed).
    fn hook_counts(&mut self, server: &Server, case: &Case) -> Result<Vec<(String, f64)>> {
        let watch = if case.tls { Watch::Tls(server.port) } else { Watch::Port(server.port) };
        let vigie = self.start_vigie(&watch, Some("1"))?;
        let stats = BpfStats::enable();
        let wrk = self.wrk(&server.lua, &server.url(case.path), 1, server.conns, 3, Some(WRK_CPU))?;
        let progs = agent_progs(vigie.proc.pid());
        drop(stats);
        let per: Vec<(String, f64)> =
            progs.into_iter().map(|(name, cnt, _)| (name, cnt as f64 / wrk.requests as f64)).collect();
        println!(
            "  {}: hook runs per request (floor programs, {} requests): {}",
            case.label,
            thousands(wrk.requests as f64),
            per.iter().map(|(n, v)| format!("{n} {v:.2}")).collect::<Vec<_>>().join(", ")
        );
        Ok(per)
    }

    fn loss(&mut self) -> Result<Run> {
        step(&format!(
            "Ring-buffer loss: plaintext 99 B case as hard as wrk can (nginx 2 workers, wrk -t2 -c{}, nothing pinned), vigie watching, kernel.bpf_stats_enabled=1 for this run",
            self.opts.loss_connections
        ));
        let nginx = self.start_nginx(false, 2, None)?;
        let case = Case { label: "plaintext, 99 B, max rate", tls: false, path: SMALL_PATH };
        self.wait_quiet()?;
        let reference = self.wrk(&nginx.lua, &nginx.url(case.path), 2, self.opts.loss_connections, 5, None)?;
        println!(
            "  reference without vigie (5 s): {} req/s (p99 {})",
            thousands(reference.rps()),
            ms(reference.p99_us)
        );
        self.loss_reference = Some(reference.rps());
        self.wait_quiet()?;
        let vigie = self.start_vigie(&Watch::Port(nginx.port), None)?;
        let stats = BpfStats::enable();
        let before = cpu_snap(nginx.proc.pid(), Some(vigie.proc.pid()));
        let load = loadavg();
        let wrk =
            self.wrk(&nginx.lua, &nginx.url(case.path), 2, self.opts.loss_connections, self.opts.duration, None)?;
        let after = cpu_snap(nginx.proc.pid(), Some(vigie.proc.pid()));
        let text = vigie.drained("socket")?;
        let progs = agent_progs(vigie.proc.pid());
        let other_agents = vigie_progs_not_ours(Some(vigie.proc.pid()));
        drop(stats);
        let tck = clk_tck() as f64;
        let secs = after.at.duration_since(before.at).as_secs_f64();
        let run = Run {
            loadavg: load,
            other_agents,
            foreign: after.foreign_since(&before) as f64 / tck / secs * 100.0,
            steal: after.machine_steal.saturating_sub(before.machine_steal) as f64 / tck / secs * 100.0,
            nginx_cpu: (after.nginx.saturating_sub(before.nginx)) as f64 / tck / secs * 100.0,
            vigie_cpu: cpu_ticks(vigie.proc.pid()).saturating_sub(before.vigie) as f64 / tck / secs * 100.0,
            wrk_cpu: (after.reaped.saturating_sub(before.reaped)) as f64 / tck / secs * 100.0,
            window_s: secs,
            counted: metric(&text, "vigie_token_requests_total", &["vantage=\"socket\""]) as u64,
            events: [
                metric(&text, "vigie_events_total", &["kind=\"recv\""]) as u64,
                metric(&text, "vigie_events_total", &["kind=\"send\""]) as u64,
                metric(&text, "vigie_events_total", &["kind=\"close\""]) as u64,
            ],
            lost: metric(&text, "vigie_events_lost_total", &[]) as u64,
            client_connections: 0,
            vigie_rss: vm_rss(vigie.proc.pid()),
            maps: agent_maps(vigie.proc.pid()),
            progs,
            wrk,
        };
        println!(
            "  {}: {} req/s (p99 {}), vigie received {} events ({} recv, {} send, {} close), lost {}; counted {} vs wrk {}; nginx {:.0}% CPU, vigie {:.0}% CPU [other load {:.0}%, steal {:.1}%]",
            case.label,
            thousands(run.wrk.rps()),
            ms(run.wrk.p99_us),
            thousands(run.events.iter().sum::<u64>() as f64),
            thousands(run.events[0] as f64),
            thousands(run.events[1] as f64),
            thousands(run.events[2] as f64),
            run.lost,
            thousands(run.counted as f64),
            thousands(run.wrk.requests as f64),
            run.nginx_cpu,
            run.vigie_cpu,
            run.foreign,
            run.steal
        );
        Ok(run)
    }

    /// What a task vigie does not watch pays: every socket call on the host runs the
    /// `sock:*` hooks, which return once they see the port is not watched. An AF_UNIX
    /// ping-pong (those hooks fire for every socket family) times one socket call, without
    /// vigie, with the floor's empty programs and with vigie, alternating.
    fn bystander(&mut self) -> Result<Bystander> {
        let rounds = (self.opts.runs * 2).max(3);
        step(&format!(
            "Bystander: a task vigie does not watch, AF_UNIX socketpair ping-pong ({BYSTANDER_TRIPS} round trips of 64 B), ns per socket call, {rounds} rounds without / floor / with vigie"
        ));
        let unwatched = free_port()?;
        let mut out = Bystander::default();
        for _ in 0..rounds {
            for (mode, floor) in [(0usize, None), (1, Some("1")), (2, None)] {
                self.wait_quiet()?;
                let agent = if mode == 0 { None } else { Some(self.start_vigie(&Watch::Port(unwatched), floor)?) };
                let ns = socket_call_ns(BYSTANDER_TRIPS)?;
                drop(agent);
                println!(
                    "  bystander {:<13} {ns:>7.0} ns per socket call",
                    ["without vigie:", "floor:", "with vigie:"][mode]
                );
                out.ns[mode].push(ns);
            }
        }
        Ok(out)
    }

    /// What an agent costs when there is nothing to count: nginx with one keep-alive
    /// connection that made one request with a token and then stays open, the agent watching
    /// it. Its CPU time from the kernel's scheduler statistics (nanoseconds, every thread)
    /// and its context switches (each is a wakeup), over `IDLE_SECS`, after a few seconds
    /// for its start-up work to end.
    fn idle(&mut self) -> Result<Idle> {
        step(&format!(
            "Idle agent: nginx with one idle keep-alive connection (one request with a token), vigie watching; \
             its CPU time and context switches over {IDLE_SECS} s"
        ));
        self.wait_quiet()?;
        let nginx = self.start_nginx(false, 1, None)?;
        let agent = self.start_vigie(&Watch::Port(nginx.port), None)?;
        let mut conn = TcpStream::connect(("127.0.0.1", nginx.port)).context("connecting to nginx")?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(
            b"GET /_matrix/client/v3/sync HTTP/1.1\r\nHost: 127.0.0.1\r\n\
              Authorization: Bearer syt_aWRsZQ_idleIdleIdleIdleIdle_0a1b2c\r\n\r\n",
        )?;
        let mut answer = [0u8; 4096];
        let got = conn.read(&mut answer).context("reading nginx's answer")?;
        if !answer[..got].starts_with(b"HTTP/1.1 200") {
            bail!("nginx answered {:?}", String::from_utf8_lossy(&answer[..got.min(80)]));
        }
        nap(Duration::from_secs(5))?;
        let pid = agent.proc.pid();
        let (cpu0, switches0) = task_cpu_and_switches(pid);
        let t0 = Instant::now();
        nap(Duration::from_secs(IDLE_SECS))?;
        let (cpu1, switches1) = task_cpu_and_switches(pid);
        let secs = t0.elapsed().as_secs_f64();
        let counted = metric(&agent.scrape()?, "vigie_token_requests_total", &[]);
        drop(conn);
        let out = Idle {
            core_pct: (cpu1.saturating_sub(cpu0)) as f64 / 1e9 / secs * 100.0,
            wakeups_per_s: (switches1.saturating_sub(switches0)) as f64 / secs,
            counted,
        };
        println!(
            "  idle agent: {:.3} % of a core, {:.1} context switches/s over {secs:.0} s; it counted {counted:.0} request(s)",
            out.core_pct, out.wakeups_per_s
        );
        Ok(out)
    }

    fn pipeline(&mut self) -> Result<PipelineOut> {
        step("Userspace pipeline: cargo run --release -p vigie --example pipeline_bench (one core, no kernel)");
        let log = self.dir().join("pipeline.out");
        let mut cmd = self.launcher(None, "cargo");
        cmd.current_dir(root()).args([
            "run",
            "--quiet",
            "--release",
            "--locked",
            "-p",
            "vigie",
            "--example",
            "pipeline_bench",
        ]);
        let mut proc = Proc::spawn("pipeline_bench", &mut cmd, &log, SIGKILL)?;
        let status = proc.wait(Duration::from_secs(900))?;
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        if !status.success() {
            bail!("pipeline_bench failed ({status}):\n{out}");
        }
        let parse = |line: &str| -> Vec<(String, f64)> {
            line.split_whitespace()
                .skip(1)
                .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.parse().unwrap_or(f64::NAN))))
                .collect()
        };
        let mut pipeline = Vec::new();
        let mut memory = Vec::new();
        let mut hot = Vec::new();
        for line in out.lines() {
            if line.starts_with("BENCH_PIPELINE ") {
                pipeline.push(parse(line));
            } else if line.starts_with("BENCH_HOT ") {
                hot = parse(line);
            } else if line.starts_with("BENCH_MEMORY ") {
                memory.push(parse(line));
            } else if !line.contains("warning:") {
                println!("  {line}");
            }
        }
        if pipeline.is_empty() {
            bail!("pipeline_bench printed no BENCH_PIPELINE line:\n{out}");
        }
        Ok((pipeline, memory, hot))
    }
}

/// `key=value` pairs of pipeline_bench's BENCH_PIPELINE line, of each BENCH_MEMORY line and
/// of its BENCH_HOT line.
type Pairs = Vec<(String, f64)>;
type PipelineOut = (Vec<Pairs>, Vec<Pairs>, Pairs);

fn get(kv: &[(String, f64)], k: &str) -> f64 {
    kv.iter().find(|(key, _)| key == k).map_or(f64::NAN, |(_, v)| *v)
}

// ---------------------------------------------------------------------------------------------
// Entry point and report.

pub(crate) fn run(args: &[String]) -> Result<()> {
    let opts = Options::parse(args)?;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        signal(SIGINT, on_signal);
        signal(SIGTERM, on_signal);
    }
    setup()?;
    let _autogroup = Autogroup::set(opts.nice);
    let vigie_bin = match &opts.vigie_bin {
        Some(bin) => {
            step(&format!("Using the agent binary {} (not building)", bin.display()));
            bin.clone()
        }
        None => build_release()?,
    };
    let path = std::env::temp_dir().join(format!("vigie-bench.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path)?;
    let keep = opts.keep;
    let mut bench = Bench {
        opts,
        vigie_bin,
        work: WorkDir { path, keep },
        bench_dir: root().join("xtask/bench"),
        started: Instant::now(),
        seq: 0,
        quiet_waited: Duration::ZERO,
        loss_reference: None,
    };
    bench.prepare_files()?;
    let only = bench.opts.only.clone();
    let plain = if only.contains("plain") { bench.overhead(false)? } else { vec![] };
    let tls = if only.contains("tls") { bench.overhead(true)? } else { vec![] };
    let synapse = if only.contains("synapse") { bench.synapse()? } else { vec![] };
    let loss = if only.contains("loss") { Some(bench.loss()?) } else { None };
    let pipeline = if only.contains("pipeline") { Some(bench.pipeline()?) } else { None };
    let bystander = if only.contains("bystander") { Some(bench.bystander()?) } else { None };
    let idle = if only.contains("idle") { Some(bench.idle()?) } else { None };
    let mut report = report(&bench, &plain, &tls, &synapse, loss.as_ref(), pipeline.as_ref());
    if let Some(b) = &bystander {
        report.push_str(&bystander_report(b));
    }
    if let Some(i) = &idle {
        report.push_str(&idle_report(i));
    }
    println!("\n{report}");
    let path = root().join("target/bench-report.md");
    if std::fs::write(&path, &report).is_ok() {
        step(&format!("Report also written to {}", path.display()));
    }
    step(&format!("Bench done in {:.0} s", bench.started.elapsed().as_secs_f64()));
    Ok(())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kb: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let nginx = command_line(Command::new("nginx").arg("-v")).unwrap_or_default();
    let wrk = command_line(Command::new("wrk").arg("-v")).unwrap_or_default();
    let wrk = wrk.split_whitespace().nth(1).unwrap_or("?").to_string();
    let commit = command_line(Command::new("git").current_dir(root()).args(["rev-parse", "--short", "HEAD"]))
        .unwrap_or_default();
    let dirty = Command::new("git")
        .current_dir(root())
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    format!(
        "{cpus} CPUs, {:.1} GiB, Linux {}, {}, wrk {wrk}; vigie commit {commit}{}",
        mem_kb / 1024.0 / 1024.0,
        kernel.trim(),
        nginx.trim_start_matches("nginx version: "),
        if dirty { " (with uncommitted changes)" } else { "" }
    )
}

fn report(
    bench: &Bench,
    plain: &[CaseResult],
    tls: &[CaseResult],
    synapse: &[CaseResult],
    loss: Option<&Run>,
    pipeline: Option<&PipelineOut>,
) -> String {
    let o = &bench.opts;
    let mut r = String::new();
    let _ = writeln!(r, "## vigie bench: results\n");
    let _ = writeln!(r, "Machine: {}.", machine());
    if let Some(bin) = &o.vigie_bin {
        // The commit above is the tree's; the agent measured is this binary.
        let _ = writeln!(r, "Agent measured: `{}` (`--vigie-bin`, not built from this tree).", bin.display());
    }
    let _ = writeln!(
        r,
        "Load: nginx 1 worker pinned to CPU {NGINX_CPU}, wrk -t1 -c{} pinned to CPU {WRK_CPU}, vigie not pinned, all three at nice {}; {} s per run, {} runs per mode (median), without/with alternating.\n",
        o.connections, o.nice, o.duration, o.runs
    );
    if !plain.is_empty() || !tls.is_empty() || !synapse.is_empty() {
        let _ = writeln!(r, "| case | without vigie | with vigie | change | target | |");
        let _ = writeln!(r, "|---|---|---|---|---|---|");
        for c in plain.iter().chain(tls).filter(|_| true) {
            let rps0 = CaseResult::med(&c.without, |x| x.wrk.rps());
            let rps1 = CaseResult::med(&c.with, |x| x.wrk.rps());
            let p50_0 = CaseResult::med(&c.without, |x| x.wrk.p50_us);
            let p50_1 = CaseResult::med(&c.with, |x| x.wrk.p50_us);
            let p99_0 = CaseResult::med(&c.without, |x| x.wrk.p99_us);
            let p99_1 = CaseResult::med(&c.with, |x| x.wrk.p99_us);
            let loss_pct = (1.0 - rps1 / rps0) * 100.0;
            let p99_pct = (p99_1 / p99_0 - 1.0) * 100.0;
            let (rps_target, rps_ok) = if c.case.tls {
                (format!("loss <= {TLS_RPS_LOSS_MAX} %"), loss_pct <= TLS_RPS_LOSS_MAX)
            } else {
                (format!("loss <= {PLAIN_RPS_LOSS_MAX} %"), loss_pct <= PLAIN_RPS_LOSS_MAX)
            };
            let _ = writeln!(
                r,
                "| {}: requests/s | {} | {} | {:+.1} % (loss {:.1} %) | {rps_target} | {} |",
                c.case.label,
                thousands(rps0),
                thousands(rps1),
                -loss_pct,
                loss_pct,
                pass(rps_ok)
            );
            let (lat_target, lat_verdict) = if c.case.tls {
                ("none".to_string(), "")
            } else {
                (format!("p99 <= +{PLAIN_P99_INCREASE_MAX} %"), pass(p99_pct <= PLAIN_P99_INCREASE_MAX))
            };
            let _ = writeln!(
                r,
                "| {}: latency p50 / p99 | {} / {} | {} / {} | p50 {:+.1} %, p99 {:+.1} % | {lat_target} | {lat_verdict} |",
                c.case.label,
                ms(p50_0),
                ms(p99_0),
                ms(p50_1),
                ms(p99_1),
                (p50_1 / p50_0 - 1.0) * 100.0,
                p99_pct
            );
            let _ = writeln!(
                r,
                "| {}: CPU (% of a core) | nginx {:.0}, wrk {:.0} | nginx {:.0}, vigie userspace {:.0}, wrk {:.0} | | | |",
                c.case.label,
                CaseResult::med(&c.without, |x| x.nginx_cpu),
                CaseResult::med(&c.without, |x| x.wrk_cpu),
                CaseResult::med(&c.with, |x| x.nginx_cpu),
                CaseResult::med(&c.with, |x| x.vigie_cpu),
                CaseResult::med(&c.with, |x| x.wrk_cpu)
            );
            // CPU time per request does not depend on how much CPU other work left us: the
            // steadier measure of what vigie adds on a shared machine.
            let n0 = CaseResult::med(&c.without, |x| x.us_per_request(x.nginx_cpu));
            let n1 = CaseResult::med(&c.with, |x| x.us_per_request(x.nginx_cpu));
            let v1 = CaseResult::med(&c.with, |x| x.us_per_request(x.vigie_cpu));
            let w0 = CaseResult::med(&c.without, |x| x.us_per_request(x.wrk_cpu));
            let w1 = CaseResult::med(&c.with, |x| x.us_per_request(x.wrk_cpu));
            let _ = writeln!(
                r,
                "| {}: CPU µs per request | nginx {n0:.1}, wrk {w0:.1} | nginx {n1:.1} + vigie {v1:.1} = {:.1}, wrk {w1:.1} | server side {:+.0} %, wrk {:+.0} % | | |",
                c.case.label,
                n1 + v1,
                ((n1 + v1) / n0 - 1.0) * 100.0,
                (w1 / w0 - 1.0) * 100.0
            );
            let wrk_change = (w1 / w0 - 1.0) * 100.0;
            let _ = writeln!(
                r,
                "| {}: load generator (wrk) CPU µs per request | {w0:.2} | {w1:.2} | {wrk_change:+.1} % | within {WRK_CPU_CHANGE_MAX} % | {} |",
                c.case.label,
                pass(wrk_change.abs() <= WRK_CPU_CHANGE_MAX)
            );
            if !c.floor.is_empty() {
                let rps_f = CaseResult::med(&c.floor, |x| x.wrk.rps());
                let n_f = CaseResult::med(&c.floor, |x| x.us_per_request(x.nginx_cpu));
                let v_f = CaseResult::med(&c.floor, |x| x.us_per_request(x.vigie_cpu));
                let w_f = CaseResult::med(&c.floor, |x| x.us_per_request(x.wrk_cpu));
                let added_f = n_f + v_f - n0;
                let added = n1 + v1 - n0;
                let loss_f = (1.0 - rps_f / rps0) * 100.0;
                let _ = writeln!(
                    r,
                    "| {}: floor (programs that return at once, same hooks): requests/s, CPU µs per request | {}, nginx {n0:.1} | {}, nginx {n_f:.1} + agent {v_f:.1}, wrk {w_f:.1} | loss {loss_f:.1} %, server {added_f:+.2} µs | | |",
                    c.case.label,
                    thousands(rps0),
                    thousands(rps_f)
                );
                let small_plain = !c.case.tls && c.case.path == SMALL_PATH;
                let ok = added <= PLAIN_ADDED_CPU_MAX_US && added <= FLOOR_RATIO_MAX * added_f.max(0.0);
                let _ = writeln!(
                    r,
                    "| {}: added server CPU µs per request, vigie against the floor | floor {added_f:+.2} | vigie {added:+.2} | ratio {:.2} | {} | {} |",
                    c.case.label,
                    added / added_f,
                    if small_plain {
                        format!("<= +{PLAIN_ADDED_CPU_MAX_US} µs and <= {FLOOR_RATIO_MAX}× floor")
                    } else {
                        String::new()
                    },
                    if small_plain { pass(ok) } else { "" }
                );
                let _ = writeln!(
                    r,
                    "| {}: throughput loss, vigie against the floor | floor {loss_f:.1} % | vigie {loss_pct:.1} % | ratio {:.2} | | |",
                    c.case.label,
                    loss_pct / loss_f
                );
            }
            if !c.hooks.is_empty() {
                let list: Vec<String> = c.hooks.iter().map(|(n, v)| format!("{n} {v:.2}")).collect();
                let _ = writeln!(
                    r,
                    "| {}: hook runs per request (floor programs) | | {} | | | |",
                    c.case.label,
                    list.join(", ")
                );
            }
            if !c.floor_entry.is_empty() && !c.floor.is_empty() {
                let runs = |name: &str| c.hooks.iter().filter(|(n, _)| n == name).map(|(_, v)| *v).sum::<f64>();
                let server = |v: &[Run]| {
                    CaseResult::med(v, |x| x.us_per_request(x.nginx_cpu))
                        + CaseResult::med(v, |x| x.us_per_request(x.vigie_cpu))
                };
                let (entry, full) = (server(&c.floor_entry), server(&c.floor));
                let (n_entry, n_ret) = (runs("vigie_floor_up"), runs("vigie_floor_uret"));
                let _ = writeln!(
                    r,
                    "| {}: one uprobe trap, server CPU µs | | entry {:.2} µs ({n_entry:.2} per request), return {:.2} µs ({n_ret:.2} per request) | | | |",
                    c.case.label,
                    (entry - n0) / n_entry,
                    (full - entry) / n_ret
                );
            }
        }
        let all: Vec<&Run> = plain
            .iter()
            .chain(tls)
            .chain(synapse)
            .flat_map(|c| c.without.iter().chain(&c.floor).chain(&c.with))
            .collect();
        let noisy = all.iter().filter(|x| x.noisy()).count();
        let worst = all.iter().map(|x| x.foreign).fold(0.0, f64::max);
        let worst_steal = all.iter().map(|x| x.steal).fold(0.0, f64::max);
        let agents = all.iter().filter(|x| x.other_agents > 0).count();
        let (lo, hi) = all.iter().map(|x| x.loadavg).fold((f64::MAX, 0.0f64), |(a, b), l| (a.min(l), b.max(l)));
        let _ = writeln!(r, "\n1-minute load average at the start of the kept runs: {lo:.2} to {hi:.2}.");
        let _ = writeln!(
            r,
            "\nOther processes on the machine used at most {worst:.0} % of a core during a kept run, the hypervisor took at most {worst_steal:.1} % ({noisy} of {} kept runs disturbed: other processes above {NOISY_PERCENT:.0} %, steal above {NOISY_STEAL_PERCENT:.0} %, or another vigie agent attached ({agents} runs)).\n",
            all.len()
        );

        let _ = writeln!(r, "Requests counted by vigie against wrk's count (with-vigie runs):\n");
        let _ = writeln!(
            r,
            "| case | run | wrk completed | vigie counted | difference | within 0..+{} | events recv / send / close | lost |",
            o.connections
        );
        let _ = writeln!(r, "|---|---|---|---|---|---|---|---|");
        for c in plain.iter().chain(tls).chain(synapse) {
            let tolerance = if c.case.path == "/" { o.synapse_connections } else { o.connections };
            for (i, x) in c.with.iter().enumerate() {
                let diff = x.counted as i64 - x.wrk.requests as i64;
                let _ = writeln!(
                    r,
                    "| {} | {} | {} | {} | {diff:+} | {} | {} / {} / {} | {} |",
                    c.case.label,
                    i + 1,
                    thousands(x.wrk.requests as f64),
                    thousands(x.counted as f64),
                    if (0..=i64::from(tolerance) + x.wrk.errors as i64).contains(&diff) { "yes" } else { "NO" },
                    thousands(x.events[0] as f64),
                    thousands(x.events[1] as f64),
                    thousands(x.events[2] as f64),
                    x.lost
                );
            }
        }
        let _ = writeln!(
            r,
            "\nwrk counts a request when its response is complete; when the run ends, up to one request per connection has been read by nginx (and counted by vigie) without wrk counting it, hence the tolerance 0..+connections."
        );
        for c in tls {
            if let Some(x) = c.with.first() {
                let _ = writeln!(
                    r,
                    "{}: vigie recognised {} TLS connections in which the process (wrk) was the client and ignored them; their uprobe hits still cost CPU in wrk.",
                    c.case.label,
                    thousands(x.client_connections as f64)
                );
            }
        }
        let _ = writeln!(r);
    }

    if !synapse.is_empty() {
        let _ = writeln!(
            r,
            "Synapse (seeded, wrk -t1 -c{} of history pages and incremental syncs with real users' tokens; Synapse pinned to CPU {NGINX_CPU}, wrk to CPU {WRK_CPU}); CPU per request is Synapse's (its own time includes the kernel programs that run in its threads) plus the agent's:\n",
            o.synapse_connections
        );
        let _ = writeln!(r, "| case | without vigie | with vigie | ratio | target | |");
        let _ = writeln!(r, "|---|---|---|---|---|---|");
        for c in synapse {
            let rps0 = CaseResult::med(&c.without, |x| x.wrk.rps());
            let rps1 = CaseResult::med(&c.with, |x| x.wrk.rps());
            let p99_0 = CaseResult::med(&c.without, |x| x.wrk.p99_us);
            let p99_1 = CaseResult::med(&c.with, |x| x.wrk.p99_us);
            let s0 = CaseResult::med(&c.without, |x| x.us_per_request(x.nginx_cpu));
            let s1 = CaseResult::med(&c.with, |x| x.us_per_request(x.nginx_cpu));
            let v1 = CaseResult::med(&c.with, |x| x.us_per_request(x.vigie_cpu));
            let cpu_max = if c.case.tls { SYNAPSE_TLS_CPU_RATIO_MAX } else { SYNAPSE_CPU_RATIO_MAX };
            let _ = writeln!(
                r,
                "| {}: requests/s | {} | {} | {:.3} | >= {SYNAPSE_RPS_RATIO_MIN} | {} |",
                c.case.label,
                thousands(rps0),
                thousands(rps1),
                rps1 / rps0,
                if c.case.tls { "" } else { pass(rps1 / rps0 >= SYNAPSE_RPS_RATIO_MIN) }
            );
            let _ = writeln!(
                r,
                "| {}: latency p99 | {} | {} | {:.3} | <= {SYNAPSE_P99_RATIO_MAX} | {} |",
                c.case.label,
                ms(p99_0),
                ms(p99_1),
                p99_1 / p99_0,
                if c.case.tls { "" } else { pass(p99_1 / p99_0 <= SYNAPSE_P99_RATIO_MAX) }
            );
            let _ = writeln!(
                r,
                "| {}: CPU µs per request | Synapse {s0:.0} | Synapse {s1:.0} + agent {v1:.1} = {:.0} | {:.3} | <= {cpu_max} | {} |",
                c.case.label,
                s1 + v1,
                (s1 + v1) / s0,
                pass((s1 + v1) / s0 <= cpu_max)
            );
            let spread = |runs: &[Run]| {
                let v: Vec<f64> = runs.iter().map(|x| x.us_per_request(x.nginx_cpu)).collect();
                let lo = v.iter().copied().fold(f64::MAX, f64::min);
                let hi = v.iter().copied().fold(0.0, f64::max);
                format!("{lo:.0}-{hi:.0}")
            };
            let _ = writeln!(
                r,
                "| {}: Synapse CPU µs per request, range over runs | {} | {} | | | |",
                c.case.label,
                spread(&c.without),
                spread(&c.with)
            );
        }
        let _ = writeln!(r);
    }

    if let Some((runs, mem, hot)) = pipeline {
        let with_detector = |v: &[Pairs], on: bool| -> Vec<Pairs> {
            v.iter().filter(|p| (get(p, "detector") == 1.0) == on).cloned().collect()
        };
        let p = &runs[0];
        let _ = writeln!(
            r,
            "Userspace pipeline (`pipeline_bench`, one core, {} tokens, {} connections, {} records); \
             \"counting only\" holds the anomaly detector to one token:\n",
            thousands(get(p, "tokens")),
            thousands(get(p, "connections")),
            thousands(get(p, "records"))
        );
        let _ = writeln!(r, "| measure | default settings | counting only | target | |");
        let _ = writeln!(r, "|---|---|---|---|---|");
        let on = with_detector(runs, true);
        let off = with_detector(runs, false);
        let cell = |v: &[Pairs]| {
            v.first().map_or("-".into(), |p| {
                format!("{} ({} requests/s)", thousands(get(p, "records_per_s")), thousands(get(p, "requests_per_s")))
            })
        };
        let rec = on.first().map_or(f64::NAN, |p| get(p, "records_per_s"));
        let _ = writeln!(
            r,
            "| records/s | {} | {} | >= {} records/s | {} |",
            cell(&on),
            cell(&off),
            thousands(PIPELINE_RECORDS_MIN),
            pass(rec >= PIPELINE_RECORDS_MIN)
        );
        let off_mem = with_detector(mem, false);
        for m in with_detector(mem, true) {
            let b = get(&m, "bytes_per_token");
            let n = get(&m, "tokens");
            let other = off_mem.iter().find(|x| get(x, "tokens") == n);
            let _ = writeln!(
                r,
                "| memory, {} active tokens (bytes per token, RSS growth) | {:.0} B (+{:.1} MB) | {} | <= {BYTES_PER_TOKEN_MAX:.0} B/token | {} |",
                thousands(n),
                b,
                (get(&m, "rss_after") - get(&m, "rss_base")) / 1e6,
                other.map_or("-".into(), |x| format!(
                    "{:.0} B (+{:.1} MB)",
                    get(x, "bytes_per_token"),
                    (get(x, "rss_after") - get(x, "rss_base")) / 1e6
                )),
                pass(b <= BYTES_PER_TOKEN_MAX)
            );
        }
        let _ = writeln!(r);
        if !hot.is_empty() {
            let _ = writeln!(
                r,
                "Hot paths alone (one core): detector {:.0} ns a request, a detector tick rescoring \
                 10,000 active tokens {:.1} ms (its longest step, the ring waiting, {:.1} ms), \
                 endpoint classification {:.0} ns, 100,000 new connections into a full table of \
                 16,384 {:.1} ms, a rebalance of a full token table (1,000,000 tokens) {:.1} ms.\n",
                get(hot, "detector_on_request_ns"),
                get(hot, "detector_tick_10k_ms"),
                get(hot, "detector_tick_step_ms"),
                get(hot, "classify_ns"),
                get(hot, "conn_flood_ms"),
                get(hot, "rebalance_1m_ms")
            );
        }
    }

    let maps = plain.iter().chain(tls).flat_map(|c| c.with.iter()).chain(loss).find(|x| !x.maps.is_empty());
    if let Some(x) = maps {
        let total: u64 = x.maps.iter().map(|m| m.1).sum();
        let parts: Vec<String> = x.maps.iter().map(|(n, b)| format!("{n} {}", human(*b))).collect();
        let _ = writeln!(
            r,
            "Kernel maps of the agent (`bpftool map show`, bytes_memlock): {} in total: {}.",
            human(total),
            parts.join(", ")
        );
        let _ = writeln!(r, "Agent resident memory after a load run: {}.\n", human(x.vigie_rss));
    }

    if let Some(l) = loss {
        let rps = l.wrk.rps();
        let verdict = match (l.lost, rps >= NO_LOSS_BELOW_RPS) {
            (0, true) => "PASS".to_string(),
            (0, false) => format!("not verifiable: no loss, but only {} req/s reached with vigie", thousands(rps)),
            (_, true) => "PASS (loss only above 50,000 req/s)".to_string(),
            (_, false) => "MISS".to_string(),
        };
        let events: u64 = l.events.iter().sum();
        let _ = writeln!(
            r,
            "Ring-buffer loss at the highest rate (nginx 2 workers, wrk -t2 -c{}, nothing pinned, {} s):\n",
            o.loss_connections, o.duration
        );
        let _ = writeln!(
            r,
            "| requests/s without vigie (5 s) | requests/s with vigie | events received (recv / send / close) | events/s | lost | target: no loss below 50,000 req/s |"
        );
        let _ = writeln!(r, "|---|---|---|---|---|---|");
        let _ = writeln!(
            r,
            "| {} | {} | {} ({} / {} / {}) | {} | {} | {verdict} |",
            bench.loss_reference.map_or("-".into(), thousands),
            thousands(rps),
            thousands(events as f64),
            thousands(l.events[0] as f64),
            thousands(l.events[1] as f64),
            thousands(l.events[2] as f64),
            thousands(events as f64 / l.wrk.duration_s),
            l.lost
        );
        let _ = writeln!(
            r,
            "\nDuring that run: nginx {:.0} %, vigie userspace {:.0} % of a core; other processes {:.0} %{}. vigie counted {} requests, wrk completed {}. Kernel programs (kernel.bpf_stats_enabled; their time includes the ring-buffer helpers they call):\n",
            l.nginx_cpu,
            l.vigie_cpu,
            l.foreign,
            if l.other_agents > 0 {
                format!(", {} programs of other vigie agents attached", l.other_agents)
            } else {
                String::new()
            },
            thousands(l.counted as f64),
            thousands(l.wrk.requests as f64)
        );
        let _ = writeln!(r, "| program | runs | mean ns per run | % of a core |");
        let _ = writeln!(r, "|---|---|---|---|");
        let mut total_ns = 0;
        for (name, cnt, ns) in &l.progs {
            total_ns += ns;
            if *cnt > 0 {
                let _ = writeln!(
                    r,
                    "| {name} | {} | {:.0} | {:.1} |",
                    thousands(*cnt as f64),
                    *ns as f64 / *cnt as f64,
                    *ns as f64 / 1e9 / l.wrk.duration_s * 100.0
                );
            }
        }
        let _ = writeln!(r, "| all | | | {:.1} |", total_ns as f64 / 1e9 / l.wrk.duration_s * 100.0);
    }
    r
}

const BYSTANDER_TRIPS: usize = 500_000;

/// How long the idle case watches the agent.
const IDLE_SECS: u64 = 60;

/// The idle case: the agent's share of a core, its wakeups, and what it counted (the one
/// request, a check that it was watching).
struct Idle {
    core_pct: f64,
    wakeups_per_s: f64,
    counted: f64,
}

fn idle_report(i: &Idle) -> String {
    format!(
        "\nAn agent with nothing to count (nginx, one idle keep-alive connection after one request with a token; \
         CPU from /proc/PID/task/*/schedstat, {IDLE_SECS} s):\n\n\
         | measure | value | target | |\n|---|---|---|---|\n\
         | idle agent: share of a core | {:.3} % | <= 0.2 % | {} |\n\
         | idle agent: context switches (wakeups) per second | {:.1} | | |\n\
         | requests it counted (the one made) | {:.0} | 1 | {} |\n",
        i.core_pct,
        pass(i.core_pct <= 0.2),
        i.wakeups_per_s,
        i.counted,
        pass(i.counted == 1.0)
    )
}

/// CPU time (ns, from schedstat) and context switches (voluntary and not) of every thread
/// of `pid`, summed.
fn task_cpu_and_switches(pid: u32) -> (u64, u64) {
    let (mut cpu, mut switches) = (0u64, 0u64);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return (0, 0) };
    for task in tasks.flatten() {
        let dir = task.path();
        if let Some(ns) = std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        {
            cpu += ns;
        }
        if let Ok(status) = std::fs::read_to_string(dir.join("status")) {
            for line in status.lines() {
                if let Some(v) = line
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    switches += v.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    (cpu, switches)
}

/// ns per socket call in each mode (without, floor, with vigie), one figure per round.
#[derive(Default)]
struct Bystander {
    ns: [Vec<f64>; 3],
}

/// Mean time of one socket call (a 64-byte write or read) over `trips` round trips on a
/// fresh AF_UNIX socket pair, on this thread.
fn socket_call_ns(trips: usize) -> Result<f64> {
    use std::os::unix::net::UnixStream;
    let (mut a, mut b) = UnixStream::pair().context("socketpair")?;
    let mut buf = [0u8; 64];
    let t0 = Instant::now();
    for _ in 0..trips {
        a.write_all(&buf)?;
        b.read_exact(&mut buf)?;
    }
    Ok(t0.elapsed().as_nanos() as f64 / (trips * 2) as f64)
}

fn bystander_report(b: &Bystander) -> String {
    let [none, floor, with] = [0, 1, 2].map(|i| median(b.ns[i].clone()));
    let spread = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        format!("{lo:.0}-{hi:.0}")
    };
    let mut r = String::new();
    let _ = writeln!(
        r,
        "\nA task vigie does not watch (AF_UNIX ping-pong on the bench's own thread, not pinned; {} rounds per mode, median, range in brackets):\n",
        b.ns[0].len()
    );
    let _ = writeln!(
        r,
        "| | without vigie | floor (empty programs) | with vigie | added by the hooks | added by vigie's programs |"
    );
    let _ = writeln!(r, "|---|---|---|---|---|---|");
    let _ = writeln!(
        r,
        "| ns per socket call | {none:.0} ({}) | {floor:.0} ({}) | {with:.0} ({}) | {:+.0} ns ({:+.1} %) | {:+.0} ns beyond the floor |",
        spread(&b.ns[0]),
        spread(&b.ns[1]),
        spread(&b.ns[2]),
        floor - none,
        (floor - none) / none * 100.0,
        with - floor
    );
    r
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else if bytes >= 1 << 10 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} B")
    }
}
