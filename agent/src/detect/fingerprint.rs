//! Is this a Matrix client? What the request head says about the program that sent it.
//!
//! Two marks, both kept as bits on the token's client entry (no header value is kept):
//!
//! - **unknown**: the user agent names no Matrix client, SDK, bot or bridge framework and no
//!   browser (a browser is how Element Web and most web clients appear). `python-requests`,
//!   `curl`, `Go-http-client` are scripts. Checked once per client of a token.
//! - **mismatch**: the user agent claims a browser (`Mozilla/…`, which Element Web and
//!   Element Desktop send) but the request lacks what every current browser's `fetch` sends
//!   to a homeserver on another origin (`Sec-Fetch-Mode`, or `Origin`), or asks to close the
//!   connection (browsers keep theirs alive). A script that copies Element's user agent
//!   rarely copies the rest of its head.
//!
//! Neither mark is evidence alone: a bot or an old script is legitimate. They only weigh
//! (as `client_fingerprint`, capped well below 1) on a token that is reading.

/// Lowercase markers of known clients; a user agent containing one is "known".
const KNOWN: &[&[u8]] = &[
    b"mozilla/",
    b"element",
    b"schildichat",
    b"fluffychat",
    b"nheko",
    b"cinny",
    b"fractal",
    b"neochat",
    b"quaternion",
    b"thunderbird",
    b"gomuks",
    b"iamb",
    b"beeper",
    b"syphon",
    b"hydrogen",
    b"commet",
    b"matrix-rust-sdk",
    b"matrix-js-sdk",
    b"matrix-bot-sdk",
    b"matrixandroidsdk",
    b"matrix-ios-sdk",
    b"matrix-nio",
    b"matrix-commander",
    b"mautrix",
    b"maubot",
    b"draupnir",
    b"mjolnir",
    b"trixnity",
    b"ruma",
    b"libquotient",
    b"synapse",
];

/// Longest user agent looked at.
const MAX_AGENT: usize = 512;

/// Whether `agent` names a known Matrix client (or a browser).
pub fn known_agent(agent: &[u8]) -> bool {
    let agent = agent.get(..MAX_AGENT).unwrap_or(agent);
    KNOWN.iter().any(|m| contains_ignore_case(agent, m))
}

/// Whether the head contradicts a browser user agent.
pub fn mismatch(agent: &[u8], browser_fetch: bool, connection_close: bool) -> bool {
    // The head's two bits first: a browser's head, as most are, needs no look at the agent.
    let claims_browser = || agent.first_chunk::<8>().is_some_and(|p| p.map(|b| b.to_ascii_lowercase()) == *b"mozilla/");
    (!browser_fetch || connection_close) && claims_browser()
}

fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_clients_and_browsers_are_known_and_scripts_are_not() {
        for ua in [
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
            "Element/1.6.28 (Google Pixel 8; Android 14; Flavour GooglePlay; MatrixAndroidSdk2 1.6.28)",
            "Element X/25.01.0 (Google Pixel 7a; Android 15; Sdk 1.0.0)",
            "Draupnir/2.0.1 matrix-bot-sdk/0.7.1",
            "mautrix-whatsapp/0.11.2 mautrix-go/0.22.1",
            "FluffyChat/1.22",
        ] {
            assert!(known_agent(ua.as_bytes()), "{ua}");
        }
        for ua in ["python-requests/2.32.3", "curl/8.11.1", "Go-http-client/1.1", "python-httpx/0.28.1", ""] {
            assert!(!known_agent(ua.as_bytes()), "{ua}");
        }
    }

    #[test]
    fn a_browser_agent_without_a_browsers_headers_is_a_mismatch() {
        let chrome = b"Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0.0.0";
        assert!(!mismatch(chrome, true, false), "what a browser sends");
        assert!(mismatch(chrome, false, false), "no Sec-Fetch-Mode, no Origin");
        assert!(mismatch(chrome, true, true), "a browser keeps its connections");
        assert!(!mismatch(b"Element/1.6.28 (Android 14)", false, false), "apps send no Sec-Fetch");
        assert!(!mismatch(b"python-requests/2.32.3", false, true), "no claim, no contradiction");
        assert!(mismatch(b"MOZILLA/5.0", false, false), "the claim in any case");
        assert!(!mismatch(b"Mozilla", false, false) && !mismatch(b"Mozilla-5.0", false, false));
    }
}
