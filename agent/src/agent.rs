//! The agent's life cycle: load the programs, drain the ring buffer into the pipeline, serve
//! `/metrics`, follow forks and TLS servers, re-read the config on SIGHUP, detach on SIGTERM.
//!
//! `main.rs` only parses the command line and calls [`run`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::aggregate::Limits;
use crate::capture::loader;
use crate::config::{FileConfig, Overrides, Settings};
use crate::pipeline::{State, monotonic_ns};
use crate::token::TokenKey;
use crate::{metrics, web};

/// Run the agent until SIGTERM or SIGINT: the config file (if any) with the command-line
/// flags on top; SIGHUP re-reads the file and lays the same flags over it again.
pub fn run(config: Option<PathBuf>, flags: Overrides) -> Result<()> {
    let reload = Reload { config, flags };
    let settings = reload.settings()?;
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(run_agent(settings, reload))
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
        max_series: settings.max_series,
        ..Limits::default()
    }
}

/// Apply a reloaded config: ports, TLS targets, bounds and the web config change live; the
/// metrics address and the key need a restart (a new key would change every label).
fn apply_reload(old: &Settings, new: Settings, probes: &mut loader::Probes, state: &Mutex<State>) -> Result<Settings> {
    if new.metrics_addr != old.metrics_addr || new.key_file != old.key_file {
        tracing::warn!("metrics_addr and key_file changes take effect at the next restart");
    }
    if new.max_connections != old.max_connections
        || new.connection_idle_seconds != old.connection_idle_seconds
        || new.respond != old.respond
        || new.detect != old.detect
        || new.detect_vantage != old.detect_vantage
        || new.capture_source != old.capture_source
    {
        tracing::warn!(
            "max_connections, connection_idle_seconds, capture_source, detector and respond changes take effect at the next restart"
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
    if settings.respond.mode != crate::respond::Mode::Off {
        // Before anything is loaded: an admin token others can read refuses the start.
        crate::respond::config::load_admin_token(&settings.respond.admin_token_file)?;
    }
    // Before loading any program: a broken web config or a busy address refuses the start.
    let web = web::WebHandle::new(web::Web::load(settings.web_config_file.as_deref(), &settings.metrics_addr)?);
    // The guard removes a Unix socket file on every way out of this function.
    let (listener, _socket_file) = web::Listener::bind(&settings.metrics_addr).await?;
    let mut probes = loader::load(&settings.server_ports, settings.capture_source, settings.kernel_log)?;
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
        st.health.capture_source = if probes.floor { "floor" } else { probes.source.name() };
        st.health.program_misses = probes.program_misses();
    }
    // Before the first record: a bad [respond] (admin token file readable by others...)
    // refuses the start.
    let mut respond = crate::respond::Responder::start(&settings.respond, state.clone())?;
    let mut registry = metrics::registry(state.clone());
    if let Some(r) = &respond {
        r.register(&mut registry, state.clone());
    }
    let registry = Arc::new(registry);
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
    // Off (the default), no logger exists and this branch of the loop never fires.
    let mut kernel_log = match probes.take_kernel_log() {
        // SAFETY: the logger owns the log ring's fd and the AsyncFd owns the logger.
        Some(logger) => Some(unsafe { AsyncFd::register(logger) }.context("polling the kernel log ring")?),
        None => None,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // The kernel adds up sends per connection; receive and close records carry the total.
    // Between them (the last response on a quiet keep-alive connection, a long download) the
    // totals are read from the kernel's map.
    let mut poll_tick = tokio::time::interval(Duration::from_millis(SENT_POLL_MS));
    poll_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // While records flow fast the kernel does not wake us per record (see
    // vigie_common::WAKEUP_BACKLOG): we are awake and drain on a timer. A drain that finds
    // nothing puts us to sleep; asleep, a record wakes us (the kernel's map starts at asleep).
    let mut drain_tick = tokio::time::interval(Duration::from_millis(vigie_common::DRAIN_INTERVAL_MS));
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut awake = false;
    let mut last_wake = std::time::Instant::now();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut since_housekeeping = 0u32;
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                // Woken early: the kernel saw a backlog.
                let mut guard = guard.context("waiting on the ring buffer")?;
                guard.clear_ready();
                let n = drain(guard.get_inner_mut(), &state);
                // A few records a second are cheapest woken one by one; once they come faster
                // than the drain timer would read them, the timer is cheaper than the wakeups.
                let now = std::time::Instant::now();
                let busy = n > 1 || now.duration_since(last_wake) < Duration::from_millis(vigie_common::DRAIN_INTERVAL_MS);
                last_wake = now;
                if !awake && busy {
                    set_awake(&mut probes, true);
                    awake = true;
                    drain_tick.reset();
                }
                attach_forks(&mut probes, &state);
                // Asleep, records come one wakeup at a time and no drain timer runs: a slow
                // scrape's crossing and its captured token are handled here.
                if let Some(r) = &mut respond {
                    r.after_drain(&mut lock(&state), monotonic_ns());
                }
            }
            guard = async { kernel_log.as_mut()?.readable_mut().await.ok() }, if kernel_log.is_some() => {
                if let Some(mut guard) = guard {
                    guard.clear_ready();
                    guard.get_inner_mut().flush();
                }
            }
            _ = drain_tick.tick(), if awake => {
                if drain(ring.get_mut(), &state) == 0 {
                    set_awake(&mut probes, false);
                    awake = false;
                    // Records queued before the kernel saw the change woke nobody: read them.
                    drain(ring.get_mut(), &state);
                }
                attach_forks(&mut probes, &state);
                if let Some(r) = &mut respond {
                    r.after_drain(&mut lock(&state), monotonic_ns());
                }
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
                // A record queued without a wakeup in the instant we went to sleep waits at
                // most until here (or the send-total poll, whichever comes first).
                drain(ring.get_mut(), &state);
                let kernel = probes.counters();
                let misses = probes.program_misses();
                lock(&state).begin_tick(monotonic_ns());
                // The ring fills while a step holds the state: drain it between steps.
                while !lock(&state).tick_step(crate::pipeline::TICK_STEP_TOKENS) {
                    drain(ring.get_mut(), &state);
                }
                let mut st = lock(&state);
                st.health.kernel = kernel;
                st.health.program_misses = misses;
                if let Some(r) = &mut respond {
                    r.tick(&mut st, monotonic_ns());
                    r.after_drain(&mut st, monotonic_ns());
                }
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
    drop(kernel_log);
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
        match crate::capture::tls::discover(port) {
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

/// Account every record waiting in the ring buffer; returns how many there were.
fn drain(ring: &mut aya::maps::RingBuf<aya::maps::MapData>, state: &Mutex<State>) -> usize {
    let mut st = lock(state);
    let mut n = 0;
    while let Some(record) = ring.next() {
        st.handle_record(&record);
        n += 1;
    }
    n
}

/// A failure here only costs wakeups (asleep: one per record; awake: none but the timer's).
fn set_awake(probes: &mut loader::Probes, awake: bool) {
    if let Err(e) = probes.set_awake(awake) {
        tracing::warn!(error = %format!("{e:#}"), "could not tell the kernel whether the agent is awake");
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}
