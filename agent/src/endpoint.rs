//! Matrix endpoint classes: the one place that lists them.
//!
//! (Interface fixed; the classifier body is being written.)

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
