//! Serving `/metrics`: where (TCP or a Unix socket), how (plain HTTP or TLS, optionally
//! requiring a client certificate) and to whom (HTTP basic auth).
//!
//! The per-token metrics tell who reads what on the homeserver: on a shared host they are worth
//! protecting. Rather than invent a format, the web config file follows the Prometheus
//! exporter-toolkit's `web.yml` (flag `--web.config.file`), which operators already write for
//! node_exporter and friends, so the same file and the same Prometheus `scrape_config`
//! (`scheme: https`, `tls_config`, `basic_auth`) work here. Settings vigie does not implement
//! are refused by name rather than silently ignored: a security setting that is ignored is
//! worse than a start that fails.
//!
//! What is rendered stays in [`crate::metrics`]; this module only moves bytes and checks
//! credentials. The HTTP server is deliberately tiny (one `GET` per connection): it has one
//! client, Prometheus.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use prometheus_client::{encoding::prometheus_text, registry::Registry};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

/// Mode of the metrics Unix socket: the agent's user and group may connect, nobody else
/// (connecting needs write permission on the socket file).
pub const SOCKET_MODE: u32 = 0o660;
/// Time a client has for the TLS handshake and its request head together.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Successful credential checks remembered; past this the cache starts over.
const AUTH_CACHE_MAX: usize = 256;

// ---------------------------------------------------------------------------------------------
// Where: `metrics_addr`.

/// `metrics_addr`: `IP:PORT`, or `unix:/path/to/socket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for MetricsAddr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        if let Some(path) = s.strip_prefix("unix:") {
            // Relative paths would depend on the working directory of a daemon: refuse them.
            if !path.starts_with('/') {
                bail!("metrics address {s:?}: the socket path after unix: must be absolute");
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(path)));
        }
        s.parse()
            .map(MetricsAddr::Tcp)
            .with_context(|| format!("metrics address {s:?} is neither IP:PORT nor unix:/path/to/socket"))
    }
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsAddr::Tcp(a) => write!(f, "{a}"),
            MetricsAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A bound metrics listener.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// Removes the metrics socket file when dropped (clean exit, or a failed start after the
/// bind), unless something else has replaced it since: the file's device and inode must still
/// be the ones we created.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && meta.dev() == self.dev
            && meta.ino() == self.ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Listener {
    /// Bind `addr`. For a Unix socket: a stale socket file left by a crash is removed (a live
    /// one, where something still accepts, is an error, as is a path that is not a socket),
    /// and the new one gets mode [`SOCKET_MODE`] whatever the umask. The returned guard
    /// removes it again; keep it alive for as long as the agent serves.
    pub async fn bind(addr: &MetricsAddr) -> Result<(Listener, Option<SocketFile>)> {
        match addr {
            MetricsAddr::Tcp(a) => {
                let l = tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("binding the metrics address {a}"))?;
                Ok((Listener::Tcp(l), None))
            }
            MetricsAddr::Unix(path) => {
                remove_stale_socket(path)?;
                let l = tokio::net::UnixListener::bind(path)
                    .with_context(|| format!("binding the metrics socket {}", path.display()))?;
                let meta = std::fs::symlink_metadata(path)
                    .with_context(|| format!("inspecting the metrics socket {}", path.display()))?;
                let guard = SocketFile { path: path.clone(), dev: meta.dev(), ino: meta.ino() };
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
                    .with_context(|| format!("setting mode {SOCKET_MODE:o} on {}", path.display()))?;
                Ok((Listener::Unix(l), Some(guard)))
            }
        }
    }
}

fn remove_stale_socket(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!("{} exists and is not a socket: refusing to replace it with the metrics socket", path.display());
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!("{} is in use: another process accepts connections on it", path.display());
    }
    std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?;
    tracing::info!(path = %path.display(), "removed a stale metrics socket");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// How and to whom: the web config file.

/// The web config file, exporter-toolkit format. Every key optional; an empty file means
/// plain HTTP without authentication.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebFile {
    tls_server_config: Option<TlsFile>,
    /// User name → bcrypt hash of the password.
    basic_auth_users: Option<BTreeMap<String, String>>,
    /// exporter-toolkit settings vigie does not implement: named in the error, not ignored.
    http_server_config: Option<serde_norway::Value>,
    rate_limit: Option<serde_norway::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    min_version: Option<String>,
    max_version: Option<String>,
    // exporter-toolkit settings vigie does not implement: named in the error, not ignored.
    cert: Option<serde_norway::Value>,
    key: Option<serde_norway::Value>,
    client_ca: Option<serde_norway::Value>,
    cipher_suites: Option<serde_norway::Value>,
    curve_preferences: Option<serde_norway::Value>,
    prefer_server_cipher_suites: Option<serde_norway::Value>,
    client_allowed_sans: Option<serde_norway::Value>,
}

/// How to serve, built and checked from a web config file: TLS material loaded, hashes
/// parsed. Immutable; a reload builds a new one.
pub struct Web {
    tls: Option<tokio_rustls::TlsAcceptor>,
    auth: Option<Arc<BasicAuth>>,
}

impl fmt::Debug for Web {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Web").field("tls", &self.tls.is_some()).field("auth", &self.auth.is_some()).finish()
    }
}

impl Web {
    /// Plain HTTP, no authentication: what vigie does without a web config file.
    pub fn plain() -> Web {
        Web { tls: None, auth: None }
    }

    /// Read, check and build the web config (`None`: plain HTTP). Every error names the file
    /// and the key or file at fault; the values of `basic_auth_users` are never echoed.
    /// `addr` is where it will serve: basic auth without TLS is only worth a warning on TCP.
    pub fn load(path: Option<&Path>, addr: &MetricsAddr) -> Result<Web> {
        let Some(path) = path else { return Ok(Web::plain()) };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading the web config file {}", path.display()))?;
        let web = Self::build(&text, path.parent().unwrap_or(Path::new(".")))
            .with_context(|| format!("in the web config file {}", path.display()))?;
        if web.auth.is_some() && web.tls.is_none() && matches!(addr, MetricsAddr::Tcp(_)) {
            tracing::warn!(
                web_config = %path.display(),
                "basic_auth_users without tls_server_config: passwords cross the network in clear text"
            );
        }
        Ok(web)
    }

    /// Relative file names in the config are taken from `base` (the config file's directory),
    /// so that a `web.yml` next to its certificates works wherever the agent was started.
    fn build(text: &str, base: &Path) -> Result<Web> {
        let file: WebFile = if text.trim().is_empty() {
            WebFile::default()
        } else {
            serde_norway::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?
        };
        for (key, set) in
            [("http_server_config", file.http_server_config.is_some()), ("rate_limit", file.rate_limit.is_some())]
        {
            if set {
                bail!("{key} is an exporter-toolkit setting that vigie does not support: remove it");
            }
        }
        let tls = file.tls_server_config.map(|t| tls_acceptor(t, base)).transpose().context("tls_server_config")?;
        // An empty user list means no authentication, as in exporter-toolkit.
        let users = file.basic_auth_users.filter(|u| !u.is_empty());
        let auth = users.map(|u| BasicAuth::new(u).map(Arc::new)).transpose().context("basic_auth_users")?;
        Ok(Web { tls, auth })
    }

    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn basic_auth(&self) -> bool {
        self.auth.is_some()
    }
}

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() { p } else { base.join(p) }
}

/// `TLS12` → 12, `TLS13` → 13 (the minor digit orders them).
fn tls_version(key: &str, v: &str) -> Result<u8> {
    match v {
        "TLS12" => Ok(12),
        "TLS13" => Ok(13),
        "TLS10" | "TLS11" => bail!("{key}: {v} is obsolete and not supported: use TLS12 or TLS13"),
        other => bail!("{key}: {other:?} is not a TLS version (TLS12 or TLS13)"),
    }
}

fn tls_acceptor(t: TlsFile, base: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    for (key, set) in [
        ("cert", t.cert.is_some()),
        ("key", t.key.is_some()),
        ("client_ca", t.client_ca.is_some()),
        ("cipher_suites", t.cipher_suites.is_some()),
        ("curve_preferences", t.curve_preferences.is_some()),
        ("prefer_server_cipher_suites", t.prefer_server_cipher_suites.is_some()),
        ("client_allowed_sans", t.client_allowed_sans.is_some()),
    ] {
        if set {
            bail!(
                "{key} is an exporter-toolkit setting that vigie does not support: remove it (certificates and keys go in cert_file, key_file, client_ca_file)"
            );
        }
    }
    let cert_file = resolve(base, t.cert_file.context("cert_file is required")?);
    let key_file = resolve(base, t.key_file.context("key_file is required")?);
    // Versions: exporter-toolkit's default minimum is TLS 1.2, which is also rustls' floor.
    let min = tls_version("min_version", t.min_version.as_deref().unwrap_or("TLS12"))?;
    let max = tls_version("max_version", t.max_version.as_deref().unwrap_or("TLS13"))?;
    let versions: Vec<&'static rustls::SupportedProtocolVersion> =
        [(12, &rustls::version::TLS12), (13, &rustls::version::TLS13)]
            .into_iter()
            .filter(|(n, _)| (min..=max).contains(n))
            .map(|(_, v)| v)
            .collect();
    if versions.is_empty() {
        bail!("min_version is above max_version");
    }

    // ring, not aws-lc-rs: no cmake or C toolchain beyond cc needed to build the agent.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .context("TLS versions")?;
    let auth_type = t.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let builder = match auth_type {
        "NoClientCert" => {
            if t.client_ca_file.is_some() {
                bail!(
                    "client_ca_file is set but client_auth_type is NoClientCert: set client_auth_type to RequireAndVerifyClientCert (or VerifyClientCertIfGiven)"
                );
            }
            builder.with_no_client_auth()
        }
        "RequireAndVerifyClientCert" | "VerifyClientCertIfGiven" => {
            let ca_file = resolve(
                base,
                t.client_ca_file.with_context(|| format!("client_auth_type {auth_type} needs client_ca_file"))?,
            );
            let mut roots = rustls::RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(&ca_file)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("client_ca_file: reading certificates from {}", ca_file.display()))?;
            for ca in cas {
                roots.add(ca).with_context(|| format!("client_ca_file: a certificate in {}", ca_file.display()))?;
            }
            if roots.is_empty() {
                bail!("client_ca_file: no PEM certificate in {}", ca_file.display());
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier =
                if auth_type == "VerifyClientCertIfGiven" { verifier.allow_unauthenticated() } else { verifier };
            builder.with_client_cert_verifier(verifier.build().context("client certificate verifier")?)
        }
        "RequestClientCert" | "RequireAnyClientCert" => {
            bail!(
                "client_auth_type {auth_type} accepts unverified certificates and is not supported: use RequireAndVerifyClientCert or VerifyClientCertIfGiven"
            )
        }
        other => bail!(
            "client_auth_type {other:?} is unknown (NoClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert)"
        ),
    };
    // The settings are sound: now the files.
    let certs = CertificateDer::pem_file_iter(&cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cert_file: reading certificates from {}", cert_file.display()))?;
    if certs.is_empty() {
        bail!("cert_file: no PEM certificate in {}", cert_file.display());
    }
    let key = PrivateKeyDer::from_pem_file(&key_file)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("key_file: reading a PEM private key from {}", key_file.display()))?;

    let config = builder.with_single_cert(certs, key).with_context(|| {
        format!("the certificate in {} and the key in {} do not go together", cert_file.display(), key_file.display())
    })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

// ---------------------------------------------------------------------------------------------
// Basic auth.

/// `basic_auth_users`, checked like exporter-toolkit: bcrypt, whose slowness is the point
/// against offline guessing but would cost tens of milliseconds per scrape, so successful
/// checks are remembered. The cache holds keyed BLAKE3 digests of (user, password), never a
/// password; the key is random per process and per config, so the set lookup need not be
/// constant-time: nobody outside can compute a digest to probe it with.
struct BasicAuth {
    users: BTreeMap<String, String>,
    /// A hash no password matches, checked for unknown users so that their answer takes as
    /// long as a known user's (no user enumeration by timing).
    decoy: String,
    cache_key: [u8; 32],
    cache: Mutex<HashSet<[u8; 32]>>,
    /// One bcrypt at a time: a flood of wrong passwords costs one core, not all of them.
    bcrypt: Mutex<()>,
}

impl BasicAuth {
    fn new(users: BTreeMap<String, String>) -> Result<BasicAuth> {
        let mut cost = 0;
        for (user, hash) in &users {
            if user.contains(':') {
                bail!("user {user:?}: a user name cannot contain ':' (basic auth splits on it)");
            }
            // Never echo the value: it may be a clear-text password pasted by mistake.
            let parts = bcrypt::HashParts::from_str(hash)
                .map_err(|e| anyhow::anyhow!("user {user:?}: the value is not a bcrypt hash ({e}); make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`"))?;
            cost = cost.max(parts.get_cost());
        }
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("random bytes: {e}"))?;
        let mut cache_key = [0u8; 32];
        getrandom::fill(&mut cache_key).map_err(|e| anyhow::anyhow!("random bytes: {e}"))?;
        // The users' own cost, so that a miss takes as long as a hit.
        let decoy =
            bcrypt::hash(blake3::hash(&secret).to_hex().as_str(), cost.max(4)).context("making the decoy hash")?;
        Ok(BasicAuth { users, decoy, cache_key, cache: Mutex::new(HashSet::new()), bcrypt: Mutex::new(()) })
    }

    fn digest(&self, user: &[u8], password: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.cache_key);
        h.update(&(user.len() as u64).to_le_bytes());
        h.update(user);
        h.update(password);
        *h.finalize().as_bytes()
    }

    /// Whether the `Authorization` header value grants access. Blocking (bcrypt) on a cache
    /// miss: call it off the async thread.
    fn check(&self, header: Option<&[u8]>) -> bool {
        let Some((user, password)) = header.and_then(parse_basic) else { return false };
        let digest = self.digest(user.as_bytes(), &password);
        if self.cache.lock().unwrap_or_else(|p| p.into_inner()).contains(&digest) {
            return true;
        }
        let (hash, known) = match self.users.get(user.as_str()) {
            Some(h) => (h.as_str(), true),
            None => (self.decoy.as_str(), false),
        };
        let ok = {
            let _one = self.bcrypt.lock().unwrap_or_else(|p| p.into_inner());
            // bcrypt::verify compares in constant time.
            bcrypt::verify(&*password, hash).unwrap_or(false)
        };
        if ok && known {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= AUTH_CACHE_MAX {
                cache.clear();
            }
            cache.insert(digest);
            return true;
        }
        false
    }
}

/// `Basic base64(user:password)` → (user, password). The password is wiped when dropped.
fn parse_basic(value: &[u8]) -> Option<(String, Zeroizing<Vec<u8>>)> {
    use base64::Engine as _;
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?);
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, Zeroizing::new(decoded[colon + 1..].to_vec())))
}

// ---------------------------------------------------------------------------------------------
// Serving.

/// The web config in force, replaced as a whole on SIGHUP. Each connection takes the one
/// current when it was accepted.
#[derive(Debug)]
pub struct WebHandle(RwLock<Arc<Web>>);

impl WebHandle {
    pub fn new(web: Web) -> Arc<WebHandle> {
        Arc::new(WebHandle(RwLock::new(Arc::new(web))))
    }

    pub fn replace(&self, web: Web) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(web);
    }

    fn current(&self) -> Arc<Web> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Serve `GET /metrics` until the listener fails. One short request per connection.
pub async fn serve(listener: Listener, web: Arc<WebHandle>, registry: Arc<Registry>) -> Result<()> {
    loop {
        let registry = registry.clone();
        match &listener {
            Listener::Tcp(l) => {
                let (stream, _) = l.accept().await.context("accepting a metrics connection")?;
                // The config in force now, not when accept() started waiting: a reload counts
                // from the next connection.
                let web = web.current();
                tokio::spawn(async move {
                    if let Some(tls) = &web.tls {
                        // A plain-HTTP client on the TLS port gets a readable answer, not a reset.
                        let mut first = [0u8; 1];
                        match tokio::time::timeout(REQUEST_TIMEOUT, stream.peek(&mut first)).await {
                            Ok(Ok(1)) if first[0] != 0x16 => {
                                let mut stream = stream;
                                let body = b"vigie: this port speaks TLS: use https://\n";
                                respond(&mut stream, "400 Bad Request", "text/plain", &[], body).await;
                            }
                            Ok(Ok(1)) => serve_tls(stream, tls.clone(), &web, &registry).await,
                            _ => {}
                        }
                    } else {
                        serve_http(stream, &web, &registry).await;
                    }
                });
            }
            Listener::Unix(l) => {
                let (stream, _) = l.accept().await.context("accepting a metrics connection")?;
                let web = web.current();
                tokio::spawn(async move {
                    match &web.tls {
                        Some(tls) => serve_tls(stream, tls.clone(), &web, &registry).await,
                        None => serve_http(stream, &web, &registry).await,
                    }
                });
            }
        }
    }
}

async fn serve_tls<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    tls: tokio_rustls::TlsAcceptor,
    web: &Web,
    registry: &Registry,
) {
    match tokio::time::timeout(REQUEST_TIMEOUT, tls.accept(stream)).await {
        Ok(Ok(stream)) => serve_http(stream, web, registry).await,
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics TLS handshake failed"),
        Err(_) => tracing::debug!("metrics TLS handshake timed out"),
    }
}

async fn serve_http<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, web: &Web, registry: &Registry) {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while len < buf.len() {
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                break;
            }
            len += n;
            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return;
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(&buf[..len]), Ok(httparse::Status::Complete(_))) {
        respond(&mut stream, "400 Bad Request", "text/plain", &[], b"bad request\n").await;
        return;
    }
    if let Some(auth) = &web.auth {
        let header = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("authorization"));
        let header = header.map(|h| Zeroizing::new(h.value.to_vec()));
        // Off the runtime thread: a cache miss runs bcrypt, tens of milliseconds by design,
        // and this thread also drains the kernel's ring buffer.
        let auth = auth.clone();
        let granted = tokio::task::spawn_blocking(move || auth.check(header.as_deref().map(Vec::as_slice)))
            .await
            .unwrap_or(false);
        if !granted {
            tracing::debug!("metrics request refused: missing or wrong basic auth credentials");
            respond(
                &mut stream,
                "401 Unauthorized",
                "text/plain",
                &[("WWW-Authenticate", "Basic realm=\"vigie\", charset=\"UTF-8\"")],
                b"401 Unauthorized\n",
            )
            .await;
            return;
        }
    }
    let (status, body, ctype) = match (req.method, req.path) {
        (Some("GET"), Some(p)) if p == "/metrics" || p.starts_with("/metrics?") => {
            ("200 OK", crate::metrics::render(registry), prometheus_text::CONTENT_TYPE)
        }
        (Some("GET"), Some("/")) => ("200 OK", "vigie: metrics at /metrics\n".to_string(), "text/plain"),
        _ => ("404 Not Found", "not found\n".to_string(), "text/plain"),
    };
    respond(&mut stream, status, ctype, &[], body.as_bytes()).await;
}

async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: &str,
    ctype: &str,
    extra: &[(&str, &str)],
    body: &[u8],
) {
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vigie-web-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn err(text: &str) -> String {
        format!("{:#}", Web::build(text, Path::new("/nonexistent")).unwrap_err())
    }

    fn basic(user: &str, password: &str) -> Vec<u8> {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))).into_bytes()
    }

    #[test]
    fn metrics_addresses() {
        assert_eq!(
            "127.0.0.1:9464".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Tcp("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!("[::1]:1".parse::<MetricsAddr>().unwrap().to_string(), "[::1]:1");
        assert_eq!(
            "unix:/run/vigie/m.sock".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Unix("/run/vigie/m.sock".into())
        );
        assert!("unix:m.sock".parse::<MetricsAddr>().is_err());
        let e = format!("{:#}", "localhost".parse::<MetricsAddr>().unwrap_err());
        assert!(e.contains("localhost") && e.contains("unix:"), "{e}");
    }

    #[test]
    fn an_empty_file_is_plain_http() {
        let w = Web::build("", Path::new("/")).unwrap();
        assert!(!w.tls() && !w.basic_auth());
        let w = Web::build("basic_auth_users: {}\n", Path::new("/")).unwrap();
        assert!(!w.basic_auth());
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = err("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth: RequireAndVerifyClientCert\n");
        assert!(e.contains("client_auth"), "{e}");
        let e = err("basic_auth_user:\n  alice: x\n");
        assert!(e.contains("basic_auth_user"), "{e}");
        // exporter-toolkit keys vigie does not implement are refused by name, not ignored.
        let e = err("rate_limit:\n  burst: 2\n");
        assert!(e.contains("rate_limit") && e.contains("not support"), "{e}");
        let e = err("tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n");
        assert!(e.contains("cipher_suites") && e.contains("not support"), "{e}");
        // Not YAML at all: refused with the parser's own words.
        let e = err(": : [");
        assert!(e.contains("did not find expected key"), "{e}");
    }

    #[test]
    fn bad_bcrypt_names_the_user_never_the_value() {
        let e = err("basic_auth_users:\n  alice: hunter2-in-clear\n");
        assert!(e.contains("alice") && e.contains("bcrypt"), "{e}");
        assert!(!e.contains("hunter2"), "the value leaked into the error: {e}");
        let e = err("basic_auth_users:\n  \"a:b\": \"$2y$04$abcdefghijklmnopqrstuu5Mn7/sfKNvM2mbhR1pUe4WqBJFgFW2\"\n");
        assert!(e.contains("':'"), "{e}");
    }

    #[test]
    fn missing_files_are_named() {
        let e = format!(
            "{:#}",
            Web::load(Some(Path::new("/nonexistent/web.yml")), &"127.0.0.1:1".parse().unwrap()).unwrap_err()
        );
        assert!(e.contains("/nonexistent/web.yml"), "{e}");
        let e = err("tls_server_config:\n  cert_file: /nonexistent/server.crt\n  key_file: /nonexistent/server.key\n");
        assert!(e.contains("/nonexistent/server.crt") && e.contains("cert_file"), "{e}");
        // Relative names are taken from the config file's directory.
        let e = err("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n");
        assert!(e.contains("/nonexistent/server.crt"), "{e}");
        let e = err("tls_server_config:\n  key_file: server.key\n");
        assert!(e.contains("cert_file is required"), "{e}");
    }

    #[test]
    fn a_file_without_a_key_is_named() {
        let d = tmpdir("nokey");
        std::fs::write(d.join("empty.pem"), "").unwrap();
        let e = format!(
            "{:#}",
            Web::build("tls_server_config:\n  cert_file: empty.pem\n  key_file: empty.pem\n", &d).unwrap_err()
        );
        assert!(e.contains("empty.pem") && e.contains("no PEM certificate"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn tls_versions_and_client_auth_types_are_checked() {
        // These fail before any file is read.
        let base = "tls_server_config:\n  cert_file: /nonexistent/c\n  key_file: /nonexistent/k\n";
        assert!(err(&format!("{base}  client_auth_type: RequireAndVerifyClientCert\n")).contains("client_ca_file"));
        assert!(err(&format!("{base}  client_auth_type: RequireAnyClientCert\n")).contains("not supported"));
        assert!(err(&format!("{base}  client_auth_type: Sometimes\n")).contains("Sometimes"));
        assert!(err(&format!("{base}  client_ca_file: /x\n")).contains("NoClientCert"));
        assert!(tls_version("min_version", "TLS11").unwrap_err().to_string().contains("obsolete"));
        assert!(tls_version("min_version", "tls1.3").is_err());
        assert_eq!(tls_version("min_version", "TLS13").unwrap(), 13);
    }

    #[test]
    fn basic_auth_checks_and_caches() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let yaml = format!("basic_auth_users:\n  alice: \"{hash}\"\n");
        let web = Web::build(&yaml, Path::new("/")).unwrap();
        let auth = web.auth.as_ref().unwrap();
        assert!(!auth.check(None));
        assert!(!auth.check(Some(b"Bearer abc")));
        assert!(!auth.check(Some(b"Basic !!!notbase64")));
        assert!(!auth.check(Some(&basic("alice", "wrong"))));
        assert!(!auth.check(Some(&basic("bob", "s3cret"))));
        assert!(!auth.check(Some(&basic("alice", "s3cret "))));
        assert!(auth.cache.lock().unwrap().is_empty(), "failures are not cached");
        assert!(auth.check(Some(&basic("alice", "s3cret"))));
        assert_eq!(auth.cache.lock().unwrap().len(), 1);
        // The scheme is case-insensitive; a cached success answers without bcrypt.
        let lower = String::from_utf8(basic("alice", "s3cret")).unwrap().replace("Basic", "basic");
        assert!(auth.check(Some(lower.as_bytes())));
        assert_eq!(auth.cache.lock().unwrap().len(), 1);
        // The cache holds digests, not passwords.
        let cached = *auth.cache.lock().unwrap().iter().next().unwrap();
        assert_ne!(&cached[..6], b"s3cret");
        assert!(!auth.check(Some(&basic("alice", "s3cre"))));
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let file: WebFile = serde_norway::from_str(include_str!("../../deploy/web.yml")).unwrap();
        let tls = file.tls_server_config.unwrap();
        assert_eq!(tls.cert_file.as_deref(), Some(Path::new("/etc/vigie/metrics.crt")));
        assert!(BasicAuth::new(file.basic_auth_users.unwrap()).is_ok());
    }

    #[test]
    fn passwords_may_hold_colons() {
        let (user, pw) = parse_basic(&basic("alice", "a:b")).unwrap();
        assert_eq!((user.as_str(), pw.as_slice()), ("alice", &b"a:b"[..]));
        assert!(parse_basic(b"Basic").is_none());
    }

    #[tokio::test]
    async fn unix_socket_lifecycle() {
        let d = tmpdir("unix");
        let path = d.join("m.sock");
        // A stale socket (nobody accepts on it) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let addr = MetricsAddr::Unix(path.clone());
        let (listener, guard) = Listener::bind(&addr).await.unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, SOCKET_MODE);
        // A live one is not.
        let e = format!("{:#}", Listener::bind(&addr).await.err().unwrap());
        assert!(e.contains("in use"), "{e}");
        drop(listener);
        drop(guard);
        assert!(!path.exists(), "the guard removes the socket");
        // Nor is a file that is not a socket.
        std::fs::write(&path, "precious").unwrap();
        let e = format!("{:#}", Listener::bind(&addr).await.err().unwrap());
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        let _ = std::fs::remove_dir_all(&d);
    }
}
