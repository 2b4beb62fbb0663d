//! Everything that touches the kernel or `/proc`, and so needs root to run for real.
//!
//! The rest of the crate is pure: it turns the records these modules deliver into requests,
//! counters and scores, and is unit-tested without privileges. Keeping the boundary in the tree
//! says where a change needs a privileged integration test to be proven.
//!
//! - [`loader`]: loading and attaching the kernel programs, for the chosen capture source.
//! - [`btf`]: kernel struct offsets from BTF, for the kernel programs.
//! - [`listeners`]: which processes listen on a port (/proc).
//! - [`tls`]: finding OpenSSL's functions in a file, and the files a TLS server maps.
//! - [`preflight`]: `vigie check`, what the host supports.
pub mod btf;
pub mod listeners;
pub mod loader;
pub mod preflight;
pub mod tls;
