//! `vigie`: the command line. It parses arguments and calls the library: the agent's life
//! cycle is [`vigie::agent`], the rest one module per command.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use zeroize::Zeroizing;

use vigie::capture::{loader, preflight};
use vigie::config::{DEFAULT_KEY_FILE, FileConfig, Overrides};
use vigie::token::TokenKey;

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
        /// TOML config file; flags override its settings.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        flags: Overrides,
    },
    /// Report what this host supports, line by line; exit non-zero when vigie cannot run.
    Check {
        /// Server port to look for (repeatable); also read from --config.
        #[arg(long = "server-port", value_name = "PORT")]
        server_ports: Vec<u16>,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The key file whose fingerprint to show (never created here); also read from
        /// --config [default: /var/lib/vigie/key].
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
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
    /// Act on a flagged session through the running agent (its `[respond]` must be on): log
    /// the device behind LABEL out, or with `--lock` lock its account. Audited like the
    /// agent's own decisions; in dry-run, reports what it would do.
    Respond {
        /// The token label (16 hex characters), as in the alert.
        label: String,
        /// Lock the account (every session gets 401 M_USER_LOCKED) instead of logging out
        /// the one device.
        #[arg(long)]
        lock: bool,
        /// The agent's control socket [default: respond.control_socket of --config, else
        /// /var/lib/vigie/control.sock].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
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
        Command::Run { config, flags } => vigie::agent::run(config, flags),
        Command::TokenHash { key_file } => token_hash(&key_file),
        Command::Check { server_ports, config, key_file, no_trial, capture_source } => {
            check(server_ports, config, key_file, !no_trial, &capture_source)
        }
        Command::Respond { label, lock, socket, config } => respond(&label, lock, socket, config),
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

fn check(
    mut ports: Vec<u16>,
    config: Option<PathBuf>,
    key_file: Option<PathBuf>,
    trial: bool,
    source: &str,
) -> Result<()> {
    let choice: loader::SourceChoice = source.parse()?;
    let file = config.map(|path| FileConfig::load(&path)).transpose()?.unwrap_or_default();
    if ports.is_empty() {
        ports = file.server_ports.unwrap_or_default();
    }
    let key_file = key_file.or(file.key_file).unwrap_or_else(|| DEFAULT_KEY_FILE.into());
    let report = preflight::check(&ports, &key_file, trial, choice);
    print!("{}", report.render());
    if report.can_run() { Ok(()) } else { anyhow::bail!("preflight failed") }
}

fn respond(label: &str, lock: bool, socket: Option<PathBuf>, config: Option<PathBuf>) -> Result<()> {
    let socket = match (socket, config) {
        (Some(s), _) => s,
        (None, Some(path)) => {
            let file = FileConfig::load(&path)?;
            let key = file.key_file.clone().unwrap_or_else(|| vigie::config::DEFAULT_KEY_FILE.into());
            let dir = key.parent().unwrap_or(std::path::Path::new(".")).to_path_buf();
            vigie::respond::RespondSettings::from_file(file.respond, &dir)?.control_socket
        }
        (None, None) => std::path::Path::new(vigie::config::DEFAULT_KEY_FILE)
            .with_file_name(vigie::respond::config::DEFAULT_CONTROL_SOCKET),
    };
    let r = vigie::respond::control::request(&socket, label, lock)?;
    println!(
        "{label}: {} {} (user {}, device {}){}",
        r.action,
        r.result,
        r.user.as_deref().unwrap_or("-"),
        r.device.as_deref().unwrap_or("-"),
        r.detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
    );
    match r.result.as_str() {
        "acted" | "would_act" | "skipped_done" => Ok(()),
        other => anyhow::bail!("no action taken ({other})"),
    }
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
