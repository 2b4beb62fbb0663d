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
        let mut m = enc.encode_descriptor(
            "vigie_key_info",
            "Fingerprint of the token-hash key, which reveals nothing of it (always 1): every host of a fleet must show the same one (docs/fleet.md)",
            None,
            MetricType::Gauge,
        )?;
        m.encode_family(&[("fingerprint", h.key_fingerprint.as_str())])?.encode_gauge(&1u64)?;
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
