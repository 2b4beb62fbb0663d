//! Settings: a TOML file, overridden by command-line flags.
//!
//! Unknown keys are refused so that a typo does not silently fall back to a default.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::web::MetricsAddr;

pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";
pub const DEFAULT_KEY_FILE: &str = "/var/lib/vigie/key";

/// The config file, every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub server_ports: Option<Vec<u16>>,
    pub tls_targets: Option<Vec<PathBuf>>,
    pub tls_discover_ports: Option<Vec<u16>>,
    /// `IP:PORT` or `unix:/path/to/socket`.
    pub metrics_addr: Option<String>,
    /// exporter-toolkit web config (TLS, basic auth) for the metrics endpoint; see `web`.
    pub web_config_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub top_k: Option<usize>,
    pub max_series: Option<usize>,
    pub max_tokens: Option<usize>,
    pub max_connections: Option<usize>,
    pub token_idle_seconds: Option<u64>,
    pub connection_idle_seconds: Option<u64>,
    /// Which vantage point feeds the detector: "socket", "tls", or "auto" (socket when
    /// server ports are watched, else tls).
    pub detect_vantage: Option<String>,
    /// Where byte counts come from: "auto" (the socket tracepoints of Linux 6.3+, else the
    /// syscall tracepoints), "sock" or "syscalls".
    pub capture_source: Option<String>,
    /// Detector thresholds (docs/detection.md); every key optional.
    pub detect: Option<crate::detect::DetectConfig>,
    /// Ending flagged sessions (docs/respond.md); off unless configured.
    pub respond: Option<crate::respond::RespondFile>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in config file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        Ok(toml::from_str(text)?)
    }
}

/// Settings the agent runs with, after merging file and flags and checking them.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server_ports: Vec<u16>,
    pub tls_targets: Vec<PathBuf>,
    pub tls_discover_ports: Vec<u16>,
    pub metrics_addr: MetricsAddr,
    pub web_config_file: Option<PathBuf>,
    pub key_file: PathBuf,
    pub top_k: usize,
    pub max_series: usize,
    pub max_tokens: usize,
    pub max_connections: usize,
    pub token_idle_seconds: u64,
    pub connection_idle_seconds: u64,
    pub detect_vantage: crate::vocab::Vantage,
    pub detect: crate::detect::DetectConfig,
    pub capture_source: crate::capture::loader::SourceChoice,
    pub respond: crate::respond::RespondSettings,
}

/// What the command line can override: clap fills it straight from `vigie run`'s flags, and
/// SIGHUP lays the same flags again over the re-read file.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Local TCP port the homeserver (or the proxy in front) accepts HTTP on. Repeatable.
    #[arg(long = "server-port", value_name = "PORT")]
    pub server_ports: Vec<u16>,
    /// Shared library or executable holding OpenSSL (SSL_read/SSL_write, exported or
    /// local): count plaintext inside TLS in every process that maps it. Repeatable.
    #[arg(long = "tls-target", value_name = "PATH")]
    pub tls_targets: Vec<PathBuf>,
    /// Find the OpenSSL that processes listening on this TLS port use, and attach to it;
    /// looked for again every 10 s, so servers started later are found. Repeatable.
    #[arg(long = "tls-discover-port", value_name = "PORT")]
    pub tls_discover_ports: Vec<u16>,
    /// Where to serve Prometheus metrics: IP:PORT or unix:/path/to/socket
    /// [default: 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// Web config for the metrics endpoint (TLS, client certificates, basic auth), in the
    /// Prometheus exporter-toolkit format; re-read on SIGHUP.
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub web_config_file: Option<PathBuf>,
    /// 32-byte secret that keys token hashing; created (mode 0600) when missing
    /// [default: /var/lib/vigie/key].
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// Where byte counts come from: auto (sock on Linux 6.3+, else syscalls), sock, or
    /// syscalls [default: auto].
    #[arg(long, value_name = "SOURCE")]
    pub capture_source: Option<String>,
}

impl Settings {
    pub fn merge(file: FileConfig, flags: Overrides) -> Result<Self> {
        fn pick<T>(flag: Vec<T>, file: Option<Vec<T>>) -> Vec<T> {
            if flag.is_empty() { file.unwrap_or_default() } else { flag }
        }
        let server_ports = pick(flags.server_ports, file.server_ports);
        let tls_targets = pick(flags.tls_targets, file.tls_targets);
        let tls_discover_ports = pick(flags.tls_discover_ports, file.tls_discover_ports);
        if server_ports.is_empty() && tls_targets.is_empty() && tls_discover_ports.is_empty() {
            bail!(
                "nothing to watch: give --server-port PORT (plaintext HTTP), --tls-target PATH or --tls-discover-port PORT, or the same in the config file"
            );
        }
        if server_ports.contains(&0) {
            bail!("server port 0 is not a port");
        }
        if server_ports.len() > vigie_common::MAX_WATCHED_PORTS as usize {
            bail!("at most {} server ports can be watched", vigie_common::MAX_WATCHED_PORTS);
        }
        let addr = flags.metrics_addr.or(file.metrics_addr).unwrap_or_else(|| DEFAULT_METRICS_ADDR.into());
        let metrics_addr: MetricsAddr = addr.parse()?;
        let positive =
            |name: &str, v: usize| -> Result<usize> { if v == 0 { bail!("{name} must be at least 1") } else { Ok(v) } };
        let at_least = |name: &str, v: usize, min: usize| -> Result<usize> {
            if v <= min {
                bail!("{name} must be more than {min} (the series the agent exports whatever the tokens)")
            } else {
                Ok(v)
            }
        };
        use crate::vocab::Vantage;
        let detect_vantage = match file.detect_vantage.as_deref().unwrap_or("auto") {
            "socket" => Vantage::Socket,
            "tls" => Vantage::Tls,
            "auto" if server_ports.is_empty() => Vantage::Tls,
            "auto" => Vantage::Socket,
            other => bail!("detect_vantage must be \"socket\", \"tls\" or \"auto\", not {other:?}"),
        };
        let capture_source =
            flags.capture_source.or(file.capture_source).map(|s| s.parse()).transpose()?.unwrap_or_default();
        let key_file: PathBuf = flags.key_file.or(file.key_file).unwrap_or_else(|| DEFAULT_KEY_FILE.into());
        let state_dir = key_file.parent().unwrap_or(Path::new(".")).to_path_buf();
        let respond = crate::respond::RespondSettings::from_file(file.respond, &state_dir)?;
        Ok(Settings {
            respond,
            capture_source,
            detect_vantage,
            detect: file.detect.unwrap_or_default(),
            server_ports,
            tls_targets,
            tls_discover_ports,
            metrics_addr,
            web_config_file: flags.web_config_file.or(file.web_config_file),
            key_file,
            top_k: positive("top_k", file.top_k.unwrap_or(500))?,
            max_series: at_least(
                "max_series",
                file.max_series.unwrap_or(crate::aggregate::DEFAULT_MAX_SERIES),
                crate::aggregate::SERIES_RESERVE,
            )?,
            max_tokens: positive("max_tokens", file.max_tokens.unwrap_or(1_000_000))?,
            max_connections: positive("max_connections", file.max_connections.unwrap_or(65_536))?,
            token_idle_seconds: positive("token_idle_seconds", file.token_idle_seconds.unwrap_or(3600) as usize)?
                as u64,
            connection_idle_seconds: positive(
                "connection_idle_seconds",
                file.connection_idle_seconds.unwrap_or(900) as usize,
            )? as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let file = FileConfig::parse("server_ports = [8008]\nmetrics_addr = \"127.0.0.1:1\"\n").unwrap();
        let s = Settings::merge(file, Overrides { server_ports: vec![9000], ..Default::default() }).unwrap();
        assert_eq!(s.server_ports, vec![9000]);
        assert_eq!(s.metrics_addr, MetricsAddr::Tcp("127.0.0.1:1".parse().unwrap()));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = FileConfig::parse("server_port = 8008\n").unwrap_err();
        assert!(format!("{err:#}").contains("server_port"), "{err:#}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(FileConfig::parse("\u{0}\u{ff}[[[").is_err());
        assert!(FileConfig::parse("server_ports = [70000]").is_err());
    }

    #[test]
    fn the_detector_learns_from_one_vantage_point() {
        use crate::vocab::Vantage;
        let ports = Overrides { server_ports: vec![8008], ..Default::default() };
        let s = Settings::merge(FileConfig::default(), ports.clone()).unwrap();
        assert_eq!(s.detect_vantage, Vantage::Socket);
        let tls = Overrides { tls_targets: vec!["/lib/libssl.so.3".into()], ..Default::default() };
        assert_eq!(Settings::merge(FileConfig::default(), tls).unwrap().detect_vantage, Vantage::Tls);
        let file = FileConfig::parse("detect_vantage = \"tls\"\n[detect]\n").unwrap();
        assert_eq!(Settings::merge(file, ports.clone()).unwrap().detect_vantage, Vantage::Tls);
        let bad = FileConfig::parse("detect_vantage = \"both\"").unwrap();
        assert!(Settings::merge(bad, ports).is_err());
    }

    #[test]
    fn a_port_is_required() {
        let err = Settings::merge(FileConfig::default(), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("--server-port"));
        assert!(err.to_string().contains("--tls-target"));
    }

    #[test]
    fn a_bad_metrics_address_is_named() {
        let flags = Overrides { server_ports: vec![1], metrics_addr: Some("nowhere".into()), ..Default::default() };
        let err = Settings::merge(FileConfig::default(), flags).unwrap_err();
        assert!(err.to_string().contains("nowhere"));
    }

    #[test]
    fn the_metrics_address_may_be_a_unix_socket() {
        let file = FileConfig::parse(
            "metrics_addr = \"unix:/run/vigie/metrics.sock\"\nweb_config_file = \"/etc/vigie/web.yml\"\n",
        )
        .unwrap();
        let s = Settings::merge(file, Overrides { server_ports: vec![1], ..Default::default() }).unwrap();
        assert_eq!(s.metrics_addr, MetricsAddr::Unix("/run/vigie/metrics.sock".into()));
        assert_eq!(s.metrics_addr.to_string(), "unix:/run/vigie/metrics.sock");
        assert_eq!(s.web_config_file.as_deref(), Some(Path::new("/etc/vigie/web.yml")));
        let flags =
            Overrides { server_ports: vec![1], metrics_addr: Some("unix:relative.sock".into()), ..Default::default() };
        let err = Settings::merge(FileConfig::default(), flags).unwrap_err();
        assert!(err.to_string().contains("absolute"), "{err:#}");
    }
}
