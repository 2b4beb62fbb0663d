//! What the detector needs from one request, read without allocating.
//!
//! Only the query parameters that matter for the endpoint are looked at: `from` and `limit`
//! for history (`dir` only to tell a backward page that reaches the room's first event, see
//! [`Shape::reaches_start`]: otherwise paging forward from the start of a room reads it as
//! surely as paging back from the end); `since`/`pos`, `full_state` and an inline `filter`'s
//! `"limit"` for syncs; `version` for the key backup. Values are never stored: `from` is
//! reduced to a fingerprint (to tell a new page from a retried one) and, for Synapse's
//! topological tokens, the depth it names; numbers to integers. Anything unparsable falls
//! back to the neutral reading (the default limit, "no `from`", not at the start).

use crate::conn::RequestSeen;
use crate::endpoint::Endpoint;
use crate::http::query_pairs;

use super::fingerprint::mismatch;
use super::hll::{fingerprint, hash64};

/// Longest user agent or address hashed; a hostile header costs no more than this.
const MAX_HEADER_HASHED: usize = 512;
/// Longest inline filter scanned for a limit.
const MAX_FILTER_SCANNED: usize = 2048;
/// Synapse's `/messages` page size when `limit` is absent, and the most it serves
/// (`synapse/streams/config.py`): the events a page can hold, whatever was asked.
const SYNAPSE_DEFAULT_LIMIT: u32 = 10;
const SYNAPSE_MAX_LIMIT: u32 = 1000;

/// The request, reduced.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Shape {
    pub endpoint: Option<Endpoint>,
    pub get: bool,
    /// A write to a room (POST, PUT or DELETE on a path naming one): a message, a receipt or
    /// read marker, typing, a state or membership change. What a person in front of a
    /// client does; no SDK makes one on its own.
    pub acts: bool,
    /// Hash of the room id the path names.
    pub room: Option<u64>,
    /// Fingerprint of `from` (pagination token), 0 when absent.
    pub from: u32,
    /// A backward `/messages` page whose `from` is a Synapse topological token naming a depth
    /// within the page's limit: it reaches the room's first event. Synapse's `end` token is
    /// `t{depth}-{stream}…`, the depth of the page's oldest event; the events older than it
    /// are the `depth - 1` before it in a room whose history is a line (events are numbered
    /// from the creation event at 1; Synapse creates a room's events one at a time per
    /// process). A history that forked (a federated room, or sends created at once by two
    /// event-creator workers) has a few more events than depths, so there this is "within a
    /// page of the start". A scraper that lies about the depth only hides the
    /// fact, and then the response's bytes still show a short last page (see `rooms.rs`); a
    /// made-up token near depth 1 makes Synapse serve the events near depth 1.
    pub reaches_start: bool,
    /// `limit` (or an inline sync filter's largest `"limit"`), if given and numeric.
    pub limit: Option<u32>,
    /// `/sync?since=` or sliding sync `?pos=`: an incremental sync.
    pub incremental: bool,
    pub full_state: bool,
    /// `version=` on `/room_keys/…`.
    pub version: bool,
    /// Fingerprints of the user agent and the first X-Forwarded-For address (0: none).
    pub agent: u32,
    pub address: u32,
    /// The head contradicts its browser user agent (see `fingerprint.rs`).
    pub mismatch: bool,
}

impl Shape {
    pub fn of(req: &RequestSeen<'_>) -> Shape {
        let endpoint = req.attribution.endpoint;
        let mut s = Shape {
            endpoint: Some(endpoint),
            get: req.method.eq_ignore_ascii_case("GET"),
            room: req.room_id.map(|r| hash64(r.as_bytes())),
            agent: req.user_agent.map_or(0, |ua| fingerprint(cap(ua))),
            address: req.forwarded_for.map_or(0, first_address),
            mismatch: req.user_agent.is_some_and(|ua| mismatch(ua, req.browser_fetch, req.connection_close)),
            ..Shape::default()
        };
        s.acts = s.room.is_some() && ["POST", "PUT", "DELETE"].iter().any(|m| req.method.eq_ignore_ascii_case(m));
        let wants_query = matches!(
            endpoint,
            Endpoint::Messages
                | Endpoint::Context
                | Endpoint::InitialSync
                | Endpoint::Sync
                | Endpoint::SlidingSync
                | Endpoint::RoomKeys
        );
        if !wants_query {
            return s;
        }
        let (mut backward, mut from, mut page_limit, mut filter_limit) = (false, None, None, None);
        for (key, value) in query_pairs(req.query) {
            match key {
                "from" if !value.is_empty() => {
                    s.from = fingerprint(cap(value.as_bytes()));
                    from = Some(value);
                }
                "dir" => backward = value == "b",
                "limit" => page_limit = parse_u32(value).or(page_limit),
                "since" | "pos" if !value.is_empty() => s.incremental = true,
                "full_state" => s.full_state = value.eq_ignore_ascii_case("true"),
                "filter" => filter_limit = filter_limit.max(inline_filter_limit(value)),
                "version" => s.version = true,
                _ => {}
            }
        }
        // `None` orders below any `Some`: the larger limit given, if any.
        s.limit = page_limit.max(filter_limit);
        if endpoint == Endpoint::Messages && backward {
            // Only the query's `limit` bounds a page: a filter's is not Synapse's page size.
            let page = page_limit.unwrap_or(SYNAPSE_DEFAULT_LIMIT).min(SYNAPSE_MAX_LIMIT);
            s.reaches_start = from.and_then(topological_depth).is_some_and(|d| d.saturating_sub(1) <= page);
        }
        s
    }
}

/// The depth a Synapse topological pagination token names: `t{depth}-{stream}`, maybe
/// followed by `_` and the other streams' positions. Anything else (a stream token `s…`, a
/// sliding-sync position, another server's format) names none.
fn topological_depth(from: &str) -> Option<u32> {
    let rest = from.strip_prefix('t')?;
    let digits = rest.find(|c: char| !c.is_ascii_digit())?;
    let (depth, after) = rest.split_at(digits);
    let stream = after.strip_prefix('-')?;
    if !stream.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    parse_u32(depth)
}

fn cap(b: &[u8]) -> &[u8] {
    b.get(..MAX_HEADER_HASHED).unwrap_or(b)
}

/// Fingerprint of the first address of an X-Forwarded-For list, trimmed; 0 if empty.
fn first_address(xff: &[u8]) -> u32 {
    let first = xff.split(|&b| b == b',').next().unwrap_or(&[]);
    let first = first.trim_ascii();
    if first.is_empty() { 0 } else { fingerprint(cap(first)) }
}

/// A decimal `u32`, saturating; `None` unless it is only digits (after an optional `+`,
/// which a form encoder might have left for a space: refused).
pub fn parse_u32(v: &str) -> Option<u32> {
    if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.bytes().fold(0u32, |acc, d| acc.saturating_mul(10).saturating_add(u32::from(d - b'0'))))
}

/// The largest number following a `"limit":` key in an inline (JSON) sync filter, read from
/// its percent-encoded form without allocating. A filter id (not starting with `{`) gives
/// `None`. Only the first [`MAX_FILTER_SCANNED`] bytes are looked at.
fn inline_filter_limit(raw: &str) -> Option<u32> {
    let raw = raw.as_bytes();
    let raw = raw.get(..MAX_FILTER_SCANNED).unwrap_or(raw);
    let mut dec = Decoder { raw, pos: 0 };
    if dec.next() != Some(b'{') {
        return None;
    }
    const KEY: &[u8] = b"\"limit\"";
    let mut matched = 0usize;
    let mut best: Option<u32> = None;
    while let Some(b) = dec.next() {
        if KEY.get(matched) == Some(&b) {
            matched += 1;
            if matched == KEY.len() {
                matched = 0;
                if let Some(n) = dec.number_after_colon() {
                    best = Some(best.map_or(n, |o| o.max(n)));
                }
            }
        } else {
            matched = usize::from(b == b'"');
        }
    }
    best
}

/// Percent-decoding reader over a raw query value (`+` is a space).
struct Decoder<'a> {
    raw: &'a [u8],
    pos: usize,
}

impl Decoder<'_> {
    fn hex(b: u8) -> Option<u8> {
        char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok())
    }

    fn peek_len(&self) -> Option<(u8, usize)> {
        let b = *self.raw.get(self.pos)?;
        if b == b'%' {
            let hi = self.raw.get(self.pos + 1).copied().and_then(Self::hex);
            let lo = self.raw.get(self.pos + 2).copied().and_then(Self::hex);
            if let (Some(hi), Some(lo)) = (hi, lo) {
                return Some((hi << 4 | lo, 3));
            }
        }
        Some((if b == b'+' { b' ' } else { b }, 1))
    }

    fn next(&mut self) -> Option<u8> {
        let (b, len) = self.peek_len()?;
        self.pos += len;
        Some(b)
    }

    fn peek(&self) -> Option<u8> {
        self.peek_len().map(|(b, _)| b)
    }

    /// After a key: whitespace, `:`, whitespace, then digits.
    fn number_after_colon(&mut self) -> Option<u32> {
        while self.peek()?.is_ascii_whitespace() {
            self.next();
        }
        if self.next()? != b':' {
            return None;
        }
        while self.peek()?.is_ascii_whitespace() {
            self.next();
        }
        let mut n: Option<u32> = None;
        while let Some(d) = self.peek().filter(u8::is_ascii_digit) {
            self.next();
            n = Some(n.unwrap_or(0).saturating_mul(10).saturating_add(u32::from(d - b'0')));
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TokenLabel;

    fn shape(endpoint: Endpoint, method: &str, query: &str) -> Shape {
        Shape::of(&super::super::sim::seen(
            Some(TokenLabel([1; 8])),
            endpoint,
            method,
            Some("!r:hs"),
            query,
            Some(b"Element/1.11"),
            Some(b" 203.0.113.7 , 10.0.0.1"),
        ))
    }

    #[test]
    fn history_parameters_are_read() {
        let s = shape(Endpoint::Messages, "GET", "dir=b&from=t47-1_2&limit=100&filter=%7B%7D");
        assert_ne!(s.from, 0);
        assert_eq!(s.limit, Some(100));
        assert!(s.get && s.room.is_some());
        assert_eq!(s.address, fingerprint(b"203.0.113.7"));
        assert_eq!(shape(Endpoint::Messages, "GET", "dir=b").limit, None);
        assert_eq!(shape(Endpoint::Messages, "GET", "from=&limit=-3").from, 0);
        assert_eq!(shape(Endpoint::Messages, "GET", "limit=-3").limit, None);
        assert_eq!(shape(Endpoint::Messages, "GET", "limit=99999999999999999999").limit, Some(u32::MAX));
    }

    #[test]
    fn a_backward_page_from_a_synapse_token_near_depth_one_reaches_the_rooms_start() {
        let reaches = |q: &str| shape(Endpoint::Messages, "GET", q).reaches_start;
        // Synapse's `end` names the depth of the page's oldest event: 12 - 1 events remain.
        assert!(reaches("dir=b&from=t12-40_0_0_0_0_0_0_0_0&limit=11"));
        assert!(reaches("dir=b&from=t12-40&limit=20"));
        assert!(!reaches("dir=b&from=t13-40&limit=11"), "one event more than the page holds");
        assert!(reaches("limit=11&from=t2-7&dir=b"), "in any order");
        // No limit: Synapse's ten; a large one: at most Synapse's thousand.
        assert!(reaches("dir=b&from=t11-3"));
        assert!(!reaches("dir=b&from=t12-3"));
        assert!(reaches("dir=b&from=t1001-3&limit=5000"));
        assert!(!reaches("dir=b&from=t1002-3&limit=5000"));
        // A filter's limit is not the page's.
        assert!(!reaches("dir=b&from=t40-3&filter=%7B%22limit%22%3A100%7D"));
        // Forward, or no direction (Synapse's default is forward), or another kind of token.
        assert!(!reaches("dir=f&from=t2-7&limit=50"));
        assert!(!reaches("from=t2-7&limit=50"));
        for from in ["s72_5_0", "t12_3", "t-3", "t12-", "t12-x", "tx-1", "12-3", "", "t99999999999999999999-1"] {
            assert!(!reaches(&format!("dir=b&from={from}&limit=50")), "{from:?}");
        }
        assert!(!shape(Endpoint::Context, "GET", "dir=b&from=t2-7&limit=50").reaches_start);
    }

    #[test]
    fn sync_parameters_are_read() {
        assert!(shape(Endpoint::Sync, "GET", "since=s1_2&timeout=30000").incremental);
        assert!(!shape(Endpoint::Sync, "GET", "timeout=0").incremental);
        assert!(shape(Endpoint::SlidingSync, "POST", "pos=7").incremental);
        assert!(shape(Endpoint::Sync, "GET", "since=s1&full_state=true").full_state);
        let f = "filter=%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A1000%7D%2C%22state%22%3A%7B%22limit%22%20%3A%2010%7D%7D%7D";
        assert_eq!(shape(Endpoint::Sync, "GET", f).limit, Some(1000));
        assert_eq!(shape(Endpoint::Sync, "GET", "filter={\"limit\":5}").limit, Some(5));
        assert_eq!(shape(Endpoint::Sync, "GET", "filter=0").limit, None, "a filter id");
    }

    #[test]
    fn a_write_to_a_room_is_a_person_acting_and_a_read_or_a_roomless_write_is_not() {
        // A receipt or read marker (`Other`), a message, typing, a state change.
        for (e, m) in
            [(Endpoint::Other, "POST"), (Endpoint::Send, "PUT"), (Endpoint::Other, "put"), (Endpoint::State, "PUT")]
        {
            assert!(shape(e, m, "").acts, "{e:?} {m}");
        }
        assert!(!shape(Endpoint::Messages, "GET", "dir=b").acts);
        assert!(!shape(Endpoint::Members, "HEAD", "").acts);
        // What an SDK writes on its own names no room: key uploads, filters, to-device.
        let keys = super::super::sim::seen(Some(TokenLabel([1; 8])), Endpoint::Keys, "POST", None, "", None, None);
        assert!(!Shape::of(&keys).acts);
    }

    #[test]
    fn key_backup_reads_are_recognised_by_their_version_parameter() {
        assert!(shape(Endpoint::RoomKeys, "GET", "version=1").version);
        assert!(!shape(Endpoint::RoomKeys, "GET", "").version);
    }

    #[test]
    fn hostile_queries_are_read_without_panicking() {
        let long = "%".repeat(100_000) + "limit=" + &"9".repeat(10_000);
        for q in [
            "",
            "&&&",
            "=",
            "limit",
            "limit=",
            "limit=%31%30",
            "filter=%7B",
            "filter=%7B%22limit%22",
            "filter=%7B%22limit%22%3A",
            "filter={\"limit\"::9}",
            "filter=%7B%22limit%22%3A%2",
            "dir=b&from=%ff%fe&limit=1e9",
            long.as_str(),
        ] {
            for e in [Endpoint::Messages, Endpoint::Sync, Endpoint::RoomKeys, Endpoint::Send] {
                let _ = shape(e, "GET", q);
            }
        }
        let mut noise = String::from("filter=%7B");
        for i in 0..5000u32 {
            noise.push(char::from(b"%\"limt:{} 0123456789A"[(i.wrapping_mul(2_654_435_761) >> 27) as usize % 21]));
        }
        let _ = shape(Endpoint::Sync, "GET", &noise);
    }
}
