//! Sliding-window counters as rings of fixed buckets.
//!
//! A token's features are counts over the last minute, ten minutes and hour. Keeping every
//! request's time would grow with the request rate; a ring of `N` buckets of `G` seconds
//! costs the same whatever the rate and answers "how many in the last `N·G` seconds" to
//! within one bucket: the window is the current (partial) bucket plus the `N-1` before it, so
//! it spans between `(N-1)·G` and `N·G` seconds. The detector uses 6×10 s (≈1 min),
//! 10×60 s (≈10 min) and 6×600 s (≈1 h).
//!
//! All of a token's counters share one ring per granularity (a bucket is a row of slots), so
//! moving the ring forward costs one comparison per request, not one per counter. Counts are
//! `u16` and bytes `u32` per bucket, saturating: a bucket only saturates far above every
//! threshold (65535 requests in 10 s), where the exact figure no longer matters.

/// Counted things, one `u16` slot each per bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Count {
    Requests,
    /// `/messages` (either direction) and room `/initialSync`.
    Pages,
    /// The same, page-weighted by `limit`, in sixteenths.
    PageWeight,
    /// `/context`, page-weighted by `limit`, in sixteenths.
    ContextWeight,
    /// `/context` asking for at least `large_limit` events.
    ContextLarge,
    Search,
    /// `/members`, `/joined_members`, `/state`, `/event`.
    RoomReads,
    /// Media downloads in quarters (a thumbnail is one quarter).
    MediaDownloads,
    /// Media uploads in quarters (one upload is four: it offsets one download).
    MediaUploads,
    /// GET `/room_keys/…?version=`: key-backup reads.
    KeyReads,
    /// Full syncs in sixteenths (see `request.rs` for their weight).
    FullSyncWeight,
    /// Reads by a client (user agent) that appeared late on the token and does not sync.
    ForeignReads,
}

pub const COUNTS: usize = 12;

/// Byte counters, one `u32` slot each per bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Bytes {
    All,
    Media,
}

pub const BYTE_SLOTS: usize = 2;

/// Fixed-point scale of the weighted slots.
pub const SIXTEENTHS: f64 = 16.0;
pub const QUARTERS: f64 = 4.0;

/// One bucket: 32 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    counts: [u16; COUNTS],
    bytes: [u32; BYTE_SLOTS],
}

impl Bucket {
    pub fn add(&mut self, what: Count, n: u32) {
        if let Some(slot) = self.counts.get_mut(what as usize) {
            *slot = slot.saturating_add(u16::try_from(n).unwrap_or(u16::MAX));
        }
    }

    pub fn add_bytes(&mut self, what: Bytes, n: u64) {
        if let Some(slot) = self.bytes.get_mut(what as usize) {
            *slot = slot.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        }
    }

    pub fn get(&self, what: Count) -> u32 {
        self.counts.get(what as usize).map_or(0, |&c| u32::from(c))
    }

    pub fn bytes(&self, what: Bytes) -> u64 {
        self.bytes.get(what as usize).map_or(0, |&b| u64::from(b))
    }
}

/// Sum of a window's buckets, in wider integers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    counts: [u32; COUNTS],
    bytes: [u64; BYTE_SLOTS],
}

impl Totals {
    fn add(&mut self, b: &Bucket) {
        for (t, c) in self.counts.iter_mut().zip(b.counts) {
            *t = t.saturating_add(u32::from(c));
        }
        for (t, c) in self.bytes.iter_mut().zip(b.bytes) {
            *t = t.saturating_add(u64::from(c));
        }
    }

    pub fn get(&self, what: Count) -> u32 {
        self.counts.get(what as usize).copied().unwrap_or(0)
    }

    pub fn bytes(&self, what: Bytes) -> u64 {
        self.bytes.get(what as usize).copied().unwrap_or(0)
    }

    /// A weighted slot in its natural unit.
    pub fn weight(&self, what: Count, scale: f64) -> f64 {
        f64::from(self.get(what)) / scale
    }
}

/// A ring of `N` buckets; bucket `e` holds what happened in epoch `e` (`time / granularity`).
#[derive(Clone, Debug)]
pub struct Window<const N: usize> {
    /// Epoch of the newest bucket.
    head: u32,
    buckets: [Bucket; N],
}

impl<const N: usize> Window<N> {
    const NONEMPTY: () = assert!(N > 0);

    pub fn new(epoch: u32) -> Self {
        let () = Self::NONEMPTY;
        Window {
            head: epoch,
            buckets: [Bucket::default(); N],
        }
    }

    pub fn head(&self) -> u32 {
        self.head
    }

    fn index(epoch: u32) -> usize {
        (epoch as usize) % N
    }

    /// The newest bucket, complete once the ring has moved past it.
    pub fn head_bucket(&self) -> Bucket {
        self.buckets
            .get(Self::index(self.head))
            .copied()
            .unwrap_or_default()
    }

    /// Move to `epoch`, clearing the buckets that fall out. Earlier epochs are ignored (the
    /// detector's clock never goes back).
    pub fn advance(&mut self, epoch: u32) {
        if epoch <= self.head {
            return;
        }
        let steps = (epoch - self.head).min(N as u32);
        for i in 1..=steps {
            if let Some(b) = self.buckets.get_mut(Self::index(self.head.wrapping_add(i))) {
                *b = Bucket::default();
            }
        }
        self.head = epoch;
    }

    /// The bucket of `epoch`, after moving the ring there.
    pub fn at(&mut self, epoch: u32) -> &mut Bucket {
        self.advance(epoch);
        let i = Self::index(self.head);
        // `i < N` always; the fallback only keeps this free of indexing panics.
        let last = self.buckets.len().saturating_sub(1);
        &mut self.buckets[i.min(last)]
    }

    /// Sum of the buckets of epochs `epoch-N+1 ..= epoch`, without moving the ring.
    pub fn totals(&self, epoch: u32) -> Totals {
        let mut t = Totals::default();
        for k in 0..N as u32 {
            let Some(e) = self.head.checked_sub(k) else {
                break;
            };
            if e > epoch {
                continue;
            }
            if epoch - e >= N as u32 {
                break;
            }
            if let Some(b) = self.buckets.get(Self::index(e)) {
                t.add(b);
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_sums_its_last_n_epochs_and_forgets_older_ones() {
        let mut w: Window<3> = Window::new(10);
        w.at(10).add(Count::Pages, 1);
        w.at(11).add(Count::Pages, 10);
        w.at(12).add(Count::Pages, 100);
        assert_eq!(w.totals(12).get(Count::Pages), 111);
        assert_eq!(
            w.totals(13).get(Count::Pages),
            110,
            "epoch 10 left the window"
        );
        w.at(13).add(Count::Pages, 1000);
        assert_eq!(w.totals(13).get(Count::Pages), 1110);
        assert_eq!(w.totals(15).get(Count::Pages), 1000);
        assert_eq!(w.totals(16).get(Count::Pages), 0);
        w.at(100).add(Count::Search, 2);
        assert_eq!(
            w.totals(100).get(Count::Pages),
            0,
            "a long gap clears everything"
        );
        assert_eq!(w.totals(100).get(Count::Search), 2);
    }

    #[test]
    fn an_earlier_epoch_lands_in_the_newest_bucket() {
        let mut w: Window<3> = Window::new(5);
        w.at(5).add(Count::Requests, 1);
        w.at(3).add(Count::Requests, 1);
        assert_eq!(w.totals(5).get(Count::Requests), 2);
    }

    #[test]
    fn buckets_saturate_instead_of_wrapping() {
        let mut w: Window<2> = Window::new(0);
        w.at(0).add(Count::Requests, u32::MAX);
        w.at(0).add(Count::Requests, 5);
        w.at(0).add_bytes(Bytes::All, u64::MAX);
        w.at(1).add_bytes(Bytes::All, u64::MAX);
        let t = w.totals(1);
        assert_eq!(t.get(Count::Requests), u32::from(u16::MAX));
        assert_eq!(t.bytes(Bytes::All), 2 * u64::from(u32::MAX));
    }

    #[test]
    fn a_bucket_is_32_bytes() {
        assert_eq!(std::mem::size_of::<Bucket>(), 32);
    }
}
