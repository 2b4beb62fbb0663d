//! The classifier on arbitrary (method, path) strings: it must never panic, and a room id it
//! returns must satisfy the documented checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigie::endpoint::{Endpoint, classify};

fuzz_target!(|input: (&str, &str)| {
    let (method, path) = input;
    let classified = classify(method, path);
    assert!(Endpoint::ALL.contains(&classified.endpoint));
    if let Some(room) = classified.room_id {
        assert!(room.starts_with('!') && room.len() <= 255);
        assert!(!room.chars().any(char::is_control));
    }
});
