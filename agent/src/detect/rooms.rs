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
//!
//! What a scraper cannot help doing shows here too: it reads each room to its first event
//! (Synapse's token says the page starts within its limit of depth 1, which counts as soon as
//! the page is served; or the last page is empty, or much shorter than the room's full pages:
//! the response bytes of each page are summed until the token's next page or room read closes
//! it), and it often lists a room's members or state right after its history. The bytes
//! alone miss about half the rooms read at a small page size: a last page of 8 events out of
//! 11 is not short.
//!
//! A scraper that pages two or three rooms turn about (so that no room is finished for
//! minutes, and the finished count stays low) shows it the other way: nearly every page
//! *resumes* a room's paging right after a page of another room. A person scrolls back in one
//! room, then maybe the next; returning to a room to page it deeper after another room's page
//! is rare in a sitting. The two signals are complements: sequential paging finishes rooms
//! quickly, interleaved paging resumes on every page.

/// A page whose response is smaller than this (status line, headers and an empty `chunk`
/// take a few hundred bytes; one event is several hundred more) returned nothing: the room's
/// start was reached.
pub const EMPTY_PAGE_BYTES: u32 = 1024;

/// A room's paging session. 24 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    /// Fingerprint of the room id; 0 marks a free entry.
    room: u32,
    /// Fingerprint of the latest `from`, to tell a new page from a retried one.
    from: u32,
    /// Consecutive pages, each from a new `from` token.
    depth: u16,
    /// [`FINISHED`], [`HARVESTED`].
    flags: u8,
    first_s: u32,
    last_s: u32,
    /// Response bytes of the session's largest page so far, saturating.
    max_bytes: u32,
}

const FINISHED: u8 = 1;
const HARVESTED: u8 = 2;

pub const ROOMS: usize = 8;

/// A page going deeper into a room this soon after the room's previous page, with another
/// room's page in between, resumes it: rooms paged turn about. A scraper at 10 s a request
/// over three rooms comes back to each within 30-40 s; a person coming back to a room
/// minutes later to scroll further (a new scrollback) does not count.
pub const RESUME_WITHIN_S: u32 = 60;

/// No page open.
const NONE: u8 = u8::MAX;

#[derive(Clone, Debug)]
pub struct RoomTable {
    /// At most [`ROOMS`]; a boxed slice, not a `Vec`: no spare capacity, 8 bytes less.
    entries: Box<[Entry]>,
    /// The entry of the latest page whose bytes are still being counted, those bytes, and
    /// whether its request said it reaches the room's first event (until its first bytes
    /// finish the room).
    open: u8,
    open_bytes: u32,
    open_reaches_start: bool,
    /// The entry of the token's latest page (open or closed).
    last: u8,
}

impl Default for RoomTable {
    fn default() -> Self {
        RoomTable { entries: Box::default(), open: NONE, open_bytes: 0, open_reaches_start: false, last: NONE }
    }
}

/// What a page told about the room.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Paged {
    pub depth: u16,
    /// The page before it (of this room or another) finished its room.
    pub finished: bool,
    /// It follows a new `from` deeper into a room whose paging is under way, and the token's
    /// previous page was of another room: paging turn about.
    pub resumed: bool,
}

/// What a `/members` or `/state` told about the room.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoomRead {
    /// It came within the window of the room's latest page: part of reading that room.
    pub after_history: bool,
    /// … and is the first such read of the room's paging session: a harvest.
    pub harvest: bool,
    /// It closed the room's open page, which finished the room.
    pub finished: bool,
}

impl RoomTable {
    /// Response bytes of the open page (the token's latest history page). Returns whether
    /// they finished its room: a page whose request reaches the room's first event finishes
    /// it as soon as it is served, not when the token's next request closes it. At a page
    /// every 8 s that is 8 s sooner, and the last room of a scrape that stops there counts at
    /// all. Empty and short pages need their whole size, so they still wait for the close.
    pub fn page_bytes(&mut self, bytes: u64) -> bool {
        if self.open == NONE || bytes == 0 {
            return false;
        }
        self.open_bytes = self.open_bytes.saturating_add(u32::try_from(bytes).unwrap_or(u32::MAX));
        // Once: the rest of the response, and its close, have nothing to add.
        std::mem::take(&mut self.open_reaches_start) && self.finish(self.open)
    }

    /// Mark `entry`'s room finished; whether it was not yet (a room finishes once a session).
    fn finish(&mut self, entry: u8) -> bool {
        match self.entries.get_mut(usize::from(entry)) {
            Some(e) if e.flags & FINISHED == 0 => {
                e.flags |= FINISHED;
                true
            }
            _ => false,
        }
    }

    /// Close the open page: returns whether it finished its room by its size (an empty page
    /// after a `from`, or one under half the session's largest page; a page whose request
    /// reached the first event was finished by its first bytes, see [`RoomTable::page_bytes`]).
    /// Bytes never seen (0) prove nothing: the page may not have been served.
    fn close(&mut self) -> bool {
        let (open, bytes) = (self.open, self.open_bytes);
        self.open = NONE;
        self.open_bytes = 0;
        self.open_reaches_start = false;
        let Some(e) = self.entries.get_mut(usize::from(open)) else {
            return false;
        };
        if bytes == 0 || e.flags & FINISHED != 0 {
            return false;
        }
        let empty = bytes < EMPTY_PAGE_BYTES && e.from != 0;
        let short = e.depth >= 2 && bytes.saturating_mul(2) < e.max_bytes;
        e.max_bytes = e.max_bytes.max(bytes);
        (empty || short) && self.finish(open)
    }

    /// A `/members` or `/state` of `room`: whether it follows that room's history (paged
    /// within `within_s`), for the first time in the session (a harvest), and whether it
    /// closed the room's open page and so finished it.
    pub fn room_read(&mut self, room: u32, now: u32, within_s: u32) -> RoomRead {
        let room = room.max(1);
        let Some(i) = self.entries.iter().position(|e| e.room == room) else {
            return RoomRead::default();
        };
        let finished = usize::from(self.open) == i && self.close();
        let Some(e) = self.entries.get_mut(i) else {
            return RoomRead { finished, ..RoomRead::default() };
        };
        let after_history = now.saturating_sub(e.last_s) <= within_s;
        let harvest = after_history && e.flags & HARVESTED == 0;
        if harvest {
            e.flags |= HARVESTED;
        }
        RoomRead { after_history, harvest, finished }
    }

    /// A page of `room` (fingerprint, non-zero) with `from` (fingerprint, 0 if none), at
    /// `now`; `reaches_start` if its request says it reaches the room's first event. A room not
    /// paged for `session_s` starts a new session. Closes the previous page (see
    /// [`Paged::finished`]) and opens this one.
    pub fn page(&mut self, room: u32, from: u32, reaches_start: bool, now: u32, session_s: u32) -> Paged {
        let finished = self.close();
        let last = self.last;
        let (depth, deeper_soon) = self.deepen(room, from, now, session_s);
        self.open_reaches_start = reaches_start;
        // A page that goes deeper follows an earlier page of its room, so `last` is set.
        let resumed = deeper_soon && last != self.open;
        self.last = self.open;
        Paged { depth, finished, resumed }
    }

    /// The room's depth after this page, and whether the page went deeper (a new `from`
    /// in a session under way) within [`RESUME_WITHIN_S`] of the room's previous page.
    fn deepen(&mut self, room: u32, from: u32, now: u32, session_s: u32) -> (u16, bool) {
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
                    *e = Entry { room, first_s: now, last_s: now, ..Entry::default() };
                }
                i
            }
        };
        self.open = u8::try_from(slot).unwrap_or(NONE);
        let Some(e) = self.entries.get_mut(slot) else {
            return (0, false);
        };
        if now.saturating_sub(e.last_s) > session_s {
            *e = Entry { room, first_s: now, last_s: now, ..Entry::default() };
        }
        let mut deeper = false;
        if from == 0 {
            // From the live end again: a new scroll, not a deeper one.
            e.depth = 1;
        } else if from != e.from || e.depth == 0 {
            deeper = e.depth > 0 && now.saturating_sub(e.last_s) <= RESUME_WITHIN_S;
            e.depth = e.depth.saturating_add(1);
        }
        e.from = from;
        e.last_s = now;
        (e.depth, deeper)
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

    /// Rooms paged at or after `since`.
    fn paged_since(&self, since: u32) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(move |e| e.room != 0 && e.last_s >= since)
    }

    /// Rooms paged at or after `since` whose session went `pages` deep or reached the room's
    /// first event.
    pub fn deep_since(&self, since: u32, pages: f64) -> u32 {
        self.paged_since(since).filter(|e| e.flags & FINISHED != 0 || f64::from(e.depth) >= pages).count() as u32
    }

    /// Rooms paged at or after `since` whose history was scrolled through: read to their first
    /// event through at least `whole_pages` pages (a room's whole history, not a small room
    /// opened), or `open_pages` deep whether or not the start has come yet. A big room is
    /// history taken page by page; counting it only at its start would make a scrape slower
    /// to see the bigger the rooms it takes.
    pub fn deep_read_since(&self, since: u32, whole_pages: f64, open_pages: f64) -> u32 {
        self.paged_since(since)
            .filter(|e| {
                let depth = f64::from(e.depth);
                (e.flags & FINISHED != 0 && depth >= whole_pages) || depth >= open_pages
            })
            .count() as u32
    }

    /// Deepest session paged at or after `since`.
    pub fn max_depth_since(&self, since: u32) -> u16 {
        self.paged_since(since).map(|e| e.depth).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn following_new_from_tokens_deepens_a_room_and_retries_do_not() {
        let mut t = RoomTable::default();
        assert_eq!(t.page(7, 11, false, 0, 600).depth, 1);
        assert_eq!(t.page(7, 12, false, 1, 600).depth, 2);
        assert_eq!(t.page(7, 12, false, 2, 600).depth, 2, "the same from again is a retry");
        assert_eq!(t.page(7, 13, false, 3, 600).depth, 3);
        assert_eq!(t.page(7, 0, false, 4, 600).depth, 1, "back to the live end");
        assert_eq!(t.page(7, 14, false, 2000, 600).depth, 1, "a new session after a pause");
        assert_eq!(t.max_depth_since(0), 1);
    }

    #[test]
    fn rooms_started_in_the_last_minute_are_counted_up_to_the_table_size() {
        let mut t = RoomTable::default();
        for r in 1..=5u32 {
            t.page(r, 1, false, r * 10, 600);
        }
        assert_eq!(t.started_since(25), 3);
        for r in 100..120u32 {
            t.page(r, 1, false, 100, 600);
        }
        assert_eq!(t.started_since(100), ROOMS as u32);
        assert_eq!(t.started_since(0), ROOMS as u32);
    }

    #[test]
    fn the_table_grows_with_the_rooms_paged_and_no_further() {
        let mut t = RoomTable::default();
        assert_eq!(t.entries.len(), 0);
        t.page(1, 1, false, 0, 600);
        t.page(1, 2, false, 1, 600);
        assert_eq!(t.entries.len(), 1);
        for r in 2..100u32 {
            t.page(r, 1, false, r, 600);
        }
        assert_eq!(t.entries.len(), ROOMS);
        assert_eq!(std::mem::size_of::<Entry>(), 24);
    }

    #[test]
    fn a_room_read_to_its_start_is_finished_and_a_scrollback_is_not() {
        let mut t = RoomTable::default();
        // A scraper: full pages, then the short last one, then the next room.
        t.page(1, 0, false, 0, 600);
        t.page_bytes(40_000);
        t.page(1, 5, false, 1, 600);
        t.page_bytes(40_000);
        t.page(1, 6, false, 2, 600);
        t.page_bytes(9_000);
        assert!(t.page(2, 0, false, 3, 600).finished, "the short last page finished room 1");
        t.page_bytes(30_000);
        // A single full page, then an empty one after its `from`: the start too.
        t.page(2, 7, false, 4, 600);
        t.page_bytes(400);
        assert!(t.page(3, 9, false, 5, 600).finished);
        // A reader: two full pages of a room with more history, and no more.
        t.page_bytes(20_000);
        t.page(3, 10, false, 6, 600);
        t.page_bytes(19_000);
        assert!(!t.page(4, 11, false, 7, 600).finished);
        // Bytes never seen prove nothing.
        assert!(!t.page(5, 12, false, 8, 600).finished);
    }

    #[test]
    fn a_page_whose_token_names_the_rooms_start_finishes_it_as_soon_as_it_is_served() {
        // A room in pages of 11 events from `now`, its last page holding 8 of them (not short
        // by its bytes), that page's token saying it reaches the first event or not. Returns
        // whether the last page's bytes finished the room.
        let read = |t: &mut RoomTable, room: u32, now: u32, said: bool| {
            let mut finished = false;
            for (i, (from, bytes)) in
                [(0, 11_000), (room * 10 + 1, 11_000), (room * 10 + 2, 8_000)].into_iter().enumerate()
            {
                t.page(room, from, said && i == 2, now + i as u32, 600);
                finished = t.page_bytes(bytes);
            }
            finished
        };
        let mut t = RoomTable::default();
        assert!(
            read(&mut t, 1, 0, true),
            "the request said it reaches the first event: its response finishes the room"
        );
        assert!(!t.page(2, 0, false, 3, 600).finished, "and the next request does not count it again");
        assert_eq!(t.deep_read_since(0, 3.0, 6.0), 1, "before any other request: a scrape's last room counts too");
        // The same last page with no such token: the bytes cannot tell.
        t.page_bytes(11_000);
        assert!(!read(&mut t, 2, 4, false));
        assert!(!t.page(3, 0, false, 7, 600).finished);
        // A page never served proves nothing, whatever its request said.
        t.page(3, 9, true, 8, 600);
        assert!(!t.page_bytes(0));
        assert!(!t.page(4, 0, false, 9, 600).finished);
        // A room is finished once per session, however many pages reach its start, and
        // however many reads its response takes.
        t.page_bytes(5_000);
        t.page(4, 10, true, 10, 600);
        assert!(t.page_bytes(200));
        assert!(!t.page_bytes(100), "the rest of the same response");
        t.page(4, 11, true, 11, 600);
        assert!(!t.page_bytes(300), "room 4 was already finished");
        assert!(!t.page(5, 0, false, 12, 600).finished);
    }

    #[test]
    fn rooms_paged_deep_or_read_to_their_start_are_read_deep_and_a_glance_is_not() {
        let mut t = RoomTable::default();
        // Room 1: three pages following `from` tokens.
        for (i, from) in [0, 11, 12].into_iter().enumerate() {
            t.page(1, from, false, i as u32, 600);
            t.page_bytes(20_000);
        }
        // Room 2: one full page, then an empty one: read to its first event in two pages.
        t.page(2, 0, false, 10, 600);
        t.page_bytes(20_000);
        t.page(2, 21, false, 11, 600);
        t.page_bytes(300);
        // Room 3: two pages of scrollback, no more (the page before it closed room 2).
        t.page(3, 31, false, 12, 600);
        t.page_bytes(20_000);
        t.page(3, 32, false, 13, 600);
        assert_eq!(t.deep_since(0, 3.0), 2, "room 1 by depth, room 2 by its start");
        assert_eq!(t.deep_since(11, 3.0), 1, "room 1's last page is older than that");
        assert_eq!(t.deep_since(0, 2.0), 3, "at two pages deep, the scrollback counts too");
        // Read whole through three pages or more: room 2 reached its start in two, room 1
        // went three deep but not to its start, which is a scrollback until it goes six.
        assert_eq!(t.deep_read_since(0, 3.0, 6.0), 0);
        assert_eq!(t.deep_read_since(0, 2.0, 6.0), 1, "room 2: whole, two pages");
        assert_eq!(t.deep_read_since(0, 3.0, 3.0), 1, "room 1, were three pages deep enough");
        // Room 4: its start on the third page.
        for (i, from) in [41, 42, 43].into_iter().enumerate() {
            t.page(4, from, i == 2, 20 + i as u32, 600);
            t.page_bytes(20_000);
        }
        assert_eq!(t.deep_read_since(0, 3.0, 6.0), 1, "room 4: whole, three pages");
        assert_eq!(t.deep_read_since(23, 3.0, 6.0), 0, "room 4's last page is older than that");
        // Room 5: a big room, six pages in and its start not in sight. It is history taken
        // as surely as room 4's three pages; waiting for its start would weigh a scrape of
        // big rooms later than one of small rooms.
        for (i, from) in [51, 52, 53, 54, 55].into_iter().enumerate() {
            t.page(5, from, false, 30 + i as u32, 600);
            t.page_bytes(20_000);
            assert_eq!(t.deep_read_since(0, 3.0, 6.0), 1, "room 5 at {} pages is a scrollback", i + 1);
        }
        t.page(5, 56, false, 35, 600);
        t.page_bytes(20_000);
        assert_eq!(t.deep_read_since(0, 3.0, 6.0), 2, "room 5 at six pages: read deep, start or not");
    }

    #[test]
    fn members_right_after_a_rooms_history_is_a_harvest_once() {
        let mut t = RoomTable::default();
        t.page(1, 0, false, 100, 600);
        t.page_bytes(30_000);
        t.page(1, 3, false, 101, 600);
        t.page_bytes(2_000);
        let read = |after_history, harvest, finished| RoomRead { after_history, harvest, finished };
        assert_eq!(t.room_read(1, 102, 30), read(true, true, true), "after the room's short last page");
        assert_eq!(t.room_read(1, 103, 30), read(true, false, false), "part of the room's reading, harvested once");
        assert_eq!(t.room_read(9, 103, 30), read(false, false, false), "a room never paged");
        t.page(2, 4, false, 200, 600);
        assert_eq!(t.room_read(2, 300, 30), read(false, false, false), "long after its history");
    }

    #[test]
    fn paging_rooms_turn_about_resumes_them_and_one_room_after_another_does_not() {
        // Three rooms turn about, each following its own `from` tokens.
        let mut t = RoomTable::default();
        let mut resumed = 0;
        for round in 0..4u32 {
            for room in 1..=3u32 {
                resumed += u32::from(t.page(room, 10 * room + round + 1, false, round * 3 + room, 600).resumed);
            }
        }
        assert_eq!(resumed, 9, "every page after the first round resumes its room");
        // The same pages, one room after the other: nothing resumed.
        let mut t = RoomTable::default();
        for room in 1..=3u32 {
            for round in 0..4u32 {
                assert!(!t.page(room, 10 * room + round + 1, false, room * 4 + round, 600).resumed);
            }
        }
        // Coming back to a room from its live end (no `from`), or after the session ended,
        // or retrying the same `from`, is not a resume.
        let mut t = RoomTable::default();
        t.page(1, 5, false, 0, 600);
        t.page(1, 6, false, 1, 600);
        t.page(2, 7, false, 2, 600);
        assert!(!t.page(1, 0, false, 3, 600).resumed, "back at the live end");
        t.page(2, 8, false, 4, 600);
        assert!(!t.page(1, 0, false, 5, 600).resumed, "a retried live end");
        t.page(2, 9, false, 6, 600);
        assert!(!t.page(1, 20, false, 2000, 600).resumed, "a new session after a pause");
        t.page(2, 10, false, 2001, 600);
        assert!(t.page(1, 21, false, 2002, 600).resumed, "deeper again after another room's page");
        t.page(2, 11, false, 2003, 600);
        assert!(!t.page(1, 21, false, 2004, 600).resumed, "the same `from` again is a retry");
        t.page(2, 12, false, 2005, 600);
        assert!(
            !t.page(1, 22, false, 2004 + RESUME_WITHIN_S + 1, 600).resumed,
            "a scroll further back minutes later, within the session: a new sitting"
        );
    }

    #[test]
    fn a_room_paged_recently_is_not_evicted_by_a_new_one() {
        let mut t = RoomTable::default();
        for r in 1..=ROOMS as u32 {
            t.page(r, 1, false, r, 600);
        }
        t.page(1, 2, false, 100, 600); // room 1 is now the most recent
        t.page(99, 1, false, 101, 600); // evicts room 2, the least recent
        assert_eq!(t.page(1, 3, false, 102, 600).depth, 3);
        assert_eq!(t.page(2, 5, false, 103, 600).depth, 1);
    }
}
