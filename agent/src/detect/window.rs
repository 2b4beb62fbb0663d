//! Sliding-window counters as rings of buckets, stored sparsely.
//!
//! A token's features are counts over the last minute, ten minutes and hour. Keeping every
//! request's time would grow with the request rate; a ring of `N` buckets of `G` seconds
//! costs the same whatever the rate and answers "how many in the last `N·G` seconds" to
//! within one bucket: the window is the current (partial) bucket plus the `N-1` before it, so
//! it spans between `(N-1)·G` and `N·G` seconds. The detector uses 6×10 s (≈1 min),
//! 10×60 s (≈10 min) and 6×600 s (≈1 h).
//!
//! A dense ring (every counter in every bucket of every ring) is 716 bytes per token, and
//! almost all of it is zeros: a token that only syncs touches one byte counter, a reader a
//! handful. So the three rings of a token live in one list of non-zero cells, each naming
//! its ring, bucket and counter in 16 bits next to a 16-bit value: 4 bytes per counter that
//! is actually non-zero. Each ring also keeps only the counters that some feature reads at
//! its span (see [`Ring::keeps`]); a counter no feature reads is not kept at all. The
//! counts are exactly those of the dense rings: `u16` per bucket and counter, `u32` for
//! bytes (two cells), both saturating, and a bucket only saturates far above every threshold
//! (65535 pages in 10 s), where the exact figure no longer matters.
//!
//! The rings share one head time: every request and byte count moves all three to `now`
//! before adding, so their newest buckets are always `head_s / G`.

/// Counted things, one `u16` per bucket each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Count {
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
    /// Requests that name a room, media or search (not syncs, not a client's housekeeping),
    /// other than `/members` or `/state` right after that room's history: the denominator of
    /// the history share.
    Requests,
    /// History pages with no `from`: paging that no sync's timeline started.
    FromlessPages,
    /// Rooms paged to their first event (an empty or short last page).
    RoomsFinished,
    /// `/members` or `/state` of a room right after paging its history.
    Harvests,
    /// History pages resuming a room's paging right after a page of another room.
    ResumedPages,
}

pub const COUNTS: usize = 16;

/// Byte counters, one `u32` per bucket each (two cells: low and high halves).
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

/// The three rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// 6 × 10 s.
    M1,
    /// 10 × 60 s.
    M10,
    /// 6 × 600 s.
    H1,
}

impl Ring {
    const ALL: [Ring; 3] = [Ring::M1, Ring::M10, Ring::H1];

    pub const fn granularity(self) -> u32 {
        match self {
            Ring::M1 => 10,
            Ring::M10 => 60,
            Ring::H1 => 600,
        }
    }

    pub const fn buckets(self) -> u32 {
        match self {
            Ring::M1 | Ring::H1 => 6,
            Ring::M10 => 10,
        }
    }

    /// Whether this ring keeps `slot`: only what a feature (or the baseline, which reads
    /// the 10-minute ring's minutes) reads at this span. The hour only feeds `history_1h`
    /// and `ceil_bytes_1h`; the minute never reads bytes, key-backup reads, full syncs,
    /// foreign reads, large `/context`s, requests or the reading pattern's counts.
    fn keeps(self, slot: Slot) -> bool {
        match (self, slot) {
            (Ring::M10, _) => true,
            (Ring::H1, Slot::Count(c)) => c == Count::PageWeight,
            (Ring::H1, Slot::Bytes(b, _)) => b == Bytes::All,
            (Ring::M1, Slot::Bytes(..)) => false,
            (Ring::M1, Slot::Count(c)) => matches!(
                c,
                Count::Pages
                    | Count::PageWeight
                    | Count::ContextWeight
                    | Count::Search
                    | Count::RoomReads
                    | Count::MediaDownloads
                    | Count::MediaUploads
            ),
        }
    }
}

/// What a cell counts: a counter, or one half (`true`: the high one) of a byte counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Count(Count),
    Bytes(Bytes, bool),
}

impl Slot {
    const COUNTS: [Count; COUNTS] = [
        Count::Pages,
        Count::PageWeight,
        Count::ContextWeight,
        Count::ContextLarge,
        Count::Search,
        Count::RoomReads,
        Count::MediaDownloads,
        Count::MediaUploads,
        Count::KeyReads,
        Count::FullSyncWeight,
        Count::ForeignReads,
        Count::Requests,
        Count::FromlessPages,
        Count::RoomsFinished,
        Count::Harvests,
        Count::ResumedPages,
    ];

    fn code(self) -> u16 {
        match self {
            Slot::Count(c) => c as u16,
            Slot::Bytes(b, high) => (COUNTS + 2 * b as usize + usize::from(high)) as u16,
        }
    }

    fn of(code: u16) -> Option<Slot> {
        let code = usize::from(code);
        if let Some(&c) = Self::COUNTS.get(code) {
            return Some(Slot::Count(c));
        }
        let b = code.checked_sub(COUNTS)?;
        let bytes = match b / 2 {
            0 => Bytes::All,
            1 => Bytes::Media,
            _ => return None,
        };
        Some(Slot::Bytes(bytes, b % 2 == 1))
    }
}

/// A non-zero counter of one bucket: ring (2 bits), bucket (4), slot (5) in `key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cell {
    key: u16,
    value: u16,
}

const SLOT_BITS: u16 = 5;
const BUCKET_BITS: u16 = 4;
const _FITS: () = assert!(COUNTS + 2 * BYTE_SLOTS <= 1 << SLOT_BITS);

impl Cell {
    fn key(ring: Ring, bucket: u32, slot: Slot) -> u16 {
        ((ring as u16) << (SLOT_BITS + BUCKET_BITS))
            | ((bucket as u16 & ((1 << BUCKET_BITS) - 1)) << SLOT_BITS)
            | slot.code()
    }

    fn ring(self) -> Option<Ring> {
        Ring::ALL.get(usize::from(self.key >> (SLOT_BITS + BUCKET_BITS))).copied()
    }

    fn bucket(self) -> u32 {
        u32::from((self.key >> SLOT_BITS) & ((1 << BUCKET_BITS) - 1))
    }

    fn slot(self) -> Option<Slot> {
        Slot::of(self.key & ((1 << SLOT_BITS) - 1))
    }
}

/// Sum of a window's buckets, in wider integers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    counts: [u32; COUNTS],
    bytes: [u64; BYTE_SLOTS],
}

impl Totals {
    fn add(&mut self, slot: Slot, value: u16) {
        match slot {
            Slot::Count(c) => {
                if let Some(t) = self.counts.get_mut(c as usize) {
                    *t = t.saturating_add(u32::from(value));
                }
            }
            Slot::Bytes(b, high) => {
                if let Some(t) = self.bytes.get_mut(b as usize) {
                    let v = if high { u64::from(value) << 16 } else { u64::from(value) };
                    *t = t.saturating_add(v);
                }
            }
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

/// A token's three rings, as a list of non-zero cells.
#[derive(Clone, Debug)]
pub struct Rings {
    /// The time the rings were last moved to: each ring's newest bucket is `head_s / G`.
    head_s: u32,
    /// Live cells and free ones ([`FREE`]). A boxed slice rather than a `Vec` (8 bytes less
    /// on every token) that grows by half, not double: most tokens use a dozen cells or so.
    cells: Box<[Cell]>,
}

/// A free cell's key: no ring has index 3.
const FREE: u16 = u16::MAX;
/// A key no cell has, free or not.
const NO_KEY: u16 = u16::MAX - 1;
/// Keys of the words other sparse structures of the token keep among the cells (see
/// [`Rings::extras`]): ring keys stay below `0x0800`, free is `0xFFFF`.
const EXTRA_TAG: u16 = 0x1000;
const EXTRA_KEY_BITS: u32 = 12;
/// Bits of an extra word's payload.
pub const EXTRA_BITS: u32 = EXTRA_KEY_BITS + 16;

impl Rings {
    pub fn new(now: u32) -> Self {
        Rings { head_s: now, cells: Box::default() }
    }

    pub fn head_s(&self) -> u32 {
        self.head_s
    }

    /// Heap bytes behind the cells.
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        self.cells.len() * std::mem::size_of::<Cell>()
    }

    /// Live cells.
    #[cfg(test)]
    fn live(&self) -> usize {
        self.cells.iter().filter(|c| c.key != FREE).count()
    }

    /// Move every ring to `now`, clearing the buckets that fall out. Earlier times are
    /// ignored (the detector's clock never goes back).
    pub fn advance(&mut self, now: u32) {
        if now <= self.head_s {
            return;
        }
        let mut clear = [0u16; 3];
        for (mask, ring) in clear.iter_mut().zip(Ring::ALL) {
            let (g, n) = (ring.granularity(), ring.buckets());
            let (old, new) = (self.head_s / g, now / g);
            for i in 1..=(new - old).min(n) {
                *mask |= 1 << ((old + i) % n);
            }
        }
        self.head_s = now;
        if clear == [0; 3] {
            return;
        }
        for c in self.cells.iter_mut() {
            if let Some(r) = c.ring()
                && clear[r as usize] & (1 << c.bucket()) != 0
            {
                c.key = FREE;
            }
        }
        self.shrink();
    }

    /// Cells freed as buckets age: give back what the token no longer needs once more than
    /// a third is free (right after growing by half, exactly a third is), keeping a quarter
    /// of the live count spare so that a steady token does not reallocate at every bucket.
    fn shrink(&mut self) {
        let live = self.cells.iter().filter(|c| c.key != FREE).count();
        if self.cells.len() > 4 && (self.cells.len() - live) * 3 > self.cells.len() {
            self.resize(live + live / 4);
        }
    }

    /// A free cell's index, growing the slice by half when there is none.
    fn free_slot(&mut self) -> usize {
        if let Some(i) = self.cells.iter().position(|c| c.key == FREE) {
            return i;
        }
        let used = self.cells.len();
        self.resize((used + used / 2).max(4));
        used
    }

    /// The payloads of the extra words: [`EXTRA_BITS`]-bit words that another sparse part
    /// of the token (its room sketches) keeps here rather than in an allocation of its own,
    /// saving a pointer on every token and an allocation on most.
    pub fn extras(&self) -> impl Iterator<Item = u32> + '_ {
        self.cells
            .iter()
            .filter(|c| c.key != FREE && c.key & !((1 << EXTRA_KEY_BITS) - 1) == EXTRA_TAG)
            .map(|c| u32::from(c.key & ((1 << EXTRA_KEY_BITS) - 1)) << 16 | u32::from(c.value))
    }

    /// Replace every extra word's payload by `f(payload)`, or free it when `f` says `None`.
    pub fn update_extras(&mut self, mut f: impl FnMut(u32) -> Option<u32>) {
        let mut freed = false;
        for c in self.cells.iter_mut() {
            if c.key == FREE || c.key & !((1 << EXTRA_KEY_BITS) - 1) != EXTRA_TAG {
                continue;
            }
            let p = u32::from(c.key & ((1 << EXTRA_KEY_BITS) - 1)) << 16 | u32::from(c.value);
            match f(p) {
                Some(q) => *c = Self::extra_cell(q),
                None => {
                    c.key = FREE;
                    freed = true;
                }
            }
        }
        if freed {
            self.shrink();
        }
    }

    /// Set `bits` in the first extra word whose payload `matches`, in one pass that stops
    /// there; when none does, how many extra words there are.
    pub fn mark_extra(&mut self, matches: impl Fn(u32) -> bool, bits: u32) -> Result<(), usize> {
        let mut extras = 0;
        for c in self.cells.iter_mut() {
            if c.key == FREE || c.key & !((1 << EXTRA_KEY_BITS) - 1) != EXTRA_TAG {
                continue;
            }
            let p = u32::from(c.key & ((1 << EXTRA_KEY_BITS) - 1)) << 16 | u32::from(c.value);
            if matches(p) {
                *c = Self::extra_cell(p | bits);
                return Ok(());
            }
            extras += 1;
        }
        Err(extras)
    }

    /// Add an extra word (its payload's high bits beyond [`EXTRA_BITS`] are dropped).
    pub fn add_extra(&mut self, payload: u32) {
        let Cell { key, value } = Self::extra_cell(payload);
        self.make(key, value);
    }

    fn extra_cell(payload: u32) -> Cell {
        Cell { key: EXTRA_TAG | ((payload >> 16) as u16 & ((1 << EXTRA_KEY_BITS) - 1)), value: payload as u16 }
    }

    /// Live cells into a slice of `len` (at least as many).
    fn resize(&mut self, len: usize) {
        let mut cells: Vec<Cell> = Vec::with_capacity(len);
        cells.extend(self.cells.iter().filter(|c| c.key != FREE));
        cells.resize(len.max(cells.len()), Cell { key: FREE, value: 0 });
        self.cells = cells.into_boxed_slice();
    }

    fn head_bucket(&self, ring: Ring) -> u32 {
        (self.head_s / ring.granularity()) % ring.buckets()
    }

    /// Add `n` (saturating) to `what` in the newest bucket of every ring that keeps it.
    pub fn add(&mut self, what: Count, n: u32) {
        let n = u16::try_from(n).unwrap_or(u16::MAX);
        if n == 0 {
            return;
        }
        let slot = Slot::Count(what);
        let mut keys = [NO_KEY; 3];
        for (k, ring) in keys.iter_mut().zip(Ring::ALL) {
            if ring.keeps(slot) {
                *k = Cell::key(ring, self.head_bucket(ring), slot);
            }
        }
        let found = self.find(keys);
        for (key, at) in keys.into_iter().zip(found) {
            if key == NO_KEY {
                continue;
            }
            match at.and_then(|i| self.cells.get_mut(i)) {
                Some(c) => c.value = c.value.saturating_add(n),
                None => self.make(key, n),
            }
        }
    }

    /// A new cell: in a free slot, the slice growing by half when there is none (which
    /// moves no live cell: indices found before stay valid).
    fn make(&mut self, key: u16, value: u16) {
        let i = self.free_slot();
        if let Some(c) = self.cells.get_mut(i) {
            *c = Cell { key, value };
        }
    }

    /// Where each of `keys` is (`NO_KEY` is never found), in one pass: the request path
    /// calls this for every counter it bumps. `keys` are grouped by ring, `K / 3` of each in
    /// the order of `Ring::ALL`, and a cell is compared only with its own ring's.
    fn find<const K: usize>(&self, keys: [u16; K]) -> [Option<usize>; K] {
        const { assert!(K.is_multiple_of(Ring::ALL.len())) };
        let per_ring = K / Ring::ALL.len();
        let mut at = [None; K];
        for (i, c) in self.cells.iter().enumerate() {
            // Extras and free cells are in no ring.
            let Some(ring) = c.ring() else { continue };
            let group = ring as usize * per_ring..(ring as usize + 1) * per_ring;
            let (Some(keys), Some(at)) = (keys.get(group.clone()), at.get_mut(group)) else { continue };
            for (k, a) in keys.iter().zip(at) {
                if c.key == *k {
                    *a = Some(i);
                }
            }
        }
        at
    }

    /// Add `n` bytes (saturating at `u32::MAX` per bucket) to `what` in the newest bucket of
    /// every ring that keeps it.
    pub fn add_bytes(&mut self, what: Bytes, n: u64) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        if n == 0 {
            return;
        }
        // Low and high halves for each ring, found in one pass.
        let mut keys = [NO_KEY; 6];
        for (r, ring) in Ring::ALL.into_iter().enumerate() {
            if ring.keeps(Slot::Bytes(what, false)) {
                let b = self.head_bucket(ring);
                keys[2 * r] = Cell::key(ring, b, Slot::Bytes(what, false));
                keys[2 * r + 1] = Cell::key(ring, b, Slot::Bytes(what, true));
            }
        }
        let found = self.find(keys);
        for (halves, at) in keys.chunks_exact(2).zip(found.chunks_exact(2)) {
            let (&[lo_key, hi_key], &[lo_at, hi_at]) = (halves, at) else { continue };
            if lo_key == NO_KEY {
                continue;
            }
            let value = |at: Option<usize>| at.and_then(|i| self.cells.get(i)).map_or(0, |c| c.value);
            let (lo, hi) = (value(lo_at), value(hi_at));
            let sum = (u32::from(hi) << 16 | u32::from(lo)).saturating_add(n);
            let (h, l) = ((sum >> 16) as u16, sum as u16);
            for (key, at, v, write) in [(lo_key, lo_at, l, l != 0 || lo != 0), (hi_key, hi_at, h, h != 0)] {
                if !write {
                    continue;
                }
                match at.and_then(|i| self.cells.get_mut(i)) {
                    Some(c) => c.value = v,
                    None => self.make(key, v),
                }
            }
        }
    }

    /// Sum of `ring`'s buckets covering the `N` epochs up to `now`'s, without moving.
    pub fn totals(&self, ring: Ring, now: u32) -> Totals {
        let (g, n) = (ring.granularity(), ring.buckets());
        let (head, epoch) = (self.head_s / g, now / g);
        let mut t = Totals::default();
        for c in &self.cells {
            if c.ring() != Some(ring) {
                continue;
            }
            // Every cell belongs to one of the ring's last `n` epochs up to `head`.
            let back = (head % n + n - c.bucket()) % n;
            let Some(e) = head.checked_sub(back) else {
                continue;
            };
            if e <= epoch
                && epoch - e < n
                && let Some(slot) = c.slot()
            {
                t.add(slot, c.value);
            }
        }
        t
    }

    /// The newest bucket of `ring` alone (complete once the ring has moved past it).
    pub fn newest(&self, ring: Ring) -> Totals {
        let b = self.head_bucket(ring);
        let mut t = Totals::default();
        for c in &self.cells {
            if c.ring() == Some(ring)
                && c.bucket() == b
                && let Some(slot) = c.slot()
            {
                t.add(slot, c.value);
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_ring_sums_its_last_n_epochs_and_forgets_older_ones() {
        // The minute ring: 6 buckets of 10 s.
        let mut r = Rings::new(100);
        r.add(Count::Pages, 1);
        r.advance(110);
        r.add(Count::Pages, 10);
        r.advance(125);
        r.add(Count::Pages, 100);
        assert_eq!(r.totals(Ring::M1, 125).get(Count::Pages), 111);
        assert_eq!(r.totals(Ring::M1, 160).get(Count::Pages), 110, "epoch 10 left");
        r.advance(160);
        r.add(Count::Pages, 1000);
        assert_eq!(r.totals(Ring::M1, 160).get(Count::Pages), 1110);
        assert_eq!(r.totals(Ring::M1, 170).get(Count::Pages), 1100);
        assert_eq!(r.totals(Ring::M1, 215).get(Count::Pages), 1000);
        assert_eq!(r.totals(Ring::M1, 220).get(Count::Pages), 0);
        r.advance(1000);
        r.add(Count::Search, 2);
        assert_eq!(r.totals(Ring::M1, 1000).get(Count::Pages), 0, "a long gap clears");
        assert_eq!(r.totals(Ring::M1, 1000).get(Count::Search), 2);
        assert_eq!(r.live(), 2, "only the live cells stay: search in 1 min and 10 min");
    }

    #[test]
    fn counters_saturate_instead_of_wrapping() {
        let mut r = Rings::new(0);
        r.add(Count::Search, u32::MAX);
        r.add(Count::Search, 5);
        r.add_bytes(Bytes::All, u64::MAX);
        r.advance(60);
        r.add_bytes(Bytes::All, u64::MAX);
        r.add_bytes(Bytes::All, 7);
        let t = r.totals(Ring::M10, 60);
        assert_eq!(t.get(Count::Search), u32::from(u16::MAX));
        assert_eq!(t.bytes(Bytes::All), 2 * u64::from(u32::MAX));
    }

    #[test]
    fn each_ring_keeps_only_what_its_features_read() {
        let mut r = Rings::new(0);
        r.add(Count::KeyReads, 1);
        r.add_bytes(Bytes::Media, 1);
        assert_eq!(r.totals(Ring::M10, 0).get(Count::KeyReads), 1);
        assert_eq!(r.totals(Ring::M1, 0).get(Count::KeyReads), 0);
        assert_eq!(r.totals(Ring::H1, 0).bytes(Bytes::Media), 0);
        assert_eq!(r.live(), 2);
    }

    /// The sparse cells against the plain model they replace: a dense ring per granularity,
    /// every counter in every bucket, `u16`/`u32` saturating; random traffic, every total
    /// compared at every step.
    #[test]
    fn the_cells_count_exactly_what_dense_rings_count() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let mut r = Rings::new(1_000);
        // (granularity, epoch, slot) -> value
        let mut dense: HashMap<(u32, u32, usize), u64> = HashMap::new();
        let mut now = 1_000u32;
        for step in 0..20_000 {
            now += match next() % 10 {
                0 => (next() % 4000) as u32,
                1..=3 => (next() % 30) as u32,
                _ => 0,
            };
            r.advance(now);
            if next() % 2 == 0 {
                let c = Slot::COUNTS[(next() % COUNTS as u64) as usize];
                let n = if next() % 50 == 0 { 70_000 } else { (next() % 20) as u32 };
                r.add(c, n);
                for g in Ring::ALL.iter().filter(|g| g.keeps(Slot::Count(c))) {
                    let v = dense.entry((g.granularity(), now / g.granularity(), c as usize)).or_default();
                    *v = (*v + u64::from(n)).min(u64::from(u16::MAX));
                }
            }
            if next() % 2 == 0 {
                let b = if next() % 2 == 0 { Bytes::All } else { Bytes::Media };
                let n = if next() % 20 == 0 { next() % (1 << 33) } else { next() % 100_000 };
                r.add_bytes(b, n);
                for g in Ring::ALL.iter().filter(|g| g.keeps(Slot::Bytes(b, false))) {
                    let v = dense.entry((g.granularity(), now / g.granularity(), COUNTS + b as usize)).or_default();
                    *v = (*v + n.min(u64::from(u32::MAX))).min(u64::from(u32::MAX));
                }
            }
            let at = now + if step % 7 == 0 { (next() % 700) as u32 } else { 0 };
            for ring in Ring::ALL {
                let (g, n) = (ring.granularity(), ring.buckets());
                let t = r.totals(ring, at);
                let e = at / g;
                let sum = |slot: usize| -> u64 {
                    (e.saturating_sub(n - 1)..=e)
                        .filter(|&x| x <= now / g)
                        .map(|x| dense.get(&(g, x, slot)).copied().unwrap_or(0))
                        .sum()
                };
                for c in Slot::COUNTS {
                    assert_eq!(u64::from(t.get(c)), sum(c as usize), "step {step} {ring:?} {c:?}");
                }
                for b in [Bytes::All, Bytes::Media] {
                    assert_eq!(t.bytes(b), sum(COUNTS + b as usize), "step {step} {ring:?} {b:?}");
                }
            }
        }
    }

    #[test]
    fn a_cell_is_4_bytes() {
        assert_eq!(std::mem::size_of::<Cell>(), 4);
    }
}
