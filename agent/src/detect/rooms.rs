//! How deep a token pages into each of the last few rooms it read.
//!
//! A reader scrolling back follows `from` tokens a few pages into a room or two; a scraper
//! follows them to the room's beginning, then moves on to the next room. Eight entries (the
//! rooms most recently paged) are enough to see both the depth reached in a room and how many
//! rooms were newly started in the last minute; the total breadth over longer windows comes
//! from the HyperLogLog sketches, which have no size limit.
//!
//! Most tokens never page history, and a reader pages one room or two: the table grows one
//! entry at a time up to [`ROOMS`] (20 bytes each) and costs nothing until the first page.
//! Entries are never removed, only reused, so the table behaves exactly as a fixed array
//! filled in order.

/// A room's paging session. 20 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    /// Fingerprint of the room id; 0 marks a free entry.
    room: u32,
    /// Fingerprint of the latest `from`, to tell a new page from a retried one.
    from: u32,
    /// Consecutive pages, each from a new `from` token.
    depth: u16,
    first_s: u32,
    last_s: u32,
}

pub const ROOMS: usize = 8;

#[derive(Clone, Debug, Default)]
pub struct RoomTable {
    /// At most [`ROOMS`]; a boxed slice, not a `Vec`: no spare capacity, 8 bytes less.
    entries: Box<[Entry]>,
}

impl RoomTable {
    /// A page of `room` (fingerprint, non-zero) with `from` (fingerprint, 0 if none), at
    /// `now`. A room not paged for `session_s` starts a new session. Returns the depth.
    pub fn page(&mut self, room: u32, from: u32, now: u32, session_s: u32) -> u16 {
        let room = room.max(1);
        let slot = match self.entries.iter().position(|e| e.room == room) {
            Some(i) => i,
            None => {
                // A free entry, or the one paged least recently.
                let i = if self.entries.len() < ROOMS {
                    let mut grown = Vec::with_capacity(self.entries.len() + 1);
                    grown.extend_from_slice(&self.entries);
                    grown.push(Entry::default());
                    self.entries = grown.into_boxed_slice();
                    self.entries.len() - 1
                } else {
                    (0..ROOMS).min_by_key(|&i| self.entries.get(i).map_or(0, |e| e.last_s.max(1))).unwrap_or(0)
                };
                if let Some(e) = self.entries.get_mut(i) {
                    *e = Entry { room, from: 0, depth: 0, first_s: now, last_s: now };
                }
                i
            }
        };
        let Some(e) = self.entries.get_mut(slot) else {
            return 0;
        };
        if now.saturating_sub(e.last_s) > session_s {
            *e = Entry { room, from: 0, depth: 0, first_s: now, last_s: now };
        }
        if from == 0 {
            // From the live end again: a new scroll, not a deeper one.
            e.depth = 1;
        } else if from != e.from || e.depth == 0 {
            e.depth = e.depth.saturating_add(1);
        }
        e.from = from;
        e.last_s = now;
        e.depth
    }

    /// Heap bytes behind the table.
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.entries)
    }

    /// Whether a page of `room` at `now` continues a session (else it starts one).
    pub fn in_session(&self, room: u32, now: u32, session_s: u32) -> bool {
        let room = room.max(1);
        self.entries.iter().any(|e| e.room == room && now.saturating_sub(e.last_s) <= session_s)
    }

    /// Rooms whose paging session started at or after `since`.
    pub fn started_since(&self, since: u32) -> u32 {
        self.entries.iter().filter(|e| e.room != 0 && e.first_s >= since).count() as u32
    }

    /// Deepest session paged at or after `since`.
    pub fn max_depth_since(&self, since: u32) -> u16 {
        self.entries.iter().filter(|e| e.room != 0 && e.last_s >= since).map(|e| e.depth).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn following_new_from_tokens_deepens_a_room_and_retries_do_not() {
        let mut t = RoomTable::default();
        assert_eq!(t.page(7, 11, 0, 600), 1);
        assert_eq!(t.page(7, 12, 1, 600), 2);
        assert_eq!(t.page(7, 12, 2, 600), 2, "the same from again is a retry");
        assert_eq!(t.page(7, 13, 3, 600), 3);
        assert_eq!(t.page(7, 0, 4, 600), 1, "back to the live end");
        assert_eq!(t.page(7, 14, 2000, 600), 1, "a new session after a pause");
        assert_eq!(t.max_depth_since(0), 1);
    }

    #[test]
    fn rooms_started_in_the_last_minute_are_counted_up_to_the_table_size() {
        let mut t = RoomTable::default();
        for r in 1..=5u32 {
            t.page(r, 1, r * 10, 600);
        }
        assert_eq!(t.started_since(25), 3);
        for r in 100..120u32 {
            t.page(r, 1, 100, 600);
        }
        assert_eq!(t.started_since(100), ROOMS as u32);
        assert_eq!(t.started_since(0), ROOMS as u32);
    }

    #[test]
    fn the_table_grows_with_the_rooms_paged_and_no_further() {
        let mut t = RoomTable::default();
        assert_eq!(t.entries.len(), 0);
        t.page(1, 1, 0, 600);
        t.page(1, 2, 1, 600);
        assert_eq!(t.entries.len(), 1);
        for r in 2..100u32 {
            t.page(r, 1, r, 600);
        }
        assert_eq!(t.entries.len(), ROOMS);
        assert_eq!(std::mem::size_of::<Entry>(), 20);
    }

    #[test]
    fn a_room_paged_recently_is_not_evicted_by_a_new_one() {
        let mut t = RoomTable::default();
        for r in 1..=ROOMS as u32 {
            t.page(r, 1, r, 600);
        }
        t.page(1, 2, 100, 600); // room 1 is now the most recent
        t.page(99, 1, 101, 600); // evicts room 2, the least recent
        assert_eq!(t.page(1, 3, 102, 600), 3);
        assert_eq!(t.page(2, 5, 103, 600), 1);
    }
}
