// A Matrix client in a real browser, for the integration tests (tests/harness/browser.py).
//
// matrix-js-sdk is the SDK Element Web is built on; run in headless Chromium, every request
// it makes is the browser's own: Chromium's user agent, Origin and Sec-Fetch-* headers, CORS
// preflights, HTTP/1.1 keep-alive as the network stack does it. The tests use it where the
// harness's own HTTP client would only be our idea of a browser: a member exporting a room
// as Element's "Export chat" does, a member catching up on every room as Element's room view
// pages them, and a scrape run from a browser to look like Element.
//
// The page asks the harness that served it (same origin) for its task: /config gives the
// homeserver, the access token (kept in memory, never logged) and the task; /stop says
// whether to stop; /status receives what the client did after every request.

import { ClientEvent, Direction, EventTimeline, createClient } from "matrix-js-sdk";

// mulberry32: a seeded generator, so that a draw's pauses and room order repeat.
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const status = {
  requests: {},
  pages: 0,
  events: 0,
  emptyPages: 0,
  rooms: [],
  // Seconds from the task's first request to each room's first page, in opening order.
  openedAfter: [],
  syncs: 0,
  errors: [],
  outcome: "starting",
};

async function post(path, body) {
  try {
    await fetch(path, { method: "POST", body: JSON.stringify(body) });
  } catch {
    // The harness went away: nothing to report to.
  }
}

class Stop extends Error {}

async function main() {
  const cfg = await (await fetch("/config")).json();
  const random = rng(cfg.seed || 1);
  const client = createClient({
    baseUrl: cfg.baseUrl,
    accessToken: cfg.token,
    userId: cfg.userId,
    deviceId: cfg.deviceId,
  });
  client.on(ClientEvent.Sync, (state) => {
    if (state === "SYNCING" || state === "PREPARED") status.syncs += 1;
  });
  const prepared = new Promise((resolve) => {
    client.on(ClientEvent.Sync, (state) => {
      if (state === "PREPARED") resolve();
    });
  });
  // What Element Web starts with: a lazy-loading sync loop with a small initial timeline.
  await client.startClient({ initialSyncLimit: 20, lazyLoadMembers: true });
  await prepared;
  status.outcome = "synced";
  await post("/status", status);

  const task = cfg.task;
  // A member does not export the moment the tab opens.
  if (task.delay) await sleep(1000 * task.delay);
  let first = true;
  let firstAt = 0;
  let nextAt = 0;
  const pace = task.pace || 0;
  // One request of the task: the pace, the harness's stop, the first-request mark.
  async function call(what, fn) {
    const wait = nextAt - Date.now();
    if (wait > 0) await sleep(wait);
    const stop = await (await fetch("/stop")).json();
    if (stop.stop) throw new Stop(stop.why || "stopped");
    if (first) {
      first = false;
      await post("/first", {});
      firstAt = Date.now();
    }
    status.requests[what] = (status.requests[what] || 0) + 1;
    try {
      return await fn();
    } catch (e) {
      status.errors.push(`${what}: ${e.httpStatus || ""} ${e.errcode || e.name || ""}`.slice(0, 200));
      return null;
    } finally {
      nextAt = Date.now() + 1000 * pace * (0.7 + 0.6 * random());
      await post("/status", status);
    }
  }
  const seen = new Set();
  async function page(room, from, limit) {
    const res = await call("messages", () => client.createMessagesRequest(room, from, limit, Direction.Backward));
    if (!res) return [false, null];
    const chunk = res.chunk || [];
    status.pages += 1;
    status.events += chunk.length;
    const opened = !seen.has(room);
    if (opened) {
      seen.add(room);
      status.rooms.push(room);
      status.openedAfter.push((Date.now() - firstAt) / 1000);
    }
    if (!chunk.length) status.emptyPages += 1;
    if (task.marksRead && opened && chunk.length && chunk[0].event_id) {
      // The private read marker only (m.fully_read): a write to the room no other member sees.
      await call("read_markers", () => client.setRoomReadMarkersHttpRequest(room, chunk[0].event_id));
    }
    if (!chunk.length || !res.end) return [false, null];
    return [true, res.end];
  }

  try {
    if (task.kind === "export") {
      // Element's Exporter: /messages backwards from the live end, 1,000 events a page,
      // following `end` until the room's start.
      let from = null;
      for (;;) {
        const [more, next] = await page(task.room, from, 1000);
        if (!more) break;
        from = next;
      }
    } else if (task.kind === "scrape") {
      const joined = await call("joined_rooms", () => client.getJoinedRooms());
      const rooms = (joined && joined.joined_rooms) || [];
      // The world's build order first (harness/world.py `in_build_order`), so that a seed
      // shuffles the same list into the same order in every run, whatever ids the rooms got.
      const made = new Map((task.buildOrder || []).map((room, i) => [room, i]));
      const rank = (room) => (made.has(room) ? made.get(room) : made.size);
      rooms.sort((a, b) => rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0));
      for (let i = rooms.length - 1; i > 0; i--) {
        const j = Math.floor(random() * (i + 1));
        [rooms[i], rooms[j]] = [rooms[j], rooms[i]];
      }
      const start = (room) => {
        if (!task.fromSync) return null;
        const r = client.getRoom(room);
        return r ? r.getLiveTimeline().getPaginationToken(EventTimeline.BACKWARDS) : null;
      };
      const open = [];
      while (rooms.length || open.length) {
        while (rooms.length && open.length < task.interleave) {
          const room = rooms.pop();
          open.push({ room, from: start(room) });
        }
        for (const cur of [...open]) {
          const [more, next] = await page(cur.room, cur.from, task.limit);
          if (more) {
            cur.from = next;
            continue;
          }
          open.splice(open.indexOf(cur), 1);
          for (const what of task.after || []) {
            if (what === "members") await call("members", () => client.members(cur.room));
            else await call("state", () => client.roomState(cur.room));
          }
        }
      }
    } else if (task.kind === "catchup") {
      // A member back on a new laptop catching up: every joined room opened in turn, the way
      // Element's room view does it (the live timeline from the sync, then back-pagination
      // 20 events at a time as the member scrolls up, a few pages at most, fewer where the
      // room begins), time spent reading each page, the read marker moved to the newest
      // event, and now and then a reply.
      const rooms = client.getRooms().map((r) => r.roomId);
      for (let i = rooms.length - 1; i > 0; i--) {
        const j = Math.floor(random() * (i + 1));
        [rooms[i], rooms[j]] = [rooms[j], rooms[i]];
      }
      const between = (lo, hi) => lo + (hi - lo) * random();
      for (const roomId of rooms) {
        const room = client.getRoom(roomId);
        if (!room) continue;
        const live = room.getLiveTimeline();
        if (!seen.has(roomId)) {
          seen.add(roomId);
          status.rooms.push(roomId);
        }
        const [lo, hi] = task.pages;
        const pages = lo + Math.floor(random() * (hi - lo + 1));
        for (let k = 0; k < pages; k++) {
          await sleep(1000 * between(...task.dwell));
          const before = live.getEvents().length;
          const more = await call("messages", () => client.paginateEventTimeline(live, { backwards: true, limit: 20 }));
          status.pages += 1;
          status.events += Math.max(0, live.getEvents().length - before);
          if (!more) break;
        }
        await sleep(1000 * between(...task.dwell));
        const events = live.getEvents();
        const newest = events[events.length - 1];
        if (newest && newest.getId()) {
          await call("read_markers", () => client.setRoomReadMarkers(roomId, newest.getId(), newest));
        }
        if (random() < task.reply) {
          await call("send", () => client.sendTextMessage(roomId, "catching up, thanks"));
        }
      }
    }
    status.outcome = "exhausted";
  } catch (e) {
    status.outcome = e instanceof Stop ? e.message : `error: ${e}`.slice(0, 200);
  }
  await post("/status", status);
  // Like a member's open tab: the sync loop goes on until the harness closes the browser.
}

main().catch((e) => {
  status.outcome = `error: ${e}`.slice(0, 200);
  post("/status", status);
});
