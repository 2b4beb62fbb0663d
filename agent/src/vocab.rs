//! The words every stage of the record path shares: where a request was seen, which
//! connection it came on, and whom its bytes are charged to.

use crate::endpoint::Endpoint;
use crate::token::TokenLabel;

/// Where a request was seen. When vigie watches both a TLS library and the plaintext port
/// behind it (nginx on 443 forwarding to Synapse on 8008), each request is seen twice, once
/// at each vantage point; the label keeps the two apart so nothing is summed twice silently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Vantage {
    /// Plaintext on a watched server port (`sock:*` tracepoints).
    Socket,
    /// Plaintext inside the TLS library (`SSL_read`/`SSL_write` uprobes).
    Tls,
}

impl Vantage {
    pub fn as_str(self) -> &'static str {
        match self {
            Vantage::Socket => "socket",
            Vantage::Tls => "tls",
        }
    }
}

/// A connection's identity. Socket vantage: the kernel socket address and when the kernel
/// first saw it. TLS vantage: the `SSL*` and the process id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub vantage: Vantage,
    pub id: u64,
    pub generation: u64,
}

/// Whom a response's bytes are charged to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Attribution {
    pub token: Option<TokenLabel>,
    pub endpoint: Endpoint,
    pub vantage: Vantage,
}
