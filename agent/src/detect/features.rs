//! A token's state: what it did, in bounded memory, and the features read from it.
//!
//! Three rings of counters (≈1 min, ≈10 min, ≈1 h), three HyperLogLog sketches of rooms, the
//! eight rooms last paged, four user agents and four addresses, four EWMAs. Each has a fixed
//! upper size, but a token pays only for what it uses: non-zero ring counters, the rooms it
//! named (registers only past 64 of them), the rooms it paged, its second and later clients.
//! [`TokenState`] itself is 192 bytes; tests pin it, what ordinary tokens cost in all, and
//! the bound for any token. Allocation happens only when a token uses something new.

use crate::endpoint::Endpoint;

use super::clients::{Clients, Late, MISMATCH, UNKNOWN};
use super::config::DetectConfig;
use super::hll::{RoomSketches, Sketch};
use super::request::Shape;
use super::rooms::RoomTable;
use super::tally::Tally;
use super::window::{Bytes, Count, QUARTERS, Ring, Rings, SIXTEENTHS, Totals};

/// Granularities, in seconds, of the two room-sketch epochs.
const ROOMS_10M_EPOCH: u32 = 300;
const ROOMS_1H_EPOCH: u32 = 1800;
/// A room not paged for this long starts a new paging session (depth back to 1).
const ROOM_SESSION_S: u32 = 600;
/// `/members` or `/state` this soon after a room's latest page is "right after its history".
const HARVEST_WITHIN_S: u32 = 30;

/// Features the baseline follows, per minute: history weight (pages and `/context`), room
/// reads, media downloads (net), megabytes sent.
pub const BASELINE: usize = 4;
/// Features the population view compares, per 10 minutes: the four baseline ones (same
/// order) plus rooms paged, last.
pub const POPULATION: usize = 5;
/// Where each baseline feature sits among the population ones.
pub const BASELINE_IN_POPULATION: [usize; BASELINE] = [0, 1, 2, 3];

const MB: f64 = 1_048_576.0;

/// Per-minute rates of the token's own history: a running mean over its first minutes
/// (the prior counting as `baseline_prior_minutes` of them), an EWMA of time constant
/// `baseline_tau_s` after that. Idle minutes count as zeros.
#[derive(Clone, Debug)]
pub struct Baseline {
    pub rate: [f32; BASELINE],
    /// Minutes folded in so far (saturating).
    pub minutes: u32,
}

impl Baseline {
    pub fn new(prior: [f64; BASELINE]) -> Self {
        let rate = prior.map(|p| if p.is_finite() { p.max(0.0) as f32 } else { 0.0 });
        Baseline { rate, minutes: 0 }
    }

    fn of_minute(b: &Totals) -> [f64; BASELINE] {
        let history = (f64::from(b.get(Count::PageWeight)) + f64::from(b.get(Count::ContextWeight))) / SIXTEENTHS;
        let media =
            (f64::from(b.get(Count::MediaDownloads)) - f64::from(b.get(Count::MediaUploads))).max(0.0) / QUARTERS;
        [history, f64::from(b.get(Count::RoomReads)), media, b.bytes(Bytes::All) as f64 / MB]
    }

    fn alpha(&self, alpha_tau: f64, prior_minutes: f64) -> f64 {
        alpha_tau.max(1.0 / (prior_minutes.max(0.0) + f64::from(self.minutes) + 1.0))
    }

    fn step(&mut self, x: [f64; BASELINE], alpha: f64) {
        for (r, x) in self.rate.iter_mut().zip(x) {
            let v = f64::from(*r) + alpha * (x - f64::from(*r));
            *r = if v.is_finite() { v.max(0.0) as f32 } else { 0.0 };
        }
        self.minutes = self.minutes.saturating_add(1);
    }

    /// Fold a completed minute, then `idle` empty ones.
    fn fold(&mut self, minute: &Totals, idle: u32, alpha_tau: f64, prior_minutes: f64) {
        let alpha_tau = if alpha_tau.is_finite() { alpha_tau.clamp(0.0, 1.0) } else { 1.0 };
        let prior_minutes = if prior_minutes.is_finite() { prior_minutes } else { 0.0 };
        self.step(Self::of_minute(minute), self.alpha(alpha_tau, prior_minutes));
        let mut left = idle;
        while left > 0 {
            let a = self.alpha(alpha_tau, prior_minutes);
            if a <= alpha_tau {
                // A plain EWMA from here on: all the idle minutes at once.
                let keep = (1.0 - alpha_tau).powi(i32::try_from(left.min(1_000_000)).unwrap_or(1_000_000));
                for r in self.rate.iter_mut() {
                    *r = (f64::from(*r) * keep) as f32;
                }
                self.minutes = self.minutes.saturating_add(left);
                break;
            }
            self.step([0.0; BASELINE], a);
            left -= 1;
        }
    }
}

/// Everything the detector keeps about one token.
#[derive(Clone, Debug)]
pub struct TokenState {
    pub first_s: u32,
    pub last_s: u32,
    /// Latest incremental `/sync` (or sliding sync with `pos`).
    last_sync_s: Stamp,
    /// Latest key-backup read made while the token was young.
    young_key_read_s: Stamp,
    /// Latest write to a room (see [`Shape::acts`]): someone is in front of the client.
    last_act_s: Stamp,
    /// The ≈1 min, ≈10 min and ≈1 h rings of counters.
    rings: Rings,
    /// Rooms read through history (pages, `/context`, room `/initialSync`), ≈10 min and
    /// ≈1 h; rooms named by any request, ≈10 min.
    sketches: RoomSketches,
    rooms: RoomTable,
    agents: Clients,
    addresses: Clients,
    pub baseline: Baseline,
    /// Score at the latest tick, and when it last reached 1.
    pub score: f32,
    pub last_alert_s: Stamp,
    /// Something happened since the latest tick.
    pub dirty: bool,
    /// Queued for [`crate::detect::Detector::rescore_moved`].
    pub queued: bool,
    /// Population features at the latest scoring, for the population statistics.
    pub population: [f32; POPULATION],
}

impl TokenState {
    /// A token first seen at `now`, with `prior` as its baseline (per-minute rates).
    pub fn new(now: u32, prior: [f64; BASELINE]) -> Self {
        TokenState {
            first_s: now,
            last_s: now,
            last_sync_s: Stamp::NEVER,
            young_key_read_s: Stamp::NEVER,
            last_act_s: Stamp::NEVER,
            rings: Rings::new(now),
            sketches: RoomSketches::new([now / ROOMS_10M_EPOCH, now / ROOMS_10M_EPOCH, now / ROOMS_1H_EPOCH]),
            rooms: RoomTable::default(),
            agents: Clients::default(),
            addresses: Clients::default(),
            baseline: Baseline::new(prior),
            score: 0.0,
            last_alert_s: Stamp::NEVER,
            dirty: true,
            queued: false,
            population: [0.0; POPULATION],
        }
    }

    /// Heap bytes behind the state (its own size is `size_of::<TokenState>()`).
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        self.rings.heap_bytes()
            + self.sketches.heap_bytes()
            + self.rooms.heap_bytes()
            + self.agents.heap_bytes()
            + self.addresses.heap_bytes()
    }

    /// Move the rings to `now`, folding completed minutes into the baseline unless the token
    /// is suspect (an attacker must not teach its token that scraping is normal).
    pub fn advance(&mut self, now: u32, cfg: &DetectConfig) {
        // The rings and the sketches are moved here together (a sketch's insert moves it to
        // the same `now`), so within the second they are at there is nothing to do: the
        // case of nearly every request and response of a busy token.
        if now <= self.rings.head_s() {
            return;
        }
        let minute = now / Ring::M10.granularity();
        let head = self.rings.head_s() / Ring::M10.granularity();
        if minute > head {
            let learning = f64::from(self.score) < cfg.pin_score;
            let tau_min = cfg.baseline_tau_s / 60.0;
            let alpha = if tau_min.is_finite() && tau_min > 0.0 { 1.0 - (-1.0 / tau_min).exp() } else { 1.0 };
            if learning {
                self.baseline.fold(&self.rings.newest(Ring::M10), minute - head - 1, alpha, cfg.baseline_prior_minutes);
            }
        }
        self.rings.advance(now);
        self.sketches.advance([now / ROOMS_10M_EPOCH, now / ROOMS_10M_EPOCH, now / ROOMS_1H_EPOCH], &mut self.rings);
    }

    /// Count `n` of `what` now (the rings were moved to `now` by [`TokenState::advance`]),
    /// and tell `tally`: the exported counters are these very increments.
    fn bump(&mut self, tally: &mut Tally, what: Count, n: u32) {
        self.rings.add(what, n);
        tally.count(what, n);
    }

    fn weigh(w: f64, scale: f64) -> u32 {
        let v = (w * scale).round();
        if v.is_finite() && v > 0.0 { v.min(f64::from(u32::MAX)) as u32 } else { 0 }
    }

    /// Account one request; returns what it added to the additive features. `known_agent`
    /// says whether its user agent is a known client; it is asked only for a client the
    /// token has not used before.
    pub fn record(&mut self, s: &Shape, now: u32, cfg: &DetectConfig, known_agent: impl FnOnce() -> bool) -> Tally {
        let mut tally = Tally::default();
        let tally = &mut tally;
        self.advance(now, cfg);
        self.last_s = now;
        self.dirty = true;
        let grace = secs(cfg.client_grace_s);
        let new_agent = s.agent != 0 && !self.agents.knows(s.agent);
        let late_agent = self.agents.see(s.agent, now, self.first_s, grace);
        if new_agent && !known_agent() {
            self.agents.mark(s.agent, UNKNOWN);
        }
        if s.mismatch {
            self.agents.mark(s.agent, MISMATCH);
        }
        // The history share's denominator: what the token asks of rooms and their content
        // (history, other room reads, sends, receipts, read markers, typing, media, search).
        // Not syncs, and not a client's housekeeping that names no room (versions,
        // capabilities, push rules, filters, keys, joined rooms, a full initial sync): a
        // client repeats those on its own, whoever is in front of it, and a scraper could add
        // them for nothing to dilute its share. Nor a room's members, state or one event:
        // reading a room is not what a person does instead of reading its history, and a
        // scraper asking for a room's members before each room's pages would halve its share.
        let other_request = match s.endpoint {
            Some(Endpoint::Sync | Endpoint::SlidingSync) => false,
            Some(Endpoint::Members | Endpoint::State | Endpoint::Event) => false,
            Some(Endpoint::Search | Endpoint::MediaDownload | Endpoint::MediaThumbnail | Endpoint::MediaUpload) => true,
            _ => s.room.is_some(),
        };
        self.addresses.see(s.address, now, self.first_s, grace);
        if s.acts {
            self.last_act_s = Stamp::at(now);
        }
        if let Some(room) = s.room {
            self.sketches.insert(Sketch::Touched, now / ROOMS_10M_EPOCH, room, &mut self.rings);
        }
        let limit = s.limit.unwrap_or(cfg.default_limit);
        let read = match s.endpoint {
            Some(Endpoint::Sync | Endpoint::SlidingSync) => {
                if s.incremental && !s.full_state {
                    self.last_sync_s = Stamp::at(now);
                    self.agents.mark_sync(s.agent);
                } else {
                    self.full_sync(tally, s, cfg);
                }
                false
            }
            Some(Endpoint::InitialSync) if s.room.is_some() => self.history_page(tally, s, limit, cfg, now),
            Some(Endpoint::InitialSync) => {
                self.full_sync(tally, s, cfg);
                false
            }
            Some(Endpoint::Messages) => self.history_page(tally, s, limit, cfg, now),
            Some(Endpoint::Context) => {
                self.bump(tally, Count::ContextWeight, Self::weigh(cfg.page_weight(limit), SIXTEENTHS));
                if limit >= cfg.large_limit {
                    self.bump(tally, Count::ContextLarge, 1);
                }
                self.room_read_for_breadth(s, now);
                true
            }
            Some(Endpoint::Search) => {
                self.bump(tally, Count::Search, 1);
                true
            }
            Some(Endpoint::Members | Endpoint::State) => {
                self.bump(tally, Count::RoomReads, 1);
                if let Some(room) = s.room {
                    let r = self.rooms.room_read(fold(room), now, HARVEST_WITHIN_S);
                    if r.harvest {
                        self.bump(tally, Count::Harvests, 1);
                    }
                    if r.finished {
                        self.bump(tally, Count::RoomsFinished, 1);
                    }
                }
                true
            }
            Some(Endpoint::Event) => {
                self.bump(tally, Count::RoomReads, 1);
                true
            }
            Some(Endpoint::MediaDownload) => {
                self.bump(tally, Count::MediaDownloads, 4);
                true
            }
            Some(Endpoint::MediaThumbnail) => {
                self.bump(tally, Count::MediaDownloads, 1);
                false
            }
            Some(Endpoint::MediaUpload) => {
                self.bump(tally, Count::MediaUploads, 4);
                false
            }
            Some(Endpoint::RoomKeys) if s.get && s.version => {
                self.bump(tally, Count::KeyReads, 1);
                if f64::from(now.saturating_sub(self.first_s)) < cfg.key_backup_young_s {
                    self.young_key_read_s = Stamp::at(now);
                }
                false
            }
            _ => false,
        };
        if other_request {
            self.bump(tally, Count::Requests, 1);
        }
        if read && late_agent && self.agents.is_foreign_reader(s.agent) {
            self.bump(tally, Count::ForeignReads, 1);
        }
        *tally
    }

    fn full_sync(&mut self, tally: &mut Tally, s: &Shape, cfg: &DetectConfig) {
        let w = s.limit.map_or(1.0, |l| cfg.page_weight(l));
        self.bump(tally, Count::FullSyncWeight, Self::weigh(w, SIXTEENTHS));
    }

    fn room_read_for_breadth(&mut self, s: &Shape, now: u32) {
        if let Some(room) = s.room {
            self.sketches.insert(Sketch::Read, now / ROOMS_10M_EPOCH, room, &mut self.rings);
            self.sketches.insert(Sketch::ReadLong, now / ROOMS_1H_EPOCH, room, &mut self.rings);
        }
    }

    fn history_page(&mut self, tally: &mut Tally, s: &Shape, limit: u32, cfg: &DetectConfig, now: u32) -> bool {
        self.bump(tally, Count::Pages, 1);
        self.bump(tally, Count::PageWeight, Self::weigh(cfg.page_weight(limit), SIXTEENTHS));
        self.room_read_for_breadth(s, now);
        if s.from == 0 {
            self.bump(tally, Count::FromlessPages, 1);
        }
        if let Some(room) = s.room {
            let fp = fold(room);
            if !self.rooms.in_session(fp, now, ROOM_SESSION_S) {
                tally.rooms_paged += 1;
            }
            let paged = self.rooms.page(fp, s.from, s.reaches_start, now, ROOM_SESSION_S);
            if paged.finished {
                self.bump(tally, Count::RoomsFinished, 1);
            }
            if paged.resumed {
                self.bump(tally, Count::ResumedPages, 1);
            }
        }
        true
    }

    /// Account response bytes.
    pub fn record_bytes(&mut self, endpoint: Endpoint, bytes: u64, now: u32, cfg: &DetectConfig) {
        self.advance(now, cfg);
        self.dirty = true;
        let media = matches!(endpoint, Endpoint::MediaDownload | Endpoint::MediaThumbnail);
        if endpoint == Endpoint::Messages && self.rooms.page_bytes(bytes) {
            // Not a per-token counter: nothing to tell a tally.
            self.rings.add(Count::RoomsFinished, 1);
        }
        self.rings.add_bytes(Bytes::All, bytes);
        if media {
            self.rings.add_bytes(Bytes::Media, bytes);
        }
    }

    /// The features at `now` (call [`TokenState::advance`] first).
    pub fn features(&self, now: u32, cfg: &DetectConfig) -> Features {
        let t1 = self.rings.totals(Ring::M1, now);
        let t10 = self.rings.totals(Ring::M10, now);
        let th = self.rings.totals(Ring::H1, now);
        let history = |t: &Totals| t.weight(Count::PageWeight, SIXTEENTHS);
        let context = |t: &Totals| t.weight(Count::ContextWeight, SIXTEENTHS);
        let media = |t: &Totals| {
            (f64::from(t.get(Count::MediaDownloads)) - f64::from(t.get(Count::MediaUploads))).max(0.0) / QUARTERS
        };
        let since_10m = now.saturating_sub(600);
        let reads_1m = f64::from(t1.get(Count::Pages))
            + context(&t1)
            + f64::from(t1.get(Count::Search))
            + f64::from(t1.get(Count::RoomReads))
            + f64::from(t1.get(Count::MediaDownloads)) / QUARTERS;
        let young_key_read = self.young_key_read_s.within(now, 600);
        let live = self.last_sync_s.get().is_some_and(|s| f64::from(now.saturating_sub(s)) <= cfg.live_sync_s);
        let acted_10m = self.last_act_s.within(now, 600);
        let rooms_10m = self.sketches.estimate(Sketch::Read, now / ROOMS_10M_EPOCH, &self.rings).round();
        Features {
            age_s: f64::from(now.saturating_sub(self.first_s)),
            pages_1m: f64::from(t1.get(Count::Pages)),
            history_1m: history(&t1),
            history_10m: history(&t10),
            history_1h: history(&th),
            oversize_1m: (history(&t1) - f64::from(t1.get(Count::Pages))).max(0.0),
            oversize_10m: (history(&t10) - f64::from(t10.get(Count::Pages))).max(0.0),
            depth: f64::from(self.rooms.max_depth_since(since_10m)),
            deep_rooms_10m: f64::from(self.rooms.deep_since(since_10m, cfg.deep_room_pages)),
            deep_whole_10m: f64::from(self.rooms.deep_read_since(
                since_10m,
                cfg.deep_room_pages,
                cfg.deep_open_room_pages,
            )),
            new_rooms_1m: f64::from(self.rooms.started_since(now.saturating_sub(60))),
            rooms_10m,
            rooms_1h: self.sketches.estimate(Sketch::ReadLong, now / ROOMS_1H_EPOCH, &self.rings).round(),
            touched_10m: self.sketches.estimate(Sketch::Touched, now / ROOMS_10M_EPOCH, &self.rings).round(),
            context_1m: context(&t1),
            context_10m: context(&t10),
            context_large_10m: f64::from(t10.get(Count::ContextLarge)),
            search_1m: f64::from(t1.get(Count::Search)),
            search_10m: f64::from(t10.get(Count::Search)),
            media_1m: media(&t1),
            media_10m: media(&t10),
            media_bytes_10m: t10.bytes(Bytes::Media) as f64,
            key_reads_10m: f64::from(t10.get(Count::KeyReads)),
            young_key_read,
            full_sync_10m: t10.weight(Count::FullSyncWeight, SIXTEENTHS),
            reads_1m,
            live,
            acted_10m,
            late_agent: self.agents.late_since(since_10m),
            late_address: self.addresses.late_since(since_10m),
            foreign_10m: f64::from(t10.get(Count::ForeignReads)),
            room_reads_10m: f64::from(t10.get(Count::RoomReads)),
            bytes_10m: t10.bytes(Bytes::All) as f64,
            bytes_1h: th.bytes(Bytes::All) as f64,
            agents: self.agents.distinct(),
            addresses: self.addresses.distinct(),
            pages_10m: f64::from(t10.get(Count::Pages)),
            requests_10m: f64::from(t10.get(Count::Requests)),
            fromless_10m: f64::from(t10.get(Count::FromlessPages)),
            finished_10m: f64::from(t10.get(Count::RoomsFinished)),
            harvests_10m: f64::from(t10.get(Count::Harvests)),
            resumed_10m: f64::from(t10.get(Count::ResumedPages)),
            unknown_client: self.agents.marks_since(since_10m) & UNKNOWN != 0,
            client_mismatch: self.agents.marks_since(since_10m) & MISMATCH != 0,
        }
    }
}

/// A room hash as the room table's 32-bit fingerprint.
fn fold(room: u64) -> u32 {
    (room ^ (room >> 32)) as u32
}

/// A time that may not have come, in 4 bytes where `Option<u32>` takes 8: `u32::MAX` is
/// "never", which the clock (monotonic seconds, clamped to `u32`) reaches after 136 years.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp(u32);

impl Stamp {
    pub const NEVER: Stamp = Stamp(u32::MAX);

    pub fn at(now: u32) -> Stamp {
        Stamp(now.min(u32::MAX - 1))
    }

    pub fn get(self) -> Option<u32> {
        (self != Self::NEVER).then_some(self.0)
    }

    /// It came, less than `secs` before `now`.
    pub fn within(self, now: u32, secs: u32) -> bool {
        self.get().is_some_and(|s| now.saturating_sub(s) < secs)
    }
}

/// Seconds as `u32`, for durations from the configuration (NaN and negatives are 0).
pub fn secs(s: f64) -> u32 {
    if s.is_finite() && s > 0.0 { s.min(f64::from(u32::MAX)) as u32 } else { 0 }
}

/// A token's features at one instant. Weights are page-weights; counts are plain.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Features {
    pub age_s: f64,
    pub pages_1m: f64,
    pub history_1m: f64,
    pub history_10m: f64,
    pub history_1h: f64,
    /// Page-weight beyond 1 per page: what large limits add.
    pub oversize_1m: f64,
    pub oversize_10m: f64,
    /// Deepest paging session in the last 10 minutes (among the 8 rooms last paged).
    pub depth: f64,
    /// Rooms read deep in the last 10 minutes (among the 8 rooms last paged): paged
    /// `deep_room_pages` deep, or read to their first event.
    pub deep_rooms_10m: f64,
    /// Rooms scrolled through in the last 10 minutes (among the 8 rooms last paged): read to
    /// their first event through `deep_room_pages` pages or more, or paged
    /// `deep_open_room_pages` deep.
    pub deep_whole_10m: f64,
    pub new_rooms_1m: f64,
    pub rooms_10m: f64,
    pub rooms_1h: f64,
    pub touched_10m: f64,
    pub context_1m: f64,
    pub context_10m: f64,
    pub context_large_10m: f64,
    pub search_1m: f64,
    pub search_10m: f64,
    /// Media downloads net of uploads (thumbnails a quarter).
    pub media_1m: f64,
    pub media_10m: f64,
    pub media_bytes_10m: f64,
    pub key_reads_10m: f64,
    pub young_key_read: bool,
    pub full_sync_10m: f64,
    /// Pages, context weight, searches, room reads and downloads in the last minute.
    pub reads_1m: f64,
    /// An incremental sync within `live_sync_s`.
    pub live: bool,
    /// A write to a room (a message, receipt, read marker, typing…) in the last 10 minutes.
    pub acted_10m: bool,
    pub late_agent: Option<Late>,
    pub late_address: Option<Late>,
    pub foreign_10m: f64,
    pub room_reads_10m: f64,
    pub bytes_10m: f64,
    pub bytes_1h: f64,
    pub agents: u8,
    pub addresses: u8,
    /// History pages in 10 min, and requests that name a room, media or search, other than
    /// room reads right after that room's history (the history share's denominator).
    pub pages_10m: f64,
    pub requests_10m: f64,
    /// History pages without `from`, rooms read to their first event, `/members` or `/state`
    /// right after a room's history: 10 min.
    pub fromless_10m: f64,
    pub finished_10m: f64,
    pub harvests_10m: f64,
    /// History pages that resumed a room's paging right after another room's page, 10 min.
    pub resumed_10m: f64,
    /// A client of the token (seen in 10 min) whose user agent is no known client, or whose
    /// head contradicts it.
    pub unknown_client: bool,
    pub client_mismatch: bool,
}

impl Features {
    /// The population features (see [`POPULATION`]).
    pub fn population(&self) -> [f64; POPULATION] {
        [self.history_10m + self.context_10m, self.room_reads_10m, self.media_10m, self.bytes_10m / MB, self.rooms_10m]
    }
}
