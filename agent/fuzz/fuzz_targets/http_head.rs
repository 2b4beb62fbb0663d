//! Everything the agent does with bytes read off a socket, on arbitrary bytes: none of it
//! may panic, and what it returns must stay inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigie::{endpoint, http, token};

fuzz_target!(|data: &[u8]| {
    let _ = http::looks_like_request_start(data);
    if let Some(end) = http::head_end(data) {
        assert!(end <= data.len());
        // The tracker parses heads it framed itself: the same answer as the whole buffer's.
        assert_eq!(http::parse_framed_head(&data[..end]), http::parse_head(data));
    }
    // The tracker reads a well-formed head in one pass when it can: the same end, the same head.
    if let Some((end, head)) = http::parse_whole_head(data) {
        assert_eq!(http::head_end(data), Some(end));
        assert_eq!(http::parse_framed_head(&data[..end]), Ok(head));
    }
    let key = token::TokenKey::from_bytes([0x42; 32]);
    if let Ok(head) = http::parse_head(data) {
        let classified = endpoint::classify(head.method, head.path);
        let _ = classified.endpoint.as_str();
        if let Some(token) = token::extract_token(&head) {
            assert!(!token.is_empty());
            assert_eq!(Some(key.label(&token)), token::label_for_request(&key, &head));
        }
        for (name, value) in http::query_pairs(head.query) {
            assert!(http::percent_decode(name.as_bytes(), true).len() <= name.len());
            assert!(http::percent_decode(value.as_bytes(), false).len() <= value.len());
        }
    }
});
