//! The homeserver's client API (`whoami`) and Synapse's admin API, over http:// or https://.
//!
//! Blocking (ureq, rustls): called only from the responder thread, never from the agent's
//! runtime. Every request carries the agent's per-run marker header, so the pipeline counts
//! it as the agent's own and never as the token's traffic (`tap::Tap::is_own`). Tokens are
//! put in request headers from zeroizing buffers; no error or log line holds one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use zeroize::Zeroizing;

use super::policy::Subject;

/// The header that marks the agent's own requests; its value is random per run.
pub const MARKER_HEADER: &str = "X-Vigie-Agent";
/// Attempts of an admin call, and the pause before each retry: a scrape goes on meanwhile,
/// so the first retries come fast.
const ATTEMPTS: usize = 4;
const BACKOFF_MS: [u64; ATTEMPTS - 1] = [250, 1000, 3000];

#[derive(Debug, Default)]
pub struct AdminStats {
    /// Retries of admin or whoami calls (5xx, 429, connection errors).
    pub retries: AtomicU64,
    /// Calls that failed for good.
    pub failures: AtomicU64,
}

pub struct Admin {
    base: String,
    agent: ureq::Agent,
    marker: String,
    admin_token: Zeroizing<String>,
    pub stats: std::sync::Arc<AdminStats>,
    /// Pauses between retries (shortened in unit tests).
    backoff_ms: [u64; ATTEMPTS - 1],
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("base", &self.base).finish_non_exhaustive()
    }
}

/// What an HTTP exchange gave: a status and a short body, or a transport error.
enum Reply {
    Status(u16, String),
    Transport(String),
}

impl Admin {
    pub fn new(base: &str, admin_token: Zeroizing<String>, marker: String) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .proxy(None)
            .user_agent("vigie")
            .build()
            .into();
        Admin {
            base: base.trim_end_matches('/').to_string(),
            agent,
            marker,
            admin_token,
            stats: Default::default(),
            backoff_ms: BACKOFF_MS,
        }
    }

    fn send(&self, method: &str, path: &str, bearer: &str, body: Option<&str>) -> Reply {
        let url = format!("{}{path}", self.base);
        let auth = Zeroizing::new(format!("Bearer {bearer}"));
        let result = match (method, body) {
            ("GET", _) => {
                self.agent.get(&url).header("Authorization", auth.as_str()).header(MARKER_HEADER, &self.marker).call()
            }
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", auth.as_str())
                .header(MARKER_HEADER, &self.marker)
                .call(),
            (_, b) => self
                .agent
                .put(&url)
                .header("Authorization", auth.as_str())
                .header(MARKER_HEADER, &self.marker)
                .header("Content-Type", "application/json")
                .send(b.unwrap_or("{}")),
        };
        match result {
            Ok(mut r) => {
                let status = r.status().as_u16();
                let text = r.body_mut().with_config().limit(64 * 1024).read_to_string().unwrap_or_default();
                Reply::Status(status, text)
            }
            // ureq's errors name the URL and the cause, never a header.
            Err(e) => Reply::Transport(e.to_string()),
        }
    }

    /// `send` with retries on 5xx, 429 and transport errors; `Ok` holds a 2xx body.
    fn call(&self, what: &str, method: &str, path: &str, bearer: &str, body: Option<&str>) -> Result<String> {
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(self.backoff_ms[attempt - 1]));
            }
            match self.send(method, path, bearer, body) {
                Reply::Status(s, text) if (200..300).contains(&s) => return Ok(text),
                Reply::Status(s, text) if s >= 500 || s == 429 => last = format!("HTTP {s}: {}", short(&text)),
                Reply::Status(s, text) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    bail!("{what}: HTTP {s}: {}", short(&text));
                }
                Reply::Transport(e) => last = e,
            }
            tracing::debug!(what, attempt, error = %last, "homeserver call failed, retrying");
        }
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        Err(anyhow!("{what}: {last} (after {ATTEMPTS} attempts)"))
    }

    /// Who holds this token: `GET /_matrix/client/v3/account/whoami` with it.
    pub fn whoami(&self, token: &[u8]) -> Result<Subject> {
        let token = std::str::from_utf8(token).map_err(|_| anyhow!("whoami: the token is not UTF-8"))?;
        let text = self.call("whoami", "GET", "/_matrix/client/v3/account/whoami", token, None)?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|_| anyhow!("whoami: the answer is not JSON"))?;
        let user = v.get("user_id").and_then(|u| u.as_str()).ok_or_else(|| anyhow!("whoami: no user_id"))?;
        let device = v.get("device_id").and_then(|d| d.as_str()).map(String::from);
        Ok(Subject { user: user.to_string(), device })
    }

    /// Log a device out: its access token stops working at once.
    pub fn logout_device(&self, user: &str, device: &str) -> Result<()> {
        let path = format!("/_synapse/admin/v2/users/{}/devices/{}", encode(user), encode(device));
        self.call("delete device", "DELETE", &path, &self.admin_token, None).map(drop)
    }

    /// Lock the account: every session gets 401 `M_USER_LOCKED` until an admin unlocks it.
    pub fn lock_user(&self, user: &str) -> Result<()> {
        let path = format!("/_synapse/admin/v2/users/{}", encode(user));
        self.call("lock user", "PUT", &path, &self.admin_token, Some(r#"{"locked": true}"#)).map(drop)
    }
}

fn short(text: &str) -> String {
    let t: String = text.chars().take(200).collect();
    t.replace(['\n', '\r'], " ")
}

/// Percent-encode a path segment (user and device IDs hold `@`, `:` and maybe worse).
pub fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len() * 3);
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode("@eve:example.org"), "%40eve%3Aexample.org");
        assert_eq!(encode("AB/../x"), "AB%2F..%2Fx");
    }

    /// A server answering the given statuses in turn, recording request lines and headers.
    fn server(statuses: Vec<u16>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let h = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for status in statuses {
                let (s, _) = l.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                seen.push(head);
                let body = r#"{"user_id":"@eve:hs","device_id":"DEV"}"#;
                let mut s = s;
                write!(s, "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                    .unwrap();
            }
            seen
        });
        (url, h)
    }

    #[test]
    fn server_errors_are_retried_then_counted_and_client_errors_are_not_retried() {
        let (url, h) = server(vec![500, 503, 200]);
        let mut a = Admin::new(&url, Zeroizing::new("admintok".into()), "m4rk".into());
        a.backoff_ms = [1, 1, 1];
        let s = a.whoami(b"syt_user").unwrap();
        assert_eq!(s, Subject { user: "@eve:hs".into(), device: Some("DEV".into()) });
        assert_eq!(a.stats.retries.load(Ordering::Relaxed), 2);
        let heads = h.join().unwrap();
        assert!(heads.iter().all(|h| h.contains("X-Vigie-Agent: m4rk") || h.contains("x-vigie-agent: m4rk")));
        assert!(heads[0].contains("syt_user"));

        let (url, h) = server(vec![401]);
        let mut a = Admin::new(&url, Zeroizing::new("admintok".into()), "m".into());
        a.backoff_ms = [1, 1, 1];
        let e = a.logout_device("@eve:hs", "DEV").unwrap_err().to_string();
        assert!(e.contains("401") && !e.contains("admintok"), "{e}");
        assert_eq!(a.stats.retries.load(Ordering::Relaxed), 0);
        assert!(h.join().unwrap()[0].starts_with("DELETE /_synapse/admin/v2/users/%40eve%3Ahs/devices/DEV "));
    }

    #[test]
    fn nothing_listening_is_a_counted_failure() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut a = Admin::new(&format!("http://127.0.0.1:{port}"), Zeroizing::new("t".into()), "m".into());
        a.backoff_ms = [1, 1, 1];
        assert!(a.lock_user("@eve:hs").is_err());
        assert_eq!(a.stats.retries.load(Ordering::Relaxed), 3);
        assert_eq!(a.stats.failures.load(Ordering::Relaxed), 1);
    }
}
