//! Bulk-read detection: a score per access token, 1.0 and above meaning "alert".
//!
//! The attack this exists for reads, it does not write: a hijacked session pages room
//! history back to the beginning, room after room, downloads every media file, walks
//! `/context`, sweeps `/search`, pulls the key backup. Synapse rate-limits none of that.
//! The detector keeps bounded per-token features over sliding windows (≈1 min, ≈10 min,
//! ≈1 h) and turns them into a score that is the sum of named reasons:
//!
//! - domain reasons, ramps over what no interactive client does (many or large history
//!   pages, many rooms, deep paging, `/context` with large limits, media downloads, searches,
//!   key-backup reads, full syncs);
//! - corroborating reasons, capped below 1: a new client on an established token, reads
//!   without a sync loop (or beside one whose token never writes to a room), volume far
//!   above the token's own past (per-minute EWMAs) or above the host's other tokens (median
//!   and MAD, with floors so a small population does not make everyone an outlier);
//! - hard ceilings, each adding 1.
//!
//! `docs/detection.md` describes the model, every threshold ([`DetectConfig`]) and tuning.
//!
//! Use: [`Detector::on_request`] for every request with a token and
//! [`Detector::on_response_bytes`] for every response byte count (both on the hot path:
//! allocation only when a token's storage grows, amortised), [`Detector::tick`] about once a second (scores,
//! population statistics, expiry), then read [`Detector::scores`] and
//! [`Detector::suspects`]. Only token labels are ever seen or kept.
//!
//! Feed it one vantage only: behind a TLS terminator the same request is seen at the socket
//! and in the TLS library, and counting both would halve every threshold.

mod clients;
mod config;
mod features;
mod fingerprint;
mod hll;
mod request;
mod rooms;
mod score;
mod tally;
mod window;

/// Simulated Matrix traffic for the tests and the benchmarks (`examples/pipeline_bench.rs`).
#[doc(hidden)]
pub mod sim;

pub use config::{DetectConfig, Ramp};
pub use score::{Population, REASONS, Reason};
pub use tally::{COLUMNS as TALLY_COLUMNS, Tally};

use crate::conn::RequestSeen;
use crate::endpoint::Endpoint;
use crate::token::TokenLabel;
use features::{BASELINE, BASELINE_IN_POPULATION, POPULATION, Stamp, TokenState, secs};
use request::Shape;
use score::evaluate;

/// A token's score and the reasons behind it, largest first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored<'a> {
    pub token: TokenLabel,
    pub score: f64,
    pub reasons: &'a [(&'static str, f64)],
}

/// The detector's own bookkeeping, for agent-health metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DetectStats {
    pub tracked_tokens: usize,
    /// Tokens at or above 1.0 at the latest tick.
    pub alerting: usize,
    /// Times a token went from below 1.0 to 1.0 or more.
    pub alerts_total: u64,
    pub tokens_expired: u64,
    /// Tokens dropped because `max_tokens` was reached.
    pub tokens_evicted: u64,
    /// Active tokens in the latest population statistics.
    pub population: usize,
}

type Tokens = crate::token::LabelMap<Box<TokenState>>;

/// An entry of the latest tick's scores; its reasons are `reasons[start..end]`.
#[derive(Clone, Copy, Debug)]
struct Entry {
    token: TokenLabel,
    score: f64,
    alerted: bool,
    start: usize,
    end: usize,
}

/// A tick being scored in steps: the tokens still to score, and the scores so far (swapped
/// in for [`Detector::scores`] when the last step is done).
#[derive(Default)]
struct NextTick {
    due: Vec<TokenLabel>,
    scored: Vec<Entry>,
    reasons: Vec<(&'static str, f64)>,
    alerting: usize,
}

pub struct Detector {
    cfg: DetectConfig,
    tokens: Tokens,
    /// The detector's clock, whole seconds, never going back.
    now: u32,
    population: Population,
    last_population_s: Option<u32>,
    scored: Vec<Entry>,
    reasons: Vec<(&'static str, f64)>,
    /// The tick in progress ([`Detector::begin_tick`]).
    next: NextTick,
    /// Scratch space for the population statistics, kept between ticks.
    columns: [Vec<f64>; POPULATION],
    stats: DetectStats,
    /// Tokens that made a request since the latest tick or early rescoring, when someone
    /// acts on scores between ticks ([`Detector::track_moved`]); `None` otherwise.
    moved: Option<Vec<TokenLabel>>,
}

/// Tokens queued for early rescoring between two ticks; beyond it the tick scores them.
const MOVED_MAX: usize = 4096;

/// Queue a token that just made a request for [`Detector::rescore_moved`], once, when early
/// rescoring is on and the queue has room.
fn queue_moved(moved: &mut Option<Vec<TokenLabel>>, t: &mut TokenState, token: TokenLabel) {
    if let Some(moved) = moved
        && !t.queued
        && moved.len() < MOVED_MAX
    {
        t.queued = true;
        moved.push(token);
    }
}
/// Tokens rescored per [`Detector::rescore_moved`] call: bounds its cost when every token is
/// busy (the agent calls it after each drain, about 20 times a second when busy).
const RESCORE_PER_CALL: usize = 256;

impl Detector {
    pub fn new(cfg: DetectConfig) -> Self {
        Detector {
            population: Population::floors(&cfg),
            cfg,
            tokens: Tokens::default(),
            now: 0,
            last_population_s: None,
            scored: Vec::new(),
            reasons: Vec::new(),
            next: NextTick::default(),
            columns: Default::default(),
            stats: DetectStats::default(),
            moved: None,
        }
    }

    /// Keep track of the tokens that move between ticks, so that [`Detector::rescore_moved`]
    /// can score them early. Only `respond` needs it: a score seen up to a second sooner is
    /// a session ended up to a second sooner, which for a fast scrape is dozens of pages.
    pub fn track_moved(&mut self, on: bool) {
        self.moved = on.then(Vec::new);
    }

    pub fn config(&self) -> &DetectConfig {
        &self.cfg
    }

    /// The clock: `now_s` in whole seconds, ignoring NaN, negative and backward times.
    fn clock(&mut self, now_s: f64) -> u32 {
        if now_s.is_finite() && now_s >= 0.0 {
            self.now = self.now.max(now_s.min(f64::from(u32::MAX)) as u32);
        }
        self.now
    }

    /// A request with a token (requests without one are ignored). `now_s` is monotonic
    /// seconds. Allocates only for a new token, or when a token's cell list, room table or
    /// client table grows (amortised: cells grow by half). Returns what the request added
    /// to the token's additive features (for the per-token counters).
    pub fn on_request(&mut self, req: &RequestSeen<'_>, now_s: f64) -> Tally {
        let Some(token) = req.attribution.token else {
            return Tally::default();
        };
        let now = self.clock(now_s);
        let shape = Shape::of(req);
        // Looked at once per client of a token, not per request.
        let known = || req.user_agent.is_none_or(fingerprint::known_agent);
        if let Some(t) = self.tokens.get_mut(&token) {
            let tally = t.record(&shape, now, &self.cfg, known);
            queue_moved(&mut self.moved, t, token);
            return tally;
        }
        self.make_room();
        let mut t = Box::new(TokenState::new(now, self.prior()));
        let tally = t.record(&shape, now, &self.cfg, known);
        queue_moved(&mut self.moved, &mut t, token);
        self.tokens.insert(token, t);
        tally
    }

    /// Between ticks: score tokens that made a request since they were last scored (at most
    /// `RESCORE_PER_CALL` of them, the rest at the next call or tick), and hand `found` each
    /// one that reaches `min_score` now but had not at the latest tick. Changes nothing the
    /// tick reports: scores, alerts and the exported series stay the tick's.
    pub fn rescore_moved(&mut self, now_s: f64, min_score: f64, mut found: impl FnMut(Scored<'_>)) {
        let Some(mut moved) = self.moved.take() else { return };
        let now = self.clock(now_s);
        let cfg = &self.cfg;
        let mut reasons: Vec<(&'static str, f64)> = Vec::new();
        for _ in 0..RESCORE_PER_CALL {
            let Some(label) = moved.pop() else { break };
            let Some(t) = self.tokens.get_mut(&label) else { continue };
            t.queued = false;
            if f64::from(t.score) >= min_score {
                // The tick saw it already.
                continue;
            }
            t.advance(now, cfg);
            let f = t.features(now, cfg);
            let ev = evaluate(&f, &t.baseline.rate, &self.population, cfg);
            let score = ev.total();
            if score >= min_score {
                reasons.clear();
                reasons.extend(ev.reasons().map(|(r, v)| (r.as_str(), v)));
                found(Scored { token: label, score, reasons: &reasons });
            }
        }
        self.moved = Some(moved);
    }

    /// Response bytes for a token's request of this endpoint class. Bytes for a token not
    /// (or no longer) tracked are dropped: its request is what starts tracking.
    pub fn on_response_bytes(&mut self, token: TokenLabel, endpoint: Endpoint, bytes: u64, now_s: f64) {
        let now = self.clock(now_s);
        if let Some(t) = self.tokens.get_mut(&token) {
            t.record_bytes(endpoint, bytes, now, &self.cfg);
        }
    }

    /// A new token's baseline: the configured prior, or the population's median rates when
    /// the population is busier. A new token thus starts out "typical", never "suspicious
    /// for being new".
    fn prior(&self) -> [f64; BASELINE] {
        let mut prior = self.cfg.baseline_prior;
        if self.population.active >= self.cfg.population_min_tokens.max(1) {
            for (p, j) in prior.iter_mut().zip(BASELINE_IN_POPULATION) {
                let median_per_min = self.population.median.get(j).copied().unwrap_or(0.0) / 10.0;
                *p = p.max(median_per_min);
            }
        }
        prior
    }

    /// At `max_tokens`, drop the least recently seen eighth, suspects last. Amortised: one
    /// pass per `max_tokens / 8` new tokens.
    fn make_room(&mut self) {
        let max = self.cfg.max_tokens.max(1);
        if self.tokens.len() < max {
            return;
        }
        let mut order: Vec<(bool, u32, TokenLabel)> =
            self.tokens.iter().map(|(k, t)| (self.is_suspect_state(t), t.last_s, *k)).collect();
        let n = (order.len() / 8).max(1).min(order.len());
        if n < order.len() {
            order.select_nth_unstable(n);
        }
        for (_, _, k) in order.iter().take(n) {
            self.tokens.remove(k);
        }
        self.stats.tokens_evicted += n as u64;
    }

    fn is_suspect_state(&self, t: &TokenState) -> bool {
        f64::from(t.score) >= self.cfg.pin_score || self.alerted_recently(t)
    }

    fn alerted_recently(&self, t: &TokenState) -> bool {
        t.last_alert_s.get().is_some_and(|a| f64::from(self.now.saturating_sub(a)) < self.cfg.alert_memory_s)
    }

    /// About once a second: expire idle tokens, refresh the population statistics, rescore
    /// every token that was active since the last tick or still has a score. In one go:
    /// [`Detector::begin_tick`], then [`Detector::tick_step`] until done.
    pub fn tick(&mut self, now_s: f64) {
        self.begin_tick(now_s);
        while !self.tick_step(usize::MAX) {}
    }

    /// A tick in steps, so that its caller can do other work between them: with tens of
    /// thousands of tokens new each second (a flood of one-request tokens), scoring them all
    /// takes longer than the ring buffer can hold the records that arrive meanwhile. Expiry
    /// and the population statistics run here, once; the tokens to score are listed, and
    /// [`Detector::tick_step`] scores them. Until the last step, [`Detector::scores`] and
    /// [`Detector::suspects`] stay the previous tick's, so no one reads half a tick.
    pub fn begin_tick(&mut self, now_s: f64) {
        let now = self.clock(now_s);
        self.expire(now);
        let due = self
            .last_population_s
            .is_none_or(|last| f64::from(now.saturating_sub(last)) >= self.cfg.population_every_s);
        if due {
            self.refresh_population(now);
        }
        let memory = secs(self.cfg.alert_memory_s);
        self.next.due.clear();
        self.next.due.extend(
            self.tokens
                .iter()
                .filter(|(_, t)| t.dirty || t.score > 0.0 || t.last_alert_s.within(now, memory))
                .map(|(label, _)| *label),
        );
        self.next.scored.clear();
        self.next.reasons.clear();
        self.next.alerting = 0;
        // Every token queued for early rescoring is in this tick's list: the queue starts
        // again, and a token that moves while the tick is in steps is queued anew.
        if let Some(moved) = &mut self.moved {
            for label in moved.drain(..) {
                if let Some(t) = self.tokens.get_mut(&label) {
                    t.queued = false;
                }
            }
        }
    }

    /// Score up to `max` of the tokens [`Detector::begin_tick`] listed; true once the tick is
    /// complete and its scores are the ones reported. Tokens that left the table between
    /// steps are skipped; tokens new since the listing are dirty and wait for the next tick.
    pub fn tick_step(&mut self, max: usize) -> bool {
        // The clock as of now: requests handled between steps may have moved it.
        let now = self.now;
        let cfg = &self.cfg;
        let memory = secs(cfg.alert_memory_s);
        let next = &mut self.next;
        let take = max.min(next.due.len());
        for label in next.due.drain(next.due.len() - take..) {
            let Some(t) = self.tokens.get_mut(&label) else { continue };
            t.advance(now, cfg);
            let f = t.features(now, cfg);
            for (p, v) in t.population.iter_mut().zip(f.population()) {
                *p = v as f32;
            }
            let ev = evaluate(&f, &t.baseline.rate, &self.population, cfg);
            let score = ev.total();
            if score >= 1.0 {
                if f64::from(t.score) < 1.0 {
                    self.stats.alerts_total += 1;
                }
                t.last_alert_s = Stamp::at(now);
                next.alerting += 1;
            }
            t.score = score as f32;
            t.dirty = false;
            let latched = t.last_alert_s.within(now, memory);
            if score > 0.0 || latched {
                let start = next.reasons.len();
                next.reasons.extend(ev.reasons().map(|(r, v)| (r.as_str(), v)));
                next.scored.push(Entry { token: label, score, alerted: latched, start, end: next.reasons.len() });
            }
        }
        if !next.due.is_empty() {
            return false;
        }
        next.scored.sort_unstable_by(|a, b| b.score.total_cmp(&a.score).then(a.token.cmp(&b.token)));
        std::mem::swap(&mut self.scored, &mut next.scored);
        std::mem::swap(&mut self.reasons, &mut next.reasons);
        self.stats.alerting = next.alerting;
        self.stats.tracked_tokens = self.tokens.len();
        true
    }

    fn expire(&mut self, now: u32) {
        let idle = secs(self.cfg.idle_expiry_s);
        let memory = secs(self.cfg.alert_memory_s);
        let before = self.tokens.len();
        self.tokens.retain(|_, t| now.saturating_sub(t.last_s) < idle || t.last_alert_s.within(now, memory));
        self.stats.tokens_expired += (before - self.tokens.len()) as u64;
    }

    fn refresh_population(&mut self, now: u32) {
        for col in self.columns.iter_mut() {
            col.clear();
        }
        let since = now.saturating_sub(600);
        for t in self.tokens.values().filter(|t| t.last_s >= since) {
            for (col, v) in self.columns.iter_mut().zip(t.population) {
                col.push(f64::from(v));
            }
        }
        self.population = Population::compute(&mut self.columns, &self.cfg);
        self.last_population_s = Some(now);
        self.stats.population = self.population.active;
    }

    /// Scores as of the latest tick, highest first: every token whose score is above 0 or
    /// that reached 1.0 within `alert_memory_s`.
    pub fn scores(&self) -> impl Iterator<Item = Scored<'_>> {
        self.scored.iter().map(|e| Scored {
            token: e.token,
            score: e.score,
            reasons: self.reasons.get(e.start..e.end).unwrap_or(&[]),
        })
    }

    /// Tokens that must keep their own metric series whatever their activity: score at or
    /// above `pin_score`, or an alert within `alert_memory_s`.
    pub fn suspects(&self) -> impl Iterator<Item = TokenLabel> + '_ {
        self.scored.iter().filter(|e| e.score >= self.cfg.pin_score || e.alerted).map(|e| e.token)
    }

    /// Estimated distinct rooms the token touched in the last 10 minutes (as of the latest
    /// tick; `features` only reads, the tick advanced the windows).
    pub fn distinct_rooms_10m(&self, token: &TokenLabel) -> Option<f64> {
        self.tokens.get(token).map(|t| t.features(self.now, &self.cfg).rooms_10m)
    }

    /// Series [`Detector::scores`] exports: a score and each reason of every scored token.
    pub fn series(&self) -> usize {
        self.scored.iter().map(|e| 1 + e.end.saturating_sub(e.start)).sum()
    }

    pub fn tracked_tokens(&self) -> usize {
        self.tokens.len()
    }

    pub fn stats(&self) -> DetectStats {
        DetectStats { tracked_tokens: self.tokens.len(), ..self.stats }
    }

    /// The population statistics in use (medians and outlier scales of the 10-minute
    /// history weight, room reads, media downloads, megabytes and rooms paged).
    pub fn population(&self) -> &Population {
        &self.population
    }
}

#[cfg(test)]
mod tests;
