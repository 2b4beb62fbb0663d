//! The pipeline's side of `respond`: the only place a raw token is copied out of a request.
//!
//! A label that crossed the policy's threshold is *wanted*; the next request that carries its
//! token hands a copy of that token (in a zeroizing buffer) to a short queue, which the agent
//! forwards to the responder thread for one `whoami`. Tokens of labels nobody wants are never
//! copied. The agent's own requests carry a per-run random marker and are told apart here, so
//! that asking who a token is never counts as that token's traffic, nor captures it again.

use std::collections::VecDeque;

use memchr::memmem::Finder;
use zeroize::Zeroizing;

use crate::http::RequestHead;
use crate::token::{self, LabelMap, TokenLabel};

/// Labels wanted at once; more are refused (counted) until some are resolved or expire.
pub const MAX_WANTED: usize = 256;
/// Tokens captured and not yet taken by the agent; more are dropped (counted).
pub const MAX_CAPTURED: usize = 32;
/// A wanted label whose token makes no request for this long is given up.
pub const WANTED_FOR_NS: u64 = 15 * 60 * 1_000_000_000;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TapStats {
    pub captures: u64,
    /// Captures dropped because the queue was full.
    pub capture_drops: u64,
    /// Labels not marked wanted because `MAX_WANTED` were already.
    pub wants_refused: u64,
    pub wants_expired: u64,
}

#[derive(Default)]
pub struct Tap {
    marker: Option<Finder<'static>>,
    /// Label -> when it was first wanted (monotonic ns).
    wanted: LabelMap<u64>,
    captured: VecDeque<(TokenLabel, Zeroizing<Vec<u8>>)>,
    pub stats: TapStats,
}

impl Tap {
    /// The value of the agent's own header: requests whose head holds it are the agent's.
    pub fn set_marker(&mut self, marker: &str) {
        self.marker = Some(Finder::new(marker.as_bytes()).into_owned());
    }

    /// Whether this request head is one of the agent's own (cheap: nothing to search when
    /// `respond` is off).
    pub fn is_own(&self, head: &[u8]) -> bool {
        self.marker.as_ref().is_some_and(|m| m.find(head).is_some())
    }

    pub fn is_wanted(&self, label: &TokenLabel) -> bool {
        !self.wanted.is_empty() && self.wanted.contains_key(label)
    }

    /// Want the next token of `label`; false when too many are wanted already.
    pub fn want(&mut self, label: TokenLabel, now_ns: u64) -> bool {
        if self.wanted.contains_key(&label) {
            return true;
        }
        if self.wanted.len() >= MAX_WANTED {
            self.stats.wants_refused += 1;
            return false;
        }
        self.wanted.insert(label, now_ns);
        true
    }

    pub fn wanted_count(&self) -> usize {
        self.wanted.len()
    }

    /// Copy the request's token for a wanted label; the label is no longer wanted.
    pub fn capture(&mut self, label: TokenLabel, head: &RequestHead<'_>) {
        let Some(raw) = token::extract_token(head) else { return };
        self.wanted.remove(&label);
        if self.captured.len() >= MAX_CAPTURED {
            self.stats.capture_drops += 1;
            return;
        }
        self.stats.captures += 1;
        self.captured.push_back((label, raw));
    }

    /// The captured tokens, oldest first (buffers zeroized when the caller drops them).
    pub fn take(&mut self) -> VecDeque<(TokenLabel, Zeroizing<Vec<u8>>)> {
        std::mem::take(&mut self.captured)
    }

    pub fn expire(&mut self, now_ns: u64) {
        let before = self.wanted.len();
        self.wanted.retain(|_, since| now_ns.saturating_sub(*since) < WANTED_FOR_NS);
        self.stats.wants_expired += (before - self.wanted.len()) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse_head;

    #[test]
    fn only_wanted_labels_are_captured_once_and_the_queue_is_bounded() {
        let mut tap = Tap::default();
        let a = TokenLabel([1; 8]);
        let head = b"GET /sync HTTP/1.1\r\nAuthorization: Bearer syt_secret\r\n\r\n";
        assert!(!tap.is_wanted(&a));
        assert!(tap.want(a, 0));
        assert!(tap.is_wanted(&a));
        tap.capture(a, &parse_head(head).unwrap());
        assert!(!tap.is_wanted(&a), "one capture per want");
        let got = tap.take();
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].1[..], b"syt_secret");
        for i in 0..(MAX_CAPTURED + 3) {
            let l = TokenLabel([i as u8, 9, 9, 9, 9, 9, 9, 9]);
            tap.want(l, 0);
            tap.capture(l, &parse_head(head).unwrap());
        }
        assert_eq!(tap.take().len(), MAX_CAPTURED);
        assert_eq!(tap.stats.capture_drops, 3);
    }

    #[test]
    fn wants_are_bounded_and_expire() {
        let mut tap = Tap::default();
        for i in 0..(MAX_WANTED + 2) {
            tap.want(TokenLabel([(i % 256) as u8, (i / 256) as u8, 0, 0, 0, 0, 0, 0]), 0);
        }
        assert_eq!(tap.wanted_count(), MAX_WANTED);
        assert_eq!(tap.stats.wants_refused, 2);
        tap.expire(WANTED_FOR_NS);
        assert_eq!(tap.wanted_count(), 0);
    }

    #[test]
    fn own_requests_are_recognised_by_the_marker_only() {
        let mut tap = Tap::default();
        let head = b"GET /whoami HTTP/1.1\r\nX-Vigie-Agent: 0123456789abcdef\r\n\r\n";
        assert!(!tap.is_own(head), "no marker, nothing is own");
        tap.set_marker("0123456789abcdef");
        assert!(tap.is_own(head));
        assert!(!tap.is_own(b"GET /whoami HTTP/1.1\r\nX-Vigie-Agent: 0123456789abcdee\r\n\r\n"));
    }
}
