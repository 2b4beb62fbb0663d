//! vigie: per-access-token accounting of a Matrix homeserver's HTTP traffic, from eBPF.
//!
//! The binary (`main.rs`) only parses the command line; these modules do the work:
//! - [`http`]: request-head parsing, robust to hostile input.
//! - [`endpoint`]: the one list of Matrix endpoint classes and the classifier.
//! - [`token`]: access-token extraction and keyed hashing into labels; raw tokens never leave it.
//! - [`vocab`]: the words the record path shares (`Vantage`, `ConnKey`, `Attribution`).
//! - [`record`]: ring-buffer records decoded once into typed values.
//! - [`conn`]: per-connection HTTP/1.1 state that turns socket events into requests and bytes.
//! - [`aggregate`]: per-token counters with bounded cardinality (top-K plus overflow).
//! - [`pipeline`]: acting on decoded records: the tracker, the aggregator, the detector, health.
//! - [`metrics`]: the Prometheus exposition.
//! - [`detect`]: per-token scoring of how far a session is from normal reading.
//! - [`config`]: the TOML file and command-line settings.
//! - [`web`]: the metrics endpoint (TLS, basic auth, Unix socket).
//! - [`resolve`]: `vigie resolve`, labels back to users from Synapse's database.
//! - [`respond`]: ending flagged sessions through Synapse's admin API, and `vigie respond`.
//! - [`agent`]: the agent's life cycle (`vigie run`), tying capture to the pipeline.
//!
//! Kernel-facing code, which needs root and is proven by the integration tests, lives under
//! [`capture`]: the program loader, BTF, `/proc` listeners, TLS discovery and `vigie check`.
//! Everything above it is pure and unit-tested.
pub mod agent;
pub mod aggregate;
pub mod capture;
pub mod config;
pub mod conn;
pub mod detect;
pub mod endpoint;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod record;
pub mod resolve;
pub mod respond;
pub mod token;
pub mod vocab;
pub mod web;
