//! Per-token counters with bounded metric cardinality.
//!
//! Every token seen is tracked (up to `max_tokens`), but only `top_k` of them own their own
//! metric series. The rule that keeps every exported counter monotonic: an increment goes to
//! the token's own series if the token holds an export slot *at that moment*, else to the
//! `overflow` series. Slots are handed out on first sight while free, and reassigned on each
//! [`Aggregator::rebalance`] to the tokens with the most recent activity (an exponentially
//! decayed request rate). A token that loses its slot loses its series (Prometheus marks it
//! stale); one that gains a slot starts a fresh series at zero. Idle tokens are forgotten.
//!
//! A new token that finds no free slot is *held* until the next tick (at most
//! [`HOLD_MAX`] at once): its increments wait in a private counter, unexported. If the
//! detector makes it a suspect at that tick, the counter becomes its own series, so a burst
//! that was over before the tick (a `/context` walk of eight requests in a second) is still
//! shown under its token; otherwise the counter is added to `overflow`. Nothing is counted
//! twice; a held increment is only late, by under a second.
//!
//! Requests that carry no token are counted per endpoint under `anonymous`.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use crate::detect::Tally;
use crate::endpoint::Endpoint;
use crate::token::{LabelSet, TokenLabel};
use crate::vocab::Vantage;

/// A decayed activity, ordered totally (it is never NaN, but the heap needs `Ord`).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Activity(f64);

impl Eq for Activity {}

impl PartialOrd for Activity {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Activity {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// What a series is broken down by, besides the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Class {
    pub endpoint: Endpoint,
    pub vantage: Vantage,
}

/// Requests and response bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub bytes: u64,
}

/// Counts per class, stored sparsely: a token touches few classes; and the detector's
/// additive features (one vantage only), whose sums over hosts mean something.
#[derive(Clone, Debug, Default)]
pub struct ByEndpoint(Vec<(Class, Counts)>, Tally);

impl ByEndpoint {
    fn slot(&mut self, class: Class) -> &mut Counts {
        let i = match self.0.iter().position(|(c, _)| *c == class) {
            Some(i) => i,
            None => {
                self.0.push((class, Counts::default()));
                self.0.len() - 1
            }
        };
        &mut self.0[i].1
    }

    pub fn iter(&self) -> impl Iterator<Item = (Class, Counts)> + '_ {
        self.0.iter().copied()
    }

    pub fn tally(&self) -> &Tally {
        &self.1
    }

    /// Series this exports: requests and bytes per class, and each non-zero feature.
    pub fn series(&self) -> usize {
        2 * self.0.len() + self.1.series()
    }

    pub fn total(&self) -> Counts {
        self.0
            .iter()
            .fold(Counts::default(), |a, (_, c)| Counts { requests: a.requests + c.requests, bytes: a.bytes + c.bytes })
    }
}

/// Where a token's increments go. Counters are boxed: all but `top_k` (plus suspects and
/// held newcomers) of up to `max_tokens` entries are `Folded`, and an entry that carries
/// only a pointer keeps the table at a third of the memory and its scans fast.
#[derive(Debug)]
enum Slot {
    /// Its own series.
    Own(Box<ByEndpoint>),
    /// A private counter, unexported, until the next tick (see the module doc).
    Held(Box<ByEndpoint>),
    /// `overflow`.
    Folded,
}

impl Slot {
    /// The series this slot's increments go to.
    fn series<'a>(&'a mut self, overflow: &'a mut ByEndpoint) -> &'a mut ByEndpoint {
        match self {
            Slot::Own(counts) | Slot::Held(counts) => counts,
            Slot::Folded => overflow,
        }
    }
}

#[derive(Debug)]
struct TokenState {
    slot: Slot,
    last_seen_s: f64,
    /// Decayed request count, as of `last_seen_s`.
    activity: f64,
    /// Classes the token used (bit `endpoint * 2 + vantage`), exported or not: what its
    /// series would cost, for the series budget.
    classes: u64,
}

/// Series of a token besides its per-class and feature counters: its distinct-rooms gauge.
const TOKEN_GAUGES: usize = 1;

fn class_bit(class: Class) -> u64 {
    1u64.checked_shl(class.endpoint as u32 * 2 + class.vantage as u32).unwrap_or(0)
}

impl TokenState {
    /// Series the token exports, or would if it had a slot: per-class requests and bytes,
    /// its features (at most one a class, an estimate while it has no slot), its gauges.
    fn cost(&self) -> usize {
        match &self.slot {
            Slot::Own(own) => own.series() + TOKEN_GAUGES,
            Slot::Held(_) | Slot::Folded => 3 * self.classes.count_ones() as usize + TOKEN_GAUGES,
        }
    }

    fn activity_at(&self, now_s: f64, tau_s: f64) -> f64 {
        self.activity * (-(now_s - self.last_seen_s).max(0.0) / tau_s).exp()
    }

    /// A request now.
    fn seen(&mut self, now_s: f64, tau_s: f64) {
        self.activity = self.activity_at(now_s, tau_s) + 1.0;
        self.last_seen_s = now_s;
    }
}

/// A request, and what the detector counted for it, to `series`.
fn count_request(series: &mut ByEndpoint, class: Class, tally: &Tally) {
    series.slot(class).requests += 1;
    if !tally.is_empty() {
        series.1.add(tally);
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Tokens with their own series.
    pub top_k: usize,
    /// Tokens tracked at all; beyond it new tokens are counted in overflow only.
    pub max_tokens: usize,
    /// A token with no request for this long is forgotten.
    pub idle_s: f64,
    /// Time constant of the activity that ranks tokens for export slots.
    pub activity_tau_s: f64,
    /// Series the agent may export in all (see [`SERIES_RESERVE`]): tokens beyond it are
    /// folded into overflow, suspects never.
    pub max_series: usize,
}

/// New tokens held at once (see the module doc); beyond it a new token without a slot goes
/// straight to overflow.
pub const HOLD_MAX: usize = 64;

/// Default `max_series`: 100 agents in a Mimir tenant's default 150,000 series.
pub const DEFAULT_MAX_SERIES: usize = 1_500;

/// Series of the budget kept for what does not depend on tokens (agent health, anonymous
/// and overflow per class); a test pins the health exposition below it.
pub const SERIES_RESERVE: usize = 200;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            top_k: 500,
            max_tokens: 1_000_000,
            idle_s: 3600.0,
            activity_tau_s: 300.0,
            max_series: DEFAULT_MAX_SERIES,
        }
    }
}

/// Counters of the aggregator's own bookkeeping, exported as agent health.
#[derive(Clone, Copy, Debug, Default)]
pub struct AggregatorStats {
    pub tracked_tokens: usize,
    pub exported_tokens: usize,
    pub tokens_expired: u64,
    /// New tokens not tracked because `max_tokens` was reached.
    pub tokens_untracked: u64,
    /// Tracked tokens counted in overflow (no slot: beyond `top_k` or the series budget).
    pub tokens_folded: usize,
    /// Per-token series as of the latest rebalance, and since then the estimate of new slots.
    pub token_series: usize,
}

pub struct Aggregator {
    limits: Limits,
    tokens: crate::token::LabelMap<TokenState>,
    /// The tokens whose slot is `Slot::Own`: exporting and rebalancing walk these, never
    /// the whole table (a million tokens would stall the ring buffer's drain).
    own: LabelSet,
    /// The tokens whose slot is `Slot::Held`, at most `HOLD_MAX`: what the tick releases.
    held: Vec<TokenLabel>,
    anonymous: ByEndpoint,
    overflow: ByEndpoint,
    unattributed_bytes: u64,
    tokens_expired: u64,
    tokens_untracked: u64,
    /// Per-token series (see `TokenState::cost`) of the exported tokens, plus the detector's
    /// series given at the latest rebalance.
    series: usize,
}

impl Aggregator {
    pub fn new(limits: Limits) -> Self {
        Aggregator {
            limits,
            tokens: Default::default(),
            own: Default::default(),
            held: Default::default(),
            anonymous: ByEndpoint::default(),
            overflow: ByEndpoint::default(),
            unattributed_bytes: 0,
            tokens_expired: 0,
            tokens_untracked: 0,
            series: 0,
        }
    }

    /// Series tokens may take: the budget less the reserve.
    fn token_budget(&self) -> usize {
        self.limits.max_series.saturating_sub(SERIES_RESERVE)
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// New bounds take effect at the next [`Aggregator::rebalance`].
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The series an increment for this token goes to right now.
    fn series(&mut self, token: Option<TokenLabel>) -> &mut ByEndpoint {
        let Some(label) = token else { return &mut self.anonymous };
        match self.tokens.get_mut(&label) {
            Some(t) => t.slot.series(&mut self.overflow),
            None => &mut self.overflow,
        }
    }

    pub fn request(&mut self, token: Option<TokenLabel>, class: Class, now_s: f64) {
        self.request_tallied(token, class, now_s, &Tally::default());
    }

    /// A request and what the detector counted for it (see [`Tally`]; nothing for a request
    /// without a token), both to the series the request goes to: a known token is looked
    /// up once, where counting them apart looked it up four times.
    pub fn request_tallied(&mut self, token: Option<TokenLabel>, class: Class, now_s: f64, tally: &Tally) {
        let Some(label) = token else {
            self.anonymous.slot(class).requests += 1;
            return;
        };
        let tau = self.limits.activity_tau_s;
        if let Some(t) = self.tokens.get_mut(&label) {
            t.seen(now_s, tau);
            t.classes |= class_bit(class);
            return count_request(t.slot.series(&mut self.overflow), class, tally);
        }
        self.track(label, now_s);
        if let Some(t) = self.tokens.get_mut(&label) {
            t.classes |= class_bit(class);
        }
        count_request(self.series(token), class, tally);
    }

    pub fn response_bytes(&mut self, token: Option<TokenLabel>, class: Class, bytes: u64) {
        self.series(token).slot(class).bytes += bytes;
    }

    /// What the detector counted for this token's request (see [`Tally`]), to the series the
    /// request itself went to. The pipeline uses [`Aggregator::request_tallied`], one look-up
    /// for both; this two-call form is the reference the tests hold it to.
    #[cfg(test)]
    pub(crate) fn tally(&mut self, token: TokenLabel, tally: &Tally) {
        if !tally.is_empty() {
            self.series(Some(token)).1.add(tally);
        }
    }

    /// Media bytes on the detector's vantage: a feature, next to the per-class bytes.
    pub fn media_bytes(&mut self, token: TokenLabel, bytes: u64) {
        let t = &mut self.series(Some(token)).1;
        t.media_bytes = t.media_bytes.saturating_add(bytes);
    }

    pub fn unattributed_bytes(&mut self, bytes: u64) {
        self.unattributed_bytes += bytes;
    }

    /// Start tracking a token not seen before, if there is room, with an export slot if one
    /// is free, else held, else folded.
    fn track(&mut self, label: TokenLabel, now_s: f64) {
        if self.tokens.len() >= self.limits.max_tokens {
            self.tokens_untracked += 1;
            return;
        }
        // A new token costs a class or two; the next rebalance counts what it really took.
        const NEW_TOKEN_SERIES: usize = 2 * 2 + TOKEN_GAUGES;
        let slot = if self.own.len() < self.limits.top_k && self.series + NEW_TOKEN_SERIES <= self.token_budget() {
            self.own.insert(label);
            self.series += NEW_TOKEN_SERIES;
            Slot::Own(Box::default())
        } else if self.held.len() < HOLD_MAX {
            self.held.push(label);
            Slot::Held(Box::default())
        } else {
            Slot::Folded
        };
        self.tokens.insert(label, TokenState { slot, last_seen_s: now_s, activity: 1.0, classes: 0 });
    }

    /// After the tick's pins: the held tokens that were not pinned go to overflow.
    pub fn release_held(&mut self) {
        for label in self.held.drain(..) {
            let Some(t) = self.tokens.get_mut(&label) else { continue };
            let held = match std::mem::replace(&mut t.slot, Slot::Folded) {
                Slot::Held(held) => held,
                // Pinned at this tick: `Own` already.
                own => {
                    t.slot = own;
                    continue;
                }
            };
            for (class, c) in held.iter() {
                let o = self.overflow.slot(class);
                o.requests += c.requests;
                o.bytes += c.bytes;
            }
            self.overflow.1.add(held.tally());
        }
    }

    /// Give this token its own series now, whatever its activity: a suspect must never be
    /// hidden in overflow. Pinned tokens may take the exported count past `top_k`; they are
    /// bounded by the detector's suspects, not by activity.
    pub fn pin(&mut self, label: TokenLabel) {
        let Some(t) = self.tokens.get_mut(&label) else { return };
        t.slot = match std::mem::replace(&mut t.slot, Slot::Folded) {
            Slot::Own(own) => Slot::Own(own),
            // A held newcomer keeps what it did before the tick (release_held skips it now).
            Slot::Held(held) => Slot::Own(held),
            Slot::Folded => Slot::Own(Box::default()),
        };
        self.own.insert(label);
    }

    /// Forget idle tokens and give export slots to the most active ones, within `top_k`
    /// and the series budget; `suspects` keep theirs whatever they cost. `other_series` are
    /// per-token series exported elsewhere (the detector's scores and reasons), which the
    /// budget has to leave room for.
    ///
    /// One pass over the table (expiry and ranking together, into a heap of `top_k`), then
    /// work on the few hundred tokens that have or get a slot: at a million tracked tokens
    /// this runs while the ring buffer waits, so it must not walk the table twice.
    pub fn rebalance(&mut self, now_s: f64, suspects: impl IntoIterator<Item = TokenLabel>, other_series: usize) {
        // Normally done by the tick already; a rebalance without one must not keep them.
        self.release_held();
        let idle = self.limits.idle_s;
        let tau = self.limits.activity_tau_s;
        let k = self.limits.top_k;
        let pinned: LabelSet = suspects.into_iter().collect();
        // The `k` most active tokens that are not suspects, least active on top.
        // Sized by what can be ranked, not by `top_k` alone: a configured top_k far above the
        // tokens tracked (the config fuzzer's 146,744,073) must not allocate gigabytes.
        let mut top: BinaryHeap<Reverse<(Activity, TokenLabel)>> =
            BinaryHeap::with_capacity(k.min(self.tokens.len()).saturating_add(1));
        let before = self.tokens.len();
        let own = &mut self.own;
        self.tokens.retain(|label, t| {
            if now_s - t.last_seen_s >= idle {
                own.remove(label);
                return false;
            }
            if k > 0 && !pinned.contains(label) {
                let ranked = (Activity(t.activity_at(now_s, tau)), *label);
                if top.len() < k {
                    top.push(Reverse(ranked));
                } else if top.peek().is_some_and(|least| ranked > least.0) {
                    top.pop();
                    top.push(Reverse(ranked));
                }
            }
            true
        });
        self.tokens_expired += (before - self.tokens.len()) as u64;

        // Candidates: suspects first, then the others, most active first.
        let mut candidates: Vec<(bool, Activity, TokenLabel)> = pinned
            .iter()
            .filter_map(|l| self.tokens.get(l).map(|t| (true, Activity(t.activity_at(now_s, tau)), *l)))
            .collect();
        candidates.extend(top.into_iter().map(|Reverse((a, l))| (false, a, l)));
        candidates.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        let budget = self.token_budget().saturating_sub(other_series);
        let mut used = 0usize;
        let mut keep = LabelSet::default();
        for (is_pinned, _, label) in candidates {
            let Some(t) = self.tokens.get(&label) else { continue };
            let cost = t.cost();
            if is_pinned || used + cost <= budget {
                used += cost;
                keep.insert(label);
            }
        }
        // No token is held here: release_held ran first.
        for label in self.own.iter().filter(|l| !keep.contains(*l)) {
            if let Some(t) = self.tokens.get_mut(label) {
                t.slot = Slot::Folded;
            }
        }
        for label in keep.iter().filter(|l| !self.own.contains(*l)) {
            if let Some(t) = self.tokens.get_mut(label) {
                t.slot = Slot::Own(Box::default());
            }
        }
        self.own = keep;
        self.series = used + other_series;
    }

    /// Tokens with their own series, and their counts.
    pub fn exported(&self) -> impl Iterator<Item = (TokenLabel, &ByEndpoint)> {
        self.own.iter().filter_map(|l| match &self.tokens.get(l)?.slot {
            Slot::Own(own) => Some((*l, &**own)),
            Slot::Held(_) | Slot::Folded => None,
        })
    }

    pub fn anonymous(&self) -> &ByEndpoint {
        &self.anonymous
    }

    pub fn overflow(&self) -> &ByEndpoint {
        &self.overflow
    }

    pub fn unattributed(&self) -> u64 {
        self.unattributed_bytes
    }

    pub fn stats(&self) -> AggregatorStats {
        AggregatorStats {
            tracked_tokens: self.tokens.len(),
            exported_tokens: self.own.len(),
            tokens_expired: self.tokens_expired,
            tokens_untracked: self.tokens_untracked,
            tokens_folded: self.tokens.len() - self.own.len(),
            token_series: self.series,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(endpoint: Endpoint) -> Class {
        Class { endpoint, vantage: Vantage::Socket }
    }

    fn label(n: u8) -> Option<TokenLabel> {
        Some(TokenLabel([n; 8]))
    }

    fn own(agg: &Aggregator, n: u8) -> Option<Counts> {
        agg.exported().find(|(l, _)| *l == TokenLabel([n; 8])).map(|(_, e)| e.total())
    }

    fn total_of_everything(agg: &Aggregator) -> Counts {
        let mut all = agg.anonymous().total();
        for c in agg.exported().map(|(_, e)| e.total()).chain([agg.overflow().total()]) {
            all.requests += c.requests;
            all.bytes += c.bytes;
        }
        all
    }

    #[test]
    fn tokens_get_their_own_series_while_slots_are_free() {
        let mut agg = Aggregator::new(Limits { top_k: 2, ..Limits::default() });
        for n in 1..=3 {
            agg.request(label(n), c(Endpoint::Sync), 0.0);
            agg.response_bytes(label(n), c(Endpoint::Sync), 100);
        }
        assert_eq!(own(&agg, 1), Some(Counts { requests: 1, bytes: 100 }));
        assert_eq!(own(&agg, 2), Some(Counts { requests: 1, bytes: 100 }));
        assert_eq!(own(&agg, 3), None);
        // The third is held until the tick, then counted in overflow.
        assert_eq!(agg.overflow().total(), Counts::default());
        agg.release_held();
        assert_eq!(own(&agg, 3), None);
        assert_eq!(agg.overflow().total(), Counts { requests: 1, bytes: 100 });
    }

    #[test]
    fn a_top_k_far_above_the_tokens_tracked_ranks_them_without_allocating_for_it() {
        // The config fuzzer's OOM: top_k = 146,744,073 preallocated a 2.35 GB heap at the
        // first rebalance. At usize::MAX / 64 a heap that size cannot even be asked for.
        let mut agg = Aggregator::new(Limits { top_k: usize::MAX / 64, ..Limits::default() });
        for n in 1..=3 {
            agg.request(label(n), c(Endpoint::Sync), 0.0);
        }
        agg.rebalance(1.0, [], 0);
        for n in 1..=3 {
            assert_eq!(own(&agg, n).map(|c| c.requests), Some(1));
        }
    }

    #[test]
    fn a_burst_over_before_the_tick_is_shown_under_its_token_when_the_tick_pins_it() {
        let mut agg = Aggregator::new(Limits { top_k: 1, ..Limits::default() });
        agg.request(label(1), c(Endpoint::Sync), 0.0);
        for _ in 0..8 {
            agg.request(label(2), c(Endpoint::Context), 0.1);
            agg.response_bytes(label(2), c(Endpoint::Context), 1000);
        }
        agg.request(label(3), c(Endpoint::Sync), 0.2);
        // The tick: the detector pins 2, not 3.
        agg.pin(TokenLabel([2; 8]));
        agg.release_held();
        assert_eq!(own(&agg, 2), Some(Counts { requests: 8, bytes: 8000 }));
        assert_eq!(agg.overflow().total(), Counts { requests: 1, bytes: 0 });
        assert_eq!(total_of_everything(&agg), Counts { requests: 10, bytes: 8000 }, "nothing counted twice");
        // Held at most HOLD_MAX at once; the rest go straight to overflow.
        for n in 0..(HOLD_MAX + 10) {
            agg.request(Some(TokenLabel([n as u8, 0xAB, 0, 0, 0, 0, 0, 1])), c(Endpoint::Sync), 1.0);
        }
        assert_eq!(agg.held.len(), HOLD_MAX);
        assert_eq!(agg.overflow().total().requests, 1 + 10);
        agg.release_held();
        assert!(agg.held.is_empty());
        assert_eq!(total_of_everything(&agg).requests, 10 + HOLD_MAX as u64 + 10);
    }

    /// One look-up for a request and its tally counts what the two calls counted, whatever
    /// the token's slot: own, held, folded, untracked, anonymous.
    #[test]
    fn a_tallied_request_counts_as_a_request_then_its_tally() {
        let limits = Limits { top_k: 3, max_tokens: 40, ..Limits::default() };
        let (mut apart, mut together) = (Aggregator::new(limits), Aggregator::new(limits));
        let tally = Tally { pages: 1, page_weight_16: 24, ..Tally::default() };
        for i in 0..400u32 {
            let token = (i % 7 != 0).then(|| TokenLabel([(i * 31 % 50) as u8, 1, 0, 0, 0, 0, 0, 0]));
            let class = c(if i % 3 == 0 { Endpoint::Messages } else { Endpoint::Sync });
            let t = if i % 3 == 0 { tally } else { Tally::default() };
            apart.request(token, class, f64::from(i));
            if let Some(label) = token {
                apart.tally(label, &t);
            }
            together.request_tallied(token, class, f64::from(i), &t);
            if i % 50 == 49 {
                apart.release_held();
                together.release_held();
            }
        }
        let seen = |agg: &Aggregator| {
            let mut own: Vec<_> = agg.exported().map(|(l, e)| (l, e.iter().collect::<Vec<_>>(), *e.tally())).collect();
            own.sort_by_key(|(l, _, _)| *l);
            let overflow = (agg.overflow().iter().collect::<Vec<_>>(), *agg.overflow().tally());
            (own, overflow, agg.anonymous().iter().collect::<Vec<_>>(), agg.stats().tokens_untracked)
        };
        assert_eq!(seen(&apart), seen(&together));
        assert!(seen(&apart).3 > 0 && !seen(&apart).0.is_empty());
    }

    #[test]
    fn anonymous_requests_are_counted_per_endpoint() {
        let mut agg = Aggregator::new(Limits::default());
        agg.request(None, c(Endpoint::Login), 0.0);
        agg.response_bytes(None, c(Endpoint::Login), 42);
        assert_eq!(
            agg.anonymous().iter().collect::<Vec<_>>(),
            vec![(c(Endpoint::Login), Counts { requests: 1, bytes: 42 })]
        );
    }

    #[test]
    fn rebalance_gives_slots_to_the_busiest_and_never_loses_a_count() {
        let mut agg = Aggregator::new(Limits { top_k: 1, ..Limits::default() });
        agg.request(label(1), c(Endpoint::Sync), 0.0);
        for _ in 0..50 {
            agg.request(label(2), c(Endpoint::Messages), 1.0);
            agg.response_bytes(label(2), c(Endpoint::Messages), 10);
        }
        assert_eq!(own(&agg, 2), None, "no free slot yet: token 2 is in overflow");
        agg.rebalance(2.0, [], 0);
        assert_eq!(own(&agg, 1), None);
        assert_eq!(own(&agg, 2), Some(Counts::default()), "a new series starts at zero");
        agg.request(label(2), c(Endpoint::Messages), 3.0);
        assert_eq!(own(&agg, 2), Some(Counts { requests: 1, bytes: 0 }));
        assert_eq!(
            total_of_everything(&agg).requests,
            1 + 50,
            "token 1's series went with its slot; token 2's own + overflow remain"
        );
        assert_eq!(agg.overflow().total().requests, 50, "overflow kept what it had");
    }

    #[test]
    fn idle_tokens_are_forgotten_and_free_their_slot() {
        let mut agg = Aggregator::new(Limits { top_k: 1, idle_s: 10.0, ..Limits::default() });
        agg.request(label(1), c(Endpoint::Sync), 0.0);
        agg.rebalance(11.0, [], 0);
        assert_eq!(agg.stats().tracked_tokens, 0);
        assert_eq!(agg.stats().tokens_expired, 1);
        agg.request(label(2), c(Endpoint::Sync), 12.0);
        assert!(own(&agg, 2).is_some());
    }

    #[test]
    fn beyond_max_tokens_new_tokens_count_in_overflow() {
        let mut agg = Aggregator::new(Limits { top_k: 10, max_tokens: 1, ..Limits::default() });
        agg.request(label(1), c(Endpoint::Sync), 0.0);
        agg.request(label(2), c(Endpoint::Sync), 0.0);
        assert_eq!(agg.stats().tracked_tokens, 1);
        assert_eq!(agg.stats().tokens_untracked, 1);
        assert_eq!(agg.overflow().total().requests, 1);
    }

    #[test]
    fn a_pinned_suspect_keeps_its_series_however_quiet_it_is() {
        let mut agg = Aggregator::new(Limits { top_k: 1, ..Limits::default() });
        agg.request(label(1), c(Endpoint::Sync), 0.0);
        agg.request(label(2), c(Endpoint::Messages), 0.0);
        assert_eq!(own(&agg, 2), None);
        agg.pin(TokenLabel([2; 8]));
        agg.request(label(2), c(Endpoint::Messages), 1.0);
        // Its first request was held until the pin, so it is its own too.
        assert_eq!(own(&agg, 2), Some(Counts { requests: 2, bytes: 0 }));
        for _ in 0..100 {
            agg.request(label(1), c(Endpoint::Sync), 2.0);
        }
        agg.rebalance(3.0, [TokenLabel([2; 8])], 0);
        assert!(own(&agg, 1).is_some(), "the busiest keeps the one top-K slot");
        assert!(own(&agg, 2).is_some(), "the suspect keeps its pinned slot");
    }

    #[test]
    fn among_many_tokens_the_k_busiest_and_every_suspect_hold_the_slots_and_nothing_else() {
        let mut agg = Aggregator::new(Limits { top_k: 10, idle_s: 100.0, max_series: 10_000, ..Limits::default() });
        let n = |i: u32| TokenLabel([i as u8, (i >> 8) as u8, 0, 0, 0, 0, 0, 1]);
        // 2,000 tokens; token i makes i % 50 requests, so the busiest are those with i % 50 = 49.
        for i in 0..2000u32 {
            for _ in 0..=(i % 50) {
                agg.request(Some(n(i)), c(Endpoint::Sync), 1.0);
            }
            agg.release_held();
        }
        // One old token, idle by the rebalance; one quiet suspect.
        agg.request(Some(n(5000)), c(Endpoint::Sync), -200.0);
        agg.release_held();
        let suspect = n(50);
        agg.rebalance(2.0, [suspect, n(9999)], 0);

        let mut exported: Vec<TokenLabel> = agg.exported().map(|(l, _)| l).collect();
        exported.sort();
        let mut busiest: Vec<TokenLabel> = (0..2000).filter(|i| i % 50 == 49).map(n).take(40).collect();
        assert!(exported.contains(&suspect), "the suspect is pinned beyond top_k");
        assert!(!exported.contains(&n(9999)), "a suspect the aggregator never saw takes no slot");
        exported.retain(|l| *l != suspect);
        assert_eq!(exported.len(), 10, "top_k slots besides the suspect");
        busiest.sort();
        assert!(exported.iter().all(|l| busiest.contains(l)), "only the busiest hold them: {exported:?}");
        let stats = agg.stats();
        assert_eq!(stats.tokens_expired, 1, "the idle token is forgotten");
        assert_eq!((stats.tracked_tokens, stats.exported_tokens, stats.tokens_folded), (2000, 11, 1989));
        // A token that lost its slot counts in overflow now, a slot holder under its own.
        let before = agg.overflow().total().requests;
        agg.request(Some(n(0)), c(Endpoint::Sync), 3.0);
        assert_eq!(agg.overflow().total().requests, before + 1);
        let holder = exported[0];
        agg.request(Some(holder), c(Endpoint::Sync), 3.0);
        assert_eq!(agg.exported().find(|(l, _)| *l == holder).map(|(_, e)| e.total().requests), Some(1));
    }
}
