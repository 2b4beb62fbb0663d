//! Per-connection HTTP/1.1 state: socket events in, requests and attributed bytes out.
//!
//! The kernel reports, per server-side connection and in order, each receive (its exact byte
//! count and up to `MAX_CAPTURE` of its first bytes), each send (exact byte count) and the
//! close. This module rebuilds request boundaries from that:
//!
//! - a request head may arrive over several receives; it is buffered until its blank line;
//! - request bodies are skipped by `Content-Length`, without needing their bytes;
//! - every byte sent goes to the request the connection is answering: the latest complete
//!   head. HTTP/1.1 clients do not send the next request before the previous response ends,
//!   so "bytes since the latest head" is exactly that response (pipelined requests are the
//!   exception: their bytes are still counted, but may land on the later request);
//! - after garbage or an invisible request start the connection is *desynchronised*: its
//!   bytes are counted as unattributed until a receive starts with a plausible request line.
//!
//! Nothing here panics on any input, and every byte sent is accounted somewhere.

use std::collections::HashMap;

use crate::endpoint;
use crate::http::{self, MAX_HEAD_BYTES};
use crate::record;
use crate::token::{self, TokenKey};
use crate::vocab::{Attribution, ConnKey, Vantage};
use zeroize::Zeroize;

/// A parsed request, as handed to the sink. No `Debug`: `query` may hold `access_token=`.
pub struct RequestSeen<'a> {
    pub conn: ConnKey,
    pub at_ns: u64,
    pub attribution: Attribution,
    pub method: &'a str,
    pub room_id: Option<&'a str>,
    pub query: &'a str,
    pub user_agent: Option<&'a [u8]>,
    pub forwarded_for: Option<&'a [u8]>,
    /// The head had `Sec-Fetch-Mode` or `Origin` (see [`crate::http::RequestHead::browser_fetch`]).
    pub browser_fetch: bool,
    /// The client closes the connection after this exchange.
    pub connection_close: bool,
}

/// Why a receive could not be turned into a request. Most also desynchronise the connection
/// (`Conn::desync`); each has a stable label value for `vigie_parse_failures_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseFailure {
    /// Where a request head was expected, bytes that do not start one.
    NotHttp,
    /// The head runs past the bytes the kernel copied.
    CaptureTruncated,
    /// The kernel knew no buffer for a receive where a head was expected.
    NoCapture,
    /// The connection closed with half a head buffered.
    ClosedMidHead,
    /// A head buffered over several receives outgrew `MAX_HEAD_BYTES`.
    HeadTooLarge,
    /// An HTTP/2 frame header fell in bytes that were not copied: requests are no longer counted.
    Http2FrameLost,
    /// Holding this head would pass `HEAD_BUFFER_BUDGET`.
    HeadBudget,
    /// The head parser refused the head.
    Head(http::HeadError),
}

impl ParseFailure {
    /// The tracker's own failures; with [`http::HeadError::ALL`], every one (see [`Self::all`]).
    pub const OWN: [ParseFailure; 7] = [
        ParseFailure::NotHttp,
        ParseFailure::CaptureTruncated,
        ParseFailure::NoCapture,
        ParseFailure::ClosedMidHead,
        ParseFailure::HeadTooLarge,
        ParseFailure::Http2FrameLost,
        ParseFailure::HeadBudget,
    ];

    /// Every failure, so that each reason can be exported at zero before it happens.
    pub fn all() -> impl Iterator<Item = ParseFailure> {
        Self::OWN.into_iter().chain(http::HeadError::ALL.into_iter().map(ParseFailure::Head))
    }

    /// Short snake_case name, stable: used as a metric label value. A head too large for the
    /// parser and one too large to buffer are the same fact to an operator, one label.
    pub fn reason(self) -> &'static str {
        match self {
            ParseFailure::NotHttp => "not_http",
            ParseFailure::CaptureTruncated => "capture_truncated",
            ParseFailure::NoCapture => "no_capture",
            ParseFailure::ClosedMidHead => "closed_mid_head",
            ParseFailure::HeadTooLarge => "head_too_large",
            ParseFailure::Http2FrameLost => "http2_frame_lost",
            ParseFailure::HeadBudget => "head_budget",
            ParseFailure::Head(e) => e.reason(),
        }
    }
}

/// Most bytes of unfinished request heads held across all connections. Each connection may
/// buffer up to `MAX_HEAD_BYTES` of a head that arrives in pieces; without a shared bound,
/// clients that open many connections and never finish their heads would make the agent hold
/// `max_connections` x 64 KiB (4 GiB at the defaults). Past it, the connection whose head would
/// grow is desynchronised (`head_budget`), its buffer freed. Real heads complete within a
/// round trip, so this is never reached by normal traffic.
pub const HEAD_BUFFER_BUDGET: usize = 64 << 20;

/// Where the tracker reports what it rebuilt.
pub trait Sink {
    fn request(&mut self, request: &RequestSeen<'_>);
    fn response_bytes(&mut self, attribution: Attribution, bytes: u64);
    /// Bytes sent on a connection whose current request is unknown.
    fn unattributed_bytes(&mut self, bytes: u64);
    /// A receive that could not be turned into a request.
    fn parse_failure(&mut self, failure: ParseFailure);
    /// HTTP/2 is recognised and counted per connection, not attributed to tokens (HPACK).
    fn http2(&mut self, vantage: Vantage, event: Http2Event);
    /// A TLS connection turned out to be a client's (its first plaintext in is a response):
    /// a process on the host that maps the same TLS library talking to someone else.
    fn tls_client_connection(&mut self);
    /// A request arrived before the previous one on its connection was answered.
    fn pipelined_request(&mut self);
    /// A request the agent itself made (`respond`), and the bytes of its response.
    fn own_request(&mut self) {}
    fn own_response_bytes(&mut self, _bytes: u64) {}
}

/// Which end of the connection the watched process is. Sockets are watched by local port, so
/// they are server side by construction; a TLS library is used by clients too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// No plaintext received yet: bytes sent are held until the role is known.
    Unknown {
        held: u64,
    },
    Server,
    Client,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Http2Event {
    /// A connection opened with the HTTP/2 preface.
    Connection,
    /// A HEADERS frame from the client: one request (stream).
    Request,
    /// Bytes the server sent on an HTTP/2 connection.
    ResponseBytes(u64),
}

/// What arrived of a request head split across receives. Zeroized on drop, as `Zeroizing`
/// would, but an empty buffer (every head that arrives whole) costs no call: that call was a
/// twentieth of the agent's CPU under load.
#[derive(Debug, Default)]
struct HeadBuf(Vec<u8>);

impl Drop for HeadBuf {
    fn drop(&mut self) {
        if self.0.capacity() > 0 {
            self.0.zeroize();
        }
    }
}

impl std::ops::Deref for HeadBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for HeadBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

#[derive(Debug)]
enum Phase {
    /// Waiting for (the rest of) a request head; holds what arrived so far. Zeroized on drop:
    /// it may hold a token.
    Head(HeadBuf),
    /// Skipping a request body of known length.
    Body(u64),
    /// Skipping a chunked request body: it ends when the response starts.
    ChunkedBody,
    /// Lost track of request boundaries.
    Desync,
    /// An HTTP/2 connection: frames are walked to count requests.
    Http2(H2Frames),
}

/// What only a client receives first: an HTTP/1 response, or an HTTP/2 server's SETTINGS
/// frame (stream 0, a whole number of 6-byte settings). A server receives a request line or
/// the HTTP/2 preface.
fn is_client_side(first: &[u8]) -> bool {
    if first.starts_with(b"HTTP/") {
        return true;
    }
    match first.get(..H2_FRAME_HEADER) {
        Some(&[l0, l1, l2, kind, _flags, s0, s1, s2, s3]) => {
            let len = u32::from(l0) << 16 | u32::from(l1) << 8 | u32::from(l2);
            kind == H2_SETTINGS && [s0, s1, s2, s3] == [0; 4] && len % 6 == 0
        }
        _ => false,
    }
}

const H2_SETTINGS: u8 = 0x4;

/// The HTTP/2 client preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const H2_FRAME_HEADER: usize = 9;
const H2_HEADERS: u8 = 0x1;

/// Position in the client's HTTP/2 frame stream. Frame headers must be in captured bytes;
/// payloads are skipped by length, so large DATA frames need no capture.
#[derive(Debug, Default)]
struct H2Frames {
    /// Bytes of the current frame payload (or of the preface) still to skip.
    skip: u64,
    header: [u8; H2_FRAME_HEADER],
    have: usize,
    /// A frame header fell in bytes that were not captured: only bytes are counted now.
    lost: bool,
}

impl H2Frames {
    /// Walk one receive of `total` bytes whose first `data.len()` were captured; returns the
    /// number of HEADERS frames that started in it.
    fn walk(&mut self, total: u64, data: &[u8]) -> (u32, bool) {
        let (mut pos, mut requests, mut lost_now) = (0u64, 0u32, false);
        while pos < total && !self.lost {
            if self.skip > 0 {
                let take = self.skip.min(total - pos);
                self.skip -= take;
                pos += take;
                continue;
            }
            let Some(&byte) = data.get(pos as usize) else {
                self.lost = true;
                lost_now = true;
                break;
            };
            self.header[self.have] = byte;
            self.have += 1;
            pos += 1;
            if self.have == H2_FRAME_HEADER {
                self.have = 0;
                let h = self.header;
                self.skip = u64::from(h[0]) << 16 | u64::from(h[1]) << 8 | u64::from(h[2]);
                if h[3] == H2_HEADERS {
                    requests += 1;
                }
            }
        }
        (requests, lost_now)
    }
}

impl Phase {
    fn head() -> Self {
        Phase::Head(HeadBuf::default())
    }

    /// What follows a request head on the connection: its body, or the next head.
    fn after_head(parsed: &http::RequestHead<'_>) -> Self {
        match (parsed.chunked, parsed.content_length) {
            (true, _) => Phase::ChunkedBody,
            (false, Some(n)) if n > 0 => Phase::Body(n),
            _ => Phase::head(),
        }
    }
}

#[derive(Debug)]
struct Conn {
    phase: Phase,
    current: Option<Attribution>,
    /// Response bytes were sent since the latest request head.
    answering: bool,
    /// The latest request asked for `100 Continue`: the first bytes sent are that interim
    /// response, not the end of the request body.
    expect_continue: bool,
    role: Role,
    last_seen_ns: u64,
    /// Socket vantage: the kernel's running total of bytes sent already accounted, and the
    /// number of the latest receive processed (`vigie_common::ConnInfo`).
    sent_seen: u64,
    recv_seq: u32,
    /// The latest request is the agent's own (`respond::Tap::is_own`): its response is
    /// counted apart, never as a token's.
    own: bool,
}

impl Conn {
    /// Memory held for an unfinished request head.
    fn buffered(&self) -> usize {
        match &self.phase {
            Phase::Head(buf) => buf.capacity(),
            _ => 0,
        }
    }

    fn desync(&mut self, failure: ParseFailure, sink: &mut impl Sink) {
        sink.parse_failure(failure);
        self.phase = Phase::Desync;
        self.current = None;
        self.own = false;
    }
}

/// Connection table with a bound: when full, the sixteenth of connections quiet for longest
/// is dropped at once. Their state is only the current attribution; their later bytes become
/// unattributed (until their next request head), never lost.
struct Table {
    /// foldhash: keys are kernel addresses and start times, not chosen by clients, and this
    /// map is looked up several times per request.
    conns: HashMap<ConnKey, Conn, foldhash::fast::RandomState>,
    max: usize,
    evicted: u64,
    /// Sum of `Conn::buffered` over the table (see `HEAD_BUFFER_BUDGET`).
    head_bytes: usize,
    /// The kernel's running send total already accounted for socket connections dropped from
    /// the table while still open: if one comes back, its next total must not be counted
    /// again from zero. Bounded (cleared when full: the rare loss is a double count of
    /// one connection's earlier bytes as unattributed).
    gone_sent: HashMap<ConnKey, u64, foldhash::fast::RandomState>,
}

impl Table {
    fn get(&mut self, key: ConnKey, now_ns: u64) -> &mut Conn {
        self.room_for(key);
        self.entry(key, now_ns)
    }

    /// Make room when `key` is new and the table full.
    fn room_for(&mut self, key: ConnKey) {
        if self.conns.len() >= self.max && !self.conns.contains_key(&key) {
            self.make_room();
        }
    }

    /// The connection, made if new (after [`Table::room_for`]), seen at `now_ns`.
    fn entry(&mut self, key: ConnKey, now_ns: u64) -> &mut Conn {
        let gone_sent = &mut self.gone_sent;
        let conn = self.conns.entry(key).or_insert_with(|| Conn {
            phase: Phase::head(),
            current: None,
            answering: false,
            expect_continue: false,
            role: match key.vantage {
                Vantage::Socket => Role::Server,
                Vantage::Tls => Role::Unknown { held: 0 },
            },
            last_seen_ns: now_ns,
            sent_seen: gone_sent.remove(&key).unwrap_or(0),
            recv_seq: 0,
            own: false,
        });
        conn.last_seen_ns = now_ns;
        conn
    }

    /// A connection's held head bytes went from `before` to `after` (other connections may
    /// have been evicted meanwhile, their bytes already taken off).
    fn held_changed(&mut self, before: usize, after: usize) {
        self.head_bytes = self.head_bytes.saturating_sub(before) + after;
    }

    /// Drop the quietest sixteenth of the table (at least one connection) in one pass, so a
    /// flood of new connections costs amortised O(1) each. Dropping only the single quietest
    /// one meant a scan of the whole table per new connection: at 65,536 connections a flood
    /// of new ones stalled the agent for seconds (scrapes timed out, the ring buffer filled).
    fn make_room(&mut self) {
        let mut order: Vec<(u64, ConnKey)> = self.conns.iter().map(|(k, c)| (c.last_seen_ns, *k)).collect();
        let n = (order.len() / 16).clamp(1, order.len().max(1));
        if n < order.len() {
            order.select_nth_unstable_by_key(n - 1, |e| e.0);
        }
        for (_, k) in order.iter().take(n) {
            if let Some(c) = self.conns.remove(k) {
                self.head_bytes = self.head_bytes.saturating_sub(c.buffered());
                self.remember_gone(*k, c.sent_seen);
            }
        }
        self.evicted += n.min(order.len()) as u64;
    }

    fn remember_gone(&mut self, key: ConnKey, sent_seen: u64) {
        if sent_seen == 0 {
            return;
        }
        if self.gone_sent.len() >= self.max.max(4096) {
            self.gone_sent.clear();
        }
        self.gone_sent.insert(key, sent_seen);
    }
}

/// Size and eviction counters of the connection table.
#[derive(Debug, Default, Clone, Copy)]
pub struct TrackerStats {
    pub connections: usize,
    pub evicted: u64,
}

pub struct Tracker {
    key: TokenKey,
    table: Table,
    /// Where `respond` takes the tokens it wants and tells its own requests apart (a cell:
    /// the head reader holds the receive's context by shared reference).
    tap: std::cell::RefCell<crate::respond::Tap>,
}

impl Tracker {
    pub fn new(key: TokenKey, max_conns: usize) -> Self {
        Tracker {
            key,
            tap: Default::default(),
            table: Table {
                conns: HashMap::default(),
                max: max_conns.max(1),
                evicted: 0,
                head_bytes: 0,
                gone_sent: HashMap::default(),
            },
        }
    }

    pub fn tap(&mut self) -> &mut crate::respond::Tap {
        self.tap.get_mut()
    }

    pub fn stats(&self) -> TrackerStats {
        TrackerStats { connections: self.table.conns.len(), evicted: self.table.evicted }
    }

    /// Forget connections with no event for `idle_ns` (their close was never seen, for
    /// example because they predate the agent). Returns how many went.
    pub fn expire_idle(&mut self, now_ns: u64, idle_ns: u64) -> usize {
        let before = self.table.conns.len();
        let mut freed = 0;
        let mut gone = Vec::new();
        self.table.conns.retain(|k, c| {
            let keep = now_ns.saturating_sub(c.last_seen_ns) < idle_ns;
            if !keep {
                freed += c.buffered();
                gone.push((*k, c.sent_seen));
            }
            keep
        });
        self.table.head_bytes = self.table.head_bytes.saturating_sub(freed);
        for (k, sent) in gone {
            self.table.remember_gone(k, sent);
        }
        before - self.table.conns.len()
    }

    pub fn on_send(&mut self, key: ConnKey, now_ns: u64, bytes: u64, sink: &mut impl Sink) {
        let conn = self.table.get(key, now_ns);
        Self::sent(conn, key.vantage, bytes, sink);
    }

    fn sent(conn: &mut Conn, vantage: Vantage, bytes: u64, sink: &mut impl Sink) {
        match &mut conn.role {
            Role::Unknown { held } => {
                *held += bytes;
                return;
            }
            Role::Client => return,
            Role::Server => {}
        }
        if conn.expect_continue {
            conn.expect_continue = false;
        } else {
            conn.answering = true;
        }
        if matches!(conn.phase, Phase::Http2(_)) {
            return sink.http2(vantage, Http2Event::ResponseBytes(bytes));
        }
        if conn.own {
            return sink.own_response_bytes(bytes);
        }
        match conn.current {
            Some(a) => sink.response_bytes(a, bytes),
            None => sink.unattributed_bytes(bytes),
        }
    }

    /// A socket record's running total of bytes sent on its connection (receive and close
    /// records carry one, read after the receive): account what was sent since the last
    /// total, before the receive itself, so it goes to the request it answered. A receive
    /// record also gives its number (`recv_seq`), which `on_polled_total` checks.
    pub fn on_sent_total(
        &mut self,
        key: ConnKey,
        now_ns: u64,
        total: u64,
        recv_seq: Option<u32>,
        sink: &mut impl Sink,
    ) {
        let conn = self.table.get(key, now_ns);
        if let Some(seq) = recv_seq {
            conn.recv_seq = seq;
        }
        Self::account_total(conn, key.vantage, total, sink);
    }

    fn account_total(conn: &mut Conn, vantage: Vantage, total: u64, sink: &mut impl Sink) {
        let new = total.saturating_sub(conn.sent_seen);
        conn.sent_seen = conn.sent_seen.max(total);
        if new > 0 {
            Self::sent(conn, vantage, new, sink);
        }
    }

    /// Socket connections whose running totals are worth reading from the kernel: those
    /// answering now, or quiet for a while (their last response may be unaccounted). At most
    /// `limit`, starting at `skip` (the caller rotates it), as (key, latest receive number).
    pub fn poll_targets(&self, limit: usize, skip: usize) -> Vec<(ConnKey, u32)> {
        let socket = self.table.conns.iter().filter(|(k, c)| k.vantage == Vantage::Socket && c.role == Role::Server);
        let n = self.table.conns.len().max(1);
        socket.skip(skip % n).take(limit).map(|(k, c)| (*k, c.recv_seq)).collect()
    }

    /// A running total read from the kernel's connection map by the agent. It is accounted
    /// only when no receive is pending in the ring buffer for this connection (`recv_seq`
    /// matches the latest processed), so a response is never credited to the request before
    /// it. The kernel's entry is read in one copy with `sent` before `recvs`: a copy that
    /// includes the next response's bytes also has the next receive's number, and is skipped.
    pub fn on_polled_total(&mut self, key: ConnKey, total: u64, recv_seq: u32, sink: &mut impl Sink) -> bool {
        // Looked up without `Table::get`: a poll is not activity (the idle clock stays where
        // the records left it) and never creates a connection.
        match self.table.conns.get_mut(&key) {
            Some(conn) if conn.recv_seq == recv_seq => {
                Self::account_total(conn, key.vantage, total, sink);
                true
            }
            _ => false,
        }
    }

    pub fn on_close(&mut self, key: ConnKey, sink: &mut impl Sink) {
        self.table.gone_sent.remove(&key);
        let Some(conn) = self.table.conns.remove(&key) else { return };
        self.table.head_bytes = self.table.head_bytes.saturating_sub(conn.buffered());
        if let Role::Unknown { held } = conn.role
            && held > 0
        {
            sink.unattributed_bytes(held);
        }
        if let Phase::Head(buf) = &conn.phase
            && !buf.is_empty()
        {
            sink.parse_failure(ParseFailure::ClosedMidHead);
        }
    }

    /// A receive of `total` bytes of which the first `data.len()` were captured.
    /// `blind` says nothing was captured because the kernel knew no buffer for it.
    pub fn on_recv(&mut self, key: ConnKey, now_ns: u64, total: u64, data: &[u8], blind: bool, sink: &mut impl Sink) {
        let rx = record::Receive { conn: key, ts_ns: now_ns, bytes: total, data, blind };
        self.receive(rx, None, sink);
    }

    /// A socket receive record: the running send total read after it (`on_sent_total`, with
    /// the receive's number), then the receive itself (`on_recv`), on one look-up of the
    /// connection instead of four.
    pub fn on_socket_recv(&mut self, rx: record::Receive<'_>, sent_total: u64, recv_seq: u32, sink: &mut impl Sink) {
        self.receive(rx, Some((sent_total, recv_seq)), sink);
    }

    /// A receive, after the connection's running send total and the receive's number when
    /// the record carries them, with the bookkeeping of buffered heads.
    fn receive(&mut self, rx: record::Receive<'_>, sent: Option<(u64, u32)>, sink: &mut impl Sink) {
        let key = rx.conn;
        // What the other connections hold once a new one has made room.
        self.table.room_for(key);
        let head_bytes = self.table.head_bytes;
        let conn = self.table.entry(key, rx.ts_ns);
        if let Some((sent_total, recv_seq)) = sent {
            conn.recv_seq = recv_seq;
            Self::account_total(conn, key.vantage, sent_total, sink);
        }
        let before = conn.buffered();
        let others = head_bytes.saturating_sub(before);
        let (now_ns, total, data) = (rx.ts_ns, rx.bytes, rx.data);
        let receive = Receive { token_key: &self.key, tap: &self.tap, key, now_ns, total, data, others };
        recv(conn, &receive, rx.blind, sink);
        let after = conn.buffered();
        self.table.held_changed(before, after);
    }
}

/// A receive on `conn`, without the bookkeeping of buffered heads.
fn recv(conn: &mut Conn, rx: &Receive<'_>, blind: bool, sink: &mut impl Sink) {
    let (key, total, data) = (rx.key, rx.total, rx.data);
    if !settle_role(conn, key.vantage, data, blind, sink) {
        return;
    }
    if let Phase::Http2(frames) = &mut conn.phase {
        return walk_http2(frames, key.vantage, total, if blind { &[] } else { data }, sink);
    }
    // A receive after the response started begins a new request, whatever we thought
    // the request body still held (the server may answer early, or the body was chunked).
    if conn.answering && !matches!(conn.phase, Phase::Head(_)) {
        conn.phase = Phase::head();
    }
    if blind {
        return skip_blind(conn, total, sink);
    }
    let mut pos: u64 = 0;
    while pos < total {
        let seen = data.get(pos as usize..).unwrap_or(&[]);
        match &mut conn.phase {
            Phase::Desync => {
                if pos == 0 && !seen.is_empty() && http::looks_like_request_start(seen) {
                    conn.phase = Phase::head();
                    continue;
                }
                return;
            }
            Phase::ChunkedBody | Phase::Http2(_) => return,
            Phase::Body(rest) => {
                let take = (*rest).min(total - pos);
                *rest -= take;
                pos += take;
                if *rest == 0 {
                    conn.phase = Phase::head();
                }
            }
            Phase::Head(_) => match read_head(rx, conn, pos, sink) {
                Some(next) => pos = next,
                None => return,
            },
        }
    }
}

/// One receive, as the head reader needs it.
struct Receive<'a> {
    token_key: &'a TokenKey,
    tap: &'a std::cell::RefCell<crate::respond::Tap>,
    key: ConnKey,
    now_ns: u64,
    /// Bytes the receive moved; the first `data.len()` were captured.
    total: u64,
    data: &'a [u8],
    /// Head bytes the other connections hold (`HEAD_BUFFER_BUDGET`).
    others: usize,
}

/// Learn which end of a TLS connection the watched process is from its first plaintext in.
/// Returns whether the receive is a server's, to be read as requests.
fn settle_role(conn: &mut Conn, vantage: Vantage, data: &[u8], blind: bool, sink: &mut impl Sink) -> bool {
    match conn.role {
        Role::Client => false,
        Role::Server => true,
        Role::Unknown { held } => {
            if !blind && is_client_side(data) {
                conn.role = Role::Client;
                sink.tls_client_connection();
                return false;
            }
            conn.role = Role::Server;
            if held > 0 && !blind && data.starts_with(H2_PREFACE) {
                // An HTTP/2 server may send its SETTINGS before reading the client's preface.
                sink.http2(vantage, Http2Event::ResponseBytes(held));
            } else if held > 0 {
                sink.unattributed_bytes(held);
            }
            true
        }
    }
}

/// Count the HTTP/2 requests that start in one receive.
fn walk_http2(frames: &mut H2Frames, vantage: Vantage, total: u64, data: &[u8], sink: &mut impl Sink) {
    let (requests, lost) = frames.walk(total, data);
    for _ in 0..requests {
        sink.http2(vantage, Http2Event::Request);
    }
    if lost {
        sink.parse_failure(ParseFailure::Http2FrameLost);
    }
}

/// A receive whose content the kernel could not copy: a body shrinks by its length, a head
/// cannot be read.
fn skip_blind(conn: &mut Conn, total: u64, sink: &mut impl Sink) {
    match &mut conn.phase {
        Phase::Body(rest) => {
            *rest = rest.saturating_sub(total);
            if *rest == 0 {
                conn.phase = Phase::head();
            }
        }
        Phase::ChunkedBody | Phase::Desync | Phase::Http2(_) => {}
        Phase::Head(_) => conn.desync(ParseFailure::NoCapture, sink),
    }
}

/// Read request-head bytes from `pos` of a receive into a connection waiting for a head.
/// Returns where the rest of the receive starts, or `None` when nothing more of it is read
/// (the head is unfinished, the connection desynchronised, or it turned out to be HTTP/2).
fn read_head(rx: &Receive<'_>, conn: &mut Conn, mut pos: u64, sink: &mut impl Sink) -> Option<u64> {
    let Phase::Head(buf) = &mut conn.phase else { return Some(pos) };
    let seen = rx.data.get(pos as usize..).unwrap_or(&[]);
    if seen.is_empty() {
        // The request starts in bytes the kernel did not copy.
        conn.desync(ParseFailure::CaptureTruncated, sink);
        return None;
    }
    let over_budget = |buf: &HeadBuf| rx.others.saturating_add(buf.capacity()) > HEAD_BUFFER_BUDGET;
    let uncaptured_tail = (rx.data.len() as u64) < rx.total;
    if buf.is_empty() && matches!(seen.first(), Some(b'\r' | b'\n')) {
        // Stray line ends between keep-alive requests (RFC 9112 §2.2).
        return Some(pos + 1);
    }
    if buf.is_empty() && pos == 0 && seen.starts_with(H2_PREFACE) {
        sink.http2(rx.key.vantage, Http2Event::Connection);
        let mut frames = H2Frames { skip: H2_PREFACE.len() as u64, ..H2Frames::default() };
        walk_http2(&mut frames, rx.key.vantage, rx.total, rx.data, sink);
        conn.phase = Phase::Http2(frames);
        return None;
    }
    if buf.is_empty() {
        if !http::looks_like_request_start(seen) {
            conn.desync(ParseFailure::NotHttp, sink);
            return None;
        }
        if let Some((end, parsed)) = http::parse_whole_head(seen)
            && let Some(head) = seen.get(..end)
        {
            // The common case: a whole head in one receive, framed and parsed in place at once.
            begin_request(rx, conn, head, parsed, sink);
            return Some(pos + end as u64);
        }
        if let Some(end) = http::head_end(seen) {
            return start_request(rx, conn, &seen[..end], sink).then_some(pos + end as u64);
        }
        if uncaptured_tail {
            conn.desync(ParseFailure::CaptureTruncated, sink);
            return None;
        }
        buf.extend_from_slice(&seen[..seen.len().min(MAX_HEAD_BYTES)]);
        if over_budget(buf) {
            conn.desync(ParseFailure::HeadBudget, sink);
        }
        return None;
    }
    let prev = buf.len();
    buf.extend_from_slice(&seen[..seen.len().min(MAX_HEAD_BYTES - prev.min(MAX_HEAD_BYTES))]);
    if !http::looks_like_request_start(buf) {
        conn.desync(ParseFailure::NotHttp, sink);
        return None;
    }
    let Some(end) = http::head_end(buf) else {
        let failure = if buf.len() >= MAX_HEAD_BYTES {
            Some(ParseFailure::HeadTooLarge)
        } else if uncaptured_tail {
            Some(ParseFailure::CaptureTruncated)
        } else if over_budget(buf) {
            Some(ParseFailure::HeadBudget)
        } else {
            None
        };
        if let Some(failure) = failure {
            conn.desync(failure, sink);
        }
        return None;
    };
    let head = std::mem::take(buf);
    pos += end.saturating_sub(prev).max(1) as u64;
    start_request(rx, conn, &head[..end], sink).then_some(pos)
}

/// A complete head: attribute the connection to it and report it. Returns false when the
/// head was refused (the connection is then desynchronised).
fn start_request(rx: &Receive<'_>, conn: &mut Conn, head: &[u8], sink: &mut impl Sink) -> bool {
    match http::parse_framed_head(head) {
        Ok(parsed) => {
            begin_request(rx, conn, head, parsed, sink);
            true
        }
        Err(e) => {
            conn.desync(ParseFailure::Head(e), sink);
            false
        }
    }
}

/// A complete head, parsed: attribute the connection to it and report it.
fn begin_request(rx: &Receive<'_>, conn: &mut Conn, head: &[u8], parsed: http::RequestHead<'_>, sink: &mut impl Sink) {
    let mut tap = rx.tap.borrow_mut();
    conn.own = tap.is_own(head);
    if conn.own {
        // The agent asking the homeserver who a token is (or acting on it): not that
        // token's traffic, and never a token to capture again.
        conn.current = None;
        conn.answering = false;
        conn.expect_continue = parsed.expect_continue;
        conn.phase = Phase::after_head(&parsed);
        sink.own_request();
        return;
    }
    let classified = endpoint::classify(parsed.method, parsed.path);
    let label = token::label_for_request(rx.token_key, &parsed);
    if let Some(l) = label
        && tap.is_wanted(&l)
    {
        tap.capture(l, &parsed);
    }
    drop(tap);
    let attribution = Attribution { token: label, endpoint: classified.endpoint, vantage: rx.key.vantage };
    // A head that arrives before the previous request was answered is pipelined: its response
    // boundary is unknown without parsing responses, so bytes may land on the later request.
    if conn.current.is_some() && !conn.answering {
        sink.pipelined_request();
    }
    conn.current = Some(attribution);
    conn.answering = false;
    conn.expect_continue = parsed.expect_continue;
    conn.phase = Phase::after_head(&parsed);
    sink.request(&RequestSeen {
        conn: rx.key,
        at_ns: rx.now_ns,
        attribution,
        method: parsed.method,
        room_id: classified.room_id.as_deref(),
        query: parsed.query,
        user_agent: parsed.user_agent,
        forwarded_for: parsed.forwarded_for,
        browser_fetch: parsed.browser_fetch,
        connection_close: parsed.connection_close,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Endpoint;
    use crate::token::TokenLabel;

    #[derive(Default, Debug, PartialEq)]
    struct Recorder {
        requests: Vec<(Option<TokenLabel>, Endpoint, Option<String>)>,
        bytes: Vec<(Attribution, u64)>,
        unattributed: u64,
        failures: Vec<&'static str>,
        h2: Vec<Http2Event>,
        client_connections: u32,
        pipelined: u32,
        own_requests: u32,
        own_bytes: u64,
    }

    impl Sink for Recorder {
        fn request(&mut self, r: &RequestSeen<'_>) {
            self.requests.push((r.attribution.token, r.attribution.endpoint, r.room_id.map(String::from)));
        }
        fn response_bytes(&mut self, a: Attribution, bytes: u64) {
            self.bytes.push((a, bytes));
        }
        fn unattributed_bytes(&mut self, bytes: u64) {
            self.unattributed += bytes;
        }
        fn parse_failure(&mut self, failure: ParseFailure) {
            self.failures.push(failure.reason());
        }
        fn http2(&mut self, _: Vantage, event: Http2Event) {
            self.h2.push(event);
        }
        fn tls_client_connection(&mut self) {
            self.client_connections += 1;
        }
        fn pipelined_request(&mut self) {
            self.pipelined += 1;
        }
        fn own_request(&mut self) {
            self.own_requests += 1;
        }
        fn own_response_bytes(&mut self, bytes: u64) {
            self.own_bytes += bytes;
        }
    }

    const C: ConnKey = ConnKey { vantage: Vantage::Socket, id: 0xffff_8880_0000_1000, generation: 1 };

    fn key() -> TokenKey {
        TokenKey::from_bytes([7; 32])
    }

    fn tracker() -> Tracker {
        Tracker::new(key(), 16)
    }

    fn recv(t: &mut Tracker, data: &[u8], sink: &mut Recorder) {
        t.on_recv(C, 0, data.len() as u64, data, false, sink);
    }

    fn get(path: &str, token: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: hs\r\nAuthorization: Bearer {token}\r\n\r\n").into_bytes()
    }

    #[test]
    fn the_agents_own_requests_are_not_the_tokens_and_a_wanted_token_is_captured_once() {
        let mut t = tracker();
        let mut s = Recorder::default();
        t.tap().set_marker("5eed5eed5eed5eed");
        let label = key().label(b"syt_thief");
        t.tap().want(label, 0);
        // The agent's whoami with the thief's token: its own, neither counted nor captured.
        let own = b"GET /_matrix/client/v3/account/whoami HTTP/1.1\r\nAuthorization: Bearer syt_thief\r\nX-Vigie-Agent: 5eed5eed5eed5eed\r\n\r\n";
        recv(&mut t, own, &mut s);
        t.on_send(C, 0, 300, &mut s);
        assert!(s.requests.is_empty() && s.bytes.is_empty() && s.unattributed == 0);
        assert_eq!((s.own_requests, s.own_bytes), (1, 300));
        assert!(t.tap().take().is_empty(), "the agent's own request is never a capture");
        // The thief's own next request: counted as its token's, and its token captured.
        recv(&mut t, &get("/_matrix/client/v3/rooms/!r:hs/messages", "syt_thief"), &mut s);
        t.on_send(C, 0, 1000, &mut s);
        assert_eq!(bytes_for(&s, "syt_thief"), 1000);
        let captured = t.tap().take();
        assert_eq!(captured.len(), 1);
        assert_eq!((captured[0].0, &captured[0].1[..]), (label, &b"syt_thief"[..]));
        recv(&mut t, &get("/_matrix/client/v3/sync", "syt_thief"), &mut s);
        assert!(t.tap().take().is_empty(), "one capture per want");
    }

    fn bytes_for(sink: &Recorder, token: &str) -> u64 {
        let label = key().label(token.as_bytes());
        sink.bytes.iter().filter(|(a, _)| a.token == Some(label)).map(|(_, b)| b).sum()
    }

    #[test]
    fn keep_alive_requests_each_get_the_bytes_sent_after_them() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        recv(&mut t, &get("/_matrix/client/v3/sync?timeout=30000", "syt_a"), &mut s);
        t.on_send(C, 0, 1000, &mut s);
        t.on_send(C, 0, 5, &mut s);
        recv(&mut t, &get("/_matrix/client/v3/rooms/!r:hs/messages?dir=b", "syt_b"), &mut s);
        t.on_send(C, 0, 300, &mut s);
        assert_eq!(s.requests.len(), 2);
        assert_eq!(s.requests[0].1, Endpoint::Sync);
        assert_eq!(s.requests[1].1, Endpoint::Messages);
        assert_eq!(s.requests[1].2.as_deref(), Some("!r:hs"));
        assert_eq!(bytes_for(&s, "syt_a"), 1005);
        assert_eq!(bytes_for(&s, "syt_b"), 300);
        assert!(s.failures.is_empty());
    }

    /// The kernel's running send totals, as receive records carry them (the socket source
    /// sends no record per send): each total's increase goes to the request it answered.
    #[test]
    fn running_send_totals_credit_the_request_before_the_receive_that_carries_them() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        t.on_sent_total(C, 0, 0, Some(1), &mut s);
        recv(&mut t, &get("/_matrix/client/v3/sync", "syt_a"), &mut s);
        t.on_sent_total(C, 0, 1005, Some(2), &mut s);
        recv(&mut t, &get("/_matrix/client/v3/joined_rooms", "syt_b"), &mut s);
        // A stale (smaller) total is not a negative send.
        t.on_sent_total(C, 0, 900, None, &mut s);
        t.on_sent_total(C, 0, 1305, None, &mut s);
        t.on_close(C, &mut s);
        assert_eq!(bytes_for(&s, "syt_a"), 1005);
        assert_eq!(bytes_for(&s, "syt_b"), 300);
        assert_eq!(s.unattributed, 0);
    }

    /// A connection dropped from a full table and seen again must not have the kernel's
    /// running total counted a second time from zero.
    #[test]
    fn a_connection_evicted_and_seen_again_is_not_counted_twice() {
        let (mut t, mut s) = (Tracker::new(key(), 1), Recorder::default());
        let other = ConnKey { id: 2, ..C };
        recv(&mut t, &get("/_matrix/client/v3/sync", "syt_a"), &mut s);
        t.on_sent_total(C, 1, 500, None, &mut s);
        // A second connection takes the only slot.
        t.on_recv(other, 2, 10, b"GET / HTTP", false, &mut s);
        t.on_sent_total(C, 3, 700, None, &mut s);
        assert_eq!(bytes_for(&s, "syt_a") + s.unattributed, 700, "500 once, then 200 more");
    }

    /// A poll of the kernel map that raced a receive still in the ring buffer (its number is
    /// ahead of the last processed) is skipped: the receive record will carry the total.
    #[test]
    fn a_polled_total_is_accounted_only_when_no_receive_is_pending() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        t.on_sent_total(C, 0, 0, Some(1), &mut s);
        recv(&mut t, &get("/_matrix/client/v3/sync", "syt_a"), &mut s);
        assert!(t.on_polled_total(C, 700, 1, &mut s), "an answer to the only receive is taken");
        assert!(!t.on_polled_total(C, 900, 2, &mut s), "receive 2 is not processed yet");
        assert_eq!(bytes_for(&s, "syt_a"), 700);
        t.on_sent_total(C, 7, 800, Some(2), &mut s);
        recv(&mut t, &get("/_matrix/client/v3/joined_rooms", "syt_b"), &mut s);
        assert!(t.on_polled_total(C, 900, 2, &mut s));
        assert_eq!(bytes_for(&s, "syt_a"), 800);
        assert_eq!(bytes_for(&s, "syt_b"), 100);
        let unknown = ConnKey { id: 1, ..C };
        assert!(!t.on_polled_total(unknown, 50, 0, &mut s), "a connection the agent does not track is left alone");
        assert_eq!(t.poll_targets(10, 0), vec![(C, 2)]);
    }

    /// A socket receive record read on one look-up counts exactly as its running total and
    /// its receive read apart, through evictions, split heads, garbage and blind receives.
    #[test]
    fn a_socket_receive_is_its_total_then_its_receive() {
        let (mut apart, mut together) = (Tracker::new(key(), 3), Tracker::new(key(), 3));
        let (mut a, mut b) = (Recorder::default(), Recorder::default());
        let head = get("/_matrix/client/v3/sync", "syt_a");
        let (first, rest) = head.split_at(20);
        let pieces: [&[u8]; 5] =
            [&head, first, rest, b"\x16\x03garbage", b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"];
        let mut x: u32 = 0x2545_f491;
        let mut sent = [0u64; 5];
        for step in 0..4000u64 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let id = u64::from(x % 5);
            let conn = ConnKey { id, ..C };
            sent[id as usize] += u64::from(x >> 20) % 3 * 100;
            let data = pieces[(x >> 8) as usize % pieces.len()];
            let (total, blind) = match (x >> 12) % 8 {
                0 => (data.len() as u64 + 40, false),
                1 => (64, true),
                _ => (data.len() as u64, false),
            };
            let captured = if blind { &[][..] } else { data };
            let seq = step as u32;
            apart.on_sent_total(conn, step, sent[id as usize], Some(seq), &mut a);
            apart.on_recv(conn, step, total, captured, blind, &mut a);
            let rx = record::Receive { conn, ts_ns: step, bytes: total, data: captured, blind };
            together.on_socket_recv(rx, sent[id as usize], seq, &mut b);
            if x.is_multiple_of(97) {
                apart.on_close(conn, &mut a);
                together.on_close(conn, &mut b);
                sent[id as usize] = 0;
            }
            assert_eq!(a, b, "step {step}");
            assert_eq!(apart.table.head_bytes, together.table.head_bytes, "step {step}");
            assert_eq!(apart.stats().connections, together.stats().connections, "step {step}");
            let polled = |t: &Tracker| {
                let mut v = t.poll_targets(10, 0);
                v.sort_by_key(|(k, seq)| (k.id, *seq));
                v
            };
            assert_eq!(polled(&apart), polled(&together), "step {step}");
        }
        assert!(!a.requests.is_empty() && !a.failures.is_empty() && apart.stats().evicted > 0);
    }

    #[test]
    fn a_head_split_into_one_byte_receives_is_reassembled() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        for b in get("/_matrix/client/v3/joined_rooms", "syt_a") {
            recv(&mut t, &[b], &mut s);
        }
        t.on_send(C, 0, 42, &mut s);
        assert_eq!(s.requests.len(), 1);
        assert_eq!(s.requests[0].1, Endpoint::JoinedRooms);
        assert_eq!(bytes_for(&s, "syt_a"), 42);
    }

    #[test]
    fn a_body_of_known_length_is_skipped_and_a_pipelined_head_after_it_is_seen() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        let mut data = b"PUT /_matrix/client/v3/rooms/!r:hs/send/m.room.message/1 HTTP/1.1\r\nAuthorization: Bearer syt_a\r\nContent-Length: 11\r\n\r\n{\"body\":1}\n".to_vec();
        data.extend(get("/_matrix/client/v3/sync", "syt_a"));
        recv(&mut t, &data, &mut s);
        let endpoints: Vec<Endpoint> = s.requests.iter().map(|r| r.1).collect();
        assert_eq!(endpoints, vec![Endpoint::Send, Endpoint::Sync]);
        assert!(s.failures.is_empty());
    }

    #[test]
    fn a_body_in_later_receives_is_counted_without_being_seen() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        recv(
            &mut t,
            b"POST /_matrix/media/v3/upload HTTP/1.1\r\nAuthorization: Bearer syt_a\r\nContent-Length: 100000\r\n\r\n",
            &mut s,
        );
        t.on_recv(C, 0, 65536, &[0u8; 8192], false, &mut s);
        t.on_recv(C, 0, 100000 - 65536, &[0u8; 8192], false, &mut s);
        recv(&mut t, &get("/_matrix/client/v3/sync", "syt_a"), &mut s);
        assert_eq!(s.requests.len(), 2);
        assert!(s.failures.is_empty(), "{:?}", s.failures);
    }

    #[test]
    fn a_chunked_request_body_ends_when_the_response_starts() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        recv(&mut t, b"POST /_matrix/media/v3/upload HTTP/1.1\r\nAuthorization: Bearer syt_a\r\nTransfer-Encoding: chunked\r\n\r\n", &mut s);
        recv(&mut t, b"5\r\nhello\r\n0\r\n\r\n", &mut s);
        t.on_send(C, 0, 77, &mut s);
        recv(&mut t, &get("/_matrix/client/v3/sync", "syt_b"), &mut s);
        t.on_send(C, 0, 10, &mut s);
        assert_eq!(s.requests.len(), 2);
        assert_eq!(bytes_for(&s, "syt_a"), 77);
        assert_eq!(bytes_for(&s, "syt_b"), 10);
    }

    #[test]
    fn garbage_is_a_counted_failure_and_the_next_request_resynchronises() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        recv(&mut t, b"\x16\x03\x01\x02\x00garbage", &mut s);
        t.on_send(C, 0, 9, &mut s);
        recv(&mut t, &get("/_matrix/client/v3/sync", "syt_a"), &mut s);
        t.on_send(C, 0, 10, &mut s);
        assert_eq!(s.failures, vec!["not_http"]);
        assert_eq!(s.unattributed, 9);
        assert_eq!(bytes_for(&s, "syt_a"), 10);
    }

    #[test]
    fn a_head_cut_by_the_capture_limit_is_a_counted_failure_not_a_guess() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        let head = get("/_matrix/client/v3/sync", "syt_a");
        t.on_recv(C, 0, head.len() as u64, &head[..10], false, &mut s);
        t.on_send(C, 0, 10, &mut s);
        assert!(s.requests.is_empty());
        assert_eq!(s.failures, vec!["capture_truncated"]);
        assert_eq!(s.unattributed, 10);
    }

    #[test]
    fn bytes_before_any_request_are_unattributed_never_lost() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        t.on_send(C, 0, 123, &mut s);
        assert_eq!(s.unattributed, 123);
    }

    #[test]
    fn a_blind_receive_where_a_head_was_expected_desynchronises() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        t.on_recv(C, 0, 100, &[], true, &mut s);
        assert_eq!(s.failures, vec!["no_capture"]);
    }

    #[test]
    fn closing_in_the_middle_of_a_head_is_counted() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        recv(&mut t, b"GET /_matrix/client/v3/sync HTTP/1.1\r\nHost:", &mut s);
        t.on_close(C, &mut s);
        assert_eq!(s.failures, vec!["closed_mid_head"]);
        assert_eq!(t.stats().connections, 0);
    }

    #[test]
    fn requests_without_a_token_are_attributed_to_no_token() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        recv(&mut t, b"POST /_matrix/client/v3/login HTTP/1.1\r\nContent-Length: 0\r\n\r\n", &mut s);
        assert_eq!(s.requests, vec![(None, Endpoint::Login, None)]);
    }

    #[test]
    fn the_connection_table_is_bounded() {
        let (mut t, mut s) = (Tracker::new(key(), 2), Recorder::default());
        for sock in 0..5u64 {
            t.on_send(ConnKey { vantage: Vantage::Socket, id: sock, generation: 0 }, sock, 1, &mut s);
        }
        assert_eq!(t.stats().connections, 2);
        assert_eq!(t.stats().evicted, 3);
    }

    #[test]
    fn a_connection_flood_evicts_the_quietest_in_batches() {
        let (max, flood) = (16_384usize, 100_000u64);
        let (mut t, mut s) = (Tracker::new(key(), max), Recorder::default());
        for sock in 0..flood {
            t.on_send(ConnKey { vantage: Vantage::Socket, id: sock, generation: 0 }, sock, 1, &mut s);
            assert!(t.stats().connections <= max);
        }
        let st = t.stats();
        assert!(st.connections >= max - max / 16, "{st:?}");
        assert_eq!(st.evicted, flood - st.connections as u64);
        // The most recently seen connections are the ones kept.
        assert!(t.table.conns.contains_key(&ConnKey { vantage: Vantage::Socket, id: flood - 1, generation: 0 }));
        assert!(!t.table.conns.contains_key(&ConnKey { vantage: Vantage::Socket, id: 0, generation: 0 }));
        // Its cost is a benchmark figure (`pipeline_bench`, BENCH_HOT conn_flood_ns): a
        // whole-table scan per new connection (the old eviction) took 4.6 s here in release
        // (83,616 scans of 16,384 entries); batches take about 16 steps per connection.
    }

    #[test]
    fn unfinished_heads_on_many_connections_are_held_within_the_budget() {
        let (mut t, mut s) = (Tracker::new(key(), 65_536), Recorder::default());
        let piece = [b'x'; 8000];
        let conns = 2 * HEAD_BUFFER_BUDGET / MAX_HEAD_BYTES;
        for id in 0..conns as u64 {
            let c = ConnKey { vantage: Vantage::Socket, id, generation: 0 };
            t.on_recv(c, id, 16, b"GET / HTTP/1.1\r\n", false, &mut s);
            for _ in 0..7 {
                t.on_recv(c, id, piece.len() as u64, &piece, false, &mut s);
            }
            let held: usize = t.table.conns.values().map(Conn::buffered).sum();
            assert_eq!(t.table.head_bytes, held);
            assert!(held <= HEAD_BUFFER_BUDGET, "{held}");
        }
        let refused = s.failures.iter().filter(|r| **r == "head_budget").count();
        assert!(refused >= conns / 3, "{refused} of {conns} connections refused");
        // A complete head still goes through on a fresh connection, and closes free it all.
        let c = ConnKey { vantage: Vantage::Socket, id: u64::MAX, generation: 0 };
        recv_on(&mut t, c, &get("/_matrix/client/v3/sync", "syt_a"), &mut s);
        assert_eq!(s.requests.len(), 1);
        for id in 0..conns as u64 {
            t.on_close(ConnKey { vantage: Vantage::Socket, id, generation: 0 }, &mut s);
        }
        assert_eq!(t.table.head_bytes, 0);
    }

    fn recv_on(t: &mut Tracker, c: ConnKey, data: &[u8], sink: &mut Recorder) {
        t.on_recv(c, 0, data.len() as u64, data, false, sink);
    }

    fn h2_frame(kind: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![(payload >> 16) as u8, (payload >> 8) as u8, payload as u8, kind, 0, 0, 0, 0, 1];
        f.resize(f.len() + payload, 0xaa);
        f
    }

    #[test]
    fn http2_is_recognised_and_its_requests_and_bytes_counted_per_connection() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        let mut first = H2_PREFACE.to_vec();
        first.extend(h2_frame(0x4, 6)); // SETTINGS
        first.extend(h2_frame(H2_HEADERS, 40));
        recv(&mut t, &first, &mut s);
        // A large DATA frame whose payload is not captured, then two HEADERS frames.
        let mut next = h2_frame(0x0, 20000);
        next.truncate(9);
        t.on_recv(C, 0, 20009, &next, false, &mut s);
        let mut more = h2_frame(H2_HEADERS, 10);
        more.extend(h2_frame(H2_HEADERS, 10));
        recv(&mut t, &more, &mut s);
        t.on_send(C, 0, 500, &mut s);
        assert_eq!(
            s.h2,
            vec![
                Http2Event::Connection,
                Http2Event::Request,
                Http2Event::Request,
                Http2Event::Request,
                Http2Event::ResponseBytes(500)
            ]
        );
        assert!(s.requests.is_empty() && s.failures.is_empty(), "{:?}", s.failures);
    }

    const T: ConnKey = ConnKey { vantage: Vantage::Tls, id: 0x5555_0000_1000, generation: 42 };

    #[test]
    fn a_tls_connection_whose_first_plaintext_in_is_a_response_is_a_client_and_ignored() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        t.on_send(T, 0, 136, &mut s);
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        t.on_recv(T, 0, response.len() as u64, response, false, &mut s);
        t.on_send(T, 0, 136, &mut s);
        t.on_close(T, &mut s);
        assert_eq!(s.client_connections, 1);
        assert_eq!(s.unattributed, 0);
        assert!(s.requests.is_empty() && s.failures.is_empty() && s.bytes.is_empty());
    }

    #[test]
    fn a_tls_server_connection_counts_like_a_socket_one() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        let head = get("/_matrix/client/v3/sync", "syt_a");
        t.on_recv(T, 0, head.len() as u64, &head, false, &mut s);
        t.on_send(T, 0, 700, &mut s);
        assert_eq!(s.requests.len(), 1);
        assert_eq!(s.bytes[0].0.vantage, Vantage::Tls);
        assert_eq!(bytes_for(&s, "syt_a"), 700);
    }

    #[test]
    fn stray_line_ends_between_keep_alive_requests_are_skipped() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        let mut data = b"\r\n".to_vec();
        data.extend(get("/_matrix/client/v3/sync", "syt_a"));
        recv(&mut t, &data, &mut s);
        assert_eq!(s.requests.len(), 1);
        assert!(s.failures.is_empty());
    }

    #[test]
    fn an_interim_100_continue_does_not_end_the_request_body() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        recv(&mut t, b"POST /_matrix/media/v3/upload HTTP/1.1\r\nAuthorization: Bearer syt_a\r\nExpect: 100-continue\r\nContent-Length: 70000\r\n\r\n", &mut s);
        t.on_send(C, 0, 25, &mut s);
        t.on_recv(C, 0, 65536, b"GET / HTTP/1.1\r\n\r\n looks like a request but is body", false, &mut s);
        t.on_recv(C, 0, 70000 - 65536, b"more body", false, &mut s);
        t.on_send(C, 0, 521, &mut s);
        recv(&mut t, &get("/_matrix/client/v3/sync", "syt_a"), &mut s);
        t.on_send(C, 0, 100, &mut s);
        assert_eq!(s.requests.len(), 2);
        assert_eq!(bytes_for(&s, "syt_a"), 25 + 521 + 100);
        assert!(s.failures.is_empty(), "{:?}", s.failures);
    }

    #[test]
    fn pipelined_requests_are_all_counted_and_flagged_and_no_byte_is_lost() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        let mut batch = get("/_matrix/client/v3/sync", "syt_a");
        batch.extend(get("/_matrix/client/v3/joined_rooms", "syt_a"));
        batch.extend(get("/_matrix/client/v3/sync", "syt_a"));
        recv(&mut t, &batch, &mut s);
        t.on_send(C, 0, 300, &mut s);
        assert_eq!(s.requests.len(), 3);
        assert_eq!(s.pipelined, 2);
        assert_eq!(bytes_for(&s, "syt_a"), 300);
    }

    #[test]
    fn an_http2_client_end_is_recognised_by_the_servers_settings_frame() {
        let (mut t, mut s) = (tracker(), Recorder::default());
        t.on_send(T, 0, 24 + 27, &mut s);
        let mut settings = h2_frame(H2_SETTINGS, 18);
        settings[8] = 0;
        t.on_recv(T, 0, settings.len() as u64, &settings, false, &mut s);
        t.on_send(T, 0, 40, &mut s);
        assert_eq!(s.client_connections, 1);
        assert_eq!(s.unattributed, 0);
        assert!(s.failures.is_empty() && s.h2.is_empty());
    }
}
