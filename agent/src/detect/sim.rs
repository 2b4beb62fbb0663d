//! Synthetic request streams for the detector's specification tests: Element-like users,
//! a heavy user, and each attack, driven by a deterministic PRNG on a simulated clock.
//!
//! The users follow the brief the thresholds were set against: an incremental `/sync` every
//! 1–30 s, a few sends a minute, receipts and typing, rare scrollback of 1–3 pages of 20–50
//! events in one or two rooms, rare member lists, thumbnails, the odd image burst (an
//! encrypted room shows every image through `/download`), rare searches and `/context`
//! (permalinks). The heavy user does five times the sends and scrolls a few pages in several
//! rooms at a time, views more media and searches more.

use std::collections::HashMap;

use crate::conn::RequestSeen;
use crate::endpoint::Endpoint;
use crate::token::TokenLabel;
use crate::vocab::{Attribution, ConnKey, Vantage};

use super::{DetectConfig, Detector};

/// SplitMix64: tiny, deterministic, good enough for workloads.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0xA076_1D64_78BD_642F)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform integer in `lo..=hi`.
    pub fn int(&mut self, lo: u32, hi: u32) -> u32 {
        let span = u64::from(hi.saturating_sub(lo)) + 1;
        lo + (self.next_u64() % span) as u32
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Exponential gap with mean `mean`.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[(self.next_u64() % v.len() as u64) as usize]
    }
}

pub fn label(n: u64) -> TokenLabel {
    TokenLabel(n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes())
}

pub fn room(i: u32) -> String {
    format!("!room{i:03}abcdefghij:test.local")
}

/// One simulated request and the bytes its response carries.
#[derive(Clone, Debug)]
pub struct Req {
    pub at: f64,
    pub token: TokenLabel,
    pub endpoint: Endpoint,
    pub method: &'static str,
    pub room: Option<String>,
    pub query: String,
    pub ua: String,
    pub xff: Option<String>,
    pub bytes: u64,
}

/// Who is making requests: token and headers.
#[derive(Clone, Debug)]
pub struct Client {
    pub token: TokenLabel,
    pub ua: String,
    pub xff: Option<String>,
}

impl Client {
    pub fn new(token: TokenLabel, ua: &str) -> Self {
        Client { token, ua: ua.to_owned(), xff: None }
    }

    pub fn req(
        &self,
        at: f64,
        endpoint: Endpoint,
        method: &'static str,
        room: Option<&str>,
        query: String,
        bytes: u64,
    ) -> Req {
        Req {
            at,
            token: self.token,
            endpoint,
            method,
            room: room.map(str::to_owned),
            query,
            ua: self.ua.clone(),
            xff: self.xff.clone(),
            bytes,
        }
    }
}

/// Rates per minute and shapes of an interactive user's activities.
#[derive(Clone, Debug)]
pub struct Profile {
    pub sends: f64,
    pub scrolls: f64,
    pub scroll_rooms: (u32, u32),
    pub scroll_pages: (u32, u32),
    pub limit: (u32, u32),
    pub members: f64,
    pub downloads: f64,
    pub bursts: f64,
    pub burst: (u32, u32),
    pub thumbnails: f64,
    pub searches: f64,
    pub contexts: f64,
    /// Restores the key backup once, shortly after login.
    pub key_backup_restore: bool,
}

impl Profile {
    pub fn normal() -> Self {
        Profile {
            sends: 3.0,
            scrolls: 0.1,
            scroll_rooms: (1, 2),
            scroll_pages: (1, 3),
            limit: (20, 50),
            members: 0.1,
            downloads: 0.3,
            bursts: 0.05,
            burst: (3, 8),
            thumbnails: 2.0,
            searches: 0.03,
            contexts: 0.03,
            key_backup_restore: false,
        }
    }

    pub fn heavy() -> Self {
        Profile {
            sends: 15.0,
            scrolls: 0.3,
            scroll_rooms: (2, 5),
            scroll_pages: (2, 5),
            limit: (20, 50),
            members: 0.5,
            downloads: 1.5,
            bursts: 0.3,
            burst: (5, 20),
            thumbnails: 6.0,
            searches: 0.3,
            contexts: 0.3,
            key_backup_restore: false,
        }
    }
}

/// Poisson event times in `[start, end)` at `per_min`.
fn poisson(rng: &mut Rng, per_min: f64, start: f64, end: f64) -> Vec<f64> {
    let mut out = Vec::new();
    if per_min <= 0.0 {
        return out;
    }
    let mut t = start + rng.exp(60.0 / per_min);
    while t < end {
        out.push(t);
        t += rng.exp(60.0 / per_min);
    }
    out
}

/// An Element-like session from `start` to `end`.
pub fn element_user(rng: &mut Rng, c: &Client, rooms: &[String], start: f64, end: f64, p: &Profile) -> Vec<Req> {
    let mut out = Vec::new();
    let any_room = |rng: &mut Rng| Some(rng.pick(rooms).clone());
    // Sync: an initial sync, then incremental long-polls returning every 1-30 s.
    out.push(c.req(start, Endpoint::Sync, "GET", None, "filter=0&timeout=0".into(), 200_000));
    let mut t = start + rng.uniform(0.5, 3.0);
    let mut n = 0;
    while t < end {
        n += 1;
        out.push(c.req(
            t,
            Endpoint::Sync,
            "GET",
            None,
            format!("filter=0&timeout=30000&since=s{n}_1"),
            rng.int(500, 5000).into(),
        ));
        t += rng.uniform(1.0, 30.0);
    }
    for t in poisson(rng, p.sends, start, end) {
        let r = any_room(rng);
        out.push(c.req(t, Endpoint::Send, "PUT", r.as_deref(), String::new(), 120));
        // Typing before, a receipt after.
        out.push(c.req(t - 2.0_f64.min(t - start), Endpoint::Other, "PUT", r.as_deref(), String::new(), 60));
        out.push(c.req(t + 0.2, Endpoint::Other, "POST", r.as_deref(), String::new(), 60));
    }
    for t in poisson(rng, 0.5, start, end) {
        out.push(c.req(t, Endpoint::Keys, "POST", None, String::new(), 2_000));
    }
    // One scrollback at a time: a person reads one room at a time.
    let mut busy_until = start;
    for t in poisson(rng, p.scrolls, start, end) {
        if t < busy_until {
            continue;
        }
        let mut t = t;
        for _ in 0..rng.int(p.scroll_rooms.0, p.scroll_rooms.1) {
            let r = any_room(rng);
            if rng.chance(0.5) {
                out.push(c.req(t, Endpoint::Members, "GET", r.as_deref(), "not_membership=leave".into(), 8_000));
                t += rng.uniform(0.2, 1.0);
            }
            let tag = rng.next_u64() % 100_000;
            for depth in 0..rng.int(p.scroll_pages.0, p.scroll_pages.1) {
                let limit = rng.int(p.limit.0, p.limit.1);
                let q = format!("dir=b&from=t{tag}_{depth}&limit={limit}&filter=%7B%22lazy_load_members%22%3Atrue%7D");
                out.push(c.req(t, Endpoint::Messages, "GET", r.as_deref(), q, u64::from(limit) * 700));
                t += rng.uniform(0.5, 3.0);
            }
            t += rng.uniform(3.0, 20.0);
        }
        busy_until = t;
    }
    for t in poisson(rng, p.members, start, end) {
        let r = any_room(rng);
        out.push(c.req(t, Endpoint::Members, "GET", r.as_deref(), "not_membership=leave".into(), 8_000));
    }
    for (per_min, endpoint) in [(0.1, Endpoint::State), (0.1, Endpoint::Event)] {
        for t in poisson(rng, per_min, start, end) {
            let r = any_room(rng);
            out.push(c.req(t, endpoint, "GET", r.as_deref(), String::new(), 3_000));
        }
    }
    for t in poisson(rng, p.thumbnails, start, end) {
        out.push(c.req(
            t,
            Endpoint::MediaThumbnail,
            "GET",
            None,
            "width=96&height=96&method=crop".into(),
            rng.int(3_000, 30_000).into(),
        ));
    }
    for t in poisson(rng, p.downloads, start, end) {
        out.push(c.req(t, Endpoint::MediaDownload, "GET", None, String::new(), rng.int(50_000, 3_000_000).into()));
    }
    for t in poisson(rng, p.bursts, start, end) {
        let mut t = t;
        for _ in 0..rng.int(p.burst.0, p.burst.1) {
            out.push(c.req(t, Endpoint::MediaDownload, "GET", None, String::new(), rng.int(50_000, 3_000_000).into()));
            t += rng.uniform(0.05, 0.5);
        }
    }
    for t in poisson(rng, 0.1, start, end) {
        out.push(c.req(t, Endpoint::MediaUpload, "POST", None, String::new(), 200));
    }
    for t in poisson(rng, p.searches, start, end) {
        let mut t = t;
        for page in 0..rng.int(1, 3) {
            let q = if page == 0 { String::new() } else { format!("next_batch=b{page}") };
            out.push(c.req(t, Endpoint::Search, "POST", None, q, 20_000));
            t += rng.uniform(1.0, 3.0);
        }
    }
    for t in poisson(rng, p.contexts, start, end) {
        let r = any_room(rng);
        let q = format!("limit={}", rng.int(10, 20));
        out.push(c.req(t, Endpoint::Context, "GET", r.as_deref(), q, 15_000));
    }
    if p.key_backup_restore {
        let t = start + rng.uniform(5.0, 60.0);
        out.push(c.req(t, Endpoint::RoomKeys, "GET", None, "version=1".into(), 400_000));
    }
    out.retain(|r| r.at >= start && r.at < end);
    out
}

/// How an attacker paces itself.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Seconds between requests.
    pub gap: (f64, f64),
}

/// Paging every room to its start: `/joined_rooms`, then per room `/members` and
/// `/messages` pages following `from` until the room (30-300 events) is exhausted.
pub fn scrape(rng: &mut Rng, c: &Client, rooms: &[String], start: f64, pace: Pace, limits: &[u32]) -> Vec<Req> {
    let mut out = Vec::new();
    let mut t = start;
    out.push(c.req(t, Endpoint::JoinedRooms, "GET", None, String::new(), 2_000));
    for r in rooms {
        t += rng.uniform(pace.gap.0, pace.gap.1);
        out.push(c.req(t, Endpoint::Members, "GET", Some(r), String::new(), 8_000));
        let size = rng.int(30, 300);
        let limit = *rng.pick(limits);
        let pages = size / limit + 1;
        for page in 0..pages {
            t += rng.uniform(pace.gap.0, pace.gap.1);
            let q = if page == 0 {
                format!("dir=b&limit={limit}")
            } else {
                format!("dir=b&from=t{}_{page}&limit={limit}", rng.next_u64() % 1000)
            };
            let events = if page + 1 == pages { size % limit } else { limit };
            out.push(c.req(t, Endpoint::Messages, "GET", Some(r), q, u64::from(events) * 900 + 100));
        }
    }
    out
}

/// `/context` with a large limit, hopping from room to room.
pub fn context_walk(rng: &mut Rng, c: &Client, rooms: &[String], start: f64, pace: Pace, steps: u32) -> Vec<Req> {
    let mut t = start;
    (0..steps)
        .map(|_| {
            t += rng.uniform(pace.gap.0, pace.gap.1);
            let r = rng.pick(rooms).clone();
            let limit = rng.int(100, 500);
            c.req(t, Endpoint::Context, "GET", Some(&r), format!("limit={limit}"), u64::from(limit) * 900)
        })
        .collect()
}

/// Downloading `items` media files one after another.
pub fn media_spree(rng: &mut Rng, c: &Client, start: f64, pace: Pace, items: u32) -> Vec<Req> {
    let mut t = start;
    (0..items)
        .map(|_| {
            t += rng.uniform(pace.gap.0, pace.gap.1);
            c.req(t, Endpoint::MediaDownload, "GET", None, String::new(), rng.int(10_000, 2_000_000).into())
        })
        .collect()
}

/// `/search` for one term after another, sometimes paging the results.
pub fn search_sweep(rng: &mut Rng, c: &Client, start: f64, pace: Pace, terms: u32) -> Vec<Req> {
    let mut t = start;
    let mut out = Vec::new();
    for _ in 0..terms {
        t += rng.uniform(pace.gap.0, pace.gap.1);
        out.push(c.req(t, Endpoint::Search, "POST", None, String::new(), 30_000));
        if rng.chance(0.3) {
            t += rng.uniform(pace.gap.0, pace.gap.1);
            out.push(c.req(t, Endpoint::Search, "POST", None, "next_batch=x".into(), 30_000));
        }
    }
    out
}

/// A population: `normals` Element-like users and one heavy user, in `rooms` rooms, each
/// member of a random 5-20 of them. Returns the clients (heavy last) and their requests.
pub struct World {
    pub rooms: Vec<String>,
    pub users: Vec<(Client, Vec<String>)>,
    pub reqs: Vec<Req>,
}

pub fn world(rng: &mut Rng, normals: u32, rooms: u32, start: f64, end: f64) -> World {
    let all: Vec<String> = (0..rooms).map(room).collect();
    let mut users = Vec::new();
    let mut reqs = Vec::new();
    for i in 0..=normals {
        let heavy = i == normals;
        let mut mine: Vec<String> = all.iter().filter(|_| rng.chance(0.5)).cloned().collect();
        if mine.len() < 5 {
            mine = all.iter().take(5).cloned().collect();
        }
        let mut c = Client::new(label(u64::from(i) + 1), &format!("Mozilla/5.0 Element/1.11.{i}"));
        c.xff = Some(format!("203.0.113.{}", i + 1));
        let mut p = if heavy { Profile::heavy() } else { Profile::normal() };
        p.key_backup_restore = i == 1;
        // Sessions start within the first minute, like clients coming back online.
        let s = start + rng.uniform(0.0, 60.0);
        reqs.extend(element_user(rng, &c, &mine, s, end, &p));
        users.push((c, mine));
    }
    World { rooms: all, users, reqs }
}

/// What a run saw.
#[derive(Debug, Default)]
pub struct Outcome {
    pub max_score: HashMap<TokenLabel, f64>,
    /// The reasons at each token's maximum.
    pub max_reasons: HashMap<TokenLabel, Vec<(&'static str, f64)>>,
    pub first_alert: HashMap<TokenLabel, f64>,
    pub max_tracked: usize,
}

impl Outcome {
    pub fn max(&self, t: TokenLabel) -> f64 {
        self.max_score.get(&t).copied().unwrap_or(0.0)
    }
}

/// Feed `reqs` to a detector in time order, ticking every simulated second until `end`.
pub fn run(mut reqs: Vec<Req>, start: f64, end: f64, cfg: DetectConfig) -> (Detector, Outcome) {
    reqs.sort_by(|a, b| a.at.total_cmp(&b.at));
    let mut d = Detector::new(cfg);
    let mut out = Outcome::default();
    let mut next = reqs.iter().peekable();
    let mut now = start;
    while now < end {
        now += 1.0;
        while let Some(r) = next.next_if(|r| r.at < now) {
            feed(&mut d, r);
        }
        d.tick(now);
        for s in d.scores() {
            let m = out.max_score.entry(s.token).or_insert(0.0);
            if s.score > *m {
                *m = s.score;
                out.max_reasons.insert(s.token, s.reasons.to_vec());
            }
            if s.score >= 1.0 {
                out.first_alert.entry(s.token).or_insert(now);
            }
        }
        out.max_tracked = out.max_tracked.max(d.tracked_tokens());
    }
    (d, out)
}

/// A request as the connection tracker hands it over (the one place that builds them, so
/// the tests follow `RequestSeen` if it changes).
pub fn seen<'a>(
    token: Option<TokenLabel>,
    endpoint: Endpoint,
    method: &'a str,
    room_id: Option<&'a str>,
    query: &'a str,
    user_agent: Option<&'a [u8]>,
    forwarded_for: Option<&'a [u8]>,
) -> RequestSeen<'a> {
    RequestSeen {
        conn: ConnKey { vantage: Vantage::Socket, id: 1, generation: 1 },
        at_ns: 0,
        attribution: Attribution { token, endpoint, vantage: Vantage::Socket },
        method,
        room_id,
        query,
        user_agent,
        forwarded_for,
        // The simulated browsers (Element Web) send what browsers send; scripts do not.
        browser_fetch: user_agent.is_some_and(|u| u.starts_with(b"Mozilla/")),
        connection_close: false,
    }
}

impl Req {
    pub fn seen(&self) -> RequestSeen<'_> {
        seen(
            Some(self.token),
            self.endpoint,
            self.method,
            self.room.as_deref(),
            &self.query,
            Some(self.ua.as_bytes()),
            self.xff.as_deref().map(str::as_bytes),
        )
    }
}

pub fn feed(d: &mut Detector, r: &Req) {
    d.on_request(&r.seen(), r.at);
    d.on_response_bytes(r.token, r.endpoint, r.bytes, r.at + 0.05);
}

/// A tick's worst case: `n` Element tokens (a sync and a page each over a minute from
/// `start`), scored by a tick at `start + 60`, then all active again at `start + 61`, so that
/// the next tick rescores every one. For the tick's test and its benchmark figure.
pub fn busy_tokens(n: u64, start: f64, cfg: DetectConfig) -> Detector {
    let mut d = Detector::new(cfg);
    let room = room(1);
    for i in 0..n {
        let c = Client::new(label(i + 1), "Element");
        let at = start + (i % 60) as f64;
        feed(&mut d, &c.req(at, Endpoint::Sync, "GET", None, "since=s1".into(), 2_000));
        feed(&mut d, &c.req(at, Endpoint::Messages, "GET", Some(&room), "dir=b&limit=20".into(), 20_000));
    }
    d.tick(start + 60.0);
    for i in 0..n {
        let c = Client::new(label(i + 1), "Element");
        feed(&mut d, &c.req(start + 61.0, Endpoint::Send, "PUT", Some(&room), String::new(), 100));
    }
    d
}
