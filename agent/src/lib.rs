//! vigie: per-access-token accounting of a Matrix homeserver's HTTP traffic, from eBPF.
//!
//! The binary (`main.rs`) is a thin CLI over these modules:
//! - [`http`]: request-head parsing, robust to hostile input.
//! - [`endpoint`]: the one list of Matrix endpoint classes and the classifier.
//! - [`token`]: access-token extraction and keyed hashing into labels; raw tokens never leave it.
//! - [`conn`]: per-connection HTTP/1.1 state that turns socket events into requests and bytes.
//! - [`aggregate`]: per-token counters with bounded cardinality (top-K plus overflow).
//! - [`pipeline`]: decoding kernel records and feeding the tracker and aggregator.
//! - [`metrics`]: the Prometheus exposition.
//! - [`loader`]: loading and attaching the kernel programs, for the chosen capture source.
//! - [`btf`]: kernel struct offsets from BTF, for the kernel programs.
//! - [`listeners`]: which processes listen on a port (/proc).
//! - [`tls`]: finding OpenSSL's functions in a file, and the files a TLS server maps.
//! - [`config`]: the TOML file and command-line settings.
//! - [`preflight`]: `vigie check`, what the host supports.
//! - [`resolve`]: `vigie resolve`, labels back to users from Synapse's database.
pub mod aggregate;
pub mod btf;
pub mod config;
pub mod conn;
pub mod detect;
pub mod endpoint;
pub mod http;
pub mod listeners;
pub mod loader;
pub mod metrics;
pub mod pipeline;
pub mod preflight;
pub mod resolve;
pub mod tls;
pub mod token;
pub mod web;
