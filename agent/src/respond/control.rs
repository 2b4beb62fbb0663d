//! The local control socket behind `vigie respond LABEL [--lock]`.
//!
//! A Unix socket, mode 0600, in the agent's state directory; each connection's peer must be
//! root or the agent's own uid (SO_PEERCRED), whatever the file mode says. One JSON line in
//! (`{"label": "...", "lock": false}`), one JSON line out (the decision as audited).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, SyncSender};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::Job;
use crate::token::TokenLabel;

/// How long `vigie respond` waits for the agent's answer: resolving a label may need the
/// token's next request (`MANUAL_WAIT`), then the admin API's retries.
pub const MANUAL_WAIT: Duration = Duration::from_secs(30);
const REPLY_WAIT: Duration = Duration::from_secs(45);

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub label: String,
    #[serde(default)]
    pub lock: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    pub result: String,
    pub action: String,
    pub user: Option<String>,
    pub device: Option<String>,
    pub detail: Option<String>,
}

impl Reply {
    pub fn error(detail: impl Into<String>) -> Self {
        Reply { result: "error".into(), action: "none".into(), user: None, device: None, detail: Some(detail.into()) }
    }
}

/// Removes the socket file when the agent stops.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Bind the socket and serve it on its own thread.
pub fn serve(path: &Path, jobs: SyncSender<Job>) -> Result<SocketFile> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("control socket path {} exists and is not a socket", path.display());
        }
        if UnixStream::connect(path).is_ok() {
            bail!("control socket {} is in use: is another agent running?", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale control socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating control socket directory {}", dir.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding control socket {}", path.display()))?;
    let guard = SocketFile(path.to_path_buf());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting control socket {}", path.display()))?;
    std::thread::Builder::new()
        .name("vigie-control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => handle(s, &jobs),
                    Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
                }
            }
        })
        .context("starting the control socket thread")?;
    Ok(guard)
}

/// The peer's uid, from the kernel.
fn peer_uid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the ucred we own.
    let rc = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &raw mut len)
    };
    (rc == 0).then_some(cred.uid)
}

fn handle(stream: UnixStream, jobs: &SyncSender<Job>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let reply = match answer(&stream, jobs) {
        Ok(r) => r,
        Err(e) => Reply::error(format!("{e:#}")),
    };
    let mut out = serde_json::to_string(&reply).unwrap_or_else(|_| "{}".into());
    out.push('\n');
    let mut s = &stream;
    let _ = s.write_all(out.as_bytes());
}

fn answer(stream: &UnixStream, jobs: &SyncSender<Job>) -> Result<Reply> {
    // SAFETY-free: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    match peer_uid(stream) {
        Some(uid) if uid == 0 || uid == me => {}
        Some(uid) => {
            tracing::warn!(uid, "control socket: refused a peer that is neither root nor the agent's user");
            bail!("permission denied: only root or uid {me} may act through this agent");
        }
        None => bail!("could not tell who is on the other end of the control socket"),
    }
    let mut line = String::new();
    BufReader::new(stream.take(1024)).read_line(&mut line).context("reading the request")?;
    let req: Request =
        serde_json::from_str(line.trim()).context("the request is not {\"label\": ..., \"lock\": ...}")?;
    let Some(label) = TokenLabel::parse(req.label.trim()) else {
        bail!("{:?} is not a 16-hex-character token label", req.label);
    };
    let (tx, rx) = mpsc::channel();
    jobs.try_send(Job::Manual { label, lock: req.lock, reply: tx })
        .map_err(|_| anyhow::anyhow!("the responder is busy or stopped; try again"))?;
    rx.recv_timeout(REPLY_WAIT).context("no answer from the responder")
}

/// `vigie respond`: ask the running agent, print its answer; success when it acted (or
/// would have, in dry-run), or the session had already been acted on.
pub fn request(socket: &Path, label: &str, lock: bool) -> Result<Reply> {
    let s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the agent's control socket {}", socket.display()))?;
    exchange(s, label, lock)
}

/// One request, one answer, on a connected control socket.
fn exchange(mut s: UnixStream, label: &str, lock: bool) -> Result<Reply> {
    s.set_read_timeout(Some(REPLY_WAIT + Duration::from_secs(5)))?;
    let mut req = serde_json::to_string(&Request { label: label.to_string(), lock })?;
    req.push('\n');
    // The agent answers a refused peer before reading its request, then closes: the write can
    // then fail (EPIPE) while the refusal already waits in our receive queue. Read it either way.
    let sent = s.write_all(req.as_bytes());
    let mut line = String::new();
    let read = BufReader::new(&s).read_line(&mut line);
    match (sent, read) {
        (_, Ok(n)) if n > 0 => serde_json::from_str(line.trim()).context("the agent's answer is not JSON"),
        (Err(e), _) => Err(e).context("sending the request"),
        (Ok(()), Err(e)) => Err(e).context("reading the agent's answer"),
        (Ok(()), Ok(_)) => bail!("the agent closed the control socket without answering"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused peer must see the refusal even when the agent answered and closed before the
    /// request was written: the write then fails with EPIPE (it did once in CI).
    #[test]
    fn a_refusal_sent_before_the_request_still_reaches_the_caller() {
        let (client, server) = UnixStream::pair().unwrap();
        let mut out = serde_json::to_string(&Reply::error("permission denied: only root or uid 0 may act")).unwrap();
        out.push('\n');
        (&server).write_all(out.as_bytes()).unwrap();
        drop(server);
        let reply = exchange(client, "0123456789abcdef", false).expect("the refusal, not a broken pipe");
        assert_eq!(reply.result, "error");
        assert!(reply.detail.unwrap().contains("only root or uid 0"));
    }

    #[test]
    fn a_peer_that_closes_without_answering_is_an_error_that_says_so() {
        let (client, server) = UnixStream::pair().unwrap();
        drop(server);
        let e = format!("{:#}", exchange(client, "0123456789abcdef", false).unwrap_err());
        assert!(e.contains("sending the request") || e.contains("without answering"), "{e}");
    }
}
