//! What one request adds to a token's additive features: the increments the detector puts
//! in its rings, handed back so that the exported per-token counters are the same numbers
//! (never a second reading of the request).
//!
//! These counters are the ones whose sum over hosts means something (docs/fleet.md): a
//! page, a search or a download is served by exactly one Synapse process, so summing each
//! host's count gives the fleet's. Rooms newly paged add up too as long as one room's
//! `/messages` always go to the same worker (Synapse's per-room routing); otherwise a room
//! paged through two workers counts once on each.

use super::window::{Count, QUARTERS, SIXTEENTHS};

/// Increments, in the rings' fixed-point units: weights in sixteenths, media in quarters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// `/messages` pages (and room `/initialSync`).
    pub pages: u64,
    pub page_weight_16: u64,
    pub context_weight_16: u64,
    pub searches: u64,
    /// Downloads in quarters: a thumbnail is one quarter, a full download four.
    pub media_downloads_4: u64,
    /// Rooms whose paging session started (a room not paged for 10 minutes starts anew).
    pub rooms_paged: u64,
    pub full_sync_weight_16: u64,
    pub key_reads: u64,
    /// Bytes sent in reply to media downloads and thumbnails.
    pub media_bytes: u64,
}

/// One exported counter: metric name (without `_total`), help, and its value in base units.
pub type Column = (&'static str, &'static str, fn(&Tally) -> f64);

/// Every counter, in exposition order.
pub const COLUMNS: [Column; 9] = [
    ("vigie_token_history_pages", "History pages (/messages, room /initialSync) per token", |t| t.pages as f64),
    (
        "vigie_token_history_page_weight",
        "History page-weight per token: 1 per page up to normal_limit events, more for larger limits (docs/detection.md)",
        |t| t.page_weight_16 as f64 / SIXTEENTHS,
    ),
    ("vigie_token_context_page_weight", "/context page-weight per token", |t| t.context_weight_16 as f64 / SIXTEENTHS),
    ("vigie_token_searches", "/search requests per token", |t| t.searches as f64),
    ("vigie_token_media_downloads", "Media downloads per token (a thumbnail counts a quarter)", |t| {
        t.media_downloads_4 as f64 / QUARTERS
    }),
    ("vigie_token_media_response_bytes", "Bytes of media downloads and thumbnails sent per token", |t| {
        t.media_bytes as f64
    }),
    ("vigie_token_rooms_paged", "Rooms whose history paging started (again after 10 idle minutes) per token", |t| {
        t.rooms_paged as f64
    }),
    ("vigie_token_full_syncs", "Full-sync weight per token (initial or full_state syncs)", |t| {
        t.full_sync_weight_16 as f64 / SIXTEENTHS
    }),
    ("vigie_token_key_backup_reads", "Key-backup reads (GET /room_keys/…?version=) per token", |t| {
        t.key_reads as f64
    }),
];

impl Tally {
    pub fn count(&mut self, what: Count, n: u32) {
        let n = u64::from(n);
        let slot = match what {
            Count::Pages => &mut self.pages,
            Count::PageWeight => &mut self.page_weight_16,
            Count::ContextWeight => &mut self.context_weight_16,
            Count::Search => &mut self.searches,
            Count::MediaDownloads => &mut self.media_downloads_4,
            Count::FullSyncWeight => &mut self.full_sync_weight_16,
            Count::KeyReads => &mut self.key_reads,
            Count::ContextLarge
            | Count::RoomReads
            | Count::MediaUploads
            | Count::ForeignReads
            | Count::Requests
            | Count::FromlessPages
            | Count::RoomsFinished
            | Count::Harvests
            | Count::ResumedPages => return,
        };
        *slot = slot.saturating_add(n);
    }

    pub fn add(&mut self, o: &Tally) {
        self.pages = self.pages.saturating_add(o.pages);
        self.page_weight_16 = self.page_weight_16.saturating_add(o.page_weight_16);
        self.context_weight_16 = self.context_weight_16.saturating_add(o.context_weight_16);
        self.searches = self.searches.saturating_add(o.searches);
        self.media_downloads_4 = self.media_downloads_4.saturating_add(o.media_downloads_4);
        self.rooms_paged = self.rooms_paged.saturating_add(o.rooms_paged);
        self.full_sync_weight_16 = self.full_sync_weight_16.saturating_add(o.full_sync_weight_16);
        self.key_reads = self.key_reads.saturating_add(o.key_reads);
        self.media_bytes = self.media_bytes.saturating_add(o.media_bytes);
    }

    pub fn is_empty(&self) -> bool {
        *self == Tally::default()
    }

    /// Counters that are non-zero: the series this tally exports.
    pub fn series(&self) -> usize {
        COLUMNS.iter().filter(|(_, _, v)| v(self) != 0.0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_in_base_units() {
        let mut t = Tally::default();
        t.count(Count::PageWeight, 24);
        t.count(Count::MediaDownloads, 5);
        t.count(Count::RoomReads, 3);
        t.media_bytes = 10;
        let v: Vec<f64> = COLUMNS.iter().map(|(_, _, f)| f(&t)).collect();
        assert_eq!(v, vec![0.0, 1.5, 0.0, 0.0, 1.25, 10.0, 0.0, 0.0, 0.0]);
        assert_eq!(t.series(), 3);
        let mut sum = t;
        sum.add(&t);
        assert_eq!(sum.page_weight_16, 48);
        assert!(!sum.is_empty() && Tally::default().is_empty());
    }
}
