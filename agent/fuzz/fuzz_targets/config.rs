//! The config file on arbitrary text, then what the agent does with a file it accepts: merge
//! it with the command line, build the pipeline State with its bounds and detector thresholds,
//! feed it a few requests, tick, keep house and render /metrics. None of it may panic, whatever
//! numbers (0, NaN, infinities, huge counts) the file holds; a refused file is an `Err`.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vigie::aggregate::Limits;
use vigie::config::{FileConfig, Overrides, Settings};
use vigie::pipeline::State;
use vigie::token::TokenKey;
use vigie_common::{EVENT_HEADER_LEN, EVENT_RECV, EVENT_SEND, EventHeader};

fn record(kind: u32, conn: u64, ts_ns: u64, payload: &[u8], bytes: u64) -> Vec<u8> {
    let h = EventHeader {
        kind,
        conn,
        conn_start_ns: 1,
        ts_ns,
        bytes,
        captured: payload.len() as u32,
        port: 8008,
        ..EventHeader::default()
    };
    let mut out = vec![0u8; EVENT_HEADER_LEN];
    // SAFETY: EventHeader is #[repr(C)] plain data, EVENT_HEADER_LEN bytes long.
    unsafe {
        std::ptr::copy_nonoverlapping((&h as *const EventHeader).cast::<u8>(), out.as_mut_ptr(), EVENT_HEADER_LEN)
    };
    out.extend_from_slice(payload);
    out
}

const HEADS: [&[u8]; 3] = [
    b"GET /_matrix/client/v3/rooms/!a:hs/messages?dir=b&limit=1000 HTTP/1.1\r\nAuthorization: Bearer syt_fuzz_a\r\n\r\n",
    b"GET /_matrix/client/v1/media/download/hs/abc HTTP/1.1\r\nAuthorization: Bearer syt_fuzz_b\r\n\r\n",
    b"GET /_matrix/client/v3/sync?timeout=30000 HTTP/1.1\r\nAuthorization: Bearer syt_fuzz_a\r\n\r\n",
];

fn exercise(settings: &Settings) {
    let limits = Limits {
        top_k: settings.top_k,
        max_tokens: settings.max_tokens,
        idle_s: settings.token_idle_seconds as f64,
        ..Limits::default()
    };
    // The table bound is allocated lazily, so a huge max_connections costs nothing here.
    let mut state = State::new(
        TokenKey::from_bytes([0x42; 32]),
        limits,
        settings.max_connections,
        settings.connection_idle_seconds,
        settings.detect.clone(),
        settings.detect_vantage,
    );
    let mut ts = 1_000_000_000u64;
    for i in 0..24u64 {
        let head = HEADS[(i % 3) as usize];
        state.handle_record(&record(EVENT_RECV, i % 4, ts, head, head.len() as u64));
        state.handle_record(&record(EVENT_SEND, i % 4, ts + 1000, &[], 40_000));
        ts += 700_000_000;
        state.tick(ts);
        if i % 8 == 7 {
            state.housekeeping(ts);
        }
    }
    let state = Arc::new(Mutex::new(state));
    let text = vigie::metrics::render(&vigie::metrics::registry(state));
    assert!(!text.contains("syt_fuzz"), "a raw token reached the exposition");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = FileConfig::parse(text) else {
        return;
    };
    // Without flags (the file alone must name something to watch), and with a port flag.
    let alone = FileConfig::parse(text).expect("parsed once, parses twice");
    if let Ok(settings) = Settings::merge(alone, Overrides::default()) {
        assert!(settings.top_k >= 1 && settings.max_tokens >= 1 && settings.max_connections >= 1);
        assert!(!settings.server_ports.contains(&0));
    }
    let flags = Overrides { server_ports: vec![8008], ..Overrides::default() };
    if let Ok(settings) = Settings::merge(file, flags) {
        assert_eq!(settings.server_ports, vec![8008]);
        exercise(&settings);
    }
});
