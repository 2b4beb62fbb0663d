//! Respond: end a flagged session while the scrape is still going (`[respond]`, off by default).
//!
//! - [`tap`]: in the pipeline, copies the token of a wanted label from its next request, and
//!   tells the agent's own requests apart;
//! - [`policy`]: pure decisions (threshold, allow-list, cap, never twice, escalation);
//! - [`admin`]: `whoami` and Synapse's admin API, blocking, on the responder thread;
//! - [`audit`]: log line, counter and audit-file line per decision;
//! - [`control`]: the socket behind `vigie respond LABEL [--lock]`.
//!
//! The agent's loop only marks labels wanted (at each tick, and after each ring drain for the
//! tokens that crossed the threshold since: the detector rescores just those) and forwards
//! captured tokens to the responder thread through a bounded channel; nothing here blocks
//! the loop.

pub mod admin;
pub mod audit;
pub mod config;
pub mod control;
pub mod policy;
pub mod tap;

pub use config::{Mode, RespondFile, RespondSettings};
pub use tap::Tap;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use zeroize::Zeroizing;

use crate::pipeline::{State, monotonic_ns};
use crate::token::{LabelMap, TokenLabel};
use admin::{Admin, AdminStats};
use audit::{Audit, Counters, Decision};
use policy::{Action, Origin, Outcome, Policy, Subject, Verdict};

/// A label flagged once is not flagged again for this long (its decision stands; a failed
/// action is tried again after it).
const REFLAG_NS: u64 = 10 * 60 * 1_000_000_000;
/// Resolved labels remembered (so a manual `--lock` needs no new request).
const MAX_KNOWN: usize = 4096;
const QUEUE: usize = 256;

/// Work for the responder thread.
pub enum Job {
    /// The detector flagged a label; `policy_ok` says whether its reasons fit the policy.
    Flagged { label: TokenLabel, score: f64, reasons: Vec<(String, f64)>, policy_ok: bool },
    /// A wanted label's token, captured from its latest request.
    Token { label: TokenLabel, token: Zeroizing<Vec<u8>> },
    /// `vigie respond LABEL [--lock]`.
    Manual { label: TokenLabel, lock: bool, reply: Sender<control::Reply> },
}

#[derive(Debug, Default)]
pub struct Stats {
    pub counters: Counters,
    pub admin: Arc<AdminStats>,
    /// Jobs (tokens included) dropped because the responder's queue was full.
    pub jobs_dropped: AtomicU64,
    pub audit_write_errors: AtomicU64,
    /// Labels flagged between ticks, by the early rescoring after a drain.
    pub early_flags: AtomicU64,
}

/// The agent's handle: lives in the agent loop.
pub struct Responder {
    settings: RespondSettings,
    jobs: SyncSender<Job>,
    stats: Arc<Stats>,
    flagged: LabelMap<u64>,
    _socket: control::SocketFile,
}

impl Responder {
    /// Start the responder (nothing when `mode = "off"`). A bad admin token file, audit file
    /// or control socket refuses the start.
    pub fn start(settings: &RespondSettings, state: Arc<Mutex<State>>) -> Result<Option<Responder>> {
        if settings.mode == Mode::Off {
            return Ok(None);
        }
        let token = config::load_admin_token(&settings.admin_token_file)?;
        let audit = Audit::open(&settings.audit_file)?;
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("generating the agent's marker: {e}"))?;
        let marker: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
        {
            let mut st = lock(&state);
            st.tracker.tap().set_marker(&marker);
            st.detector.track_moved(settings.automatic);
        }
        let admin = Admin::new(&settings.homeserver_url, token, marker);
        let stats = Arc::new(Stats { admin: admin.stats.clone(), ..Stats::default() });
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let socket = control::serve(&settings.control_socket, tx.clone())?;
        let worker = Worker {
            settings: settings.clone(),
            admin,
            audit,
            policy: Policy::new(settings),
            stats: stats.clone(),
            state,
            pending: LabelMap::default(),
            known: LabelMap::default(),
            started: Instant::now(),
        };
        std::thread::Builder::new()
            .name("vigie-respond".into())
            .spawn(move || worker.run(rx))
            .context("starting the responder thread")?;
        tracing::info!(
            mode = settings.mode.as_str(),
            automatic = settings.automatic,
            score = settings.score,
            homeserver = %settings.homeserver_url,
            audit_file = %settings.audit_file.display(),
            control_socket = %settings.control_socket.display(),
            "respond is on"
        );
        Ok(Some(Responder {
            settings: settings.clone(),
            jobs: tx,
            stats,
            flagged: LabelMap::default(),
            _socket: socket,
        }))
    }

    fn send(&self, job: Job) {
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.jobs_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// After each detector tick: want the tokens of newly flagged labels.
    pub fn tick(&mut self, st: &mut State, now_ns: u64) {
        self.flagged.retain(|_, at| now_ns.saturating_sub(*at) < REFLAG_NS);
        st.tracker.tap().expire(now_ns);
        if !self.settings.automatic {
            return;
        }
        let mut new = Vec::new();
        for s in st.detector.scores() {
            if s.score < self.settings.score {
                // Sorted highest first.
                break;
            }
            self.consider(s, &mut new);
        }
        self.flag(st, new, now_ns);
    }

    /// After each drain of the ring buffer: tokens that crossed the threshold since the
    /// latest tick are flagged now rather than at the next tick (the detector rescoring only
    /// those that moved), then captured tokens go to the responder thread.
    pub fn after_drain(&mut self, st: &mut State, now_ns: u64) {
        if self.settings.automatic {
            let mut new = Vec::new();
            let min = self.settings.score;
            st.detector.rescore_moved(now_ns as f64 / 1e9, min, |s| self.consider(s, &mut new));
            if !new.is_empty() {
                self.stats.early_flags.fetch_add(new.len() as u64, Ordering::Relaxed);
            }
            self.flag(st, new, now_ns);
        }
        for (label, token) in st.tracker.tap().take() {
            self.send(Job::Token { label, token });
        }
    }

    /// A scored label at or above the threshold: a job, unless it was flagged already.
    fn consider(&self, s: crate::detect::Scored<'_>, new: &mut Vec<Job>) {
        if self.flagged.contains_key(&s.token) {
            return;
        }
        let policy_ok = policy::reasons_match(&self.settings.reasons, s.reasons);
        let reasons = s.reasons.iter().map(|(r, v)| (r.to_string(), *v)).collect();
        new.push(Job::Flagged { label: s.token, score: s.score, reasons, policy_ok });
    }

    fn flag(&mut self, st: &mut State, new: Vec<Job>, now_ns: u64) {
        for job in new {
            if let Job::Flagged { label, policy_ok, .. } = &job {
                if *policy_ok && !st.tracker.tap().want(*label, now_ns) {
                    // Too many wanted at once: try again at a later tick.
                    continue;
                }
                self.flagged.insert(*label, now_ns);
            }
            self.send(job);
        }
    }

    /// The response metrics, on the agent's registry.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry, state: Arc<Mutex<State>>) {
        registry.register_collector(Box::new(RespondCollector {
            stats: self.stats.clone(),
            state,
            mode: self.settings.mode,
        }));
    }
}

/// The response metrics as a running responder exports them, for the exposition's tests.
#[cfg(test)]
pub fn register_for_tests(registry: &mut prometheus_client::registry::Registry, state: Arc<Mutex<State>>) {
    registry.register_collector(Box::new(RespondCollector { stats: Arc::default(), state, mode: Mode::DryRun }));
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// A label waiting for its token's next request.
struct Pending {
    flag: Option<(f64, Vec<(String, f64)>)>,
    manual: Vec<(bool, Sender<control::Reply>)>,
    since: Instant,
}

struct Worker {
    settings: RespondSettings,
    admin: Admin,
    audit: Audit,
    policy: Policy,
    stats: Arc<Stats>,
    state: Arc<Mutex<State>>,
    pending: LabelMap<Pending>,
    known: LabelMap<Subject>,
    started: Instant,
}

impl Worker {
    fn run(mut self, rx: Receiver<Job>) {
        loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(job) => self.handle(job),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.expire();
        }
    }

    fn now_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Flagged { label, score, reasons, policy_ok } => {
                if !policy_ok {
                    let text = label.to_string();
                    let d = Decision::new(&text, Action::None, Outcome::RefusedPolicy);
                    let detail = format!("none of the reasons is in respond.reasons {:?}", self.settings.reasons);
                    return self.record(Decision { score: Some(score), reasons: &reasons, detail: Some(&detail), ..d });
                }
                if let Some(subject) = self.known.get(&label).cloned() {
                    return self.decide(label, Some(&subject), Origin::Automatic, Some((score, &reasons)), None);
                }
                let p = self.pending.entry(label).or_insert_with(|| Pending {
                    flag: None,
                    manual: Vec::new(),
                    since: Instant::now(),
                });
                p.flag = Some((score, reasons));
            }
            Job::Token { label, token } => {
                let Some(p) = self.pending.remove(&label) else { return };
                let who = self.admin.whoami(&token);
                drop(token);
                let subject = match who {
                    Ok(s) => {
                        if self.known.len() >= MAX_KNOWN {
                            self.known.clear();
                        }
                        self.known.insert(label, s.clone());
                        Some(s)
                    }
                    Err(e) => {
                        // Fail safe: without knowing who it is, nothing is done.
                        let detail = format!("{e:#}");
                        let text = label.to_string();
                        if let Some((score, reasons)) = &p.flag {
                            let d = Decision::new(&text, Action::None, Outcome::Unresolved);
                            self.record(Decision { score: Some(*score), reasons, detail: Some(&detail), ..d });
                        }
                        for (_, reply) in p.manual {
                            let d = Decision::new(&text, Action::None, Outcome::Unresolved);
                            self.record(Decision { origin: "manual", detail: Some(&detail), ..d });
                            let _ = reply.send(reply_of(Action::None, Outcome::Unresolved, None, Some(&detail)));
                        }
                        return;
                    }
                };
                if let Some((score, reasons)) = &p.flag {
                    self.decide(label, subject.as_ref(), Origin::Automatic, Some((*score, reasons)), None);
                }
                for (lock, reply) in p.manual {
                    self.decide(label, subject.as_ref(), Origin::Manual { lock }, None, Some(reply));
                }
            }
            Job::Manual { label, lock, reply } => {
                if let Some(subject) = self.known.get(&label).cloned() {
                    return self.decide(label, Some(&subject), Origin::Manual { lock }, None, Some(reply));
                }
                let wanted =
                    self.state.lock().unwrap_or_else(|p| p.into_inner()).tracker.tap().want(label, monotonic_ns());
                if !wanted {
                    let _ = reply.send(control::Reply::error("too many labels are being resolved; try again"));
                    return;
                }
                let p = self.pending.entry(label).or_insert_with(|| Pending {
                    flag: None,
                    manual: Vec::new(),
                    since: Instant::now(),
                });
                p.since = Instant::now();
                p.manual.push((lock, reply));
            }
        }
    }

    /// Operators waiting too long are told; flags whose token never came back are dropped.
    fn expire(&mut self) {
        let mut timed_out = Vec::new();
        for (label, p) in self.pending.iter_mut() {
            if !p.manual.is_empty() && p.since.elapsed() >= control::MANUAL_WAIT {
                timed_out.push((*label, std::mem::take(&mut p.manual)));
            }
        }
        for (label, manual) in timed_out {
            let detail = format!(
                "the token made no request within {} s: nothing to resolve it with (it may have ended already; \
                 `vigie resolve` finds it in the database)",
                control::MANUAL_WAIT.as_secs()
            );
            let text = label.to_string();
            for (_, reply) in manual {
                let d = Decision::new(&text, Action::None, Outcome::Unresolved);
                self.record(Decision { origin: "manual", detail: Some(&detail), ..d });
                let _ = reply.send(reply_of(Action::None, Outcome::Unresolved, None, Some(&detail)));
            }
        }
        let max = Duration::from_nanos(tap::WANTED_FOR_NS);
        self.pending.retain(|_, p| !p.manual.is_empty() || p.since.elapsed() < max);
    }

    fn decide(
        &mut self,
        label: TokenLabel,
        subject: Option<&Subject>,
        origin: Origin,
        flag: Option<(f64, &[(String, f64)])>,
        reply: Option<Sender<control::Reply>>,
    ) {
        let now = self.now_s();
        let verdict = self.policy.decide(subject, origin, now);
        let (action, outcome, detail) = match verdict {
            Verdict::Skip(a, o) => (a, o, None),
            Verdict::Act(a) => match (self.settings.mode, subject) {
                (Mode::Enforce, Some(s)) => {
                    let done = match a {
                        Action::LogoutDevice => {
                            self.admin.logout_device(&s.user, s.device.as_deref().unwrap_or_default())
                        }
                        Action::LockUser => self.admin.lock_user(&s.user),
                        Action::None => Ok(()),
                    };
                    match done {
                        Ok(()) => {
                            self.policy.commit(s, a, now);
                            (a, Outcome::Acted, None)
                        }
                        Err(e) => (a, Outcome::Failed, Some(format!("{e:#}"))),
                    }
                }
                (_, Some(s)) => {
                    // Dry-run remembers what it would have done, so it reports exactly what
                    // enforce would do next (a repeat would lock, the same device is done).
                    self.policy.commit(s, a, now);
                    (a, Outcome::WouldAct, None)
                }
                (_, None) => (Action::None, Outcome::Unresolved, None),
            },
        };
        let label_text = label.to_string();
        let (score, reasons) = flag.unwrap_or((f64::NAN, &[]));
        let d = Decision {
            user: subject.map(|s| s.user.as_str()),
            device: subject.and_then(|s| s.device.as_deref()),
            score: flag.map(|_| score),
            reasons,
            origin: if matches!(origin, Origin::Manual { .. }) { "manual" } else { "automatic" },
            detail: detail.as_deref(),
            ..Decision::new(&label_text, action, outcome)
        };
        let r = reply_of(action, outcome, subject, detail.as_deref());
        self.record(d);
        if let Some(reply) = reply {
            let _ = reply.send(r);
        }
    }

    fn record(&mut self, d: Decision<'_>) {
        let d = Decision { mode: self.settings.mode.as_str(), ..d };
        let before = self.audit.write_errors;
        self.audit.record(&d, &self.stats.counters);
        if self.audit.write_errors != before {
            self.stats.audit_write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<'a> Decision<'a> {
    fn new(label: &'a str, action: Action, outcome: Outcome) -> Self {
        Decision {
            label,
            user: None,
            device: None,
            score: None,
            reasons: &[],
            action,
            outcome,
            origin: "automatic",
            mode: "",
            detail: None,
        }
    }
}

fn reply_of(action: Action, outcome: Outcome, s: Option<&Subject>, detail: Option<&str>) -> control::Reply {
    control::Reply {
        result: outcome.as_str().into(),
        action: action.as_str().into(),
        user: s.map(|s| s.user.clone()),
        device: s.and_then(|s| s.device.clone()),
        detail: detail.map(String::from),
    }
}

struct RespondCollector {
    stats: Arc<Stats>,
    state: Arc<Mutex<State>>,
    mode: Mode,
}

impl std::fmt::Debug for RespondCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RespondCollector")
    }
}

fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?.encode_counter::<NoLabelSet, _, u64>(&v, None)
}

impl Collector for RespondCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (tap, wanted, own_requests, own_bytes) = {
            let mut st = lock(&self.state);
            (
                st.tracker.tap().stats,
                st.tracker.tap().wanted_count(),
                st.health.own_requests,
                st.health.own_response_bytes,
            )
        };
        let mut m = enc.encode_descriptor(
            "vigie_response_actions",
            "Response decisions by action (logout_device, lock_user, none) and result (acted, would_act, failed, refused_cap, refused_policy, skipped_allowlist, skipped_done, unresolved)",
            None,
            MetricType::Counter,
        )?;
        for ((a, o), v) in self.stats.counters.snapshot() {
            m.encode_family(&[("action", a.as_str()), ("result", o.as_str())])?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
        let admin = &self.stats.admin;
        counter(
            &mut enc,
            "vigie_response_admin_retries",
            "Homeserver calls (whoami, admin API) retried after a 5xx, 429 or connection error",
            admin.retries.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "vigie_response_admin_failures",
            "Homeserver calls that failed for good",
            admin.failures.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "vigie_response_token_captures",
            "Tokens of flagged labels copied from a request to ask whoami",
            tap.captures,
        )?;
        counter(
            &mut enc,
            "vigie_response_dropped",
            "Captured tokens and jobs dropped because a queue was full",
            tap.capture_drops + self.stats.jobs_dropped.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "vigie_response_wants_refused",
            "Flagged labels not resolved at once because too many were pending",
            tap.wants_refused,
        )?;
        counter(
            &mut enc,
            "vigie_response_early_flags",
            "Labels flagged between detector ticks, by rescoring the tokens that moved after a ring drain",
            self.stats.early_flags.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "vigie_response_audit_write_errors",
            "Audit lines that could not be written",
            self.stats.audit_write_errors.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "vigie_agent_own_requests",
            "The agent's own requests to the homeserver, never counted as a token's",
            own_requests,
        )?;
        counter(&mut enc, "vigie_agent_own_response_bytes", "Response bytes of the agent's own requests", own_bytes)?;
        enc.encode_descriptor(
            "vigie_response_pending_labels",
            "Flagged labels waiting for their token's next request",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&(wanted as u64))?;
        let mut m = enc.encode_descriptor("vigie_response_mode", "respond.mode (always 1)", None, MetricType::Gauge)?;
        m.encode_family(&[("mode", self.mode.as_str())])?.encode_gauge(&1u64)?;
        Ok(())
    }
}
