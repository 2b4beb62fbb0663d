//! Distinct counts in fixed memory: a HyperLogLog sketch and the hash that feeds it.
//!
//! "How many rooms did this token read" must not cost memory per room: a scraper reads
//! hundreds. A HyperLogLog of `m` registers estimates any number of distinct items with a
//! relative standard error of about `1.04/√m` (better at low counts), in `m/2` bytes here:
//! registers are 4 bits, which holds ranks up to 15, enough for counts up to `m·2^13`.
//! The estimator is Ertl's (2017, "New cardinality estimation algorithms for HyperLogLog
//! sketches", improved raw estimator): one formula, no switch between linear counting and
//! the raw estimate, no bias tables, and it handles saturated registers.
//!
//! A window needs forgetting, which a sketch cannot do item by item. Each sketch is a pair,
//! the current epoch and the previous one, answering with their union: the count over the
//! last one to two epochs.
//!
//! A token has three such pairs ([`RoomSketches`]): 384 bytes of registers, while most
//! tokens name a handful of rooms and many none. Until a token has named [`SPARSE_MAX`]
//! distinct rooms within its sketches' epochs, it keeps instead the rooms themselves, 4 bytes
//! each (among its ring cells: see `Rings::extras`): the top 22 bits of the room's hash and
//! two bits (current, previous epoch) per sketch. A register depends on nothing else (index:
//! the top 6 or 8 bits; rank: the leading zeros of the next 14, capped at 15), so registers
//! rebuilt from that list are bit-for-bit those of the dense sketch, and so is every
//! estimate.

/// A fast 64-bit hash of a short byte string (room ids, user agents, pagination tokens).
///
/// Eight bytes at a time with a multiply-rotate step, then MurmurHash3's finaliser so that
/// every output bit depends on every input bit (HyperLogLog reads the top bits as a register
/// index and the rest as a rank). Not keyed: a client choosing colliding room ids only makes
/// its own counts smaller, and reading a room needs a real room.
pub fn hash64(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = (bytes.len() as u64).wrapping_mul(K) ^ 0x5851_F42D_4C95_7F2D;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h.rotate_left(23) ^ u64::from_le_bytes(w)).wrapping_mul(K);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        for (d, s) in w.iter_mut().zip(rest) {
            *d = *s;
        }
        h = (h.rotate_left(23) ^ u64::from_le_bytes(w)).wrapping_mul(K);
    }
    fmix64(h)
}

/// MurmurHash3's 64-bit finaliser.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^ (h >> 33)
}

/// A non-zero 32-bit fingerprint (0 means "none" in the small tables).
pub fn fingerprint(bytes: &[u8]) -> u32 {
    let h = hash64(bytes);
    let f = (h ^ (h >> 32)) as u32;
    f.max(1)
}

use super::window::{EXTRA_BITS, Rings};

/// Largest register value: 4-bit registers.
const MAX_RANK: u8 = 15;
/// Rank bits the estimator may assume (`q` in Ertl's paper): value `q+1` means "saturated".
const Q: usize = MAX_RANK as usize - 1;

/// A HyperLogLog sketch of `2·BYTES` 4-bit registers (`BYTES` a power of two, at least 8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hll<const BYTES: usize> {
    regs: [u8; BYTES],
}

impl<const BYTES: usize> Default for Hll<BYTES> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const BYTES: usize> Hll<BYTES> {
    const VALID: () = assert!(BYTES >= 8 && BYTES.is_power_of_two());
    /// Registers.
    pub const M: usize = 2 * BYTES;
    /// Index bits.
    const P: u32 = Self::M.trailing_zeros();

    pub const fn new() -> Self {
        let () = Self::VALID;
        Hll { regs: [0; BYTES] }
    }

    pub fn clear(&mut self) {
        self.regs = [0; BYTES];
    }

    fn get(&self, i: usize) -> u8 {
        let b = self.regs.get(i / 2).copied().unwrap_or(0);
        if i.is_multiple_of(2) { b & 0x0F } else { b >> 4 }
    }

    pub fn insert_hash(&mut self, h: u64) {
        let i = (h >> (64 - Self::P)) as usize;
        let rest = h << Self::P;
        let rank = u8::try_from(rest.leading_zeros() + 1).unwrap_or(MAX_RANK).min(MAX_RANK);
        if let Some(b) = self.regs.get_mut(i / 2) {
            let (cur, shift) = if i.is_multiple_of(2) { (*b & 0x0F, 0) } else { (*b >> 4, 4) };
            if rank > cur {
                *b = (*b & !(0x0F << shift)) | (rank << shift);
            }
        }
    }

    #[cfg(test)]
    pub fn insert(&mut self, item: &[u8]) {
        self.insert_hash(hash64(item));
    }

    /// Histogram of register values of this sketch, or of its union with `other`.
    fn histogram(&self, other: Option<&Self>) -> [u32; 16] {
        let mut hist = [0u32; 16];
        for i in 0..Self::M {
            let v = match other {
                Some(o) => self.get(i).max(o.get(i)),
                None => self.get(i),
            };
            if let Some(c) = hist.get_mut(usize::from(v)) {
                *c += 1;
            }
        }
        hist
    }

    pub fn estimate(&self) -> f64 {
        ertl(&self.histogram(None), Self::M as f64)
    }

    /// Estimate of the union of two sketches, without building it.
    pub fn estimate_union(&self, other: &Self) -> f64 {
        ertl(&self.histogram(Some(other)), Self::M as f64)
    }
}

/// Ertl's improved raw estimator from a register histogram (values `0..=Q+1`).
fn ertl(hist: &[u32; 16], m: f64) -> f64 {
    let c = |k: usize| f64::from(hist.get(k).copied().unwrap_or(0));
    if c(0) >= m {
        return 0.0;
    }
    let mut z = m * tau(1.0 - c(Q + 1) / m);
    for k in (1..=Q).rev() {
        z = 0.5 * (z + c(k));
    }
    z += m * sigma(c(0) / m);
    // Every register saturated: more than the sketch can tell; say the most it can.
    let most = m * f64::from(1u32 << (Q + 1));
    let alpha_inf = 0.5 / std::f64::consts::LN_2;
    let e = alpha_inf * m * m / z;
    if e.is_finite() { e.min(most) } else { most }
}

fn sigma(mut x: f64) -> f64 {
    if x >= 1.0 {
        return f64::INFINITY;
    }
    let mut y = 1.0;
    let mut z = x;
    for _ in 0..64 {
        x *= x;
        let prev = z;
        z += x * y;
        y += y;
        if z == prev {
            break;
        }
    }
    z
}

fn tau(mut x: f64) -> f64 {
    if x <= 0.0 || x >= 1.0 {
        return 0.0;
    }
    let mut y = 1.0;
    let mut z = 1.0 - x;
    for _ in 0..64 {
        x = x.sqrt();
        let prev = z;
        y *= 0.5;
        z -= (1.0 - x) * (1.0 - x) * y;
        if z == prev {
            break;
        }
    }
    z / 3.0
}

/// Distinct items over the last one to two epochs: the current epoch's sketch and the
/// previous one's, estimated as their union. [`RoomSketches`] must estimate exactly as three
/// of these would (a test compares them).
#[cfg(test)]
#[derive(Clone, Debug)]
pub struct EpochHll<const BYTES: usize> {
    epoch: u32,
    cur: Hll<BYTES>,
    prev: Hll<BYTES>,
}

#[cfg(test)]
impl<const BYTES: usize> EpochHll<BYTES> {
    pub fn new(epoch: u32) -> Self {
        EpochHll { epoch, cur: Hll::new(), prev: Hll::new() }
    }

    fn advance(&mut self, epoch: u32) {
        if epoch <= self.epoch {
            return;
        }
        if epoch == self.epoch + 1 {
            std::mem::swap(&mut self.prev, &mut self.cur);
            self.cur.clear();
        } else {
            self.prev.clear();
            self.cur.clear();
        }
        self.epoch = epoch;
    }

    pub fn insert_hash(&mut self, epoch: u32, h: u64) {
        self.advance(epoch);
        self.cur.insert_hash(h);
    }

    /// The count as seen at `epoch`, without moving.
    pub fn estimate(&self, epoch: u32) -> f64 {
        if epoch <= self.epoch {
            self.cur.estimate_union(&self.prev)
        } else if epoch == self.epoch + 1 {
            self.cur.estimate()
        } else {
            0.0
        }
    }
}

/// One of a token's three room sketches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sketch {
    /// Rooms named by any request, 64 registers.
    Touched,
    /// Rooms read through history, 64 registers, short epochs.
    Read,
    /// The same, 256 registers, long epochs.
    ReadLong,
}

impl Sketch {
    const ALL: [Sketch; 3] = [Sketch::Touched, Sketch::Read, Sketch::ReadLong];

    /// This sketch's two bits in a sparse entry: current epoch, previous epoch.
    fn cur(self) -> u32 {
        1 << (2 * self as u32)
    }

    fn prev(self) -> u32 {
        1 << (2 * self as u32 + 1)
    }
}

/// Rooms a token keeps exactly before its sketches go dense: 256 bytes of entries, where
/// the dense registers take 384.
pub const SPARSE_MAX: usize = 64;
/// Hash bits a sparse entry keeps: the most any register needs (8 index bits, 14 rank bits).
const ENTRY_HASH_BITS: u32 = 22;
const MARK_BITS: u32 = 6;
const MARKS: u32 = (1 << MARK_BITS) - 1;
const _: () = assert!(ENTRY_HASH_BITS + MARK_BITS <= EXTRA_BITS);

/// A current and a previous epoch's registers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Pair<const BYTES: usize> {
    cur: Hll<BYTES>,
    prev: Hll<BYTES>,
}

impl<const BYTES: usize> Pair<BYTES> {
    fn advance(&mut self, steps: u32) {
        if steps == 1 {
            std::mem::swap(&mut self.prev, &mut self.cur);
            self.cur.clear();
        } else if steps > 1 {
            self.prev.clear();
            self.cur.clear();
        }
    }

    fn is_empty(&self) -> bool {
        self.cur.regs.iter().chain(&self.prev.regs).all(|&r| r == 0)
    }

    fn estimate(&self, union: bool) -> f64 {
        if union { self.cur.estimate_union(&self.prev) } else { self.cur.estimate() }
    }
}

#[derive(Clone, Debug, Default)]
struct Dense {
    touched: Pair<32>,
    read: Pair<32>,
    read_long: Pair<128>,
}

impl Dense {
    fn insert(&mut self, s: Sketch, cur: bool, h: u64) {
        let (c, p) = match s {
            Sketch::Touched => (&mut self.touched.cur, &mut self.touched.prev),
            Sketch::Read => (&mut self.read.cur, &mut self.read.prev),
            Sketch::ReadLong => {
                let pair = &mut self.read_long;
                return if cur { pair.cur.insert_hash(h) } else { pair.prev.insert_hash(h) };
            }
        };
        if cur { c.insert_hash(h) } else { p.insert_hash(h) }
    }

    fn advance(&mut self, s: Sketch, steps: u32) {
        match s {
            Sketch::Touched => self.touched.advance(steps),
            Sketch::Read => self.read.advance(steps),
            Sketch::ReadLong => self.read_long.advance(steps),
        }
    }

    fn estimate(&self, s: Sketch, union: bool) -> f64 {
        match s {
            Sketch::Touched => self.touched.estimate(union),
            Sketch::Read => self.read.estimate(union),
            Sketch::ReadLong => self.read_long.estimate(union),
        }
    }

    fn is_empty(&self) -> bool {
        self.touched.is_empty() && self.read.is_empty() && self.read_long.is_empty()
    }
}

/// A token's three room sketches, each over its current and previous epoch: exact rooms
/// while they are few, dense registers after (see the module's documentation). The sparse
/// entries (`hash top bits << MARK_BITS | marks`, one per distinct room) live in the token's
/// [`Rings`], passed to every call.
#[derive(Clone, Debug)]
pub struct RoomSketches {
    /// Each sketch's current epoch.
    epochs: [u32; 3],
    dense: Option<Box<Dense>>,
}

impl RoomSketches {
    pub fn new(epochs: [u32; 3]) -> Self {
        RoomSketches { epochs, dense: None }
    }

    /// Heap bytes behind the sketches.
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        self.dense.as_ref().map_or(0, |_| std::mem::size_of::<Dense>())
    }

    fn epoch(&self, s: Sketch) -> u32 {
        self.epochs.get(s as usize).copied().unwrap_or(0)
    }

    /// Move every sketch to its epoch of now (`[Touched, Read, ReadLong]`). Estimates do not
    /// change (a sketch answers for later epochs as if moved); this only lets the registers
    /// of a token that stopped naming rooms go back to nothing.
    pub fn advance(&mut self, epochs: [u32; 3], store: &mut Rings) {
        for (s, e) in Sketch::ALL.into_iter().zip(epochs) {
            self.advance_one(s, e, store);
        }
    }

    /// Move sketch `s` to `epoch`: the current epoch becomes the previous one (or both are
    /// forgotten after a gap). Earlier epochs are ignored.
    fn advance_one(&mut self, s: Sketch, epoch: u32, store: &mut Rings) {
        let old = self.epoch(s);
        if epoch <= old {
            return;
        }
        let steps = epoch - old;
        if let Some(e) = self.epochs.get_mut(s as usize) {
            *e = epoch;
        }
        if let Some(d) = self.dense.as_mut() {
            d.advance(s, steps);
            if d.is_empty() {
                // Every epoch has passed: back to nothing, sparse.
                self.dense = None;
            }
            return;
        }
        store.update_extras(|e| {
            let mut kept = e & !(s.cur() | s.prev());
            if e & s.cur() != 0 && steps == 1 {
                kept |= s.prev();
            }
            (kept & MARKS != 0).then_some(kept)
        });
    }

    /// Record the room of hash `h` in sketch `s` at `epoch`.
    pub fn insert(&mut self, s: Sketch, epoch: u32, h: u64, store: &mut Rings) {
        self.advance_one(s, epoch, store);
        if let Some(d) = self.dense.as_mut() {
            d.insert(s, true, h);
            return;
        }
        let top = ((h >> (64 - ENTRY_HASH_BITS)) as u32) << MARK_BITS;
        let Err(entries) = store.mark_extra(|e| e & !MARKS == top, s.cur()) else {
            return;
        };
        if entries < SPARSE_MAX {
            store.add_extra(top | s.cur());
            return;
        }
        // Too many rooms to keep one by one: the registers from here on.
        let mut d = Box::<Dense>::default();
        for e in store.extras().chain(std::iter::once(top | s.cur())) {
            for s in Sketch::ALL {
                if e & s.cur() != 0 {
                    d.insert(s, true, Self::hash_of(e));
                }
                if e & s.prev() != 0 {
                    d.insert(s, false, Self::hash_of(e));
                }
            }
        }
        store.update_extras(|_| None);
        self.dense = Some(d);
    }

    /// The hash a sparse entry stands for: its kept bits at the top, zeros below.
    fn hash_of(entry: u32) -> u64 {
        u64::from(entry >> MARK_BITS) << (64 - ENTRY_HASH_BITS)
    }

    fn sparse_estimate<const BYTES: usize>(store: &Rings, mask: u32) -> f64 {
        let mut h = Hll::<BYTES>::new();
        for e in store.extras().filter(|&e| e & mask != 0) {
            h.insert_hash(Self::hash_of(e));
        }
        h.estimate()
    }

    /// Distinct rooms of sketch `s` as seen at `epoch`, without moving: its current and
    /// previous epochs, only the current one an epoch later, nothing after that.
    pub fn estimate(&self, s: Sketch, epoch: u32, store: &Rings) -> f64 {
        let old = self.epoch(s);
        let union = if epoch <= old {
            true
        } else if epoch == old + 1 {
            false
        } else {
            return 0.0;
        };
        if let Some(d) = self.dense.as_ref() {
            return d.estimate(s, union);
        }
        let mask = if union { s.cur() | s.prev() } else { s.cur() };
        match s {
            Sketch::Touched | Sketch::Read => Self::sparse_estimate::<32>(store, mask),
            Sketch::ReadLong => Self::sparse_estimate::<128>(store, mask),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(seed: u64, i: u64) -> String {
        format!("!{:x}{i}:server{}.example.org", seed.wrapping_mul(0x9E37_79B9), seed % 7)
    }

    fn relative_errors<const B: usize>(n: u64, seeds: u64) -> Vec<f64> {
        (0..seeds)
            .map(|seed| {
                let mut h: Hll<B> = Hll::new();
                for i in 0..n {
                    h.insert(room(seed, i).as_bytes());
                    // Repeats change nothing.
                    h.insert(room(seed, i / 2).as_bytes());
                }
                (h.estimate() - n as f64).abs() / n as f64
            })
            .collect()
    }

    #[test]
    fn a_1024_register_sketch_counts_1000_rooms_within_5_percent() {
        // Standard error ≈2.4% here: 5% is two of them, so about one set in twenty is
        // further off, and none by much.
        let errs = relative_errors::<512>(1000, 40);
        let rms = (errs.iter().map(|e| e * e).sum::<f64>() / errs.len() as f64).sqrt();
        let within = errs.iter().filter(|&&e| e <= 0.05).count();
        assert!(rms < 0.03, "rms relative error {rms:.4}: {errs:?}");
        assert!(within >= 36, "{within}/40 within 5%: {errs:?}");
        assert!(errs.iter().all(|&e| e < 0.10), "{errs:?}");
    }

    #[test]
    fn the_per_token_sketches_are_accurate_where_their_thresholds_are() {
        // 64 registers (rooms paged in 10 min): thresholds 7..20.
        for n in [1u64, 3, 7, 12, 20, 40] {
            let errs = relative_errors::<32>(n, 20);
            let worst = errs.iter().cloned().fold(0.0, f64::max);
            assert!(worst * n as f64 <= 1.0 + 0.25 * n as f64, "n={n}: {errs:?}");
        }
        // 256 registers (rooms paged in 1 h): thresholds 15..40, and the 2026 scrape's 876.
        for n in [15u64, 40, 876] {
            let errs = relative_errors::<128>(n, 20);
            let mean = errs.iter().sum::<f64>() / errs.len() as f64;
            assert!(mean < 0.08, "n={n}: mean {mean:.3} {errs:?}");
        }
    }

    #[test]
    fn an_empty_sketch_counts_zero_and_a_saturated_one_stays_finite() {
        let mut h: Hll<8> = Hll::new();
        assert_eq!(h.estimate(), 0.0);
        for i in 0..1_000_000u64 {
            h.insert_hash(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 0xF);
        }
        for i in 0..16 {
            h.insert_hash((i as u64) << 60);
        }
        assert!(h.estimate().is_finite() && h.estimate() > 0.0);
    }

    #[test]
    fn an_epoch_sketch_covers_the_current_and_previous_epoch_only() {
        let mut e: EpochHll<32> = EpochHll::new(0);
        for i in 0..10 {
            e.insert_hash(0, hash64(format!("!a{i}:x").as_bytes()));
        }
        for i in 0..5 {
            e.insert_hash(1, hash64(format!("!b{i}:x").as_bytes()));
        }
        assert!((e.estimate(1) - 15.0).abs() <= 2.0, "{}", e.estimate(1));
        assert!((e.estimate(2) - 5.0).abs() <= 1.0, "{}", e.estimate(2));
        assert_eq!(e.estimate(3), 0.0);
        e.insert_hash(9, hash64(b"!c:x"));
        assert!((e.estimate(9) - 1.0).abs() < 0.5);
    }

    /// The token's sketches against three plain epoch sketches: the same rooms at the same
    /// times, from a few rooms (sparse) to hundreds (dense) and back after quiet epochs; every
    /// estimate must be the same number, not merely close.
    #[test]
    fn room_sketches_estimate_exactly_as_dense_epoch_sketches() {
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let mut t = 100_000u32;
        let ep = |t: u32| [t / 300, t / 300, t / 1800];
        let mut s = RoomSketches::new(ep(t));
        let mut store = Rings::new(t);
        let mut touched: EpochHll<32> = EpochHll::new(t / 300);
        let mut read: EpochHll<32> = EpochHll::new(t / 300);
        let mut long: EpochHll<128> = EpochHll::new(t / 1800);
        let (mut went_dense, mut went_back) = (false, false);
        for step in 0..60_000u32 {
            t += match next() % 100 {
                0 => 2_000 + (next() % 5_000) as u32,
                1..=10 => (next() % 120) as u32,
                _ => 0,
            };
            // Bursts of many rooms now and then, a handful otherwise.
            let rooms = if (t / 7_000).is_multiple_of(3) { 400 } else { 6 };
            let h = hash64(format!("!r{}:x", next() % rooms).as_bytes());
            if next() % 3 == 0 {
                s.advance(ep(t), &mut store);
            }
            if next() % 2 == 0 {
                s.insert(Sketch::Touched, t / 300, h, &mut store);
                touched.insert_hash(t / 300, h);
            } else {
                s.insert(Sketch::Read, t / 300, h, &mut store);
                read.insert_hash(t / 300, h);
                s.insert(Sketch::ReadLong, t / 1800, h, &mut store);
                long.insert_hash(t / 1800, h);
            }
            let was_dense = s.dense.is_some();
            for later in [0, 299, 300, 900, 1800, 3600] {
                let at = t + later;
                let pairs = [
                    (Sketch::Touched, touched.estimate(at / 300), at / 300),
                    (Sketch::Read, read.estimate(at / 300), at / 300),
                    (Sketch::ReadLong, long.estimate(at / 1800), at / 1800),
                ];
                for (k, want, e) in pairs {
                    assert_eq!(s.estimate(k, e, &store).to_bits(), want.to_bits(), "step {step} {k:?} +{later}");
                }
            }
            went_dense |= was_dense;
            went_back |= went_dense && s.dense.is_none();
            assert!(store.extras().count() <= SPARSE_MAX);
            if s.dense.is_some() {
                assert_eq!(store.extras().count(), 0);
            }
        }
        assert!(went_dense && went_back, "both representations and the way back were used");
    }

    #[test]
    fn the_hash_spreads_similar_ids_over_all_bits() {
        let mut ones = [0u32; 64];
        let n = 4096;
        for i in 0..n {
            let h = hash64(format!("!room{i}:example.org").as_bytes());
            for (b, c) in ones.iter_mut().enumerate() {
                *c += ((h >> b) & 1) as u32;
            }
        }
        for (b, c) in ones.iter().enumerate() {
            let p = f64::from(*c) / f64::from(n);
            assert!((0.45..0.55).contains(&p), "bit {b}: {p}");
        }
        assert_ne!(hash64(b""), hash64(b"\0"));
        assert_ne!(fingerprint(b"a"), 0);
    }
}
