//! The agent's record path, `pipeline::State::handle_record` (decoding, the HTTP/1.1 and
//! HTTP/2 connection tracker, the aggregator, the detector), on arbitrary sequences of kernel
//! records: receives, sends and closes on a handful of connections of both vantage points,
//! with request heads built from templates and mutated, arbitrary captures, flags, lengths
//! and timestamps, truncated or garbage records, ticks and housekeeping in between.
//!
//! Invariants checked after each sequence:
//! - nothing panics;
//! - every record is counted once: as a receive, a send, a close or a malformed record;
//! - bytes: every byte sent on a socket-vantage connection (added up in the kernel, reported as
//!   running totals by receive and close records) is accounted exactly once
//!   (a token's or anonymous series, overflow, unattributed, or HTTP/2 response bytes); at
//!   the TLS vantage bytes may be dropped (client connections, held bytes of an evicted
//!   connection) but never invented;
//! - requests: never more than the captured request bytes allow;
//! - no raw token from the input reaches the /metrics exposition.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vigie::aggregate::Limits;
use vigie::pipeline::State;
use vigie::token::TokenKey;
use vigie::vocab::Vantage;
use vigie_common::{
    EVENT_CLOSE, EVENT_HEADER_LEN, EVENT_RECV, EVENT_SEND, EVENT_TLS_CLOSE, EVENT_TLS_RECV, EVENT_TLS_SEND,
    EventHeader, MAX_CAPTURE,
};

/// Tokens the templates carry; none may appear in the exposition.
const TOKENS: [&str; 3] =
    ["syt_ZnV6eg_fuzzfuzzfuzzfuzzfuzz_0a1b2c", "mat_fuzzsecretfuzzsecret", "syt_c2Vj_secretsecret_9z"];

const TEMPLATES: &[&[u8]] = &[
    b"GET /_matrix/client/v3/sync?since=s1_2&timeout=30000 HTTP/1.1\r\nHost: hs\r\nAuthorization: Bearer @T\r\n\r\n",
    b"GET /_matrix/client/v3/rooms/!room:hs/messages?dir=b&limit=1000&access_token=@T HTTP/1.1\r\n\r\n",
    b"PUT /_matrix/client/v3/rooms/%21r%3Ahs/send/m.room.message/1 HTTP/1.1\r\nAuthorization: Bearer @T\r\nContent-Length: 17\r\n\r\n{\"body\":\"hello\"}\n",
    b"POST /_matrix/media/v3/upload HTTP/1.1\r\nAuthorization: Bearer @T\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"POST /_matrix/media/v3/upload HTTP/1.1\r\nAuthorization: Bearer @T\r\nExpect: 100-continue\r\nContent-Length: 70000\r\n\r\n",
    b"GET /_matrix/client/v1/media/download/hs/abcdef HTTP/1.0\r\nauthorization: bearer @T\r\nConnection: close\r\n\r\n",
    b"GET /_matrix/client/v3/rooms/!r:hs/context/$ev?limit=100000 HTTP/1.1\r\nAuthorization: Bearer @T\r\nUser-Agent: curl/8\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n",
    b"POST /_matrix/client/v3/search?next_batch=x HTTP/1.1\r\nAuthorization: Bearer @T\r\nContent-Length: 2\r\n\r\n{}",
    b"GET /_matrix/client/versions HTTP/1.1\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64\x00\x00\x05\x01\x04\x00\x00\x00\x01abcde",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"\r\n",
];

fn record(h: &EventHeader, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; EVENT_HEADER_LEN];
    // SAFETY: EventHeader is #[repr(C)] plain data, EVENT_HEADER_LEN bytes long: what the
    // kernel copies into the ring buffer.
    unsafe {
        std::ptr::copy_nonoverlapping((h as *const EventHeader).cast::<u8>(), out.as_mut_ptr(), EVENT_HEADER_LEN)
    };
    out.extend_from_slice(payload);
    out
}

/// A request-ish payload: a template with a token, cut and mutated, or raw bytes.
fn payload(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    if u.ratio(1, 4)? {
        let n = u.int_in_range(0..=600)?;
        return Ok(u.bytes(n.min(u.len()))?.to_vec());
    }
    let template = *u.choose(TEMPLATES)?;
    let token = *u.choose(&TOKENS)?;
    let mut p = Vec::with_capacity(template.len() + token.len());
    let mut rest = template;
    while let Some(at) = rest.windows(2).position(|w| w == b"@T") {
        p.extend_from_slice(&rest[..at]);
        p.extend_from_slice(token.as_bytes());
        rest = &rest[at + 2..];
    }
    p.extend_from_slice(rest);
    for _ in 0..u.int_in_range(0..=3)? {
        if p.is_empty() {
            break;
        }
        let at = u.choose_index(p.len())?;
        match u.int_in_range(0..=3)? {
            0 => p[at] = u.arbitrary()?,
            1 => {
                p.remove(at);
            }
            2 => p.insert(at, u.arbitrary()?),
            _ => p.truncate(at),
        }
    }
    if u.ratio(1, 8)? {
        // Two requests in one receive (pipelining), or a long header run.
        let again = p.clone();
        p.extend_from_slice(&again);
    }
    if u.ratio(1, 32)? {
        let mut big = b"GET /_matrix/client/v3/sync HTTP/1.1\r\nX-Pad: ".to_vec();
        big.resize(MAX_CAPTURE + 100, b'a');
        p = big;
    }
    Ok(p)
}

#[derive(Default)]
struct Fed {
    records: u64,
    socket_send_bytes: u64,
    tls_send_bytes: u64,
    /// Payload bytes captured in well-formed receive records.
    captured: u64,
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    // Small bounds so that eviction and overflow happen; no token is ever forgotten and every
    // token can hold a series (idle_s infinite, top_k above any count reachable here), so that
    // housekeeping cannot drop counts and the byte balance is exact.
    let max_connections = u.int_in_range(1..=6)?;
    let detect_vantage = if u.arbitrary()? { Vantage::Socket } else { Vantage::Tls };
    let mut state = State::new(
        TokenKey::from_bytes([0x42; 32]),
        Limits { top_k: 1 << 20, max_tokens: 1 << 20, idle_s: f64::INFINITY, ..Limits::default() },
        max_connections,
        u.int_in_range(1..=1000)?,
        vigie::detect::DetectConfig::default(),
        detect_vantage,
    );
    let mut fed = Fed::default();
    let mut ts: u64 = 1_000_000_000;
    let mut generations = [1u64; 8];
    let mut next_generation = 2u64;
    // The kernel's running totals per socket connection (`ConnInfo`): sends are not records,
    // receive and close records carry the total.
    let mut sent = [0u64; 8];
    let mut recvs = [0u32; 8];
    let mut steps = 0;
    while !u.is_empty() && steps < 256 {
        steps += 1;
        ts = if u.ratio(1, 64)? { u.arbitrary()? } else { ts.saturating_add(u.int_in_range(0..=3_000_000_000)?) };
        let slot = u.choose_index(generations.len())?;
        let tls = slot >= 5;
        let conn = 0xffff_8880_0000_0000 + slot as u64 * 0x1000;
        let op = u.int_in_range(0..=15)?;
        let mut h = EventHeader {
            conn,
            conn_start_ns: generations[slot],
            ts_ns: ts,
            pid_tgid: 4242 << 32 | 4243,
            port: if tls { 0 } else { 8008 },
            ..EventHeader::default()
        };
        let rec = match op {
            // Receives: payload captured in full, cut, or with more bytes than captured.
            0..=5 => {
                let mut p = payload(u)?;
                p.truncate(MAX_CAPTURE);
                h.kind = if tls { EVENT_TLS_RECV } else { EVENT_RECV };
                h.flags = if u.ratio(1, 8)? { u.arbitrary()? } else { 0 };
                h.sock_hint = if tls { u.arbitrary()? } else { 0 };
                h.bytes = p.len() as u64 + if u.ratio(1, 6)? { u.int_in_range(0..=200_000)? } else { 0 };
                if u.ratio(1, 10)? {
                    let cut = u.int_in_range(0..=p.len())?;
                    p.truncate(cut);
                }
                h.captured = p.len() as u32;
                fed.captured += p.len() as u64;
                if !tls {
                    recvs[slot] = recvs[slot].wrapping_add(1);
                    h.recv_seq = recvs[slot];
                    h.sent_total = sent[slot];
                }
                record(&h, &p)
            }
            6..=10 => {
                let bytes = if u.ratio(1, 50)? { u.arbitrary::<u32>()?.into() } else { u.int_in_range(0..=70_000)? };
                if !tls {
                    // Added up in the kernel; reported by the next receive or close.
                    sent[slot] += bytes;
                    fed.socket_send_bytes += bytes;
                    continue;
                }
                h.kind = EVENT_TLS_SEND;
                h.bytes = bytes;
                h.sock_hint = u.arbitrary()?;
                fed.tls_send_bytes += h.bytes;
                record(&h, &[])
            }
            11 => {
                h.kind = if tls { EVENT_TLS_CLOSE } else { EVENT_CLOSE };
                if !tls {
                    h.sent_total = sent[slot];
                    h.recv_seq = recvs[slot];
                }
                let r = record(&h, &[]);
                // The kernel forgets a closed socket: the next connection at this address has a
                // new generation and fresh totals (always for sockets; TLS may reuse an SSL*).
                if !tls || u.arbitrary()? {
                    generations[slot] = next_generation;
                    next_generation += 1;
                    sent[slot] = 0;
                    recvs[slot] = 0;
                }
                r
            }
            12 => {
                state.tick(ts);
                continue;
            }
            13 => {
                state.housekeeping(ts);
                continue;
            }
            // Whatever the ring might hold: short, lying about its capture, unknown kinds.
            _ => {
                let n = u.int_in_range(0..=EVENT_HEADER_LEN + 64)?;
                let mut raw = u.bytes(n.min(u.len()))?.to_vec();
                if raw.len() >= EVENT_HEADER_LEN {
                    // The kernel's byte count is a socket call's return value (under 2^31):
                    // keep it in 32 bits so that counters cannot overflow u64 in a few records.
                    let at = std::mem::offset_of!(EventHeader, bytes);
                    raw[at + 4..at + 8].fill(0);
                    // Running totals come from the kernel's own map, never from garbage.
                    let at = std::mem::offset_of!(EventHeader, sent_total);
                    raw[at..at + 8].fill(0);
                    // SAFETY: at least EVENT_HEADER_LEN bytes; plain data, any bit pattern.
                    let g: EventHeader = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
                    if matches!(g.kind, EVENT_SEND | EVENT_TLS_SEND)
                        && raw.len() >= EVENT_HEADER_LEN + g.captured as usize
                    {
                        // A well-formed send after all: its bytes count like any other.
                        if g.kind == EVENT_SEND {
                            fed.socket_send_bytes += g.bytes;
                        } else {
                            fed.tls_send_bytes += g.bytes;
                        }
                    }
                    if matches!(g.kind, EVENT_RECV | EVENT_TLS_RECV)
                        && raw.len() >= EVENT_HEADER_LEN + g.captured as usize
                    {
                        fed.captured += u64::from(g.captured);
                    }
                }
                raw
            }
        };
        fed.records += 1;
        state.handle_record(&rec);
    }
    // Every connection is closed in the end (or polled): the last totals reach the agent.
    for slot in 0..5 {
        if sent[slot] > 0 {
            let h = EventHeader {
                kind: EVENT_CLOSE,
                conn: 0xffff_8880_0000_0000 + slot as u64 * 0x1000,
                conn_start_ns: generations[slot],
                ts_ns: ts,
                port: 8008,
                sent_total: sent[slot],
                recv_seq: recvs[slot],
                ..EventHeader::default()
            };
            fed.records += 1;
            state.handle_record(&record(&h, &[]));
        }
    }
    check(state, &fed);
    Ok(())
}

fn check(state: State, fed: &Fed) {
    let health = &state.health;
    assert_eq!(
        health.recv_events + health.send_events + health.close_events + health.fork_events + health.malformed_records,
        fed.records,
        "every record is a receive, a send, a close, a fork or malformed"
    );
    let agg = &state.aggregator;
    let series = agg.exported().map(|(_, e)| e.total()).chain([agg.overflow().total(), agg.anonymous().total()]);
    let (mut requests, mut bytes) = (0u64, 0u64);
    for c in series {
        requests += c.requests;
        bytes += c.bytes;
    }
    let h2: u64 = health.http2.iter().filter(|((_, what), _)| *what == "response_bytes").map(|(_, n)| *n).sum();
    let accounted = bytes + agg.unattributed() + h2;
    let sent = fed.socket_send_bytes + fed.tls_send_bytes;
    assert!(
        accounted >= fed.socket_send_bytes,
        "socket bytes lost: {accounted} accounted, {} sent on sockets",
        fed.socket_send_bytes
    );
    assert!(accounted <= sent, "bytes invented: {accounted} accounted, {sent} sent");
    if fed.tls_send_bytes == 0 {
        assert_eq!(accounted, fed.socket_send_bytes, "socket bytes lost or invented");
    }
    // The shortest request head ("GET / HTTP/1.1" and a blank line, LF only) is 16 bytes.
    assert!(requests * 8 <= fed.captured, "{requests} requests from {} captured bytes", fed.captured);
    let state = Arc::new(Mutex::new(state));
    let text = vigie::metrics::render(&vigie::metrics::registry(state));
    for t in TOKENS {
        assert!(!text.contains(t), "a raw token reached the exposition");
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
