//! From ring-buffer records to per-token counters.
//!
//! [`State`] is everything the agent knows; the ring-buffer reader feeds it records and the
//! metrics exposition reads it. Time is the kernel's monotonic clock (`bpf_ktime_get_ns` is
//! CLOCK_MONOTONIC), so record timestamps and housekeeping agree.

use std::collections::BTreeMap;

use vigie_common::COUNTER_COUNT;

use crate::aggregate::{Aggregator, Class, Limits};
use crate::conn::{Http2Event, ParseFailure, RequestSeen, Sink, Tracker};
use crate::detect::{DetectConfig, Detector, Tally};
use crate::endpoint::Endpoint;
use crate::record::{self, Record};
use crate::token::TokenKey;
use crate::vocab::{Attribution, ConnKey, Vantage};

/// Tokens scored per step of a tick ([`State::tick_step`]), between two drains of the ring
/// buffer. Alone on a core a step takes about 2 ms (`pipeline_bench`, BENCH_HOT
/// detector_tick_step_ms). In the suite's flood of new tokens (about 77,000 requests a second,
/// each a token the tick must score) a tick in one go held the state for up to 480 ms, about
/// as long as the 16 MiB ring lasts at that rate: with the token table growing on top of it,
/// CI lost 10,999 records there.
pub const TICK_STEP_TOKENS: usize = 2048;

/// CLOCK_MONOTONIC in nanoseconds, the clock of the kernel's timestamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// The agent's view of its own health, exported with the `vigie_` agent metrics.
#[derive(Debug, Default)]
pub struct Health {
    pub recv_events: u64,
    pub send_events: u64,
    pub close_events: u64,
    /// Forks of processes with per-process TLS probes, and those dropped before the agent
    /// could follow them (more than 1,024 between two drains).
    pub fork_events: u64,
    pub forks_unfollowed: u64,
    /// Records too short or inconsistent to decode.
    pub malformed_records: u64,
    pub parse_failures: BTreeMap<&'static str, u64>,
    /// Kernel-side counters, `vigie_common::COUNTER_*`.
    pub kernel: [u64; COUNTER_COUNT as usize],
    /// Runs of each kernel program the kernel skipped (`Probes::program_misses`).
    pub program_misses: Vec<(&'static str, u64)>,
    pub probes_attached: usize,
    /// `loader::CaptureSource::name` of the programs attached.
    pub capture_source: &'static str,
    /// TLS records by how their socket was known.
    pub tls_socket_ties: BTreeMap<record::SocketTie, u64>,
    /// Requests that arrived before the previous one on their connection was answered.
    pub pipelined_requests: u64,
    /// TLS connections on which the watched process was the client (ignored).
    pub tls_client_connections: u64,
    /// HTTP/2 connections, requests and response bytes, by vantage.
    pub http2: BTreeMap<(Vantage, &'static str), u64>,
    /// The agent's own requests to the homeserver (`respond`) and their response bytes,
    /// kept out of every token's counts.
    pub own_requests: u64,
    pub own_response_bytes: u64,
    /// `TokenKey::fingerprint` of the key labels are made with.
    pub key_fingerprint: String,
}

pub struct State {
    pub tracker: Tracker,
    pub aggregator: Aggregator,
    pub detector: Detector,
    /// The one vantage point the detector learns from: behind a TLS proxy each request is
    /// seen at both, and feeding both would double every feature.
    pub detect_vantage: Vantage,
    pub health: Health,
    connection_idle_ns: u64,
    forks: Vec<(u32, u32)>,
    poll_cursor: usize,
}

/// The sink the connection tracker reports into: aggregator, detector and health counters.
struct Feed<'a> {
    aggregator: &'a mut Aggregator,
    detector: &'a mut Detector,
    detect_vantage: Vantage,
    health: &'a mut Health,
    now_s: f64,
}

impl Sink for Feed<'_> {
    fn request(&mut self, request: &RequestSeen<'_>) {
        let a = request.attribution;
        let tally = if a.vantage == self.detect_vantage {
            self.detector.on_request(request, self.now_s)
        } else {
            Tally::default()
        };
        self.aggregator.request_tallied(a.token, class(a), self.now_s, &tally);
    }

    fn response_bytes(&mut self, a: Attribution, bytes: u64) {
        self.aggregator.response_bytes(a.token, class(a), bytes);
        if let Some(token) = a.token
            && a.vantage == self.detect_vantage
        {
            self.detector.on_response_bytes(token, a.endpoint, bytes, self.now_s);
            if matches!(a.endpoint, Endpoint::MediaDownload | Endpoint::MediaThumbnail) {
                self.aggregator.media_bytes(token, bytes);
            }
        }
    }

    fn unattributed_bytes(&mut self, bytes: u64) {
        self.aggregator.unattributed_bytes(bytes);
    }

    fn parse_failure(&mut self, failure: ParseFailure) {
        *self.health.parse_failures.entry(failure.reason()).or_default() += 1;
    }

    fn http2(&mut self, vantage: Vantage, event: Http2Event) {
        let (what, n) = match event {
            Http2Event::Connection => ("connections", 1),
            Http2Event::Request => ("requests", 1),
            Http2Event::ResponseBytes(b) => ("response_bytes", b),
        };
        *self.health.http2.entry((vantage, what)).or_default() += n;
    }

    fn tls_client_connection(&mut self) {
        self.health.tls_client_connections += 1;
    }

    fn pipelined_request(&mut self) {
        self.health.pipelined_requests += 1;
    }

    fn own_request(&mut self) {
        self.health.own_requests += 1;
    }

    fn own_response_bytes(&mut self, bytes: u64) {
        self.health.own_response_bytes += bytes;
    }
}

fn class(a: Attribution) -> Class {
    Class { endpoint: a.endpoint, vantage: a.vantage }
}

impl State {
    pub fn new(
        key: TokenKey,
        limits: Limits,
        max_connections: usize,
        connection_idle_s: u64,
        detect: DetectConfig,
        detect_vantage: Vantage,
    ) -> Self {
        let key_fingerprint = key.fingerprint().to_string();
        State {
            tracker: Tracker::new(key, max_connections),
            aggregator: Aggregator::new(limits),
            detector: Detector::new(detect),
            detect_vantage,
            health: Health {
                // Known reasons start at zero, so that dashboards and rules see the series.
                parse_failures: ParseFailure::all().map(|f| (f.reason(), 0)).collect(),
                key_fingerprint,
                ..Health::default()
            },
            connection_idle_ns: connection_idle_s.saturating_mul(1_000_000_000),
            forks: Vec::new(),
            poll_cursor: 0,
        }
    }

    /// Decode one ring-buffer record and account it.
    pub fn handle_record(&mut self, bytes: &[u8]) {
        match record::decode(bytes) {
            Ok(record) => self.apply(record),
            Err(_) => self.health.malformed_records += 1,
        }
    }

    /// Account one decoded record.
    pub fn apply(&mut self, record: Record<'_>) {
        match record {
            Record::Recv { rx, sent_total, recv_seq } => {
                let (tracker, mut feed) = self.feed(rx.ts_ns);
                feed.health.recv_events += 1;
                // What was sent before this receive answered the request before it.
                tracker.on_socket_recv(rx, sent_total, recv_seq, &mut feed);
            }
            Record::TlsRecv { rx, tie } => {
                let (tracker, mut feed) = self.feed(rx.ts_ns);
                *feed.health.tls_socket_ties.entry(tie).or_default() += 1;
                feed.health.recv_events += 1;
                tracker.on_recv(rx.conn, rx.ts_ns, rx.bytes, rx.data, rx.blind, &mut feed);
            }
            Record::Send { conn, ts_ns, bytes } => {
                let (tracker, mut feed) = self.feed(ts_ns);
                feed.health.send_events += 1;
                tracker.on_send(conn, ts_ns, bytes, &mut feed);
            }
            Record::TlsSend { conn, ts_ns, bytes, tie } => {
                let (tracker, mut feed) = self.feed(ts_ns);
                *feed.health.tls_socket_ties.entry(tie).or_default() += 1;
                feed.health.send_events += 1;
                tracker.on_send(conn, ts_ns, bytes, &mut feed);
            }
            Record::Close { conn, ts_ns, sent_total } => {
                let (tracker, mut feed) = self.feed(ts_ns);
                feed.health.close_events += 1;
                tracker.on_sent_total(conn, ts_ns, sent_total, None, &mut feed);
                tracker.on_close(conn, &mut feed);
            }
            Record::TlsClose { conn, ts_ns } => {
                let (tracker, mut feed) = self.feed(ts_ns);
                feed.health.close_events += 1;
                tracker.on_close(conn, &mut feed);
            }
            Record::Fork { parent, child } => {
                self.health.fork_events += 1;
                // Bounded: the agent takes them after every drain. A fork not followed here is
                // still found by the next discovery.
                if self.forks.len() < 1024 {
                    self.forks.push((parent, child));
                } else {
                    self.health.forks_unfollowed += 1;
                }
            }
        }
    }

    /// The tracker, and the sink it reports into at `now_ns`.
    fn feed(&mut self, now_ns: u64) -> (&mut Tracker, Feed<'_>) {
        let feed = Feed {
            aggregator: &mut self.aggregator,
            detector: &mut self.detector,
            detect_vantage: self.detect_vantage,
            health: &mut self.health,
            now_s: now_ns as f64 / 1e9,
        };
        (&mut self.tracker, feed)
    }

    /// Every second: rescore, and give every suspect its own series at once.
    pub fn tick(&mut self, now_ns: u64) {
        self.begin_tick(now_ns);
        while !self.tick_step(usize::MAX) {}
    }

    /// [`State::tick`] in steps (`Detector::begin_tick`): the agent drains the ring buffer
    /// between them, so that a tick with many tokens to score never holds it up.
    pub fn begin_tick(&mut self, now_ns: u64) {
        self.detector.begin_tick(now_ns as f64 / 1e9);
    }

    /// Score up to `max` tokens; true once the tick is complete (suspects then keep their
    /// series).
    pub fn tick_step(&mut self, max: usize) -> bool {
        if !self.detector.tick_step(max) {
            return false;
        }
        for suspect in self.detector.suspects() {
            self.aggregator.pin(suspect);
        }
        self.aggregator.release_held();
        true
    }

    /// Socket connections whose running send totals the agent should read from the kernel
    /// (`Tracker::poll_targets`): (socket address, generation, latest receive number).
    pub fn poll_targets(&mut self, limit: usize) -> Vec<(u64, u64, u32)> {
        let targets = self.tracker.poll_targets(limit, self.poll_cursor);
        self.poll_cursor = self.poll_cursor.wrapping_add(targets.len().max(1));
        targets.into_iter().map(|(k, seq)| (k.id, k.generation, seq)).collect()
    }

    /// Running totals read from the kernel's connection map: (socket address, kernel start
    /// time, bytes sent, receives). Stale or racing entries are skipped (`Tracker::on_polled_total`).
    pub fn apply_polled(&mut self, totals: &[(u64, u64, u64, u32)], now_ns: u64) {
        let (tracker, mut feed) = self.feed(now_ns);
        for &(id, generation, sent, recvs) in totals {
            let key = ConnKey { vantage: Vantage::Socket, id, generation };
            tracker.on_polled_total(key, sent, recvs, &mut feed);
        }
    }

    /// (parent, child) pids of TLS server processes that forked since the last call.
    pub fn take_forks(&mut self) -> Vec<(u32, u32)> {
        std::mem::take(&mut self.forks)
    }

    /// Periodic upkeep: expire idle connections and tokens, reassign export slots (suspects
    /// keep theirs).
    pub fn housekeeping(&mut self, now_ns: u64) {
        self.tracker.expire_idle(now_ns, self.connection_idle_ns);
        self.aggregator.rebalance(now_ns as f64 / 1e9, self.detector.suspects(), self.detector.series());
    }
}
