//! Matrix endpoint classes: the one place that lists them.
//!
//! A class is coarse enough to be a metric label and fine enough to tell what a token costs
//! the homeserver: a client hammering `/sync` and one paging `/messages` look alike in bytes
//! but not here. `{v}` is a client-API version: `r0`, `unstable` or `v` followed by digits
//! (`v1`, `v3`, ...); media versions are the same. Paths are matched on raw segments, as
//! Synapse routes them: a trailing slash, an empty segment or a %-encoded keyword matches
//! nothing, so Synapse's 404s are `Other` here too.
//!
//! | class             | label             | paths                                                                   |
//! |-------------------|-------------------|-------------------------------------------------------------------------|
//! | `Sync`            | `sync`            | `/_matrix/client/{v}/sync`                                              |
//! | `SlidingSync`     | `sliding_sync`    | `/_matrix/client/unstable/…/sync` with a segment containing `msc3575` (`org.matrix.msc3575`, `org.matrix.simplified_msc3575`) |
//! | `InitialSync`     | `initial_sync`    | `/_matrix/client/{v}/initialSync`, `/_matrix/client/{v}/rooms/{roomId}/initialSync` |
//! | `Messages`        | `messages`        | `/_matrix/client/{v}/rooms/{roomId}/messages`                           |
//! | `Context`         | `context`         | `/_matrix/client/{v}/rooms/{roomId}/context/{eventId}`                  |
//! | `Search`          | `search`          | `/_matrix/client/{v}/search`                                            |
//! | `Members`         | `members`         | `/_matrix/client/{v}/rooms/{roomId}/members`, `…/rooms/{roomId}/joined_members` |
//! | `State`           | `state`           | `/_matrix/client/{v}/rooms/{roomId}/state[/…]`                          |
//! | `Event`           | `event`           | `/_matrix/client/{v}/rooms/{roomId}/event/{eventId}`                    |
//! | `RoomKeys`        | `room_keys`       | `/_matrix/client/{v}/room_keys/…`                                       |
//! | `Keys`            | `keys`            | `/_matrix/client/{v}/keys/{query,upload,claim,changes}`                 |
//! | `JoinedRooms`     | `joined_rooms`    | `/_matrix/client/{v}/joined_rooms`                                      |
//! | `PublicRooms`     | `public_rooms`    | `/_matrix/client/{v}/publicRooms`                                       |
//! | `Send`            | `send`            | `/_matrix/client/{v}/rooms/{roomId}/send/…`, `…/rooms/{roomId}/redact/…` |
//! | `Login`           | `login`           | `/_matrix/client/{v}/login[/…]` (includes SSO redirects, `login/get_token`) |
//! | `MediaDownload`   | `media_download`  | `/_matrix/media/{v}/download/…`, `/_matrix/client/{v}/media/download/…` |
//! | `MediaThumbnail`  | `media_thumbnail` | `/_matrix/media/{v}/thumbnail/…`, `/_matrix/client/{v}/media/thumbnail/…` |
//! | `MediaUpload`     | `media_upload`    | `/_matrix/media/{v}/upload[/…]`                                         |
//! | `Other`           | `other`           | everything else, including every `OPTIONS` request (CORS preflights serve nothing) |
//!
//! Whatever the class, a path under `/_matrix/client/{v}/rooms/{roomId}/` names a room, and
//! [`Classified::room_id`] carries it, percent-decoded, when it is a plausible room id: it
//! starts with `!`, is at most 255 bytes (the spec's limit) and has no control characters.

use std::borrow::Cow;

/// What a request asks the homeserver for, coarse enough to be a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    Sync,
    SlidingSync,
    InitialSync,
    Messages,
    Context,
    Search,
    Members,
    State,
    Event,
    RoomKeys,
    Keys,
    JoinedRooms,
    PublicRooms,
    Send,
    Login,
    MediaDownload,
    MediaThumbnail,
    MediaUpload,
    Other,
}

impl Endpoint {
    /// Every class, so metrics can pre-register one series per label.
    pub const ALL: &'static [Endpoint] = &[
        Endpoint::Sync,
        Endpoint::SlidingSync,
        Endpoint::InitialSync,
        Endpoint::Messages,
        Endpoint::Context,
        Endpoint::Search,
        Endpoint::Members,
        Endpoint::State,
        Endpoint::Event,
        Endpoint::RoomKeys,
        Endpoint::Keys,
        Endpoint::JoinedRooms,
        Endpoint::PublicRooms,
        Endpoint::Send,
        Endpoint::Login,
        Endpoint::MediaDownload,
        Endpoint::MediaThumbnail,
        Endpoint::MediaUpload,
        Endpoint::Other,
    ];

    /// The metric label value; stable, since dashboards and alerts are written against it.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Sync => "sync",
            Endpoint::SlidingSync => "sliding_sync",
            Endpoint::InitialSync => "initial_sync",
            Endpoint::Messages => "messages",
            Endpoint::Context => "context",
            Endpoint::Search => "search",
            Endpoint::Members => "members",
            Endpoint::State => "state",
            Endpoint::Event => "event",
            Endpoint::RoomKeys => "room_keys",
            Endpoint::Keys => "keys",
            Endpoint::JoinedRooms => "joined_rooms",
            Endpoint::PublicRooms => "public_rooms",
            Endpoint::Send => "send",
            Endpoint::Login => "login",
            Endpoint::MediaDownload => "media_download",
            Endpoint::MediaThumbnail => "media_thumbnail",
            Endpoint::MediaUpload => "media_upload",
            Endpoint::Other => "other",
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request's class, and the room its path names, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Classified<'a> {
    pub endpoint: Endpoint,
    /// Percent-decoded "!abc:server" when the path names a room; borrowed unless it had to
    /// be decoded.
    pub room_id: Option<Cow<'a, str>>,
}

/// Longest room id the spec allows, in bytes.
const MAX_ROOM_ID: usize = 255;
/// Path segments after the version that the rules look at; the longest exact rule has 4,
/// the others end in "any rest", so more need not be read.
const SEGMENTS: usize = 6;

/// Classify a request by method and path (the request target without its query; anything
/// from '?' or '#' on is ignored anyway). Never allocates unless a room id is %-encoded.
pub fn classify<'a>(method: &str, path: &'a str) -> Classified<'a> {
    let other = Classified { endpoint: Endpoint::Other, room_id: None };
    if method.eq_ignore_ascii_case("OPTIONS") {
        return other;
    }
    // The delimiters are ASCII: searched as bytes (searched as chars, here and in the splits
    // below, they were 12 % of the agent's instructions per request).
    let path = memchr::memchr2(b'?', b'#', path.as_bytes()).and_then(|end| path.get(..end)).unwrap_or(path);
    let Some(rest) = path.strip_prefix("/_matrix/") else {
        return other;
    };
    // Only two APIs have classes, whatever their version: matched as prefixes, not searched.
    let (client_api, rest) = match (rest.strip_prefix("client/"), rest.strip_prefix("media/")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        (None, None) => return other,
    };
    let (version, rest) = crate::http::split_ascii_near(rest, b'/').unwrap_or((rest, ""));
    if !is_version(version) {
        return other;
    }
    let (segments, count) = first_segments(rest);
    let segments = segments.get(..count).unwrap_or(&[]);
    if client_api {
        client(version, rest, segments)
    } else {
        Classified { endpoint: media(segments, true), room_id: None }
    }
}

/// The first [`SEGMENTS`] segments of a path (as `split('/')` gives them), and how many there
/// are of those.
fn first_segments(path: &str) -> ([&str; SEGMENTS], usize) {
    let mut segments = [""; SEGMENTS];
    let mut count = 0usize;
    let mut tail = Some(path);
    for slot in segments.iter_mut() {
        let Some((segment, after)) = tail.map(split_segment) else { break };
        *slot = segment;
        count = count.saturating_add(1);
        tail = after;
    }
    (segments, count)
}

/// The first segment of a path and what follows its '/', if one does.
fn split_segment(path: &str) -> (&str, Option<&str>) {
    crate::http::split_ascii(path, b'/').map_or((path, None), |(segment, after)| (segment, Some(after)))
}

/// `r0`, `unstable`, or `v` and up to three digits.
fn is_version(v: &str) -> bool {
    match v.strip_prefix('v') {
        Some(digits) => (1..=3).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()),
        None => v == "r0" || v == "unstable",
    }
}

fn media(segments: &[&str], allow_upload: bool) -> Endpoint {
    match segments {
        ["download", ..] => Endpoint::MediaDownload,
        ["thumbnail", ..] => Endpoint::MediaThumbnail,
        ["upload", ..] if allow_upload => Endpoint::MediaUpload,
        _ => Endpoint::Other,
    }
}

fn client<'a>(version: &str, rest: &str, segments: &[&'a str]) -> Classified<'a> {
    let endpoint = match segments {
        ["sync"] => Endpoint::Sync,
        ["initialSync"] => Endpoint::InitialSync,
        ["search"] => Endpoint::Search,
        ["joined_rooms"] => Endpoint::JoinedRooms,
        ["publicRooms"] => Endpoint::PublicRooms,
        ["login", ..] => Endpoint::Login,
        ["room_keys", _, ..] => Endpoint::RoomKeys,
        ["keys", "query" | "upload" | "claim" | "changes"] => Endpoint::Keys,
        ["media", media_rest @ ..] => media(media_rest, false),
        ["rooms", room, in_room @ ..] => {
            return Classified { endpoint: room_endpoint(in_room), room_id: decode_room_id(room) };
        }
        _ if version == "unstable" && is_sliding_sync(rest) => Endpoint::SlidingSync,
        _ => Endpoint::Other,
    };
    Classified { endpoint, room_id: None }
}

/// `…/msc3575…/sync` under `unstable`, whatever the MSC's namespace and revision.
fn is_sliding_sync(rest: &str) -> bool {
    rest.rsplit_once('/').is_some_and(|(prefix, last)| last == "sync" && prefix.contains("msc3575"))
}

fn room_endpoint(in_room: &[&str]) -> Endpoint {
    match in_room {
        ["messages"] => Endpoint::Messages,
        ["context", event] if !event.is_empty() => Endpoint::Context,
        ["members" | "joined_members"] => Endpoint::Members,
        ["state", ..] => Endpoint::State,
        ["event", event] if !event.is_empty() => Endpoint::Event,
        ["send" | "redact", _, ..] => Endpoint::Send,
        ["initialSync"] => Endpoint::InitialSync,
        _ => Endpoint::Other,
    }
}

/// The room id a path segment names, if it is a plausible one (see the module doc): the
/// checks keep garbage out of whatever the caller does with it (labels, logs).
fn decode_room_id(segment: &str) -> Option<Cow<'_, str>> {
    // An encoded byte takes at most three characters.
    if segment.len() > MAX_ROOM_ID.saturating_mul(3) {
        return None;
    }
    let room: Cow<'_, str> = if segment.contains('%') {
        Cow::Owned(String::from_utf8(crate::http::percent_decode(segment.as_bytes(), false)).ok()?)
    } else {
        Cow::Borrowed(segment)
    };
    let plausible = room.starts_with('!') && room.len() <= MAX_ROOM_ID && !room.chars().any(char::is_control);
    plausible.then_some(room)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VERSIONS: [&str; 4] = ["r0", "v3", "v1", "unstable"];

    fn class(method: &str, path: &str) -> Endpoint {
        classify(method, path).endpoint
    }

    fn room(path: &str) -> Option<String> {
        classify("GET", path).room_id.map(Cow::into_owned)
    }

    #[test]
    fn every_class_has_a_distinct_snake_case_label() {
        let labels: std::collections::BTreeSet<_> = Endpoint::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(labels.len(), Endpoint::ALL.len());
        assert_eq!(Endpoint::ALL.len(), 19);
        for label in labels {
            assert!(label.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{label}");
        }
        assert_eq!(Endpoint::SlidingSync.to_string(), "sliding_sync");
    }

    #[test]
    fn top_level_client_endpoints_are_classified_under_every_version() {
        for v in VERSIONS {
            let p = |rest: &str| format!("/_matrix/client/{v}/{rest}");
            assert_eq!(class("GET", &p("sync")), Endpoint::Sync, "{v}");
            assert_eq!(class("GET", &p("initialSync")), Endpoint::InitialSync, "{v}");
            assert_eq!(class("POST", &p("search")), Endpoint::Search, "{v}");
            assert_eq!(class("GET", &p("joined_rooms")), Endpoint::JoinedRooms, "{v}");
            assert_eq!(class("POST", &p("publicRooms")), Endpoint::PublicRooms, "{v}");
            assert_eq!(class("POST", &p("login")), Endpoint::Login, "{v}");
            assert_eq!(class("GET", &p("login/sso/redirect")), Endpoint::Login, "{v}");
            assert_eq!(class("GET", &p("room_keys/version")), Endpoint::RoomKeys, "{v}");
            assert_eq!(class("PUT", &p("room_keys/keys/!r:s/sess")), Endpoint::RoomKeys, "{v}");
            for k in ["query", "upload", "claim", "changes"] {
                assert_eq!(class("POST", &p(&format!("keys/{k}"))), Endpoint::Keys, "{v} {k}");
            }
        }
    }

    #[test]
    fn room_endpoints_are_classified_with_raw_and_encoded_room_ids() {
        for v in VERSIONS {
            for id in ["!abc:example.org", "%21abc%3Aexample.org", "%21abc:example.org"] {
                let p = |rest: &str| format!("/_matrix/client/{v}/rooms/{id}/{rest}");
                let cases = [
                    ("messages", Endpoint::Messages),
                    ("context/$ev", Endpoint::Context),
                    ("members", Endpoint::Members),
                    ("joined_members", Endpoint::Members),
                    ("state", Endpoint::State),
                    ("state/m.room.name/", Endpoint::State),
                    ("event/$ev", Endpoint::Event),
                    ("send/m.room.message/txn1", Endpoint::Send),
                    ("redact/$ev/txn2", Endpoint::Send),
                    ("initialSync", Endpoint::InitialSync),
                    ("typing/@u:s", Endpoint::Other),
                ];
                for (rest, want) in cases {
                    let path = p(rest);
                    let got = classify("GET", &path);
                    assert_eq!(got.endpoint, want, "{v} {id} {rest}");
                    assert_eq!(got.room_id.as_deref(), Some("!abc:example.org"), "{v} {id} {rest}");
                }
            }
        }
    }

    #[test]
    fn raw_room_ids_are_borrowed_and_encoded_ones_decoded() {
        let raw = classify("GET", "/_matrix/client/v3/rooms/!a:b/messages");
        assert!(matches!(raw.room_id, Some(Cow::Borrowed("!a:b"))));
        let enc = classify("GET", "/_matrix/client/v3/rooms/%21a%3Ab/messages");
        assert!(matches!(enc.room_id, Some(Cow::Owned(ref s)) if s == "!a:b"));
    }

    #[test]
    fn implausible_room_ids_are_dropped_but_the_class_kept() {
        let c = |id: &str| {
            let path = format!("/_matrix/client/v3/rooms/{id}/messages");
            let got = classify("GET", &path);
            (got.endpoint, got.room_id.map(Cow::into_owned))
        };
        for bad in ["", "abc:example.org", "%23alias:example.org", "!a%0Ab", "%FF%FE", "%21%FF"] {
            assert_eq!(c(bad), (Endpoint::Messages, None), "{bad}");
        }
        let long = format!("!{}", "a".repeat(MAX_ROOM_ID));
        assert_eq!(c(&long), (Endpoint::Messages, None));
        assert_eq!(room("/_matrix/client/v3/rooms/!hash_only_v12/messages").as_deref(), Some("!hash_only_v12"));
    }

    #[test]
    fn sliding_sync_is_any_unstable_msc3575_sync() {
        for p in [
            "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
            "/_matrix/client/unstable/org.matrix.msc3575/sync",
            "/_matrix/client/unstable/com.example/msc3575/v2/sync",
        ] {
            assert_eq!(class("POST", p), Endpoint::SlidingSync, "{p}");
        }
        assert_eq!(class("POST", "/_matrix/client/v3/org.matrix.msc3575/sync"), Endpoint::Other);
        assert_eq!(class("POST", "/_matrix/client/unstable/org.matrix.msc3575/sync/"), Endpoint::Other);
        assert_eq!(class("POST", "/_matrix/client/unstable/sync"), Endpoint::Sync);
    }

    #[test]
    fn media_is_classified_on_legacy_and_authenticated_paths() {
        for v in ["r0", "v3", "v1"] {
            let m = |rest: &str| format!("/_matrix/media/{v}/{rest}");
            assert_eq!(class("GET", &m("download/example.org/abc")), Endpoint::MediaDownload);
            assert_eq!(class("GET", &m("download/example.org/abc/name.png")), Endpoint::MediaDownload);
            assert_eq!(class("GET", &m("thumbnail/example.org/abc")), Endpoint::MediaThumbnail);
            assert_eq!(class("POST", &m("upload")), Endpoint::MediaUpload);
            assert_eq!(class("PUT", &m("upload/example.org/abc")), Endpoint::MediaUpload);
            assert_eq!(class("GET", &m("config")), Endpoint::Other);
        }
        let c = "/_matrix/client/v1/media";
        assert_eq!(class("GET", &format!("{c}/download/example.org/abc")), Endpoint::MediaDownload);
        assert_eq!(class("GET", &format!("{c}/thumbnail/example.org/abc")), Endpoint::MediaThumbnail);
        assert_eq!(class("GET", &format!("{c}/config")), Endpoint::Other);
        assert_eq!(class("POST", &format!("{c}/upload")), Endpoint::Other);
    }

    #[test]
    fn cors_preflights_are_other() {
        assert_eq!(class("OPTIONS", "/_matrix/client/v3/sync"), Endpoint::Other);
        assert_eq!(class("options", "/_matrix/media/v3/upload"), Endpoint::Other);
    }

    #[test]
    fn a_query_left_in_the_path_is_ignored() {
        assert_eq!(class("GET", "/_matrix/client/v3/sync?since=s1&timeout=30000"), Endpoint::Sync);
        assert_eq!(class("GET", "/_matrix/client/v3/sync#x"), Endpoint::Sync);
    }

    #[test]
    fn near_misses_are_other() {
        for p in [
            "/_matrix/client/v3/sync/",
            "/_matrix/client/v3//sync",
            "/_matrix/client/v3/%73ync",
            "/_matrix/client/v3/Sync",
            "/_matrix/client/api/v1/sync",
            "/_matrix/client/v12345/sync",
            "/_matrix/client/sync",
            "/_matrix/client",
            "/_matrix/client/",
            "/_matrix/clients/v3/sync",
            "/_matrix/media",
            "/_matrix/mediav3/download/x",
            "/_matrix/v3/sync",
            "/_matrix/federation/v1/send/txn",
            "/_matrix/client/v3/keys/device_signing/upload",
            "/_matrix/client/v3/rooms/!a:b/context/",
            "/_matrix/client/v3/rooms/!a:b/send",
            "/_matrix/client/v3/rooms",
            "/_synapse/admin/v1/rooms",
            "_matrix/client/v3/sync",
            "/",
            "",
            "*",
        ] {
            assert_eq!(class("GET", p), Endpoint::Other, "{p}");
        }
    }

    #[test]
    fn segments_are_those_of_a_split_on_slashes() {
        let parts = ["", "/", "//", "a", "bc/", "é", "/x/"];
        for a in parts {
            for b in parts {
                for c in parts {
                    for d in parts {
                        let path = format!("{a}{b}{c}{d}/{a}{c}");
                        let (segments, count) = first_segments(&path);
                        let want: Vec<&str> = path.split('/').take(SEGMENTS).collect();
                        assert_eq!(&segments[..count], &want[..], "{path:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn hostile_paths_are_other_and_never_panic() {
        let huge = format!("/_matrix/client/v3/rooms/!{}/messages", "%41".repeat(100_000));
        let deep = format!("/_matrix/client/v3/{}", "a/".repeat(100_000));
        for p in [
            "//",
            "/../",
            "/_matrix/../_matrix/client/v3/sync/..",
            "/_matrix/client/v3/rooms/%/messages",
            "/_matrix/client/v3/rooms/%2/messages",
            "/_matrix/client/v3/rooms/\u{0}/\u{fffd}",
            "/_matrix/clïent/v3/sync",
            "/_matrix/client/v٣/sync",
            "/_matrix/client/unstable/msc3575",
            huge.as_str(),
            deep.as_str(),
        ] {
            let got = classify("GET", p);
            assert!(got.room_id.is_none(), "{p:.80}");
        }
        assert_eq!(class("GET", &huge), Endpoint::Messages);
        assert_eq!(class("GET", &deep), Endpoint::Other);
    }
}
