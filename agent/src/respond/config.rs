//! The `[respond]` table: what the agent may do to a flagged session, and through what.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use zeroize::Zeroizing;

/// `[respond]` as written, every key optional.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RespondFile {
    /// Where the agent reaches the homeserver's client and admin API (http:// or https://).
    pub homeserver_url: Option<String>,
    /// A file holding a Synapse admin's access token, mode 0600 or stricter.
    pub admin_token_file: Option<PathBuf>,
    /// "off" (default), "dry-run" or "enforce".
    pub mode: Option<String>,
    /// Act on flagged sessions without an operator (default true); false leaves only
    /// `vigie respond`.
    pub automatic: Option<bool>,
    /// Score at or above which a session is acted on (default 1.0, the alert threshold).
    pub score: Option<f64>,
    /// When given, only sessions flagged for at least one of these reasons are acted on.
    pub reasons: Option<Vec<String>>,
    /// Users never acted on: exact Matrix IDs, or patterns with `*` (appservice namespaces
    /// such as "@irc_*:example.org").
    pub allow_users: Option<Vec<String>>,
    /// Most actions (would-be actions in dry-run) in any hour; beyond, refused and counted.
    pub max_actions_per_hour: Option<u32>,
    /// Lock the account when the same user is flagged again within `repeat_window_seconds`
    /// of a device logout (default true).
    pub lock_on_repeat: Option<bool>,
    pub repeat_window_seconds: Option<u64>,
    /// Append-only JSON lines, one per decision (default: `respond-audit.jsonl` next to the
    /// key file).
    pub audit_file: Option<PathBuf>,
    /// Unix socket `vigie respond` talks to (default: `control.sock` next to the key file).
    pub control_socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Off,
    DryRun,
    Enforce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::DryRun => "dry-run",
            Mode::Enforce => "enforce",
        }
    }
}

/// The validated `[respond]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RespondSettings {
    pub mode: Mode,
    pub homeserver_url: String,
    pub admin_token_file: PathBuf,
    pub automatic: bool,
    pub score: f64,
    pub reasons: Vec<String>,
    pub allow_users: Vec<String>,
    pub max_actions_per_hour: u32,
    pub lock_on_repeat: bool,
    pub repeat_window_s: u64,
    pub audit_file: PathBuf,
    pub control_socket: PathBuf,
}

pub const DEFAULT_AUDIT_FILE: &str = "respond-audit.jsonl";
pub const DEFAULT_CONTROL_SOCKET: &str = "control.sock";

impl RespondSettings {
    /// Check the table; `state_dir` (the key file's directory) holds the defaults.
    pub fn from_file(file: Option<RespondFile>, state_dir: &Path) -> Result<Self> {
        let f = file.unwrap_or_default();
        let mode = match f.mode.as_deref().unwrap_or("off") {
            "off" => Mode::Off,
            "dry-run" => Mode::DryRun,
            "enforce" => Mode::Enforce,
            other => bail!("respond.mode must be \"off\", \"dry-run\" or \"enforce\", not {other:?}"),
        };
        let homeserver_url = f.homeserver_url.unwrap_or_default().trim_end_matches('/').to_string();
        if mode != Mode::Off || !homeserver_url.is_empty() {
            if homeserver_url.is_empty() {
                bail!("respond.mode = {:?} needs respond.homeserver_url", mode.as_str());
            }
            if !(homeserver_url.starts_with("http://") || homeserver_url.starts_with("https://")) {
                bail!("respond.homeserver_url must start with http:// or https://, not {homeserver_url:?}");
            }
        }
        let admin_token_file = f.admin_token_file.unwrap_or_default();
        if mode != Mode::Off && admin_token_file.as_os_str().is_empty() {
            bail!("respond.mode = {:?} needs respond.admin_token_file", mode.as_str());
        }
        let score = f.score.unwrap_or(1.0);
        if !score.is_finite() || score <= 0.0 {
            bail!("respond.score must be a positive number, not {score}");
        }
        let reasons = f.reasons.unwrap_or_default();
        for r in &reasons {
            if !crate::detect::Reason::ALL.iter().any(|k| k.as_str() == r) {
                let known: Vec<_> = crate::detect::Reason::ALL.iter().map(|k| k.as_str()).collect();
                bail!("respond.reasons: {r:?} is not a detector reason (known: {})", known.join(", "));
            }
        }
        let allow_users = f.allow_users.unwrap_or_default();
        for u in &allow_users {
            if !u.starts_with('@') || !u.contains(':') {
                bail!("respond.allow_users: {u:?} is not a Matrix user ID or pattern (\"@name:server\", `*` allowed)");
            }
        }
        let max_actions_per_hour = f.max_actions_per_hour.unwrap_or(20);
        if max_actions_per_hour == 0 {
            bail!("respond.max_actions_per_hour must be at least 1 (use mode = \"off\" to act on nothing)");
        }
        let repeat_window_s = f.repeat_window_seconds.unwrap_or(3600);
        Ok(RespondSettings {
            mode,
            homeserver_url,
            admin_token_file,
            automatic: f.automatic.unwrap_or(true),
            score,
            reasons,
            allow_users,
            max_actions_per_hour,
            lock_on_repeat: f.lock_on_repeat.unwrap_or(true),
            repeat_window_s,
            audit_file: f.audit_file.unwrap_or_else(|| state_dir.join(DEFAULT_AUDIT_FILE)),
            control_socket: f.control_socket.unwrap_or_else(|| state_dir.join(DEFAULT_CONTROL_SOCKET)),
        })
    }
}

/// Longest admin token file read: an access token is a few dozen bytes.
const MAX_TOKEN_FILE: usize = 4096;

/// Read the admin token file: a regular file, mode 0600 or stricter (a token others can read
/// may already have leaked, and it can lock every account). Errors never show its content.
pub fn load_admin_token(path: &Path) -> Result<Zeroizing<String>> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("opening admin token file {}", path.display()))?;
    let meta = file.metadata().with_context(|| format!("reading metadata of admin token file {}", path.display()))?;
    if !meta.is_file() {
        bail!("admin token file {} is not a regular file", path.display());
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "admin token file {} is accessible to group or others (mode {mode:04o}); \
             restrict it with `chmod 600` and consider the token leaked",
            path.display()
        );
    }
    if meta.len() > MAX_TOKEN_FILE as u64 {
        bail!("admin token file {} is {} bytes long: not an access token", path.display(), meta.len());
    }
    // Room for one byte more than a token file may hold, and never more read: a file that
    // grew since the size check cannot make the buffer reallocate, which would leave a copy
    // of the token in freed memory that Zeroizing never sees.
    let mut raw = Zeroizing::new(Vec::with_capacity(MAX_TOKEN_FILE + 1));
    (&mut file)
        .take(MAX_TOKEN_FILE as u64 + 1)
        .read_to_end(&mut raw)
        .with_context(|| format!("reading admin token file {}", path.display()))?;
    if raw.len() > MAX_TOKEN_FILE {
        bail!("admin token file {} grew past {MAX_TOKEN_FILE} bytes while read: not an access token", path.display());
    }
    let trimmed = raw.trim_ascii();
    if trimmed.is_empty() {
        bail!("admin token file {} is empty", path.display());
    }
    if !trimmed.iter().all(|b| b.is_ascii_graphic()) {
        bail!("admin token file {} holds more than one printable word: not an access token", path.display());
    }
    let mut token = Zeroizing::new(String::with_capacity(trimmed.len()));
    token.extend(trimmed.iter().map(|&b| char::from(b)));
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn parse(text: &str) -> Result<RespondSettings> {
        let f: RespondFile = toml::from_str(text)?;
        RespondSettings::from_file(Some(f), Path::new("/var/lib/vigie"))
    }

    #[test]
    fn off_by_default_with_defaults_in_the_state_directory() {
        let s = RespondSettings::from_file(None, Path::new("/var/lib/vigie")).unwrap();
        assert_eq!(s.mode, Mode::Off);
        assert_eq!(s.score, 1.0);
        assert_eq!(s.audit_file, Path::new("/var/lib/vigie/respond-audit.jsonl"));
        assert_eq!(s.control_socket, Path::new("/var/lib/vigie/control.sock"));
    }

    #[test]
    fn enforce_needs_a_url_and_a_token_file() {
        let e = parse("mode = \"enforce\"").unwrap_err();
        assert!(format!("{e:#}").contains("homeserver_url"), "{e:#}");
        let e = parse("mode = \"enforce\"\nhomeserver_url = \"http://127.0.0.1:8008\"").unwrap_err();
        assert!(format!("{e:#}").contains("admin_token_file"), "{e:#}");
        let s = parse("mode = \"dry-run\"\nhomeserver_url = \"https://hs/\"\nadmin_token_file = \"/etc/t\"").unwrap();
        assert_eq!(s.mode, Mode::DryRun);
        assert_eq!(s.homeserver_url, "https://hs");
    }

    #[test]
    fn bad_values_and_unknown_keys_are_refused_by_name() {
        for (text, word) in [
            ("mode = \"on\"", "respond.mode"),
            ("mode = \"off\"\nhomeserver_url = \"ftp://x\"", "http://"),
            ("score = -1.0", "respond.score"),
            ("reasons = [\"vibes\"]", "vibes"),
            ("allow_users = [\"bot\"]", "allow_users"),
            ("max_actions_per_hour = 0", "max_actions_per_hour"),
            ("admin_token = \"x\"", "admin_token"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(format!("{e:#}").contains(word), "{text}: {e:#}");
        }
    }

    #[test]
    fn the_admin_token_file_must_be_private_and_its_content_never_shown() {
        let dir = std::env::temp_dir().join(format!("vigie-respond-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin");
        std::fs::write(&path, "syt_admin_secret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!("{:#}", load_admin_token(&path).unwrap_err());
        assert!(e.contains("0644") && !e.contains("syt_admin_secret"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(&*load_admin_token(&path).unwrap(), "syt_admin_secret");
        std::fs::write(&path, "two words\n").unwrap();
        let e = format!("{:#}", load_admin_token(&path).unwrap_err());
        assert!(!e.contains("words"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
