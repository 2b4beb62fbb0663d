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

fn gauge(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_gauge(&value)
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
        let ds = det.stats();
        gauge(&mut enc, "vigie_tokens_alerting", "Tokens whose score is 1 or more", ds.alerting as u64)?;
        let mut m = enc.encode_descriptor(
            "vigie_anomaly_alerts",
            "Times a token's score rose to 1 or more",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, ds.alerts_total)?;
        gauge(
            &mut enc,
            "vigie_detector_tracked_tokens",
            "Tokens the detector keeps features for",
            ds.tracked_tokens as u64,
        )?;
        let mut m = enc.encode_descriptor(
            "vigie_detector_tokens_evicted",
            "Tokens the detector dropped because its table was full",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, ds.tokens_evicted)?;

        let h = &state.health;
        let mut m =
            enc.encode_descriptor("vigie_events", "Kernel records received, by kind", None, MetricType::Counter)?;
        for (kind, v) in
            [("recv", h.recv_events), ("send", h.send_events), ("close", h.close_events), ("fork", h.fork_events)]
        {
            labelled_counter(&mut m, &[("kind", kind)], v)?;
        }
        let mut m = enc.encode_descriptor(
            "vigie_tls_forks_unfollowed",
            "Forks of TLS server processes the agent could not follow at once (the next discovery attaches them)",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, h.forks_unfollowed)?;
        let mut m = enc.encode_descriptor(
            "vigie_events_lost",
            "Kernel records dropped because the ring buffer was full",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, h.kernel[COUNTER_RINGBUF_FULL as usize])?;
        let mut m = enc.encode_descriptor(
            "vigie_capture_incomplete",
            "Receives whose bytes were counted but whose content could not be captured, by reason",
            None,
            MetricType::Counter,
        )?;
        labelled_counter(&mut m, &[("reason", "read_failed")], h.kernel[COUNTER_CAPTURE_FAILED as usize])?;
        labelled_counter(&mut m, &[("reason", "no_buffer")], h.kernel[COUNTER_NO_BUFFER as usize])?;
        labelled_counter(&mut m, &[("reason", "ssl_call_lost")], h.kernel[COUNTER_SSL_CALL_LOST as usize])?;
        let mut m = enc.encode_descriptor(
            "vigie_kernel_conn_table_full",
            "Connections the kernel could not record because its connection map was full",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, h.kernel[COUNTER_CONNS_FULL as usize])?;
        let mut m = enc.encode_descriptor(
            "vigie_malformed_records",
            "Kernel records the agent could not decode",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, h.malformed_records)?;
        let mut m = enc.encode_descriptor(
            "vigie_parse_failures",
            "Receives that could not be turned into a request, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, v) in &h.parse_failures {
            labelled_counter(&mut m, &[("reason", reason)], *v)?;
        }
        let mut m = enc.encode_descriptor(
            "vigie_pipelined_requests",
            "Requests sent before the previous one on the connection was answered (HTTP pipelining): counted, but their response bytes may be charged to a later request of the batch",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, h.pipelined_requests)?;
        let mut m = enc.encode_descriptor(
            "vigie_unattributed_response_bytes",
            "Bytes sent on connections whose current request was unknown (before the agent started, after unparsable input)",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, agg.unattributed())?;

        let mut m = enc.encode_descriptor(
            "vigie_tls_records",
            "TLS plaintext records, by how their TCP socket was known (during_call: the library did the socket I/O; before_call: the thread's previous receive, memory-BIO servers; unknown)",
            None,
            MetricType::Counter,
        )?;
        for (tie, v) in &h.tls_socket_ties {
            labelled_counter(&mut m, &[("socket", tie)], *v)?;
        }
        let mut m = enc.encode_descriptor(
            "vigie_tls_client_connections",
            "TLS connections on which a process mapping the TLS library was the client (not counted per token)",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, h.tls_client_connections)?;
        for (what, name, help) in [
            ("connections", "vigie_http2_connections", "Connections recognised as HTTP/2 (not attributed to tokens)"),
            ("requests", "vigie_http2_requests", "HTTP/2 requests (client HEADERS frames)"),
            ("response_bytes", "vigie_http2_response_bytes", "Bytes sent on HTTP/2 connections"),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for ((vantage, w), v) in &h.http2 {
                if *w == what {
                    labelled_counter(&mut m, &[("vantage", vantage.as_str())], *v)?;
                }
            }
        }

        let ts = state.tracker.stats();
        let ags = agg.stats();
        let mut m = enc.encode_descriptor(
            "vigie_connections_evicted",
            "Connections dropped from the agent's table because it was full",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, ts.evicted)?;
        let mut m = enc.encode_descriptor(
            "vigie_tokens_expired",
            "Tokens forgotten after being idle",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, ags.tokens_expired)?;
        let mut m = enc.encode_descriptor(
            "vigie_tokens_untracked",
            "Requests from new tokens counted in overflow because the token table was full",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, ags.tokens_untracked)?;
        gauge(&mut enc, "vigie_tracked_connections", "Connections the agent currently tracks", ts.connections as u64)?;
        gauge(&mut enc, "vigie_tracked_tokens", "Tokens the agent currently tracks", ags.tracked_tokens as u64)?;
        gauge(
            &mut enc,
            "vigie_exported_tokens",
            "Tokens that currently have their own series",
            ags.exported_tokens as u64,
        )?;
        gauge(
            &mut enc,
            "vigie_tokens_folded",
            "Tracked tokens without their own series (beyond top_k or the series budget), counted in token=\"overflow\"",
            ags.tokens_folded as u64,
        )?;
        gauge(
            &mut enc,
            "vigie_token_series",
            "Per-token series as of the latest rebalance (counters, features, scores, reasons)",
            ags.token_series as u64,
        )?;
        gauge(
            &mut enc,
            "vigie_series_budget",
            "max_series: series the agent may export in all; suspects keep theirs beyond it",
            agg.limits().max_series as u64,
        )?;
        gauge(&mut enc, "vigie_probes_attached", "Kernel programs attached", h.probes_attached as u64)?;
        let mut m = enc.encode_descriptor("vigie_build_info", "vigie's version (always 1)", None, MetricType::Gauge)?;
        m.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?.encode_gauge(&1u64)?;
        let mut m = enc.encode_descriptor(
            "vigie_capture_info",
            "Where byte counts come from (always 1): source=\"sock\" (sock:sock_{recv,send}_length, Linux 6.3+) or \"syscalls\" (the fallback)",
            None,
            MetricType::Gauge,
        )?;
        m.encode_family(&[("source", h.capture_source)])?.encode_gauge(&1u64)?;
        Ok(())
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
    use crate::conn::Vantage;
    use crate::detect::{DetectConfig, Tally};
    use crate::endpoint::Endpoint;
    use crate::token::{TokenKey, TokenLabel};

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
        s.aggregator.rebalance(2.0, &|l| *l == label(1000) || *l == label(99), 0);
        let exported: Vec<TokenLabel> = s.aggregator.exported().map(|(l, _)| l).collect();
        assert!(exported.contains(&label(1000)) && exported.contains(&label(99)));
        let stats = s.aggregator.stats();
        assert!(stats.token_series <= 50 + 30, "only the suspects may exceed: {}", stats.token_series);
        assert!(stats.tokens_folded >= 90, "{} folded", stats.tokens_folded);
    }
}
