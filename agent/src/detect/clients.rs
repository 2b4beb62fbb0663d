//! Which clients (user agents, X-Forwarded-For addresses) use a token.
//!
//! An access token belongs to one device: one client program, one user agent. A second
//! user agent that shows up once the token is established, while the first one is still in
//! use, is the mark of a copied token (a script replaying the victim's session). The first
//! seconds of a token are exempt (`client_grace_s`): a client may open its connections with
//! different agents (a sync worker and a UI thread, a browser's service worker). A late agent
//! that keeps an incremental `/sync` going behaves like a whole client and weighs less; one
//! that only reads is what a scraper looks like.
//!
//! A small table of fingerprints per token, least recently seen evicted: a token with more
//! than [`CLIENTS`] clients is abnormal anyway, and an evicted client that comes back counts
//! as new again.
//!
//! Nearly every token has one user agent and at most one address: the first client is kept
//! inline and the other three in a box made when a second one appears (40 bytes saved per
//! table on the common token). The four entries behave exactly as one array filled in order.

/// A client of the token. 13 bytes: packed, so the table's count fits beside the inline
/// entry instead of in a padded word of its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
struct Seen {
    /// Fingerprint (0: free entry).
    fp: u32,
    first_s: u32,
    last_s: u32,
    flags: u8,
}

const LATE: u8 = 1;
const SYNCS: u8 = 2;
const CONCURRENT: u8 = 4;
/// Fingerprint marks (see `fingerprint.rs`): a user agent of no known Matrix client, and a
/// request whose headers contradict its user agent.
pub const UNKNOWN: u8 = 8;
pub const MISMATCH: u8 = 16;

/// Older clients are "still in use" when seen this long after the late one appeared.
const CONCURRENCY_S: u32 = 5;

pub const CLIENTS: usize = 4;

/// What a late client looks like, for scoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Late {
    pub concurrent: bool,
    pub syncs: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Clients {
    first: Seen,
    rest: Option<Box<[Seen; CLIENTS - 1]>>,
    /// Distinct clients seen, saturating.
    distinct: u8,
}

impl Clients {
    fn iter(&self) -> impl Iterator<Item = &Seen> {
        std::iter::once(&self.first).chain(self.rest.iter().flat_map(|r| r.iter()))
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Seen> {
        std::iter::once(&mut self.first).chain(self.rest.iter_mut().flat_map(|r| r.iter_mut()))
    }

    /// Entry `i` (`< CLIENTS`), the box made when first needed.
    fn slot(&mut self, i: usize) -> Option<&mut Seen> {
        match i.checked_sub(1) {
            None => Some(&mut self.first),
            Some(j) => self.rest.get_or_insert_with(Default::default).get_mut(j),
        }
    }

    /// Entry `i`, empty when its box was never made.
    fn get(&self, i: usize) -> Seen {
        match i.checked_sub(1) {
            None => self.first,
            Some(j) => self.rest.as_ref().and_then(|r| r.get(j)).copied().unwrap_or_default(),
        }
    }

    /// A request from client `fp` (0: unknown, ignored) on a token first seen at
    /// `token_first_s`. Returns whether this client is a late one.
    pub fn see(&mut self, fp: u32, now: u32, token_first_s: u32, grace_s: u32) -> bool {
        if fp == 0 {
            return false;
        }
        if self.rest.is_none() && self.first.fp == fp {
            // The token's only client, again (nearly every request): no other client to mark.
            self.first.last_s = now;
            return self.first.flags & LATE != 0;
        }
        let known = self.iter().position(|s| s.fp == fp);
        let i = match known {
            Some(i) => i,
            None => {
                let i = (0..CLIENTS)
                    .min_by_key(|&i| {
                        let s = self.get(i);
                        if s.fp == 0 { 0 } else { s.last_s.max(1) }
                    })
                    .unwrap_or(0);
                let late = now.saturating_sub(token_first_s) > grace_s;
                if let Some(s) = self.slot(i) {
                    *s = Seen { fp, first_s: now, last_s: now, flags: if late { LATE } else { 0 } };
                }
                self.distinct = self.distinct.saturating_add(1);
                i
            }
        };
        let Some(me) = self.slot(i).map(|s| {
            s.last_s = now;
            *s
        }) else {
            return false;
        };
        // An older client still at work after a late one appeared: both are in use.
        for other in self.iter_mut() {
            if other.fp != 0
                && other.fp != me.fp
                && other.flags & LATE != 0
                && me.first_s < other.first_s
                && now >= other.first_s.saturating_add(CONCURRENCY_S)
            {
                other.flags |= CONCURRENT;
            }
        }
        me.flags & LATE != 0
    }

    /// Whether client `fp` is in the table.
    pub fn knows(&self, fp: u32) -> bool {
        fp != 0 && self.iter().any(|s| s.fp == fp)
    }

    /// Add fingerprint marks ([`UNKNOWN`], [`MISMATCH`]) to client `fp`.
    pub fn mark(&mut self, fp: u32, marks: u8) {
        if let Some(s) = self.iter_mut().find(|s| fp != 0 && s.fp == fp) {
            s.flags |= marks & (UNKNOWN | MISMATCH);
        }
    }

    /// Fingerprint marks of the clients seen at or after `since`.
    pub fn marks_since(&self, since: u32) -> u8 {
        self.iter().filter(|s| s.fp != 0 && s.last_s >= since).fold(0, |m, s| m | (s.flags & (UNKNOWN | MISMATCH)))
    }

    /// Client `fp` made an incremental sync.
    pub fn mark_sync(&mut self, fp: u32) {
        if let Some(s) = self.iter_mut().find(|s| fp != 0 && s.fp == fp) {
            s.flags |= SYNCS;
        }
    }

    /// Whether client `fp` is late and has never synced: its reads are "foreign".
    pub fn is_foreign_reader(&self, fp: u32) -> bool {
        self.iter().any(|s| fp != 0 && s.fp == fp && s.flags & LATE != 0 && s.flags & SYNCS == 0)
    }

    /// The most suspicious late client seen at or after `since`: concurrent first, then one
    /// that does not sync.
    pub fn late_since(&self, since: u32) -> Option<Late> {
        self.iter()
            .filter(|s| s.fp != 0 && s.flags & LATE != 0 && s.last_s >= since)
            .map(|s| Late { concurrent: s.flags & CONCURRENT != 0, syncs: s.flags & SYNCS != 0 })
            .max_by_key(|l| (l.concurrent, !l.syncs))
    }

    /// Heap bytes behind the table.
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        self.rest.as_ref().map_or(0, |r| std::mem::size_of_val(&**r))
    }

    pub fn distinct(&self) -> u8 {
        self.distinct
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_of_the_first_seconds_are_the_tokens_own() {
        let mut c = Clients::default();
        assert!(!c.see(1, 100, 100, 30));
        assert!(!c.see(2, 120, 100, 30));
        assert!(!c.see(1, 500, 100, 30));
        assert_eq!(c.late_since(0), None);
        assert_eq!(c.distinct(), 2);
    }

    #[test]
    fn a_late_client_used_alongside_the_first_is_concurrent() {
        let mut c = Clients::default();
        c.see(1, 0, 0, 30);
        assert!(c.see(9, 600, 0, 30));
        assert_eq!(c.late_since(0), Some(Late { concurrent: false, syncs: false }));
        c.see(1, 603, 0, 30);
        assert_eq!(c.late_since(0).map(|l| l.concurrent), Some(false), "within the overlap slack");
        c.see(1, 630, 0, 30);
        assert_eq!(c.late_since(0), Some(Late { concurrent: true, syncs: false }));
        assert!(c.is_foreign_reader(9));
        c.mark_sync(9);
        assert!(!c.is_foreign_reader(9));
        assert_eq!(c.late_since(0), Some(Late { concurrent: true, syncs: true }));
        assert_eq!(c.late_since(631), None, "not seen since");
    }

    #[test]
    fn a_replacement_client_is_late_but_not_concurrent() {
        // A browser update: the old agent stops, the new one takes over.
        let mut c = Clients::default();
        c.see(1, 0, 0, 30);
        c.see(2, 1000, 0, 30);
        c.see(2, 1100, 0, 30);
        assert_eq!(c.late_since(0).map(|l| l.concurrent), Some(false));
    }

    #[test]
    fn the_table_is_bounded_and_unknown_clients_are_ignored() {
        let mut c = Clients::default();
        assert!(!c.see(0, 1000, 0, 30));
        c.see(1, 1, 0, 30);
        c.see(1, 2, 0, 30);
        assert!(c.rest.is_none(), "one client needs no box");
        for fp in 1..=300u32 {
            c.see(fp, fp, 0, 30);
        }
        assert_eq!(c.distinct(), u8::MAX);
    }
}
