//! Every threshold of the detector, with the defaults documented in `docs/detection.md`.
//!
//! The defaults are set against an Element-like population (a `/sync` long-poll at least
//! every 30 s, a few sends a minute, rare scrollback of 1–3 pages of 20–50 events) with room
//! for a heavy user (five times that, a few pages in several rooms), and against the attacks
//! listed in the doc, each of which must reach a score of 1.0 within a minute. Tune them there,
//! not here: the doc says what each one trades.

use serde::Deserialize;

/// A linear ramp: a feature below `start` contributes nothing, at `full` it contributes the
/// reason's whole weight (1.0 unless said otherwise), in between proportionally, above
/// `full` it keeps growing up to the reason's cap.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ramp {
    pub start: f64,
    pub full: f64,
}

impl Ramp {
    pub const fn new(start: f64, full: f64) -> Self {
        Ramp { start, full }
    }

    /// 0 at or below `start` (and for NaN), 1 at `full`, linear between, unbounded above.
    /// A ramp with `full <= start` is a step at `start`.
    pub fn eval(self, x: f64) -> f64 {
        if x.is_nan() || x <= self.start {
            return 0.0;
        }
        let span = self.full - self.start;
        if span.is_nan() || span <= 0.0 {
            return 1.0;
        }
        let v = (x - self.start) / span;
        if v.is_finite() { v } else { 1.0 }
    }
}

/// Detector settings. Counts are per window (1 min, 10 min, 1 h; see `window.rs` for how
/// exact those windows are); "weight" is page-weight (see [`DetectConfig::normal_limit`]).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectConfig {
    // --- bookkeeping -------------------------------------------------------------------
    /// Score at which a token is pinned: [`super::Detector::suspects`] returns it so that it
    /// keeps its own metric series, and its baseline stops learning.
    pub pin_score: f64,
    /// How long a token that alerted stays listed (and is not expired).
    pub alert_memory_s: f64,
    /// A token with no request for this long is forgotten.
    pub idle_expiry_s: f64,
    /// Tokens tracked at most; beyond it the least recently seen eighth is dropped (never a
    /// suspect while others can go).
    pub max_tokens: usize,

    // --- request shape -------------------------------------------------------------------
    /// `limit` assumed when a request gives none (or an unparsable one): the spec's default.
    pub default_limit: u32,
    /// Largest `limit` an interactive client asks for. A page asking for this or fewer
    /// events weighs 1; above it a page weighs `1 + 3·log2(limit / normal_limit)`
    /// (limit 100 → 4, 200 → 7, 1000 → 14), capped at `page_weight_max`.
    pub normal_limit: u32,
    pub page_weight_max: f64,
    /// A `/context` at or above this `limit` is "large" (hard ceiling below).
    pub large_limit: u32,

    // --- history_paging: /messages and room /initialSync, both directions ------------------
    pub history_1m: Ramp,
    pub history_10m: Ramp,
    pub history_1h: Ramp,
    /// Page-weight beyond 1 per page (what the `limit`s above `normal_limit` add): pages
    /// no interactive client asks for, however few.
    pub oversize_1m: Ramp,
    pub oversize_10m: Ramp,
    /// Consecutive pages in one room, each from a new `from` token.
    pub depth: Ramp,

    // --- rooms_breadth: rooms read with /messages, /context, room /initialSync -------------
    /// Rooms first paged in the last minute (exact up to the 8-room table). This and the two
    /// below are weighed by the `history_share` ramp: a member clicking through unread rooms
    /// pages each (Element fills a room's view with a back-page) and moves its read marker,
    /// many rooms a minute; a scrape of rooms asks for little else.
    pub new_rooms_1m: Ramp,
    pub rooms_10m: Ramp,
    pub rooms_1h: Ramp,
    /// Rooms named by any request (sends and receipts included).
    pub rooms_touched_10m: Ramp,
    /// Rooms read to their first event (10 min), times the `history_share` ramp: whole rooms
    /// taken by a token that asks for little else. A room read whole is a room's history
    /// taken, not glanced at; a chatty reader who reaches a small room's start weighs nothing
    /// here (its share is low).
    pub whole_rooms_10m: Ramp,
    /// Rooms scrolled through (10 min), times the same share: read to their first event
    /// through `deep_room_pages` pages or more (not small rooms whose start came with the
    /// first page), or paged `deep_open_room_pages` deep, start or not. Opening a small room
    /// in any client reaches its start; paging several rooms deep, one after the other, with
    /// nothing else, is the "the same depth across several rooms".
    pub deep_whole_rooms_10m: Ramp,

    // --- context_walk: /context, page-weighted by its limit -------------------------------
    pub context_1m: Ramp,
    pub context_10m: Ramp,

    // --- media_spree: downloads net of uploads (a thumbnail counts a quarter) --------------
    pub media_1m: Ramp,
    pub media_10m: Ramp,
    pub media_bytes_10m: Ramp,

    // --- search_sweep ---------------------------------------------------------------------
    pub search_1m: Ramp,
    pub search_10m: Ramp,

    // --- key_backup: GET /room_keys/… with `version=` -------------------------------------
    /// A token younger than this reading the key backup gets `key_backup_young_weight`.
    pub key_backup_young_s: f64,
    /// Corroboration, not half an alert: every new login of Element restores the backup, and
    /// then its person reads the rooms they can now decrypt. Weighed like a new user agent on
    /// a token (`new_agent_weight`).
    pub key_backup_young_weight: f64,
    pub key_reads_10m: Ramp,

    // --- full_sync: /sync without `since` or with full_state, /initialSync, sliding sync
    //     without `pos`; an inline filter's timeline limit weighs like a page -----------------
    pub full_sync_10m: Ramp,

    // --- new_client: a user agent / address first seen after the token's first seconds -----
    /// Clients seen within this long of the token's first request are its own.
    pub client_grace_s: f64,
    pub new_agent_weight: f64,
    /// Added when the older agent is still used after the new one appeared.
    pub concurrent_agent_weight: f64,
    /// Added for a new X-Forwarded-For address used alongside the old one.
    pub concurrent_address_weight: f64,
    /// Reads (pages, context, members/state/event, search, media) by a new agent that does
    /// not sync, each adding this, up to `foreign_reads_cap`.
    pub foreign_read_weight: f64,
    pub foreign_reads_cap: f64,
    pub new_client_cap: f64,

    // --- headless: reads with no incremental /sync for `live_sync_s` -----------------------
    pub live_sync_s: f64,
    pub headless_reads_1m: Ramp,
    /// History pages in 10 min with no sync loop: no client pages for minutes without one.
    pub headless_pages_10m: Ramp,
    pub headless_weight: f64,
    /// History pages in 10 min (`headless_pages_10m`) by a token that syncs but has not
    /// written to any room (no message, receipt, read marker or typing) in 10 min weigh this
    /// much at full: a sync loop with nobody in front of it, the fig leaf a scraper keeps.
    pub silent_sync_weight: f64,

    // --- breadth over depth ---------------------------------------------------------------
    /// A token whose history reads (10 min and 1 h) cover fewer rooms than this is a
    /// *narrow* reader: one or two rooms, however deep (an export, a long scrollback).
    pub breadth_rooms: f64,
    /// What a narrow reader's reading can weigh at most (history_paging, rooms_breadth and
    /// scrape_pattern together).
    pub narrow_reading_cap: f64,
    /// What a narrow reader's whole score can reach from its reading and from what its
    /// client looks like (headless, client_fingerprint, baseline, population): below 1, so
    /// that a deep read of one room is never an alert alone.
    pub narrow_cap: f64,
    /// A room paged this many pages deep (following `from` tokens), or read to its first
    /// event, is *read deep*.
    pub deep_room_pages: f64,
    /// A room paged this many pages deep (following `from` tokens) counts among the rooms
    /// scrolled through (`deep_whole_rooms_10m`) before its first event is reached: twice
    /// `deep_room_pages`, past the few pages a person scrolls back to find something. A big
    /// room is history taken page by page; counting it only at its start made scrapes of big
    /// rooms at small pages the slowest to see.
    pub deep_open_room_pages: f64,
    /// A narrow reader with this many rooms read deep in 10 min reads *room after room*:
    /// its reading stays capped at `narrow_reading_cap` (depth is still not breadth), but
    /// `narrow_cap` no longer holds what its client looks like below 1.
    pub room_after_room: f64,

    // --- scrape_pattern: what a scraper must do to get the data --------------------------
    /// History pages without `from` (10 min): Element pages from its timeline's
    /// `prev_batch`; a script starts each room from its live end.
    pub fromless_10m: Ramp,
    /// Rooms read to their first event (10 min).
    pub finished_10m: Ramp,
    /// `/members` or `/state` right after a room's history (10 min).
    pub harvests_10m: Ramp,
    /// History pages as a share of the requests that name a room, media or search, other than
    /// room reads right after that room's history (10 min), counted once `share_min_pages`
    /// pages were made. Such reads (harvests and their like) are part of the scrape, not
    /// other activity diluting it; nor is a client's housekeeping, which names no room.
    pub history_share: Ramp,
    pub share_min_pages: f64,
    /// Pages resuming a room's paging right after another room's page (10 min): rooms paged
    /// turn about, which keeps each from being finished for minutes.
    pub resumed_10m: Ramp,
    /// Each of the five above at full strength adds this much.
    pub pattern_weight: f64,

    // --- client_fingerprint: a reading token's client is no known Matrix client -----------
    pub unknown_client_weight: f64,
    pub client_mismatch_weight: f64,
    pub fingerprint_cap: f64,

    // --- baseline_deviation: 10-min volume against the token's own EWMA -------------------
    /// Time constant of the per-minute EWMAs. Until a token has been seen for this long
    /// its baseline is the running mean of its minutes, the prior counting as
    /// `baseline_prior_minutes` of them.
    pub baseline_tau_s: f64,
    pub baseline_prior_minutes: f64,
    /// Tokens younger than this have too little history to deviate from.
    pub baseline_min_age_s: f64,
    /// Prior per-minute rates of a new token: history weight, room reads, media, MB sent.
    pub baseline_prior: [f64; 4],
    /// 10-min volumes below these never count as a deviation.
    pub baseline_floor_10m: [f64; 4],
    /// Ratio of 10-min volume to the expected (max of 10·EWMA and floor).
    pub baseline_ratio: Ramp,
    pub baseline_weight: f64,

    // --- population_outlier: 10-min volume against the active tokens ----------------------
    /// Population statistics are recomputed this often.
    pub population_every_s: f64,
    /// Fewer active tokens than this and the population view uses its floors only.
    pub population_min_tokens: usize,
    /// Scale = max(population_k · median, median + population_mads · 1.4826·MAD, floor).
    pub population_k: f64,
    pub population_mads: f64,
    /// Floors: history weight, room reads, media, MB sent, rooms paged (10 min).
    pub population_floor_10m: [f64; 5],
    pub population_ratio: Ramp,
    pub population_weight: f64,

    // --- hard ceilings: each alone means score >= 1 ---------------------------------------
    pub ceil_pages_1m: u32,
    pub ceil_history_10m: u32,
    /// Rooms read through history, weighed by the `history_share` ramp as the room ramps are
    /// (a token that does little else meets it at this count).
    pub ceil_rooms_10m: u32,
    pub ceil_rooms_1h: u32,
    pub ceil_depth: u32,
    pub ceil_context_large_10m: u32,
    pub ceil_search_10m: u32,
    pub ceil_media_10m: u32,
    pub ceil_media_bytes_10m: u64,
    pub ceil_key_reads_10m: u32,
    pub ceil_full_syncs_10m: u32,
    pub ceil_bytes_1h: u64,
}

const MIB: u64 = 1 << 20;

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            pin_score: 0.5,
            alert_memory_s: 3600.0,
            idle_expiry_s: 3600.0,
            max_tokens: 100_000,

            default_limit: 10,
            normal_limit: 50,
            page_weight_max: 15.0,
            large_limit: 100,

            history_1m: Ramp::new(12.0, 40.0),
            history_10m: Ramp::new(45.0, 150.0),
            history_1h: Ramp::new(150.0, 450.0),
            oversize_1m: Ramp::new(4.0, 20.0),
            oversize_10m: Ramp::new(12.0, 60.0),
            depth: Ramp::new(10.0, 50.0),

            new_rooms_1m: Ramp::new(3.0, 8.0),
            rooms_10m: Ramp::new(7.0, 20.0),
            rooms_1h: Ramp::new(15.0, 40.0),
            rooms_touched_10m: Ramp::new(40.0, 120.0),
            whole_rooms_10m: Ramp::new(3.0, 8.0),
            deep_whole_rooms_10m: Ramp::new(2.0, 5.0),

            context_1m: Ramp::new(4.0, 16.0),
            context_10m: Ramp::new(12.0, 48.0),

            media_1m: Ramp::new(18.0, 54.0),
            media_10m: Ramp::new(80.0, 300.0),
            media_bytes_10m: Ramp::new((200 * MIB) as f64, (1024 * MIB) as f64),

            search_1m: Ramp::new(4.0, 12.0),
            search_10m: Ramp::new(12.0, 40.0),

            key_backup_young_s: 600.0,
            key_backup_young_weight: 0.2,
            key_reads_10m: Ramp::new(30.0, 150.0),

            full_sync_10m: Ramp::new(3.0, 10.0),

            client_grace_s: 10.0,
            new_agent_weight: 0.2,
            concurrent_agent_weight: 0.15,
            concurrent_address_weight: 0.1,
            foreign_read_weight: 0.04,
            foreign_reads_cap: 0.5,
            new_client_cap: 0.9,

            live_sync_s: 90.0,
            headless_reads_1m: Ramp::new(3.0, 15.0),
            headless_pages_10m: Ramp::new(10.0, 30.0),
            headless_weight: 0.5,
            silent_sync_weight: 0.25,

            breadth_rooms: 3.0,
            narrow_reading_cap: 0.6,
            narrow_cap: 0.9,
            deep_room_pages: 3.0,
            deep_open_room_pages: 6.0,
            room_after_room: 2.0,

            fromless_10m: Ramp::new(2.0, 6.0),
            finished_10m: Ramp::new(3.0, 8.0),
            harvests_10m: Ramp::new(2.0, 6.0),
            history_share: Ramp::new(0.5, 0.9),
            resumed_10m: Ramp::new(4.0, 12.0),
            share_min_pages: 10.0,
            pattern_weight: 0.3,

            unknown_client_weight: 0.15,
            client_mismatch_weight: 0.25,
            fingerprint_cap: 0.3,

            baseline_tau_s: 3.0 * 3600.0,
            baseline_prior_minutes: 10.0,
            baseline_min_age_s: 1800.0,
            baseline_prior: [0.5, 1.0, 1.0, 0.5],
            baseline_floor_10m: [15.0, 40.0, 30.0, 100.0],
            baseline_ratio: Ramp::new(3.0, 12.0),
            baseline_weight: 0.5,

            population_every_s: 10.0,
            population_min_tokens: 8,
            population_k: 5.0,
            population_mads: 6.0,
            population_floor_10m: [45.0, 80.0, 80.0, 300.0, 7.0],
            population_ratio: Ramp::new(1.0, 4.0),
            population_weight: 0.5,

            ceil_pages_1m: 120,
            ceil_history_10m: 400,
            ceil_rooms_10m: 20,
            ceil_rooms_1h: 40,
            ceil_depth: 100,
            ceil_context_large_10m: 10,
            ceil_search_10m: 60,
            ceil_media_10m: 600,
            ceil_media_bytes_10m: 2048 * MIB,
            ceil_key_reads_10m: 300,
            ceil_full_syncs_10m: 10,
            ceil_bytes_1h: 4096 * MIB,
        }
    }
}

impl DetectConfig {
    /// Page-weight of a request asking for `limit` events (see [`DetectConfig::normal_limit`]).
    pub fn page_weight(&self, limit: u32) -> f64 {
        let normal = f64::from(self.normal_limit.max(1));
        let l = f64::from(limit);
        let w = if l <= normal { 1.0 } else { 1.0 + 3.0 * (l / normal).log2() };
        let max = if self.page_weight_max.is_finite() { self.page_weight_max.max(1.0) } else { 1.0 };
        w.clamp(1.0, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramps_are_zero_below_start_linear_between_and_safe_on_nan() {
        let r = Ramp::new(10.0, 20.0);
        assert_eq!(r.eval(5.0), 0.0);
        assert_eq!(r.eval(10.0), 0.0);
        assert_eq!(r.eval(15.0), 0.5);
        assert_eq!(r.eval(30.0), 2.0);
        assert_eq!(r.eval(f64::NAN), 0.0);
        assert_eq!(Ramp::new(10.0, 10.0).eval(11.0), 1.0);
        assert_eq!(Ramp::new(10.0, f64::NAN).eval(11.0), 1.0);
        assert_eq!(r.eval(f64::INFINITY), 1.0);
    }

    #[test]
    fn page_weight_is_one_for_interactive_limits_and_grows_with_the_log_of_larger_ones() {
        let c = DetectConfig::default();
        assert_eq!(c.page_weight(0), 1.0);
        assert_eq!(c.page_weight(20), 1.0);
        assert_eq!(c.page_weight(50), 1.0);
        assert!((c.page_weight(100) - 4.0).abs() < 1e-9);
        assert!((c.page_weight(200) - 7.0).abs() < 1e-9);
        assert!((c.page_weight(1000) - 13.97).abs() < 0.01);
        assert_eq!(c.page_weight(u32::MAX), 15.0);
    }

    #[test]
    fn the_config_is_read_from_toml_with_defaults_for_what_is_missing() {
        let c: DetectConfig =
            toml::from_str("pin_score = 0.6\nhistory_1m = { start = 5, full = 9 }\n").expect("parses");
        assert_eq!(c.pin_score, 0.6);
        assert_eq!(c.history_1m, Ramp::new(5.0, 9.0));
        assert_eq!(c.rooms_10m, DetectConfig::default().rooms_10m);
        assert!(toml::from_str::<DetectConfig>("no_such_key = 1").is_err());
    }
}
