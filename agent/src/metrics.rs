//! The Prometheus exposition: per-token series and the agent's health, read from [`State`] at
//! scrape time (the hot path only bumps integers), served at `/metrics` by [`crate::web`].
//!
//! Names follow Prometheus conventions: the `vigie_` prefix, base units, `_total` on counters
//! (the encoder appends it to counter names).

use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet, prometheus_text},
    metrics::MetricType,
    registry::Registry,
};

use crate::aggregate::{ByEndpoint, Class};
use crate::pipeline::State;
use vigie_common::{
    COUNTER_CAPTURE_FAILED, COUNTER_CONNS_FULL, COUNTER_NO_BUFFER, COUNTER_RINGBUF_FULL, COUNTER_SSL_CALL_LOST,
};

/// Label value of requests that carried no access token.
pub const ANONYMOUS: &str = "anonymous";
/// Label value of tokens without their own series (see `aggregate`).
pub const OVERFLOW: &str = "overflow";

struct StateCollector(Arc<Mutex<State>>);

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

fn counter(m: &mut MetricEncoder<'_>, value: u64) -> Result<(), std::fmt::Error> {
    m.encode_counter::<NoLabelSet, _, u64>(&value, None)
}

fn labelled_counter(m: &mut MetricEncoder<'_>, labels: &[(&str, &str)], value: u64) -> Result<(), std::fmt::Error> {
    counter(&mut m.encode_family(&labels)?, value)
}

fn class_labels(token: &str, class: Class) -> [(&'static str, &str); 3] {
    [("token", token), ("endpoint", class.endpoint.as_str()), ("vantage", class.vantage.as_str())]
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A poisoned lock means the pipeline panicked; still expose what is there.
        let state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let agg = &state.aggregator;
        let series: Vec<(String, &ByEndpoint)> = agg
            .exported()
            .map(|(l, e)| (l.to_string(), e))
            .chain([(ANONYMOUS.to_string(), agg.anonymous()), (OVERFLOW.to_string(), agg.overflow())])
            .collect();

        let mut m = enc.encode_descriptor(
            "vigie_token_requests",
            "HTTP requests per access token (keyed hash label) and Matrix endpoint class",
            None,
            MetricType::Counter,
        )?;
        for (token, counts) in &series {
            for (class, c) in counts.iter() {
                labelled_counter(&mut m, &class_labels(token, class), c.requests)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "vigie_token_response_bytes",
            "Bytes the server sent in reply (status line, headers, framing, body) per token and endpoint class",
            None,
            MetricType::Counter,
        )?;
        for (token, counts) in &series {
            for (class, c) in counts.iter() {
                labelled_counter(&mut m, &class_labels(token, class), c.bytes)?;
            }
        }

        // The detector's additive features, on its one vantage: their sum over hosts is the
        // fleet's (docs/fleet.md). A counter appears once non-zero, as the per-class ones do.
        for (name, help, value) in crate::detect::TALLY_COLUMNS {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (token, counts) in &series {
                let v = value(counts.tally());
                if v != 0.0 {
                    m.encode_family(&[("token", token.as_str())])?.encode_counter::<NoLabelSet, _, u64>(&v, None)?;
                }
            }
        }

        // Every scored token is exported here, whatever the top-K selection did.
        let det = &state.detector;
        let mut m = enc.encode_descriptor(
            "vigie_token_anomaly_score",
            "How far the token is from normal reading; 1 or more means alert (docs/detection.md)",
            None,
            MetricType::Gauge,
        )?;
        let scored: Vec<_> = det.scores().collect();
        let labels: Vec<String> = scored.iter().map(|s| s.token.to_string()).collect();
        for (s, label) in scored.iter().zip(&labels) {
            m.encode_family(&[("token", label.as_str())])?.encode_gauge(&s.score)?;
        }
        let mut m = enc.encode_descriptor(
            "vigie_token_anomaly_reason",
            "Contribution of each reason to the token's anomaly score",
            None,
            MetricType::Gauge,
        )?;
        for (s, label) in scored.iter().zip(&labels) {
            for (reason, v) in s.reasons {
                m.encode_family(&[("token", label.as_str()), ("reason", reason)])?.encode_gauge(v)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "vigie_token_distinct_rooms",
            "Estimated distinct rooms the token touched in the window",
            None,
            MetricType::Gauge,
        )?;
        for (token, _) in &series {
            let Some(label) = crate::token::TokenLabel::parse(token) else { continue };
            if let Some(rooms) = det.distinct_rooms_10m(&label) {
                m.encode_family(&[("token", token.as_str()), ("window", "10m")])?.encode_gauge(&rooms)?;
            }
        }
        for metric in AGENT_METRICS {
            encode_agent_metric(&mut enc, metric, &state)?;
        }
        Ok(())
    }
}

/// Prometheus metric types the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn metric_type(self) -> MetricType {
        match self {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
        }
    }
}

/// How an agent metric is read from the state at scrape time.
pub enum Read {
    /// One value, no labels.
    Value(fn(&State) -> u64),
    /// One value per value of the label named here.
    By(&'static str, fn(&State) -> Vec<(&'static str, u64)>),
    /// An info metric: always 1, its one label's value borrowed from the state.
    Info(&'static str, fn(&State) -> &str),
}

/// One of the agent's own metrics (not per token): its name (without the `_total` the
/// encoder appends to counters), help, type and reader. README's metric tables are checked
/// against this list by a test.
pub struct AgentMetric {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub read: Read,
}

const fn metric(name: &'static str, kind: Kind, help: &'static str, read: Read) -> AgentMetric {
    AgentMetric { name, help, kind, read }
}

use Kind::{Counter, Gauge};
use Read::{By, Value};

/// The agent's metrics besides the per-token families, in exposition order. Adding one is a
/// line here and a row in README's tables.
pub const AGENT_METRICS: &[AgentMetric] = &[
    metric(
        "vigie_tokens_alerting",
        Gauge,
        "Tokens whose score is 1 or more",
        Value(|s| s.detector.stats().alerting as u64),
    ),
    metric(
        "vigie_anomaly_alerts",
        Counter,
        "Times a token's score rose to 1 or more",
        Value(|s| s.detector.stats().alerts_total),
    ),
    metric(
        "vigie_detector_tracked_tokens",
        Gauge,
        "Tokens the detector keeps features for",
        Value(|s| s.detector.stats().tracked_tokens as u64),
    ),
    metric(
        "vigie_detector_tokens_evicted",
        Counter,
        "Tokens the detector dropped because its table was full",
        Value(|s| s.detector.stats().tokens_evicted),
    ),
    metric(
        "vigie_events",
        Counter,
        "Kernel records received, by kind",
        By("kind", |s| {
            let h = &s.health;
            vec![("recv", h.recv_events), ("send", h.send_events), ("close", h.close_events), ("fork", h.fork_events)]
        }),
    ),
    metric(
        "vigie_tls_forks_unfollowed",
        Counter,
        "Forks of TLS server processes the agent could not follow at once (the next discovery attaches them)",
        Value(|s| s.health.forks_unfollowed),
    ),
    metric(
        "vigie_events_lost",
        Counter,
        "Kernel records dropped because the ring buffer was full",
        Value(|s| s.health.kernel[COUNTER_RINGBUF_FULL as usize]),
    ),
    metric(
        "vigie_capture_incomplete",
        Counter,
        "Receives whose bytes were counted but whose content could not be captured, by reason",
        By("reason", |s| {
            let k = &s.health.kernel;
            vec![
                ("read_failed", k[COUNTER_CAPTURE_FAILED as usize]),
                ("no_buffer", k[COUNTER_NO_BUFFER as usize]),
                ("ssl_call_lost", k[COUNTER_SSL_CALL_LOST as usize]),
            ]
        }),
    ),
    metric(
        "vigie_kernel_program_misses",
        Counter,
        "Runs of a kernel program the kernel skipped because another BPF program was running on that CPU: the receive, send or close it would have seen is lost",
        By("program", |s| s.health.program_misses.clone()),
    ),
    metric(
        "vigie_kernel_conn_table_full",
        Counter,
        "Connections the kernel could not record because its connection map was full",
        Value(|s| s.health.kernel[COUNTER_CONNS_FULL as usize]),
    ),
    metric(
        "vigie_malformed_records",
        Counter,
        "Kernel records the agent could not decode",
        Value(|s| s.health.malformed_records),
    ),
    metric(
        "vigie_parse_failures",
        Counter,
        "Receives that could not be turned into a request, by reason",
        By("reason", |s| s.health.parse_failures.iter().map(|(r, v)| (*r, *v)).collect()),
    ),
    metric(
        "vigie_pipelined_requests",
        Counter,
        "Requests sent before the previous one on the connection was answered (HTTP pipelining): counted, but their response bytes may be charged to a later request of the batch",
        Value(|s| s.health.pipelined_requests),
    ),
    metric(
        "vigie_unattributed_response_bytes",
        Counter,
        "Bytes sent on connections whose current request was unknown (before the agent started, after unparsable input)",
        Value(|s| s.aggregator.unattributed()),
    ),
    metric(
        "vigie_tls_records",
        Counter,
        "TLS plaintext records, by how their TCP socket was known (during_call: the library did the socket I/O; before_call: the thread's previous receive, memory-BIO servers; unknown)",
        By("socket", |s| s.health.tls_socket_ties.iter().map(|(t, v)| (t.as_str(), *v)).collect()),
    ),
    metric(
        "vigie_tls_client_connections",
        Counter,
        "TLS connections on which a process mapping the TLS library was the client (not counted per token)",
        Value(|s| s.health.tls_client_connections),
    ),
    metric(
        "vigie_http2_connections",
        Counter,
        "Connections recognised as HTTP/2 (not attributed to tokens)",
        By("vantage", |s| http2(s, "connections")),
    ),
    metric(
        "vigie_http2_requests",
        Counter,
        "HTTP/2 requests (client HEADERS frames)",
        By("vantage", |s| http2(s, "requests")),
    ),
    metric(
        "vigie_http2_response_bytes",
        Counter,
        "Bytes sent on HTTP/2 connections",
        By("vantage", |s| http2(s, "response_bytes")),
    ),
    metric(
        "vigie_connections_evicted",
        Counter,
        "Connections dropped from the agent's table because it was full",
        Value(|s| s.tracker.stats().evicted),
    ),
    metric(
        "vigie_tokens_expired",
        Counter,
        "Tokens forgotten after being idle",
        Value(|s| s.aggregator.stats().tokens_expired),
    ),
    metric(
        "vigie_tokens_untracked",
        Counter,
        "Requests from new tokens counted in overflow because the token table was full",
        Value(|s| s.aggregator.stats().tokens_untracked),
    ),
    metric(
        "vigie_tracked_connections",
        Gauge,
        "Connections the agent currently tracks",
        Value(|s| s.tracker.stats().connections as u64),
    ),
    metric(
        "vigie_tracked_tokens",
        Gauge,
        "Tokens the agent currently tracks",
        Value(|s| s.aggregator.stats().tracked_tokens as u64),
    ),
    metric(
        "vigie_exported_tokens",
        Gauge,
        "Tokens that currently have their own series",
        Value(|s| s.aggregator.stats().exported_tokens as u64),
    ),
    metric(
        "vigie_tokens_folded",
        Gauge,
        "Tracked tokens without their own series (beyond top_k or the series budget), counted in token=\"overflow\"",
        Value(|s| s.aggregator.stats().tokens_folded as u64),
    ),
    metric(
        "vigie_token_series",
        Gauge,
        "Per-token series as of the latest rebalance (counters, features, scores, reasons)",
        Value(|s| s.aggregator.stats().token_series as u64),
    ),
    metric(
        "vigie_series_budget",
        Gauge,
        "max_series: series the agent may export in all; suspects keep theirs beyond it",
        Value(|s| s.aggregator.limits().max_series as u64),
    ),
    metric("vigie_probes_attached", Gauge, "Kernel programs attached", Value(|s| s.health.probes_attached as u64)),
    metric(
        "vigie_build_info",
        Gauge,
        "vigie's version (always 1)",
        By("version", |_| vec![(env!("CARGO_PKG_VERSION"), 1)]),
    ),
    metric(
        "vigie_capture_info",
        Gauge,
        "Where byte counts come from (always 1): source=\"sock\" (sock:sock_{recv,send}_length, Linux 6.3+) or \"syscalls\" (the fallback)",
        By("source", |s| vec![(s.health.capture_source, 1)]),
    ),
    metric(
        "vigie_key_info",
        Gauge,
        "Fingerprint of the token-hash key, which reveals nothing of it (always 1): every host of a fleet must show the same one (docs/fleet.md)",
        Read::Info("fingerprint", |s| &s.health.key_fingerprint),
    ),
];

fn http2(state: &State, what: &str) -> Vec<(&'static str, u64)> {
    state.health.http2.iter().filter(|((_, w), _)| *w == what).map(|((vantage, _), v)| (vantage.as_str(), *v)).collect()
}

fn encode_agent_metric(enc: &mut DescriptorEncoder<'_>, metric: &AgentMetric, state: &State) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(metric.name, metric.help, None, metric.kind.metric_type())?;
    let sample = |m: &mut MetricEncoder<'_>, value: u64| match metric.kind {
        Kind::Counter => m.encode_counter::<NoLabelSet, _, u64>(&value, None),
        Kind::Gauge => m.encode_gauge(&value),
    };
    match &metric.read {
        Read::Value(read) => sample(&mut m, read(state)),
        Read::Info(label, read) => sample(&mut m.encode_family(&[(*label, read(state))])?, 1),
        Read::By(label, read) => {
            for (value_label, value) in read(state) {
                sample(&mut m.encode_family(&[(*label, value_label)])?, value)?;
            }
            Ok(())
        }
    }
}

/// The registry behind `/metrics`.
pub fn registry(state: Arc<Mutex<State>>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StateCollector(state)));
    registry
}

pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug, shown as empty.
    if prometheus_text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{Class, DEFAULT_MAX_SERIES, Limits, SERIES_RESERVE};
    use crate::detect::{DetectConfig, Tally};
    use crate::endpoint::Endpoint;
    use crate::token::{TokenKey, TokenLabel};
    use crate::vocab::Vantage;

    fn state(limits: Limits) -> Arc<Mutex<State>> {
        Arc::new(Mutex::new(State::new(
            TokenKey::from_bytes([3; 32]),
            limits,
            1024,
            900,
            DetectConfig::default(),
            Vantage::Socket,
        )))
    }

    fn series(text: &str) -> usize {
        text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count()
    }

    fn label(i: u32) -> TokenLabel {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&i.to_le_bytes());
        TokenLabel(b)
    }

    /// A reader: syncs, pages history and downloads media, on the detector's vantage.
    fn reader(st: &mut State, i: u32, now: f64) {
        let t = Some(label(i));
        for endpoint in [Endpoint::Sync, Endpoint::Messages, Endpoint::MediaDownload, Endpoint::Members] {
            let class = Class { endpoint, vantage: Vantage::Socket };
            st.aggregator.request(t, class, now);
            st.aggregator.response_bytes(t, class, 1000);
        }
        st.aggregator.tally(label(i), &Tally { pages: 1, page_weight_16: 16, rooms_paged: 1, ..Tally::default() });
        st.aggregator.media_bytes(label(i), 1000);
    }

    #[test]
    fn what_does_not_depend_on_tokens_fits_in_the_reserve() {
        let st = state(Limits::default());
        // Anonymous and overflow requests in every class: the most they can take.
        for &endpoint in Endpoint::ALL {
            for vantage in [Vantage::Socket, Vantage::Tls] {
                let class = Class { endpoint, vantage };
                st.lock().unwrap().aggregator.request(None, class, 0.0);
            }
        }
        let n = series(&render(&registry(st)));
        println!("series with no token: {n} (reserve {SERIES_RESERVE})");
        assert!(n <= SERIES_RESERVE, "{n} series before any token, reserve {SERIES_RESERVE}");
    }

    #[test]
    fn at_the_defaults_an_agent_stays_within_its_series_budget() {
        let st = state(Limits::default());
        {
            let mut s = st.lock().unwrap();
            for i in 0..5_000 {
                reader(&mut s, i, 1.0);
            }
            s.housekeeping(2_000_000_000);
            // After the rebalance the exported tokens keep reading; the newcomers fold.
            for i in 0..5_000 {
                reader(&mut s, i, 3.0);
            }
        }
        let text = render(&registry(st.clone()));
        let n = series(&text);
        let s = st.lock().unwrap();
        let stats = s.aggregator.stats();
        println!(
            "5,000 readers: {n} series, {} tokens exported, {} folded (budget {DEFAULT_MAX_SERIES})",
            stats.exported_tokens, stats.tokens_folded
        );
        assert!(n <= DEFAULT_MAX_SERIES, "{n} series");
        assert!(stats.exported_tokens > 50, "the budget leaves room for real tokens");
        assert_eq!(stats.tokens_folded, 5_000 - stats.exported_tokens);
        assert!(text.contains(&format!("vigie_tokens_folded {}", stats.tokens_folded)));
        assert!(text.contains("vigie_token_history_pages_total{token=\""));
        assert!(text.contains("vigie_token_media_response_bytes_total{token=\""));
    }

    #[test]
    fn the_worst_token_costs_what_docs_fleet_md_says() {
        let st = state(Limits::default());
        let before = series(&render(&registry(st.clone())));
        {
            let mut s = st.lock().unwrap();
            for &endpoint in Endpoint::ALL {
                for vantage in [Vantage::Socket, Vantage::Tls] {
                    let class = Class { endpoint, vantage };
                    s.aggregator.request(Some(label(1)), class, 0.0);
                    s.aggregator.response_bytes(Some(label(1)), class, 1);
                }
            }
            let all = Tally {
                pages: 1,
                page_weight_16: 1,
                context_weight_16: 1,
                searches: 1,
                media_downloads_4: 1,
                rooms_paged: 1,
                full_sync_weight_16: 1,
                key_reads: 1,
                media_bytes: 1,
            };
            s.aggregator.tally(label(1), &all);
        }
        let n = series(&render(&registry(st))) - before;
        let counters = Endpoint::ALL.len() * 2 * 2;
        println!("worst token: {n} series ({counters} per-class counters), plus a score and up to 12 reasons");
        // The overflow/anonymous series already existed for none of these classes: the token's
        // own counters and features (the distinct-rooms gauge needs the detector to know it).
        assert_eq!(n, counters + crate::detect::TALLY_COLUMNS.len());
    }

    #[test]
    fn suspects_keep_their_series_beyond_the_budget() {
        let limits = Limits { max_series: SERIES_RESERVE + 50, ..Limits::default() };
        let st = state(limits);
        let mut s = st.lock().unwrap();
        for i in 0..100 {
            reader(&mut s, i, 1.0);
        }
        // The quietest token is "suspect": pinned whatever its activity and the budget.
        s.aggregator.request(Some(label(1000)), Class { endpoint: Endpoint::Sync, vantage: Vantage::Socket }, 0.5);
        s.aggregator.rebalance(2.0, [label(1000), label(99)], 0);
        let exported: Vec<TokenLabel> = s.aggregator.exported().map(|(l, _)| l).collect();
        assert!(exported.contains(&label(1000)) && exported.contains(&label(99)));
        let stats = s.aggregator.stats();
        assert!(stats.token_series <= 50 + 30, "only the suspects may exceed: {}", stats.token_series);
        assert!(stats.tokens_folded >= 90, "{} folded", stats.tokens_folded);
    }

    use std::collections::BTreeMap;

    fn exposition() -> String {
        let state = State::new(
            crate::token::TokenKey::from_bytes([1; 32]),
            crate::aggregate::Limits::default(),
            16,
            900,
            crate::detect::DetectConfig::default(),
            crate::vocab::Vantage::Socket,
        );
        let state = Arc::new(Mutex::new(state));
        let mut registry = registry(state.clone());
        // What `[respond]` adds when it is on.
        crate::respond::register_for_tests(&mut registry, state);
        render(&registry)
    }

    /// Metric name as scraped (counters with `_total`) and type, from `# TYPE` lines.
    fn exposed() -> BTreeMap<String, String> {
        exposition()
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .map(|(name, kind)| (name.to_string(), kind.to_string()))
            .collect()
    }

    /// Every metric README's tables name, with its type. A row may list several names, with
    /// one type for all or one type each.
    fn documented() -> BTreeMap<String, String> {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
        let mut out = BTreeMap::new();
        for line in readme.lines().filter(|l| l.starts_with("| `vigie_")) {
            let cols: Vec<&str> = line.split('|').map(str::trim).collect();
            let names: Vec<String> = cols[1]
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|n| n.starts_with("vigie_"))
                .map(|n| n.split('{').next().unwrap_or(n).to_string())
                .collect();
            let kinds: Vec<&str> = cols[2].split(", ").collect();
            assert!(kinds.len() == 1 || kinds.len() == names.len(), "README row with unclear types: {line}");
            for (i, name) in names.into_iter().enumerate() {
                let kind = kinds[if kinds.len() == 1 { 0 } else { i }];
                assert!(out.insert(name.clone(), kind.to_string()).is_none(), "{name} is documented twice");
            }
        }
        out
    }

    #[test]
    fn readme_documents_every_metric_the_agent_exports_with_its_type() {
        let (exposed, documented) = (exposed(), documented());
        assert!(exposed.len() >= AGENT_METRICS.len() + 5, "{exposed:?}");
        for (name, kind) in &exposed {
            assert_eq!(documented.get(name), Some(kind), "{name} ({kind}) is exported but not in README's tables");
        }
        for (name, kind) in &documented {
            assert_eq!(exposed.get(name), Some(kind), "README documents {name} ({kind}), the agent does not export it");
        }
    }

    #[test]
    fn every_agent_metric_is_exported_once_under_its_name() {
        let text = exposition();
        for m in AGENT_METRICS {
            let line = match m.kind {
                Kind::Counter => format!("# TYPE {}_total counter\n", m.name),
                Kind::Gauge => format!("# TYPE {} gauge\n", m.name),
            };
            assert_eq!(text.matches(&line).count(), 1, "{}", m.name);
            assert!(m.name.starts_with("vigie_") && !m.name.ends_with("_total"), "{}", m.name);
        }
    }
}
