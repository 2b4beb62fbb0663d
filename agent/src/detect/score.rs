//! From features to a score: a sum of bounded, explainable contributions.
//!
//! Every reason is a ramp over one or more features that is exactly 0 for what an
//! interactive client does, so the score of a normal token is 0, not "small", and a score
//! is the sum of the reasons it lists. Domain reasons (history, breadth, context, media,
//! search, keys, syncs) are capped at 1 each: any one of them at full strength alerts alone.
//! Corroborating reasons (a new client on the token, reads without a sync loop, deviation
//! from the token's own past, from the population) are capped below 1: they alert only
//! together with something else. A hard ceiling (a volume no client reaches) adds 1 whatever
//! the rest says.

use super::config::DetectConfig;
use super::features::{BASELINE, BASELINE_IN_POPULATION, Features, POPULATION};

/// Why a token scores: a bounded set of stable label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Many or large `/messages` pages, or deep paging into one room.
    HistoryPaging,
    /// Many distinct rooms read through history.
    RoomsBreadth,
    /// `/context` requests, weighted by their limit.
    ContextWalk,
    /// Media downloads (net of uploads) or media bytes.
    MediaSpree,
    /// `/search` requests.
    SearchSweep,
    /// Key-backup reads, by a young token or in bulk.
    KeyBackup,
    /// Initial or full-state syncs, or an inline filter asking for a huge timeline.
    FullSync,
    /// What a scraper must do: rooms paged without `from` and to their first event, member
    /// lists right after history, history as most of what the token asks for.
    ScrapePattern,
    /// A user agent or address that appeared on an established token, next to the old one.
    NewClient,
    /// Reads with no incremental `/sync` going, or beside a sync loop whose token writes to
    /// no room (no message, receipt, read marker, typing): nobody in front of the client.
    Headless,
    /// A reading token's client is no known Matrix client, or its head contradicts its
    /// user agent.
    ClientFingerprint,
    /// 10-minute volume far above the token's own history.
    BaselineDeviation,
    /// 10-minute volume far above the host's other active tokens.
    PopulationOutlier,
    /// A volume no normal client reaches.
    HardCeiling,
}

pub const REASONS: usize = 14;

impl Reason {
    pub const ALL: [Reason; REASONS] = [
        Reason::HistoryPaging,
        Reason::RoomsBreadth,
        Reason::ContextWalk,
        Reason::MediaSpree,
        Reason::SearchSweep,
        Reason::KeyBackup,
        Reason::FullSync,
        Reason::ScrapePattern,
        Reason::NewClient,
        Reason::Headless,
        Reason::ClientFingerprint,
        Reason::BaselineDeviation,
        Reason::PopulationOutlier,
        Reason::HardCeiling,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::HistoryPaging => "history_paging",
            Reason::RoomsBreadth => "rooms_breadth",
            Reason::ContextWalk => "context_walk",
            Reason::MediaSpree => "media_spree",
            Reason::SearchSweep => "search_sweep",
            Reason::KeyBackup => "key_backup",
            Reason::FullSync => "full_sync",
            Reason::ScrapePattern => "scrape_pattern",
            Reason::NewClient => "new_client",
            Reason::Headless => "headless",
            Reason::ClientFingerprint => "client_fingerprint",
            Reason::BaselineDeviation => "baseline_deviation",
            Reason::PopulationOutlier => "population_outlier",
            Reason::HardCeiling => "hard_ceiling",
        }
    }
}

/// The population statistics a token is compared with.
#[derive(Clone, Debug, PartialEq)]
pub struct Population {
    /// Active tokens the statistics were computed over.
    pub active: usize,
    pub median: [f64; POPULATION],
    /// What a token must exceed before it counts as an outlier (see `population_k`).
    pub scale: [f64; POPULATION],
}

impl Population {
    /// No population yet: the floors alone.
    pub fn floors(cfg: &DetectConfig) -> Self {
        Population { active: 0, median: [0.0; POPULATION], scale: cfg.population_floor_10m }
    }

    /// Statistics from the active tokens' population features, one `Vec` per feature
    /// (reordered in place).
    pub fn compute(columns: &mut [Vec<f64>; POPULATION], cfg: &DetectConfig) -> Self {
        let active = columns.first().map_or(0, Vec::len);
        let mut p = Population::floors(cfg);
        p.active = active;
        if active < cfg.population_min_tokens.max(1) {
            return p;
        }
        for (i, col) in columns.iter_mut().enumerate() {
            let med = median(col);
            for v in col.iter_mut() {
                *v = (*v - med).abs();
            }
            let mad = median(col) * 1.4826;
            let floor = cfg.population_floor_10m.get(i).copied().unwrap_or(0.0);
            let scale = (cfg.population_k * med).max(med + cfg.population_mads * mad).max(floor);
            if let Some(m) = p.median.get_mut(i) {
                *m = med;
            }
            if let Some(s) = p.scale.get_mut(i) {
                *s = if scale.is_finite() { scale } else { floor };
            }
        }
        p
    }
}

/// Median, reordering `v`; 0 for an empty slice; NaN values sort last.
fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mid = v.len() / 2;
    let (_, m, _) = v.select_nth_unstable_by(mid, |a, b| a.total_cmp(b));
    if m.is_finite() { *m } else { 0.0 }
}

/// A token's contributions, indexed like [`Reason::ALL`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Evidence(pub [f64; REASONS]);

impl Evidence {
    pub fn total(&self) -> f64 {
        self.0.iter().sum()
    }

    pub fn get(&self, r: Reason) -> f64 {
        self.0.get(r as usize).copied().unwrap_or(0.0)
    }

    fn set(&mut self, r: Reason, v: f64, cap: f64) {
        let v = if v.is_finite() { v.clamp(0.0, cap.max(0.0)) } else { 0.0 };
        if let Some(slot) = self.0.get_mut(r as usize) {
            *slot = v;
        }
    }

    /// Scale `group` down so that its sum is at most `cap` (the reasons keep their
    /// proportions, and the score stays the sum of the reasons listed).
    fn cap_group(&mut self, group: &[Reason], cap: f64) {
        let sum: f64 = group.iter().map(|&r| self.get(r)).sum();
        let cap = if cap.is_finite() { cap.max(0.0) } else { 0.0 };
        if sum > cap && sum > 0.0 {
            let k = cap / sum;
            for &r in group {
                if let Some(slot) = self.0.get_mut(r as usize) {
                    *slot *= k;
                }
            }
        }
    }

    /// Non-zero reasons, largest first.
    pub fn reasons(&self) -> impl Iterator<Item = (Reason, f64)> + '_ {
        let mut order = Reason::ALL;
        order.sort_by(|a, b| self.get(*b).total_cmp(&self.get(*a)));
        order.into_iter().map(|r| (r, self.get(r))).filter(|(_, v)| *v > 0.0)
    }
}

fn max_of<const N: usize>(v: [f64; N]) -> f64 {
    v.into_iter().fold(0.0, f64::max)
}

/// Score a token: its features, its baseline (expected per-minute rates), the population.
pub fn evaluate(f: &Features, baseline: &[f32; BASELINE], pop: &Population, cfg: &DetectConfig) -> Evidence {
    let mut e = Evidence::default();
    let c = cfg;
    // Breadth over depth: one or two rooms read, however deeply, is what a member exporting or
    // scrolling a room does; what it weighs is capped below (see `narrow_cap`).
    let narrow = f.rooms_10m.max(f.rooms_1h) < c.breadth_rooms;
    // How much of what the token asks for is history (room reads right after a room's
    // history are part of reading it, and not in `requests_10m`): 0 for a chatty reader, 1
    // for a token that does nothing else.
    let asked = f.requests_10m.max(f.pages_10m);
    let share = if f.pages_10m >= c.share_min_pages && asked > 0.0 {
        c.history_share.eval(f.pages_10m / asked).min(1.0)
    } else {
        0.0
    };

    e.set(
        Reason::HistoryPaging,
        max_of([
            c.history_1m.eval(f.history_1m),
            c.history_10m.eval(f.history_10m),
            c.history_1h.eval(f.history_1h),
            c.oversize_1m.eval(f.oversize_1m),
            c.oversize_10m.eval(f.oversize_10m),
            c.depth.eval(f.depth),
        ]),
        1.0,
    );
    // Rooms read through history count for a token that asks for little else: one that acts
    // in the rooms it opens (read markers, replies) is a member catching up, however many
    // rooms. Rooms merely named by requests are not history and are not weighed.
    let rooms_read = max_of([
        c.new_rooms_1m.eval(f.new_rooms_1m),
        c.rooms_10m.eval(f.rooms_10m),
        c.rooms_1h.eval(f.rooms_1h),
        c.whole_rooms_10m.eval(f.finished_10m),
        c.deep_whole_rooms_10m.eval(f.deep_whole_10m),
    ]);
    e.set(Reason::RoomsBreadth, max_of([rooms_read * share, c.rooms_touched_10m.eval(f.touched_10m)]), 1.0);
    e.set(Reason::ContextWalk, max_of([c.context_1m.eval(f.context_1m), c.context_10m.eval(f.context_10m)]), 1.0);
    e.set(
        Reason::MediaSpree,
        max_of([c.media_1m.eval(f.media_1m), c.media_10m.eval(f.media_10m), c.media_bytes_10m.eval(f.media_bytes_10m)]),
        1.0,
    );
    e.set(Reason::SearchSweep, max_of([c.search_1m.eval(f.search_1m), c.search_10m.eval(f.search_10m)]), 1.0);
    let young = if f.young_key_read { c.key_backup_young_weight } else { 0.0 };
    e.set(Reason::KeyBackup, young + c.key_reads_10m.eval(f.key_reads_10m), 1.0);
    e.set(Reason::FullSync, c.full_sync_10m.eval(f.full_sync_10m), 1.0);

    // Reaching rooms' first events is a scrape's trait only in a token that does little else,
    // as for whole rooms above: a chatty member scrolling back through small rooms between
    // messages reaches their starts too.
    let pattern = [
        c.fromless_10m.eval(f.fromless_10m),
        c.finished_10m.eval(f.finished_10m) * share,
        c.harvests_10m.eval(f.harvests_10m),
        share,
        c.resumed_10m.eval(f.resumed_10m),
    ];
    e.set(Reason::ScrapePattern, pattern.iter().map(|p| p.min(1.0) * c.pattern_weight).sum(), 1.0);

    let mut new_client = 0.0;
    if let Some(late) = f.late_agent {
        let mut w = c.new_agent_weight + if late.concurrent { c.concurrent_agent_weight } else { 0.0 };
        if late.syncs {
            w *= 0.5;
        }
        new_client += w;
    }
    if f.late_address.is_some_and(|l| l.concurrent) {
        new_client += c.concurrent_address_weight;
    }
    new_client += (f.foreign_10m * c.foreign_read_weight).min(c.foreign_reads_cap);
    e.set(Reason::NewClient, new_client, c.new_client_cap.min(0.99));

    // Reading with no client in front of it: no sync loop at all, or one whose token never
    // writes to a room (no message, receipt, read marker, typing), which every client does
    // when a person reads new events in it. The second is weaker: a member can read rooms
    // they had already read, and a sync loop is some evidence of a client. It weighs paging
    // for minutes only, not a minute's reads: opening rooms on a new device (members lazily
    // loaded, a page each) makes those before the person has anything to acknowledge.
    let pages = c.headless_pages_10m.eval(f.pages_10m);
    let h = if !f.live {
        c.headless_reads_1m.eval(f.reads_1m).max(pages).min(1.0) * c.headless_weight
    } else if !f.acted_10m {
        pages.min(1.0) * c.silent_sync_weight.min(c.headless_weight)
    } else {
        0.0
    };
    if h > 0.0 {
        e.set(Reason::Headless, h, c.headless_weight.min(0.99));
    }

    if f.history_1m + f.history_10m > 0.0 || f.reads_1m > 0.0 {
        let mut fp = 0.0;
        if f.unknown_client {
            fp += c.unknown_client_weight;
        }
        if f.client_mismatch {
            fp += c.client_mismatch_weight;
        }
        e.set(Reason::ClientFingerprint, fp, c.fingerprint_cap.min(0.99));
    }

    let pop_values = f.population();
    let mut deviation: f64 = 0.0;
    let seasoned = f.age_s >= c.baseline_min_age_s;
    // A narrow reader's history volume is already weighed (and capped) above.
    let counts = |j: usize| !(narrow && (j == 0 || j == POPULATION - 1));
    for (i, rate) in baseline.iter().enumerate().filter(|_| seasoned) {
        let j = BASELINE_IN_POPULATION.get(i).copied().unwrap_or(usize::MAX);
        if !counts(j) {
            continue;
        }
        let x = pop_values.get(j).copied().unwrap_or(0.0);
        let floor = c.baseline_floor_10m.get(i).copied().unwrap_or(0.0);
        let expected = (10.0 * f64::from(*rate)).max(floor);
        if expected > 0.0 {
            deviation = deviation.max(c.baseline_ratio.eval(x / expected).min(1.0));
        }
    }
    e.set(Reason::BaselineDeviation, deviation * c.baseline_weight, c.baseline_weight.min(0.99));

    let mut outlier: f64 = 0.0;
    for (j, (x, scale)) in pop_values.iter().zip(pop.scale).enumerate() {
        if scale > 0.0 && counts(j) {
            outlier = outlier.max(c.population_ratio.eval(x / scale).min(1.0));
        }
    }
    e.set(Reason::PopulationOutlier, outlier * c.population_weight, c.population_weight.min(0.99));

    let over = |x: f64, ceiling: f64| x > ceiling;
    // History volume in one or two rooms is depth, not breadth: no ceiling of its own.
    let history_ceiling = !narrow
        && (over(f.pages_1m, f64::from(c.ceil_pages_1m))
            || over(f.history_10m, f64::from(c.ceil_history_10m))
            || over(f.depth, f64::from(c.ceil_depth)));
    // Rooms opened by a token that also acts in them (read markers, replies) are a member
    // catching up, however many: the room ceilings, like the room ramps, weigh the rooms by
    // the history share (a token that does little else meets them at their count, one at
    // half the share's ramp at twice it). One that only touches rooms meets `rooms_touched_10m`.
    let rooms_ceiling =
        over(f.rooms_10m * share, f64::from(c.ceil_rooms_10m)) || over(f.rooms_1h * share, f64::from(c.ceil_rooms_1h));
    let ceiling = history_ceiling
        || rooms_ceiling
        || over(f.context_large_10m, f64::from(c.ceil_context_large_10m))
        || over(f.search_10m, f64::from(c.ceil_search_10m))
        || over(f.media_10m, f64::from(c.ceil_media_10m))
        || over(f.media_bytes_10m, c.ceil_media_bytes_10m as f64)
        || over(f.key_reads_10m, f64::from(c.ceil_key_reads_10m))
        || over(f.full_sync_10m, f64::from(c.ceil_full_syncs_10m))
        || over(f.bytes_1h, c.ceil_bytes_1h as f64);
    e.set(Reason::HardCeiling, if ceiling { 1.0 } else { 0.0 }, 1.0);
    if narrow {
        e.cap_group(&[Reason::HistoryPaging, Reason::RoomsBreadth, Reason::ScrapePattern], c.narrow_reading_cap);
        // One room read deep is what a member's export or long scrollback is, whatever
        // client did it. Room after room (the next one read deep too) is how a scrape
        // starts: its reading still weighs as depth, but a client that does not sync or
        // is no Matrix client now adds to it in full.
        if f.deep_rooms_10m < c.room_after_room {
            e.cap_group(&NARROW, c.narrow_cap.min(0.99));
        }
    }
    e
}

/// What a narrow reader's score is made of, besides evidence of another kind (media,
/// search, `/context`, keys, full syncs, a second client, a ceiling): together below 1.
const NARROW: [Reason; 7] = [
    Reason::HistoryPaging,
    Reason::RoomsBreadth,
    Reason::ScrapePattern,
    Reason::Headless,
    Reason::ClientFingerprint,
    Reason::BaselineDeviation,
    Reason::PopulationOutlier,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DetectConfig {
        DetectConfig::default()
    }

    fn score(f: &Features) -> Evidence {
        let c = cfg();
        evaluate(f, &[0.5, 1.0, 1.0, 0.5], &Population::floors(&c), &c)
    }

    fn interactive() -> Features {
        Features { live: true, acted_10m: true, ..Features::default() }
    }

    #[test]
    fn reason_labels_are_distinct_snake_case() {
        let labels: std::collections::BTreeSet<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), REASONS);
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert!(r.as_str().bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
    }

    #[test]
    fn an_idle_or_ordinary_token_scores_exactly_zero() {
        assert_eq!(score(&interactive()).total(), 0.0);
        let ordinary = Features {
            live: true,
            acted_10m: true,
            history_1m: 3.0,
            history_10m: 6.0,
            pages_1m: 3.0,
            depth: 3.0,
            new_rooms_1m: 1.0,
            rooms_10m: 2.0,
            touched_10m: 8.0,
            room_reads_10m: 3.0,
            reads_1m: 5.0,
            ..Features::default()
        };
        assert_eq!(score(&ordinary).total(), 0.0, "{:?}", score(&ordinary));
    }

    #[test]
    fn corroborating_reasons_never_alert_alone() {
        let c = cfg();
        let f = Features {
            late_agent: Some(super::super::clients::Late { concurrent: true, syncs: false }),
            late_address: Some(super::super::clients::Late { concurrent: true, syncs: false }),
            foreign_10m: 1000.0,
            reads_1m: 1000.0,
            ..Features::default()
        };
        let e = score(&f);
        assert!(e.get(Reason::NewClient) < 1.0 && e.get(Reason::Headless) < 1.0);
        let crowd = Population { active: 100, median: [0.0; POPULATION], scale: [1.0; POPULATION] };
        let e = evaluate(&Features { history_10m: 1e9, live: true, ..Features::default() }, &[0.0; 4], &crowd, &c);
        assert!(e.get(Reason::PopulationOutlier) < 1.0 && e.get(Reason::BaselineDeviation) < 1.0);
    }

    #[test]
    fn any_hard_ceiling_alerts_alone() {
        let c = cfg();
        // History ceilings are breadth's: a reader of three rooms or more.
        let broad = || Features { rooms_10m: c.breadth_rooms, ..interactive() };
        let history = [
            Features { pages_1m: f64::from(c.ceil_pages_1m) + 1.0, ..broad() },
            Features { history_10m: f64::from(c.ceil_history_10m) + 1.0, ..broad() },
            Features { depth: f64::from(c.ceil_depth) + 1.0, ..broad() },
        ];
        for f in history {
            assert!(score(&f).total() >= 1.0, "{f:?}");
            let narrow = Features { rooms_10m: 1.0, rooms_1h: 1.0, ..f };
            assert!(score(&narrow).total() < 1.0, "one room's depth alone: {narrow:?}");
        }
        // Room ceilings are a history reader's: rooms paged by a token that asks for little
        // else. The same rooms opened a page each, a read marker in each, are a catch-up.
        let rooms = f64::from(c.ceil_rooms_10m) + 1.0;
        let reading = Features { rooms_10m: rooms, pages_10m: rooms, requests_10m: rooms, ..interactive() };
        let catching_up = Features { requests_10m: 2.0 * rooms, ..reading.clone() };
        assert_eq!(score(&catching_up).get(Reason::HardCeiling), 0.0, "{catching_up:?}");
        let cases = [
            reading,
            Features { context_large_10m: f64::from(c.ceil_context_large_10m) + 1.0, ..interactive() },
            Features { search_10m: f64::from(c.ceil_search_10m) + 1.0, ..interactive() },
            Features { media_bytes_10m: c.ceil_media_bytes_10m as f64 + 1.0, ..interactive() },
            Features { bytes_1h: c.ceil_bytes_1h as f64 + 1.0, ..interactive() },
        ];
        for f in cases {
            assert!(score(&f).total() >= 1.0, "{f:?}");
            assert_eq!(score(&f).get(Reason::HardCeiling), 1.0);
        }
    }

    #[test]
    fn nan_and_infinite_features_never_make_a_nan_score() {
        let f = Features {
            history_1m: f64::NAN,
            rooms_10m: f64::INFINITY,
            media_bytes_10m: f64::NAN,
            reads_1m: f64::INFINITY,
            bytes_10m: f64::NAN,
            ..Features::default()
        };
        let c = cfg();
        let e = evaluate(&f, &[f32::NAN, f32::INFINITY, 0.0, -1.0], &Population::floors(&c), &c);
        assert!(e.total().is_finite());
    }

    #[test]
    fn population_scale_has_a_floor_so_a_quiet_crowd_does_not_make_everyone_an_outlier() {
        let c = cfg();
        let mut cols: [Vec<f64>; POPULATION] = std::array::from_fn(|_| vec![0.0; 12]);
        if let Some(col) = cols.first_mut() {
            col[0] = 30.0; // a heavy user among idle ones
        }
        let p = Population::compute(&mut cols, &c);
        assert_eq!(p.scale, c.population_floor_10m);
        let mut busy: [Vec<f64>; POPULATION] =
            std::array::from_fn(|_| (0..100).map(|i| f64::from(i % 10) * 20.0).collect());
        let p = Population::compute(&mut busy, &c);
        assert!(p.scale.first().is_some_and(|&s| s > c.population_floor_10m[0]), "{p:?}");
        let mut few: [Vec<f64>; POPULATION] = std::array::from_fn(|_| vec![1000.0; 3]);
        assert_eq!(Population::compute(&mut few, &c).scale, c.population_floor_10m);
    }
}
