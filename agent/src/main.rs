//! `vigie`: the command line. Thin over the library modules.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};
use zeroize::Zeroizing;

use vigie::aggregate::Limits;
use vigie::config::{FileConfig, Overrides, Settings};
use vigie::pipeline::{State, monotonic_ns};
use vigie::token::TokenKey;
use vigie::{loader, metrics, web};

#[derive(Parser)]
#[command(name = "vigie", version, about = "Per-access-token telemetry of a Matrix homeserver, from eBPF")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Watch the homeserver's sockets and serve per-token metrics.
    Run {
        /// Local TCP port the homeserver (or the proxy in front) accepts HTTP on. Repeatable.
        #[arg(long = "server-port", value_name = "PORT")]
        server_ports: Vec<u16>,
        /// Shared library or executable holding OpenSSL (SSL_read/SSL_write, exported or
        /// local): count plaintext inside TLS in every process that maps it. Repeatable.
        #[arg(long = "tls-target", value_name = "PATH")]
        tls_targets: Vec<PathBuf>,
        /// Find the OpenSSL that processes listening on this TLS port use, and attach to it;
        /// looked for again every 10 s, so servers started later are found. Repeatable.
        #[arg(long = "tls-discover-port", value_name = "PORT")]
        tls_discover_ports: Vec<u16>,
        /// Where to serve Prometheus metrics: IP:PORT or unix:/path/to/socket
        /// [default: 127.0.0.1:9464].
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<String>,
        /// Web config for the metrics endpoint (TLS, client certificates, basic auth), in the
        /// Prometheus exporter-toolkit format; re-read on SIGHUP.
        #[arg(long = "web.config.file", value_name = "FILE")]
        web_config_file: Option<PathBuf>,
        /// 32-byte secret that keys token hashing; created (mode 0600) when missing
        /// [default: /var/lib/vigie/key].
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
        /// TOML config file; flags override its settings.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Where byte counts come from: auto (sock on Linux 6.3+, else syscalls), sock, or
        /// syscalls [default: auto].
        #[arg(long, value_name = "SOURCE")]
        capture_source: Option<String>,
    },
    /// Report what this host supports, line by line; exit non-zero when vigie cannot run.
    Check {
        /// Server port to look for (repeatable); also read from --config.
        #[arg(long = "server-port", value_name = "PORT")]
        server_ports: Vec<u16>,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Only inspect; do not load and attach the programs for a trial.
        #[arg(long)]
        no_trial: bool,
        /// The capture source to check (auto, sock or syscalls) [default: auto].
        #[arg(long, value_name = "SOURCE", default_value = "auto")]
        capture_source: String,
    },
    /// Turn token labels back into user and device, from Synapse's database: every access
    /// token there is hashed with the same key. Labels come as arguments or, with none, on
    /// standard input (one per line); with `--all`, every token is listed. Tokens are never
    /// printed.
    Resolve {
        #[arg(long, value_name = "PATH")]
        key_file: PathBuf,
        /// Synapse's SQLite database (homeserver.db).
        #[arg(long, value_name = "PATH", conflicts_with = "postgres")]
        sqlite: Option<PathBuf>,
        /// PostgreSQL URL, e.g. postgresql://synapse@localhost/synapse (a password is better
        /// in PGPASSWORD or ~/.pgpass than here, where `ps` shows it).
        #[arg(long, value_name = "URL")]
        postgres: Option<String>,
        /// List every token's label, user and device.
        #[arg(long)]
        all: bool,
        labels: Vec<String>,
    },
    /// Print the label of each token read from standard input (one per line, one label per
    /// line). Tokens are never taken as arguments: they would show in `ps`.
    TokenHash {
        #[arg(long, value_name = "PATH")]
        key_file: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIGIE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run {
            server_ports,
            tls_targets,
            tls_discover_ports,
            metrics_addr,
            web_config_file,
            key_file,
            config,
            capture_source,
        } => {
            let file = match config.as_deref().map(FileConfig::load).transpose() {
                Ok(f) => f.unwrap_or_default(),
                Err(e) => return fail(e),
            };
            let flags = Overrides {
                server_ports,
                tls_targets,
                tls_discover_ports,
                metrics_addr,
                web_config_file,
                key_file,
                capture_source,
            };
            match Settings::merge(file, flags.clone()) {
                Ok(settings) => run(settings, Reload { config, flags }),
                Err(e) => Err(e),
            }
        }
        Command::TokenHash { key_file } => token_hash(&key_file),
        Command::Check { server_ports, config, no_trial, capture_source } => {
            check(server_ports, config, !no_trial, &capture_source)
        }
        Command::Resolve { key_file, sqlite, postgres, all, labels } => {
            resolve(&key_file, sqlite.as_deref(), postgres.as_deref(), all, labels)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn fail(e: anyhow::Error) -> std::process::ExitCode {
    eprintln!("vigie: error: {e:#}");
    std::process::ExitCode::FAILURE
}

fn check(mut ports: Vec<u16>, config: Option<PathBuf>, trial: bool, source: &str) -> Result<()> {
    let choice: loader::SourceChoice = source.parse()?;
    if ports.is_empty()
        && let Some(path) = config
    {
        ports = FileConfig::load(&path)?.server_ports.unwrap_or_default();
    }
    let report = vigie::preflight::check(&ports, trial, choice);
    print!("{}", report.render());
    if report.can_run() { Ok(()) } else { anyhow::bail!("preflight failed") }
}

fn resolve(
    key_file: &std::path::Path,
    sqlite: Option<&std::path::Path>,
    postgres: Option<&str>,
    all: bool,
    mut labels: Vec<String>,
) -> Result<()> {
    use vigie::resolve::{Database, resolve};
    use vigie::token::TokenLabel;
    let db = match (sqlite, postgres) {
        (Some(path), None) => Database::Sqlite(path),
        (None, Some(url)) => Database::Postgres(url),
        _ => anyhow::bail!("give Synapse's database: --sqlite PATH or --postgres URL"),
    };
    if labels.is_empty() && !all {
        labels = std::io::stdin().lines().collect::<Result<_, _>>().context("reading labels from standard input")?;
    }
    let mut wanted = std::collections::BTreeSet::new();
    for l in labels.iter().map(|l| l.trim()).filter(|l| !l.is_empty()) {
        wanted.insert(TokenLabel::parse(l).with_context(|| format!("{l:?} is not a 16-hex-character token label"))?);
    }
    if wanted.is_empty() && !all {
        anyhow::bail!("no label to resolve (give labels, or --all)");
    }
    let key = existing_key(key_file)?;
    let found = resolve(db, &key, &wanted)?;
    println!("label\tuser_id\tdevice_id\ttoken_localpart");
    for m in &found {
        println!(
            "{}\t{}\t{}\t{}",
            m.label,
            m.user_id,
            m.device_id.as_deref().unwrap_or("-"),
            m.token_localpart.as_deref().unwrap_or("-")
        );
    }
    let missing: Vec<_> = wanted.iter().filter(|l| !found.iter().any(|m| m.label == **l)).collect();
    for l in &missing {
        eprintln!("vigie: {l}: no live access token has this label (expired, logged out, or another key)");
    }
    Ok(())
}

/// The agent's key, which must already exist: a new key would give labels matching nothing.
fn existing_key(path: &std::path::Path) -> Result<TokenKey> {
    if !path.exists() {
        anyhow::bail!("no key file at {}: give the key file the agent runs with", path.display());
    }
    TokenKey::load_or_create(path)
}

fn token_hash(key_file: &std::path::Path) -> Result<()> {
    let key = existing_key(key_file)?;
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut line = Zeroizing::new(Vec::new());
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line).context("reading tokens from standard input")? == 0 {
            break;
        }
        let mut token: &[u8] = &line;
        while let [rest @ .., b'\n' | b'\r'] = token {
            token = rest;
        }
        if token.is_empty() {
            writeln!(out)?;
        } else {
            writeln!(out, "{}", key.label(token))?;
        }
    }
    out.flush()?;
    Ok(())
}

/// What SIGHUP re-reads: the config file, with the same command-line flags on top.
struct Reload {
    config: Option<PathBuf>,
    flags: Overrides,
}

impl Reload {
    fn settings(&self) -> Result<Settings> {
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Settings::merge(file, self.flags.clone())
    }
}

fn limits(settings: &Settings) -> Limits {
    Limits {
        top_k: settings.top_k,
        max_tokens: settings.max_tokens,
        idle_s: settings.token_idle_seconds as f64,
        ..Limits::default()
    }
}

fn run(settings: Settings, reload: Reload) -> Result<()> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(run_agent(settings, reload))
}

/// Apply a reloaded config: ports, TLS targets, bounds and the web config change live; the
/// metrics address and the key need a restart (a new key would change every label).
fn apply_reload(old: &Settings, new: Settings, probes: &mut loader::Probes, state: &Mutex<State>) -> Result<Settings> {
    if new.metrics_addr != old.metrics_addr || new.key_file != old.key_file {
        tracing::warn!("metrics_addr and key_file changes take effect at the next restart");
    }
    if new.max_connections != old.max_connections
        || new.connection_idle_seconds != old.connection_idle_seconds
        || new.detect != old.detect
        || new.detect_vantage != old.detect_vantage
        || new.capture_source != old.capture_source
    {
        tracing::warn!(
            "max_connections, connection_idle_seconds, capture_source and detector changes take effect at the next restart"
        );
    }
    probes.set_ports(&new.server_ports)?;
    add_server_processes(probes, &new.server_ports);
    for target in &new.tls_targets {
        probes.attach_tls(target)?;
    }
    discover_tls(probes, &new.tls_discover_ports);
    let mut st = lock(state);
    st.aggregator.set_limits(limits(&new));
    st.health.probes_attached = probes.attached;
    tracing::info!(
        ports = ?new.server_ports,
        tls_targets = new.tls_targets.len(),
        web_config = ?new.web_config_file,
        "configuration reloaded"
    );
    Ok(Settings { metrics_addr: old.metrics_addr.clone(), key_file: old.key_file.clone(), ..new })
}

async fn run_agent(mut settings: Settings, reload: Reload) -> Result<()> {
    let key = TokenKey::load_or_create(&settings.key_file)?;
    // Before loading any program: a broken web config or a busy address refuses the start.
    let web = web::WebHandle::new(web::Web::load(settings.web_config_file.as_deref(), &settings.metrics_addr)?);
    // The guard removes a Unix socket file on every way out of this function.
    let (listener, _socket_file) = web::Listener::bind(&settings.metrics_addr).await?;
    let mut probes = loader::load(&settings.server_ports, settings.capture_source)?;
    let state = Arc::new(Mutex::new(State::new(
        key,
        limits(&settings),
        settings.max_connections,
        settings.connection_idle_seconds,
        settings.detect.clone(),
        settings.detect_vantage,
    )));
    for target in &settings.tls_targets {
        probes.attach_tls(target)?;
    }
    discover_tls(&mut probes, &settings.tls_discover_ports);
    {
        let mut st = lock(&state);
        st.health.probes_attached = probes.attached;
        st.health.capture_source = probes.source.name();
    }
    let registry = Arc::new(metrics::registry(state.clone()));
    let server = tokio::spawn(web::serve(listener, web.clone(), registry));
    tracing::info!(
        ports = ?settings.server_ports,
        tls_targets = settings.tls_targets.len(),
        tls_discover_ports = ?settings.tls_discover_ports,
        metrics = %settings.metrics_addr,
        probes = probes.attached,
        capture_source = probes.source.name(),
        "vigie is watching"
    );

    // SAFETY: the ring buffer owns its fd and the AsyncFd owns the ring buffer, so the fd
    // stays open for as long as it is registered.
    let mut ring = unsafe { AsyncFd::register(probes.take_events()?) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // The kernel adds up sends per connection; receive and close records carry the total.
    // Between them (the last response on a quiet keep-alive connection, a long download) the
    // totals are read from the kernel's map.
    let mut poll_tick = tokio::time::interval(Duration::from_millis(SENT_POLL_MS));
    poll_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The kernel does not wake us per record (see vigie_common::WAKEUP_BACKLOG): drain on a timer.
    let mut drain_tick = tokio::time::interval(Duration::from_millis(vigie_common::DRAIN_INTERVAL_MS));
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut since_housekeeping = 0u32;
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                // Woken early: the kernel saw a backlog.
                let mut guard = guard.context("waiting on the ring buffer")?;
                drain(guard.get_inner_mut(), &state);
                guard.clear_ready();
                attach_forks(&mut probes, &state);
            }
            _ = drain_tick.tick() => {
                drain(ring.get_mut(), &state);
                attach_forks(&mut probes, &state);
            }
            _ = poll_tick.tick() => {
                // Records first, so that a poll never runs ahead of a receive in the ring.
                drain(ring.get_mut(), &state);
                let targets = lock(&state).poll_targets(SENT_POLL_MAX);
                let totals = probes.conn_totals(&targets);
                drain(ring.get_mut(), &state);
                lock(&state).apply_polled(&totals, monotonic_ns());
            }
            _ = tick.tick() => {
                let kernel = probes.counters();
                let mut st = lock(&state);
                st.health.kernel = kernel;
                st.tick(monotonic_ns());
                since_housekeeping += 1;
                if since_housekeeping >= 10 {
                    since_housekeeping = 0;
                    st.housekeeping(monotonic_ns());
                    drop(st);
                    discover_tls(&mut probes, &settings.tls_discover_ports);
                    add_server_processes(&mut probes, &settings.server_ports);
                    lock(&state).health.probes_attached = probes.attached;
                }
            }
            _ = sighup.recv() => {
                // A bad new config (the web config included) is logged and ignored: the agent
                // keeps running as it was.
                let reloaded = reload.settings().and_then(|new| {
                    let new_web = web::Web::load(new.web_config_file.as_deref(), &settings.metrics_addr)?;
                    let new = apply_reload(&settings, new, &mut probes, &state)?;
                    web.replace(new_web);
                    Ok(new)
                });
                match reloaded {
                    Ok(new) => settings = new,
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "configuration not reloaded"),
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        if server.is_finished() {
            break;
        }
    }
    if server.is_finished() {
        return match server.await {
            Ok(Err(e)) => Err(e.context("metrics server stopped")),
            _ => Err(anyhow::anyhow!("metrics server stopped")),
        };
    }
    server.abort();
    drop(ring);
    drop(probes);
    tracing::info!("detached, exiting");
    Ok(())
}

/// Attach to the OpenSSL of whatever listens on the discovery ports, in those processes only.
/// Failures are logged, not fatal: the server may not be up yet.
fn discover_tls(probes: &mut loader::Probes, ports: &[u16]) {
    let detached = probes.prune_exited_processes();
    if detached > 0 {
        tracing::info!(probes = detached, "detached the TLS probes of server processes that exited");
    }
    for &port in ports {
        match vigie::tls::discover(port) {
            Ok(paths) if paths.is_empty() => {
                tracing::warn!(port, "no OpenSSL found in the processes listening on this port")
            }
            Ok(paths) => {
                for (pid, path) in paths {
                    if let Err(e) = probes.attach_tls_process(&path, pid) {
                        tracing::warn!(port, error = %format!("{e:#}"), "could not attach to a discovered TLS library");
                    }
                }
            }
            Err(e) => tracing::debug!(port, error = %format!("{e:#}"), "TLS discovery"),
        }
    }
}

/// How often, and for how many connections at most, the kernel's running send totals are read.
const SENT_POLL_MS: u64 = 250;
const SENT_POLL_MAX: usize = 4096;

/// Give TLS server processes that forked the probes of their parent.
fn attach_forks(probes: &mut loader::Probes, state: &Mutex<State>) {
    let forks = lock(state).take_forks();
    if forks.is_empty() {
        return;
    }
    for (parent, child) in forks {
        probes.on_fork(parent, child);
    }
    lock(state).health.probes_attached = probes.attached;
}

/// Refresh the kernel's list of server processes from /proc (see `Probes::add_server_processes`).
fn add_server_processes(probes: &mut loader::Probes, ports: &[u16]) {
    if let Err(e) = probes.add_server_processes(ports) {
        tracing::warn!(error = %format!("{e:#}"), "could not update the list of server processes");
    }
}

/// Account every record waiting in the ring buffer.
fn drain(ring: &mut aya::maps::RingBuf<aya::maps::MapData>, state: &Mutex<State>) {
    let mut st = lock(state);
    while let Some(record) = ring.next() {
        st.handle_record(&record);
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}
