//! One decision, three records: a structured log line, `vigie_response_actions_total{action,
//! result}`, and a JSON line appended to the audit file. Labels, user and device IDs only:
//! no token ever reaches any of them.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};

use super::policy::{Action, Outcome};

/// Everything the audit line says.
#[derive(Debug, Clone)]
pub struct Decision<'a> {
    pub label: &'a str,
    pub user: Option<&'a str>,
    pub device: Option<&'a str>,
    pub score: Option<f64>,
    pub reasons: &'a [(String, f64)],
    pub action: Action,
    pub outcome: Outcome,
    pub origin: &'static str,
    pub mode: &'static str,
    pub detail: Option<&'a str>,
}

/// Counters by (action, result), every pair present from the start so rules see zeros.
#[derive(Debug)]
pub struct Counters(Mutex<BTreeMap<(Action, Outcome), u64>>);

impl Default for Counters {
    fn default() -> Self {
        let all = Action::ALL.iter().flat_map(|&a| Outcome::ALL.iter().map(move |&o| ((a, o), 0))).collect();
        Counters(Mutex::new(all))
    }
}

impl Counters {
    pub fn bump(&self, a: Action, o: Outcome) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()).entry((a, o)).or_default() += 1;
    }

    pub fn snapshot(&self) -> Vec<((Action, Outcome), u64)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (*k, *v)).collect()
    }
}

pub struct Audit {
    file: File,
    /// Lines that could not be written (disk full...): the decision still stands and is
    /// logged and counted.
    pub write_errors: u64,
}

impl Audit {
    /// Open (create, mode 0600) the append-only audit file; its directory is created 0700.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating audit directory {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("opening audit file {}", path.display()))?;
        Ok(Audit { file, write_errors: 0 })
    }

    pub fn record(&mut self, d: &Decision<'_>, counters: &Counters) {
        counters.bump(d.action, d.outcome);
        let reasons: String = d.reasons.iter().map(|(r, v)| format!("{r}={v:.2}")).collect::<Vec<_>>().join(",");
        let level_warn = matches!(d.outcome, Outcome::Acted | Outcome::WouldAct | Outcome::Failed);
        macro_rules! line {
            ($lvl:ident) => {
                tracing::$lvl!(
                    label = d.label,
                    user = d.user.unwrap_or("-"),
                    device = d.device.unwrap_or("-"),
                    score = d.score.unwrap_or(f64::NAN),
                    reasons = %reasons,
                    action = d.action.as_str(),
                    result = d.outcome.as_str(),
                    origin = d.origin,
                    mode = d.mode,
                    detail = d.detail.unwrap_or(""),
                    "response decision"
                )
            };
        }
        if level_warn {
            line!(warn);
        } else {
            line!(info);
        }
        let json = serde_json::json!({
            "time": rfc3339_now(),
            "label": d.label,
            "user": d.user,
            "device": d.device,
            "score": d.score,
            "reasons": d.reasons.iter().map(|(r, v)| (r.clone(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            "action": d.action.as_str(),
            "result": d.outcome.as_str(),
            "origin": d.origin,
            "mode": d.mode,
            "detail": d.detail,
        });
        let mut line = json.to_string();
        line.push('\n');
        // One write per line on an O_APPEND file: lines never interleave.
        if self.file.write_all(line.as_bytes()).is_err() {
            self.write_errors += 1;
            tracing::error!("could not append to the audit file");
        }
    }
}

/// Now as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_now() -> String {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    rfc3339(d.as_secs() as i64, d.subsec_millis())
}

fn rfc3339(secs: i64, millis: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_709_210_096, 7), "2024-02-29T12:34:56.007Z");
        assert_eq!(rfc3339(1_798_761_599, 999), "2026-12-31T23:59:59.999Z");
    }

    #[test]
    fn a_decision_is_one_json_line_and_one_count() {
        let dir = std::env::temp_dir().join(format!("vigie-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("audit.jsonl");
        let mut a = Audit::open(&path).unwrap();
        let c = Counters::default();
        let reasons = vec![("history_paging".to_string(), 1.0)];
        let d = Decision {
            label: "0011223344556677",
            user: Some("@eve:hs"),
            device: Some("D"),
            score: Some(2.5),
            reasons: &reasons,
            action: Action::LogoutDevice,
            outcome: Outcome::Acted,
            origin: "automatic",
            mode: "enforce",
            detail: None,
        };
        a.record(&d, &c);
        a.record(&Decision { outcome: Outcome::SkippedDone, ..d.clone() }, &c);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["result"], "acted");
        assert_eq!(lines[0]["reasons"]["history_paging"], 1.0);
        assert_eq!(lines[1]["result"], "skipped_done");
        let snap = c.snapshot();
        assert!(snap.contains(&((Action::LogoutDevice, Outcome::Acted), 1)));
        assert!(snap.contains(&((Action::LockUser, Outcome::Failed), 0)));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
