//! Userspace pipeline benchmark: how fast `State::handle_record` turns kernel records into
//! per-token counts on one core, and how much memory each tracked token costs.
//!
//!     cargo run --release -p vigie --example pipeline_bench [-- --tokens N --requests N]
//!
//! No kernel is involved: records are synthesized exactly as the kernel programs lay them out
//! (`vigie_common::EventHeader` followed by the captured bytes), built in memory first, then
//! fed in a timed loop. The traffic is what the agent sees behind a reverse proxy: keep-alive
//! connections carrying requests from many tokens (a Matrix client's request head of about
//! 500 bytes with `Authorization: Bearer syt_...`), each answered by 1 to 3 sends, and a
//! connection closed now and then.
//!
//! Memory is measured in child processes (one per size, so that one measurement's freed
//! memory cannot hide in the next one's): VmRSS after feeding N distinct tokens three
//! requests each, minus VmRSS before the `State` was created.
//!
//! Each figure comes twice: with the default settings, and "counting only", the anomaly
//! detector held to one token, which leaves the connection tracker and the per-token
//! counters: the difference is what the detector costs.
//!
//! Hot paths, each alone on one core (`BENCH_HOT`): the detector's per-request work and a
//! tick rescoring 10,000 active tokens, the endpoint classifier, a flood of new connections
//! into a full connection table, and the aggregator's rebalance of a full token table. These
//! were timed unit tests once; a loaded CI machine made them flake, so they are figures here
//! and the tests keep the behaviour.
//!
//! Machine-readable lines start with `BENCH_PIPELINE`, `BENCH_MEMORY` and `BENCH_HOT`
//! (`cargo xtask bench` reads them).

use std::io::Write as _;
use std::process::Command;
use std::time::Instant;

use vigie::aggregate::Limits;
use vigie::pipeline::State;
use vigie::token::TokenKey;
use vigie_common::{EVENT_CLOSE, EVENT_HEADER_LEN, EVENT_RECV, EventHeader};

/// Synthetic request rate: sets the records' timestamps, hence when housekeeping runs (every
/// 10 s of record time, as the agent does every 10 s of wall time).
const SYNTHETIC_RATE: u64 = 50_000;
const HOUSEKEEPING_NS: u64 = 10_000_000_000;
/// One in this many requests is followed by the connection's close.
const CLOSE_EVERY: u64 = 50;
const MEMORY_SIZES: [u64; 3] = [10_000, 100_000, 1_000_000];
const MEMORY_REQUESTS_PER_TOKEN: u64 = 3;
const TS_AT: usize = std::mem::offset_of!(EventHeader, ts_ns);

/// xorshift64*: deterministic, fast, good enough for traffic shapes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64(input: &[u8], out: &mut Vec<u8>) {
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(B64[(n >> (18 - 6 * i) & 63) as usize]);
        }
    }
}

/// Synapse's token shape, `syt_<base64 localpart>_<20 random>_<6 checksum>`, derived from
/// the token's index so that the same index is the same token.
fn write_token(index: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(b"syt_");
    base64(format!("user{index}").as_bytes(), out);
    out.push(b'_');
    let mut rng = Rng(index.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    for _ in 0..20 {
        out.push(ALNUM[rng.below(ALNUM.len() as u64) as usize]);
    }
    out.push(b'_');
    for _ in 0..6 {
        out.push(ALNUM[rng.below(ALNUM.len() as u64) as usize]);
    }
}

/// One request and the sends that answer it.
struct Exchange {
    head: Vec<u8>,
    /// Bytes of each send record.
    sends: [u64; 3],
    nsends: usize,
    has_token: bool,
}

const COMMON_HEADERS: &[u8] = b"Host: matrix.bench.example\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Element/1.11.85 Chrome/128.0 Safari/537.36\r\n\
Accept: application/json\r\n\
Accept-Language: fr-FR,fr;q=0.9,en-US;q=0.8\r\n\
Origin: https://app.bench.example\r\n\
X-Forwarded-For: 203.0.113.";

/// A Matrix client request: the mix of a busy homeserver (mostly /sync, then /messages,
/// sends, key queries, media, a few anonymous requests).
fn make_exchange(rng: &mut Rng, token: u64, out: &mut Exchange) {
    let head = &mut out.head;
    head.clear();
    let room = rng.below(5000);
    let pick = rng.below(100);
    let mut body: &[u8] = b"";
    out.has_token = true;
    match pick {
        0..45 => {
            let since = rng.below(1_000_000);
            write!(
                head,
                "GET /_matrix/client/v3/sync?filter=0&since=s{since}_{}_4_{}_1_1_1_{}_0_1&timeout=30000&set_presence=online HTTP/1.1\r\n",
                since / 7,
                since / 3,
                since % 977
            )
            .unwrap();
            out.sends = [380 + rng.below(2000), 0, 0];
            out.nsends = 1;
        }
        45..60 => {
            write!(
                head,
                "GET /_matrix/client/v3/rooms/!r{room:08}abcdefgh:bench.example/messages?dir=b&from=t{}-{}_0_0_0_0_0_0_0_0&limit=30&filter=%7B%22lazy_load_members%22%3Atrue%7D HTTP/1.1\r\n",
                rng.below(99999),
                rng.below(9_999_999)
            )
            .unwrap();
            out.sends = [390, 4000 + rng.below(30_000), 0];
            out.nsends = 2;
        }
        60..70 => {
            write!(
                head,
                "PUT /_matrix/client/v3/rooms/!r{room:08}abcdefgh:bench.example/send/m.room.message/m{}.{} HTTP/1.1\r\n",
                rng.below(1 << 40),
                rng.below(100)
            )
            .unwrap();
            body = b"{\"msgtype\":\"m.text\",\"body\":\"Bonjour, la r\xc3\xa9union est \xc3\xa0 15 h.\"}";
            out.sends = [420, 0, 0];
            out.nsends = 1;
        }
        70..80 => {
            head.extend_from_slice(b"POST /_matrix/client/v3/keys/query HTTP/1.1\r\n");
            body = b"{\"device_keys\":{\"@user42:bench.example\":[]},\"timeout\":10000}";
            out.sends = [400 + rng.below(3000), 0, 0];
            out.nsends = 1;
        }
        80..90 => {
            write!(head, "GET /_matrix/client/v1/media/download/bench.example/m{:016x} HTTP/1.1\r\n", rng.next())
                .unwrap();
            out.sends = [450, 65536, 1 + rng.below(65536)];
            out.nsends = 3;
        }
        90..95 => {
            head.extend_from_slice(b"GET /_matrix/client/v3/joined_rooms HTTP/1.1\r\n");
            out.sends = [350 + rng.below(500), 0, 0];
            out.nsends = 1;
        }
        _ => {
            head.extend_from_slice(b"GET /_matrix/client/versions HTTP/1.1\r\n");
            out.sends = [1200, 0, 0];
            out.nsends = 1;
            out.has_token = false;
        }
    }
    head.extend_from_slice(COMMON_HEADERS);
    write!(head, "{}\r\n", rng.below(250)).unwrap();
    if out.has_token {
        head.extend_from_slice(b"Authorization: Bearer ");
        write_token(token, head);
        head.extend_from_slice(b"\r\n");
    }
    if !body.is_empty() {
        write!(head, "Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()).unwrap();
    }
    head.extend_from_slice(b"Connection: keep-alive\r\n\r\n");
    head.extend_from_slice(body);
}

#[allow(clippy::too_many_arguments)]
fn header(
    kind: u32,
    conn: u64,
    generation: u64,
    ts_ns: u64,
    bytes: u64,
    captured: u32,
    sent_total: u64,
    recv_seq: u32,
) -> [u8; EVENT_HEADER_LEN] {
    let h = EventHeader {
        kind,
        flags: 0,
        pid_tgid: (4242 << 32) | 4243,
        conn,
        conn_start_ns: generation,
        ts_ns,
        bytes,
        captured,
        port: 8008,
        _pad: 0,
        sock_hint: 0,
        sent_total,
        recv_seq,
        _pad2: 0,
    };
    let mut out = [0u8; EVENT_HEADER_LEN];
    // SAFETY: EventHeader is #[repr(C)] plain data with explicit padding, EVENT_HEADER_LEN
    // bytes long: exactly what the kernel copies into the ring buffer.
    unsafe {
        std::ptr::copy_nonoverlapping((&h as *const EventHeader).cast::<u8>(), out.as_mut_ptr(), EVENT_HEADER_LEN)
    };
    out
}

/// Generates the record stream: each request picks a connection and a token at random.
struct Traffic {
    rng: Rng,
    /// Per connection slot: its generation (the kernel's `conn_start_ns`), and the kernel's
    /// running totals (bytes sent, receives), which receive and close records carry.
    generations: Vec<u64>,
    sent: Vec<u64>,
    recvs: Vec<u32>,
    ts_ns: u64,
    exchange: Exchange,
    requests: u64,
    with_token: u64,
    records: u64,
    head_bytes: u64,
}

impl Traffic {
    fn new(connections: usize, seed: u64) -> Self {
        Traffic {
            rng: Rng(seed | 1),
            generations: (1..=connections as u64).collect(),
            sent: vec![0; connections],
            recvs: vec![0; connections],
            ts_ns: 1_000_000_000,
            exchange: Exchange { head: Vec::with_capacity(2048), sends: [0; 3], nsends: 0, has_token: true },
            requests: 0,
            with_token: 0,
            records: 0,
            head_bytes: 0,
        }
    }

    /// One request from `token`: calls `emit` with each record (header and payload).
    fn request(&mut self, token: u64, mut emit: impl FnMut(&[u8; EVENT_HEADER_LEN], &[u8])) {
        let slot = self.rng.below(self.generations.len() as u64) as usize;
        let conn = 0xffff_8880_0000_0000 + (slot as u64) * 0x1000;
        let generation = self.generations[slot];
        make_exchange(&mut self.rng, token, &mut self.exchange);
        let x = &self.exchange;
        self.ts_ns += 1_000_000_000 / SYNTHETIC_RATE;
        let len = x.head.len() as u64;
        // The previous response's sends ride on this receive; this one's on the next record.
        self.recvs[slot] += 1;
        emit(
            &header(EVENT_RECV, conn, generation, self.ts_ns, len, len as u32, self.sent[slot], self.recvs[slot]),
            &x.head,
        );
        for &bytes in &x.sends[..x.nsends] {
            self.ts_ns += 1000;
            self.sent[slot] += bytes;
        }
        self.records += 1;
        self.requests += 1;
        self.with_token += u64::from(x.has_token);
        self.head_bytes += len;
        if self.rng.below(CLOSE_EVERY) == 0 {
            emit(&header(EVENT_CLOSE, conn, generation, self.ts_ns, 0, 0, self.sent[slot], self.recvs[slot]), &[]);
            self.records += 1;
            self.generations[slot] = self.ts_ns;
            self.sent[slot] = 0;
            self.recvs[slot] = 0;
        }
    }
}

fn key() -> TokenKey {
    TokenKey::from_bytes([0x5a; 32])
}

/// What `vigie run` uses by default (deploy/vigie.toml). Without `detector`, the anomaly
/// detector is held to a single token: what is left is the counting alone (tracker and
/// aggregator), to tell the two costs apart.
fn new_state(detector: bool) -> State {
    let detect = if detector {
        vigie::detect::DetectConfig::default()
    } else {
        vigie::detect::DetectConfig { max_tokens: 1, ..vigie::detect::DetectConfig::default() }
    };
    State::new(key(), Limits::default(), 65_536, 900, detect, vigie::vocab::Vantage::Socket)
}

fn vm_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Requests the aggregator holds, wherever they went (own series, overflow, anonymous).
fn counted_requests(state: &State) -> u64 {
    let agg = &state.aggregator;
    agg.exported().map(|(_, e)| e.total().requests).sum::<u64>()
        + agg.overflow().total().requests
        + agg.anonymous().total().requests
}

fn arg(args: &[String], name: &str) -> Option<u64> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).and_then(|v| v.replace('_', "").parse().ok())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(n) = arg(&args, "--memory") {
        memory(n, !args.iter().any(|a| a == "--counting-only"));
        return;
    }
    let tokens = arg(&args, "--tokens").unwrap_or(10_000);
    let requests = arg(&args, "--requests").unwrap_or(1_000_000);
    let connections = arg(&args, "--connections").unwrap_or(4_096) as usize;
    throughput(tokens, requests, connections);
    hot_paths();
    if !args.iter().any(|a| a == "--no-memory") {
        let exe = std::env::current_exe().expect("own path");
        for (n, detector) in MEMORY_SIZES.iter().flat_map(|&n| [(n, true), (n, false)]) {
            let mut child = Command::new(&exe);
            child.arg("--memory").arg(n.to_string());
            if !detector {
                child.arg("--counting-only");
            }
            let out = child.output().expect("running the memory child");
            std::io::stdout().write_all(&out.stdout).unwrap();
            std::io::stderr().write_all(&out.stderr).unwrap();
            if !out.status.success() {
                eprintln!("memory child for {n} tokens failed: {}", out.status);
                std::process::exit(1);
            }
        }
    }
}

fn throughput(tokens: u64, requests: u64, connections: usize) {
    let built = Instant::now();
    let mut traffic = Traffic::new(connections, 0x00c0_ffee);
    let mut arena: Vec<u8> = Vec::with_capacity((requests * 700) as usize);
    let mut ranges: Vec<(usize, usize)> = Vec::with_capacity((requests * 3) as usize);
    for _ in 0..requests {
        let token = traffic.rng.below(tokens);
        traffic.request(token, |h, payload| {
            let start = arena.len();
            arena.extend_from_slice(h);
            arena.extend_from_slice(payload);
            ranges.push((start, arena.len()));
        });
    }
    let end_ts = traffic.ts_ns;
    println!(
        "pipeline: {} requests ({} with a token, {tokens} distinct tokens), {connections} connections, {} records \
         ({:.0} MB in memory), mean request head {} B; built in {:.1} s",
        traffic.requests,
        traffic.with_token,
        ranges.len(),
        arena.len() as f64 / 1e6,
        traffic.head_bytes / traffic.requests,
        built.elapsed().as_secs_f64()
    );

    // Check and warm-up pass (untimed): with an export slot for every token, no count can
    // move to a series that is later dropped, so every request fed must be counted.
    let mut check = State::new(
        key(),
        Limits { top_k: tokens as usize + 1, ..Limits::default() },
        65_536,
        900,
        vigie::detect::DetectConfig::default(),
        vigie::vocab::Vantage::Socket,
    );
    for &(s, e) in &ranges {
        check.handle_record(&arena[s..e]);
    }
    // Newcomers without a slot are held until the agent's next tick (aggregate.rs): what the
    // tick does with the unpinned ones, before counting.
    check.aggregator.release_held();
    let counted = counted_requests(&check);
    let failures: u64 = check.health.parse_failures.values().sum();
    println!(
        "pipeline: check: {counted} requests counted of {} fed, {} tokens tracked, {failures} parse failures, {} malformed records",
        traffic.requests,
        check.aggregator.stats().tracked_tokens,
        check.health.malformed_records
    );
    if counted != traffic.requests || failures != 0 || check.health.malformed_records != 0 {
        eprintln!("pipeline: the agent did not count every synthesized request");
        std::process::exit(1);
    }
    drop(check);

    for detector in [true, false] {
        timed(&arena, &ranges, traffic.requests, end_ts, detector, tokens, connections);
    }
}

/// Feed every record to a fresh `State`, timed.
fn timed(
    arena: &[u8],
    ranges: &[(usize, usize)],
    requests: u64,
    end_ts: u64,
    detector: bool,
    tokens: u64,
    connections: usize,
) {
    let mut state = new_state(detector);
    let mut next_housekeeping = HOUSEKEEPING_NS;
    let started = Instant::now();
    for &(s, e) in ranges {
        let record = &arena[s..e];
        state.handle_record(record);
        // Housekeeping every 10 s of record time, as the agent does every 10 s.
        let ts = u64::from_ne_bytes(record[TS_AT..TS_AT + 8].try_into().unwrap());
        if ts >= next_housekeeping {
            state.housekeeping(ts);
            next_housekeeping = ts + HOUSEKEEPING_NS;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    state.housekeeping(end_ts);
    let records_per_s = ranges.len() as f64 / elapsed;
    let requests_per_s = requests as f64 / elapsed;
    println!(
        "pipeline ({}): {} records in {elapsed:.2} s on one core: {:.2} M records/s, {:.2} M requests/s \
         ({:.0} ns per record, {:.0} ns per request); {} tokens tracked, {} with their own series",
        if detector { "default settings" } else { "counting only, detector held to 1 token" },
        ranges.len(),
        records_per_s / 1e6,
        requests_per_s / 1e6,
        elapsed * 1e9 / ranges.len() as f64,
        elapsed * 1e9 / requests as f64,
        state.aggregator.stats().tracked_tokens,
        state.aggregator.stats().exported_tokens,
    );
    println!(
        "BENCH_PIPELINE detector={} records={} requests={requests} tokens={tokens} connections={connections} \
         seconds={elapsed:.4} records_per_s={records_per_s:.0} requests_per_s={requests_per_s:.0}",
        u8::from(detector),
        ranges.len(),
    );
}

/// Child: feed `n` distinct tokens a few requests each, report resident memory per token.
fn memory(n: u64, detector: bool) {
    let mut traffic = Traffic::new(1024, 0x5eed ^ n);
    let mut record = Vec::with_capacity(4096);
    let baseline = vm_rss_bytes();
    let mut state = new_state(detector);
    let started = Instant::now();
    let mut next_housekeeping = traffic.ts_ns + HOUSEKEEPING_NS;
    for _round in 0..MEMORY_REQUESTS_PER_TOKEN {
        for token in 0..n {
            traffic.request(token, |h, payload| {
                record.clear();
                record.extend_from_slice(h);
                record.extend_from_slice(payload);
                state.handle_record(&record);
            });
            if traffic.ts_ns >= next_housekeeping {
                state.housekeeping(traffic.ts_ns);
                next_housekeeping = traffic.ts_ns + HOUSEKEEPING_NS;
            }
        }
    }
    state.housekeeping(traffic.ts_ns);
    let after = vm_rss_bytes();
    let tracked = state.aggregator.stats().tracked_tokens;
    let connections = state.tracker.stats().connections;
    let delta = after.saturating_sub(baseline);
    println!(
        "memory ({}): {n} tokens x {MEMORY_REQUESTS_PER_TOKEN} requests in {:.1} s: {tracked} tokens tracked, {connections} connections; \
         VmRSS {:.1} MB -> {:.1} MB: {:.0} bytes per tracked token",
        if detector { "default settings" } else { "counting only" },
        started.elapsed().as_secs_f64(),
        baseline as f64 / 1e6,
        after as f64 / 1e6,
        delta as f64 / tracked.max(1) as f64
    );
    println!(
        "BENCH_MEMORY detector={} tokens={n} tracked={tracked} connections={connections} rss_base={baseline} rss_after={after} \
         bytes_per_token={:.0}",
        u8::from(detector),
        delta as f64 / tracked.max(1) as f64
    );
    // Keep `state` alive until measured.
    drop(state);
}

/// A sink that only keeps the connection tracker's results from being optimised away.
#[derive(Default)]
struct Discard(u64);

impl vigie::conn::Sink for Discard {
    fn request(&mut self, _: &vigie::conn::RequestSeen<'_>) {
        self.0 += 1;
    }
    fn response_bytes(&mut self, _: vigie::vocab::Attribution, bytes: u64) {
        self.0 += bytes;
    }
    fn unattributed_bytes(&mut self, bytes: u64) {
        self.0 += bytes;
    }
    fn parse_failure(&mut self, _: vigie::conn::ParseFailure) {}
    fn http2(&mut self, _: vigie::vocab::Vantage, _: vigie::conn::Http2Event) {}
    fn tls_client_connection(&mut self) {}
    fn pipelined_request(&mut self) {}
}

fn hot_paths() {
    use vigie::detect::sim::{self, Rng as SimRng};
    use vigie::detect::{DetectConfig, Detector};
    use vigie::endpoint::{Endpoint, classify};
    const T0: f64 = 1_000_000.0;

    // The detector's work per request: 2,000 requests of twelve Element-like users and a
    // heavy one in 25 rooms, replayed 200 times on a warm detector.
    let mut d = Detector::new(DetectConfig::default());
    let w = sim::world(&mut SimRng::new(4), 12, 25, T0, T0 + 600.0);
    let reqs: Vec<_> = w.reqs.iter().take(2000).cloned().collect();
    let seen: Vec<_> = reqs.iter().map(|r| (r, r.seen())).collect();
    for (r, s) in &seen {
        d.on_request(s, r.at);
    }
    let rounds: u32 = 200;
    let started = Instant::now();
    for k in 0..rounds {
        for (r, s) in &seen {
            d.on_request(s, r.at + f64::from(k) * 0.001);
        }
    }
    let on_request_ns = started.elapsed().as_nanos() as f64 / (f64::from(rounds) * seen.len() as f64);

    // A tick that rescores 10,000 tokens, all active since the previous one (the worst case).
    let busy = || sim::busy_tokens(10_000, T0, DetectConfig::default());
    let mut d = busy();
    let started = Instant::now();
    d.tick(T0 + 70.0);
    let tick_ms = started.elapsed().as_secs_f64() * 1e3;
    // The same tick as the agent runs it, in steps with the ring drained between them: the
    // longest the state is held (the ring waits that long).
    let mut d = busy();
    let started = Instant::now();
    d.begin_tick(T0 + 70.0);
    let mut step_ms = started.elapsed().as_secs_f64() * 1e3;
    loop {
        let started = Instant::now();
        let done = d.tick_step(vigie::pipeline::TICK_STEP_TOKENS);
        step_ms = step_ms.max(started.elapsed().as_secs_f64() * 1e3);
        if done {
            break;
        }
    }

    // The endpoint classifier on a mix of paths.
    let paths = [
        "/_matrix/client/v3/sync",
        "/_matrix/client/v3/rooms/!abc:example.org/messages",
        "/_matrix/client/v3/rooms/%21abc%3Aexample.org/send/m.room.message/t",
        "/_matrix/media/v3/download/example.org/abcdef",
        "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
    ];
    let calls = 1_000_000usize;
    let started = Instant::now();
    for i in 0..calls {
        std::hint::black_box(classify("GET", std::hint::black_box(paths[i % paths.len()])));
    }
    let classify_ns = started.elapsed().as_nanos() as f64 / calls as f64;

    // 100,000 new connections into a table of 16,384: eviction in batches of a sixteenth.
    let (max, flood) = (16_384usize, 100_000u64);
    let mut tracker = vigie::conn::Tracker::new(key(), max);
    let mut sink = Discard::default();
    let started = Instant::now();
    for id in 0..flood {
        let conn = vigie::vocab::ConnKey { vantage: vigie::vocab::Vantage::Socket, id, generation: 0 };
        tracker.on_send(conn, id, 1, &mut sink);
    }
    let flood_ms = started.elapsed().as_secs_f64() * 1e3;
    std::hint::black_box(sink.0);

    // Housekeeping's rebalance with the token table full (1,000,000 tokens, the default
    // max_tokens): it runs while the ring buffer waits, every 10 s.
    let mut agg = vigie::aggregate::Aggregator::new(vigie::aggregate::Limits::default());
    let class = vigie::aggregate::Class { endpoint: Endpoint::Sync, vantage: vigie::vocab::Vantage::Socket };
    for i in 0..1_000_000u64 {
        agg.request(Some(vigie::token::TokenLabel(i.to_le_bytes())), class, i as f64 * 1e-5);
        if i % 1000 == 999 {
            agg.release_held();
        }
    }
    let rounds = 5;
    let started = Instant::now();
    for k in 0..rounds {
        agg.rebalance(20.0 + f64::from(k), [], 0);
    }
    let rebalance_ms = started.elapsed().as_secs_f64() * 1e3 / f64::from(rounds);
    std::hint::black_box(agg.stats());

    println!("hot paths, one core:");
    println!("  detector on_request: {on_request_ns:.0} ns a request");
    println!(
        "  detector tick rescoring 10,000 active tokens: {tick_ms:.1} ms in one go, {step_ms:.1} ms at most \
         per step of {} (the agent's)",
        vigie::pipeline::TICK_STEP_TOKENS
    );
    println!("  endpoint classify: {classify_ns:.0} ns a call");
    println!(
        "  100,000 new connections into a full table of 16,384: {flood_ms:.1} ms ({:.0} ns each)",
        flood_ms * 1e6 / flood as f64
    );
    println!("  rebalance of a full token table (1,000,000 tokens): {rebalance_ms:.1} ms");
    println!(
        "BENCH_HOT detector_on_request_ns={on_request_ns:.1} detector_tick_10k_ms={tick_ms:.3} detector_tick_step_ms={step_ms:.3} classify_ns={classify_ns:.1} conn_flood_ms={flood_ms:.3} rebalance_1m_ms={rebalance_ms:.3}"
    );
}
