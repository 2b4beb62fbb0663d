//! HTTP/1.x request-head parsing, robust to hostile input.
//!
//! The bytes come from sockets we only observe: any of them may be garbage, truncated, or
//! crafted. Everything here is bounds-checked and never panics; a head we cannot read is an
//! error with a stable reason, so the caller can count it and resynchronise.
//!
//! Where HTTP leaves a choice, we follow what Synapse's HTTP server (Twisted) does, so that
//! what we account for is what the homeserver actually served: a head it would refuse with
//! 400 (invalid header line, both `Content-Length` and `Transfer-Encoding`, ...) is an error
//! here too.

use std::fmt;
use std::mem::MaybeUninit;
use std::sync::LazyLock;

use memchr::memmem::Finder;

/// A head larger than this is refused (counted as a parse failure by the caller).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How many headers we first make room for: real clients send 10 to 40.
const HEADERS_FIRST_TRY: usize = 128;
/// The most headers we accept; beyond this a head is refused rather than parsed with an
/// ever larger array.
const HEADERS_MAX: usize = 512;

/// Index just past the end of the request head ("\r\n\r\n"; also accept "\n\n"), if present in buf.
///
/// Empty lines before the request line are part of the head (RFC 9112 §2.2 asks servers to
/// ignore them; clients send a stray CRLF after a body), so they do not end it. The head
/// ends at the first empty line after that, whether lines end in CRLF or bare LF, exactly
/// where `httparse` stops.
///
/// The blank line is found with `memchr`'s vectorised substring search: a byte loop was a
/// fifth of the agent's CPU under load, and a search for each line end in turn still about
/// 6 % of its instructions. (The tracker frames here only the heads [`parse_whole_head`]
/// does not read.)
pub fn head_end(buf: &[u8]) -> Option<usize> {
    static CRLF_BLANK: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\r\n"));
    static LF_BLANK: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\n"));
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let rest = buf.get(start..)?;
    // The blank line is the earlier of the two; both cannot start at the same '\n', and a
    // "\n\n" before the first "\n\r\n" lies within it and the bytes before.
    let crlf = CRLF_BLANK.find(rest);
    let before_crlf = crlf.and_then(|i| rest.get(..=i)).unwrap_or(rest);
    match (LF_BLANK.find(before_crlf), crlf) {
        (Some(lf), _) => start.checked_add(lf)?.checked_add(2),
        (None, Some(crlf)) => start.checked_add(crlf)?.checked_add(3),
        (None, None) => None,
    }
}

/// True when buf plausibly begins a request line: an HTTP method token (uppercase ASCII
/// letters, 3..=10 chars) followed by a space. Used to resynchronise after garbage.
///
/// On partial input, a run of 1..=10 uppercase letters with nothing after it is accepted:
/// it may still become a method once more bytes arrive, and rejecting it would desynchronise
/// a connection whose request was merely split. An empty buffer gives nothing to judge and
/// returns false.
pub fn looks_like_request_start(buf: &[u8]) -> bool {
    const MAX_METHOD: usize = 10;
    let letters = buf.iter().take(MAX_METHOD + 1).take_while(|b| b.is_ascii_uppercase()).count();
    match buf.get(letters) {
        None => (1..=MAX_METHOD).contains(&letters),
        Some(b' ') => (3..=MAX_METHOD).contains(&letters),
        Some(_) => false,
    }
}

/// What the accounting needs from a request head; every slice borrows the input buffer.
///
/// `Debug` is written by hand: it redacts `authorization` and `query`, which carry access
/// tokens, so a head can be logged safely.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// Request target up to '?' or '#', still percent-encoded; absolute-form targets are
    /// reduced to their path ("/" when they have none).
    pub path: &'a str,
    /// Between '?' and '#', "" when none. May hold an `access_token`.
    pub query: &'a str,
    /// HTTP/1.x.
    pub minor_version: u8,
    /// Raw value of the first `Authorization` header.
    pub authorization: Option<&'a [u8]>,
    /// Raw value of the first `User-Agent` header.
    pub user_agent: Option<&'a [u8]>,
    /// Raw value of the first `X-Forwarded-For` header.
    pub forwarded_for: Option<&'a [u8]>,
    /// The body length when the body is delimited by `Content-Length`.
    pub content_length: Option<u64>,
    /// The body is chunked: `chunked` is the last transfer coding.
    pub chunked: bool,
    /// The connection ends after this exchange: `Connection: close`, or HTTP/1.0 without
    /// `Connection: keep-alive`.
    pub connection_close: bool,
    /// `Expect: 100-continue`: the body follows only after the server's interim response.
    pub expect_continue: bool,
    /// A `Sec-Fetch-Mode` or `Origin` header: what every browser's `fetch` sends to a
    /// homeserver on another origin, and what a script claiming a browser's user agent
    /// usually forgets (the detector's client fingerprint; only this bit is kept).
    pub browser_fetch: bool,
}

impl fmt::Debug for RequestHead<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |present: bool| if present { "<redacted>" } else { "" };
        f.debug_struct("RequestHead")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &redacted(!self.query.is_empty()))
            .field("minor_version", &self.minor_version)
            .field("authorization", &self.authorization.map(|_| "<redacted>"))
            .field("user_agent", &self.user_agent.map(String::from_utf8_lossy))
            .field("forwarded_for", &self.forwarded_for.map(String::from_utf8_lossy))
            .field("content_length", &self.content_length)
            .field("chunked", &self.chunked)
            .field("connection_close", &self.connection_close)
            .field("expect_continue", &self.expect_continue)
            .field("browser_fetch", &self.browser_fetch)
            .finish()
    }
}

/// Why a head could not be read. Carries no input bytes, so it is safe to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// No empty line ends the head in the buffer given.
    Incomplete,
    /// The head is longer than [`MAX_HEAD_BYTES`].
    TooLarge,
    /// The request line is not `method SP target SP version`.
    BadRequestLine,
    /// The request target is not UTF-8.
    NotUtf8Target,
    /// Not HTTP/1.0 or HTTP/1.1 (HTTP/2's preface lands here).
    BadVersion,
    /// A header line has an invalid name or a control byte in its value.
    BadHeader,
    /// More than 512 headers.
    TooManyHeaders,
    /// A `Content-Length` that is not a decimal number fitting in 64 bits.
    BadContentLength,
    /// `Content-Length` headers that disagree, or both `Content-Length` and
    /// `Transfer-Encoding`: the body length is ambiguous (the request-smuggling pattern).
    ConflictingLength,
    /// `Transfer-Encoding` whose last coding is not `chunked`: the body length cannot be
    /// known (RFC 9112 §6.3).
    BadTransferEncoding,
}

impl HeadError {
    /// Every variant, so that each reason can be exported at zero before it happens.
    pub const ALL: [HeadError; 10] = [
        HeadError::Incomplete,
        HeadError::TooLarge,
        HeadError::BadRequestLine,
        HeadError::NotUtf8Target,
        HeadError::BadVersion,
        HeadError::BadHeader,
        HeadError::TooManyHeaders,
        HeadError::BadContentLength,
        HeadError::ConflictingLength,
        HeadError::BadTransferEncoding,
    ];

    /// Short snake_case name, stable: used as a metric label value.
    pub fn reason(self) -> &'static str {
        match self {
            HeadError::Incomplete => "incomplete_head",
            HeadError::TooLarge => "head_too_large",
            HeadError::BadRequestLine => "bad_request_line",
            HeadError::NotUtf8Target => "not_utf8_target",
            HeadError::BadVersion => "bad_version",
            HeadError::BadHeader => "bad_header",
            HeadError::TooManyHeaders => "too_many_headers",
            HeadError::BadContentLength => "bad_content_length",
            HeadError::ConflictingLength => "conflicting_length",
            HeadError::BadTransferEncoding => "bad_transfer_encoding",
        }
    }
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            HeadError::Incomplete => "request head is incomplete",
            HeadError::TooLarge => "request head exceeds 64 KiB",
            HeadError::BadRequestLine => "malformed request line",
            HeadError::NotUtf8Target => "request target is not UTF-8",
            HeadError::BadVersion => "unsupported HTTP version (expected HTTP/1.0 or HTTP/1.1)",
            HeadError::BadHeader => "malformed header line",
            HeadError::TooManyHeaders => "more than 512 headers",
            HeadError::BadContentLength => "invalid Content-Length",
            HeadError::ConflictingLength => "ambiguous body length (Content-Length conflict)",
            HeadError::BadTransferEncoding => "Transfer-Encoding does not end in chunked",
        };
        f.write_str(text)
    }
}

impl std::error::Error for HeadError {}

/// Parse a complete head (buf[..head_end]); bytes after the head are ignored.
///
/// Headers are matched case-insensitively. When a header that should be single appears
/// several times, the first is used, except `Content-Length` (all must agree).
pub fn parse_head(buf: &[u8]) -> Result<RequestHead<'_>, HeadError> {
    match head_end(buf) {
        // parse_framed_head refuses a head over MAX_HEAD_BYTES.
        Some(end) => parse_framed_head(buf.get(..end).ok_or(HeadError::Incomplete)?),
        None if buf.len() > MAX_HEAD_BYTES => Err(HeadError::TooLarge),
        None => Err(HeadError::Incomplete),
    }
}

/// Parse a head the caller already framed: `head` ends just past its blank line (as
/// [`head_end`] found it). The connection tracker frames the heads [`parse_whole_head`] does
/// not read, so this spares it a second scan for the blank line.
pub fn parse_framed_head(head: &[u8]) -> Result<RequestHead<'_>, HeadError> {
    if head.len() > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    // The common case fits on the stack; only pathological heads pay for the larger array.
    // Left uninitialised: zeroing 128 headers (4 KiB) was a twentieth of the agent's CPU
    // under load, and httparse writes only the headers it returns.
    let mut headers = [const { MaybeUninit::uninit() }; HEADERS_FIRST_TRY];
    match parse_with(head, &mut headers, false) {
        Err(HeadError::TooManyHeaders) => {
            let mut headers = vec![MaybeUninit::uninit(); HEADERS_MAX];
            parse_with(head, &mut headers, false)
        }
        other => other,
    }
}

/// A whole, well-formed head at the start of `buf`, framed and parsed in one pass: its end
/// (what [`head_end`] finds) and what [`parse_framed_head`] returns for the bytes up to it.
/// `None` when the strict parse does not complete (a partial or refused head, more than
/// [`HEADERS_FIRST_TRY`] headers) or the head is refused anyway (too large, an ambiguous body
/// length): the caller then frames and parses as for any head, and gets the reason.
///
/// The ends agree because a head the strict parse completes is empty lines, then lines that
/// neither hold a '\n' nor start with '\r' or '\n', each ended by "\r\n" or "\n", then an
/// empty line: the first line end followed by an empty line is its last. Framing first cost
/// a scan of every head for its blank line, about 6 % of the agent's instructions.
pub fn parse_whole_head(buf: &[u8]) -> Option<(usize, RequestHead<'_>)> {
    let mut headers = [const { MaybeUninit::uninit() }; HEADERS_FIRST_TRY];
    let mut req = httparse::Request::new(&mut []);
    let Ok(httparse::Status::Complete(end)) = req.parse_with_uninit_headers(buf, &mut headers) else {
        return None;
    };
    if end > MAX_HEAD_BYTES {
        return None;
    }
    Some((end, read_fields(&req).ok()?))
}

/// `lenient`: skip header lines whose value holds a control byte instead of refusing the
/// head. Twisted (Synapse) serves such requests (only NUL, CR and LF in a value, or a bad
/// header name, get a 400), so refusing them would let a client hide its requests from
/// per-token accounting by adding one header such as `X-A: \x01`.
fn parse_with<'b>(
    head: &'b [u8],
    headers: &mut [MaybeUninit<httparse::Header<'b>>],
    lenient: bool,
) -> Result<RequestHead<'b>, HeadError> {
    let mut req = httparse::Request::new(&mut []);
    let parsed = if lenient {
        httparse::ParserConfig::default()
            .ignore_invalid_headers_in_requests(true)
            .parse_request_with_uninit_headers(&mut req, head, headers)
    } else {
        req.parse_with_uninit_headers(head, headers)
    };
    match parsed {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Incomplete),
        Err(httparse::Error::HeaderValue) if !lenient && !head.contains(&0) => {
            return parse_with(head, headers, true);
        }
        Err(e) => return Err(map_error(e, head)),
    }
    read_fields(&req)
}

/// What the accounting needs from a request httparse completed.
fn read_fields<'b>(req: &httparse::Request<'_, 'b>) -> Result<RequestHead<'b>, HeadError> {
    let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version) else {
        return Err(HeadError::BadRequestLine);
    };
    let (path, query) = split_target(target);
    let mut out = RequestHead {
        method,
        path,
        query,
        minor_version,
        authorization: None,
        user_agent: None,
        forwarded_for: None,
        content_length: None,
        chunked: false,
        connection_close: false,
        expect_continue: false,
        browser_fetch: false,
    };
    let mut transfer_encoding = false;
    let mut keep_alive = false;
    for h in req.headers.iter() {
        let Some(field) = Field::of(h.name.as_bytes()) else { continue };
        match field {
            Field::Authorization => {
                out.authorization.get_or_insert(h.value);
            }
            Field::UserAgent => {
                out.user_agent.get_or_insert(h.value);
            }
            Field::ForwardedFor => {
                out.forwarded_for.get_or_insert(h.value);
            }
            Field::ContentLength => {
                let n = parse_content_length(h.value)?;
                if out.content_length.is_some_and(|prev| prev != n) {
                    return Err(HeadError::ConflictingLength);
                }
                out.content_length = Some(n);
            }
            Field::TransferEncoding => {
                // Codings accumulate across headers; only the last one frames the body.
                if let Some(last) = list_items(h.value).last() {
                    transfer_encoding = true;
                    out.chunked = last.eq_ignore_ascii_case(b"chunked");
                }
            }
            Field::Connection => {
                for token in list_items(h.value) {
                    out.connection_close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            }
            Field::Expect => {
                out.expect_continue |= trim(h.value).eq_ignore_ascii_case(b"100-continue");
            }
            Field::BrowserFetch => out.browser_fetch = true,
        }
    }
    if transfer_encoding {
        if !out.chunked {
            return Err(HeadError::BadTransferEncoding);
        }
        if out.content_length.is_some() {
            return Err(HeadError::ConflictingLength);
        }
    }
    if minor_version == 0 && !keep_alive {
        out.connection_close = true;
    }
    Ok(out)
}

/// The headers a head is read for; every other header is skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Authorization,
    UserAgent,
    ForwardedFor,
    ContentLength,
    TransferEncoding,
    Connection,
    Expect,
    /// `Sec-Fetch-Mode` or `Origin` (see [`RequestHead::browser_fetch`]).
    BrowserFetch,
}

/// The one list of the names read, lowercase (names match in any case).
const FIELDS: [(&str, Field); 9] = [
    ("authorization", Field::Authorization),
    ("user-agent", Field::UserAgent),
    ("x-forwarded-for", Field::ForwardedFor),
    ("content-length", Field::ContentLength),
    ("transfer-encoding", Field::TransferEncoding),
    ("connection", Field::Connection),
    ("expect", Field::Expect),
    ("sec-fetch-mode", Field::BrowserFetch),
    ("origin", Field::BrowserFetch),
];

/// Header names are compared in blocks of this many bytes, zero-padded: longer than every
/// name in [`FIELDS`].
const NAME_BLOCK: usize = 32;
/// Names of one length in [`FIELDS`], at most.
const FIELDS_PER_LEN: usize = 2;

/// A name of [`FIELDS`], zero-padded to a block, and its field.
type Known = ([u8; NAME_BLOCK], Field);

/// [`FIELDS`] by name length, built from the list at compile time. A header name is folded
/// to lowercase once, in a block, and compared whole with the one or two names of its length:
/// comparing it byte by byte with all nine names was about 7 % of the agent's instructions.
const FIELDS_BY_LEN: [[Option<Known>; FIELDS_PER_LEN]; NAME_BLOCK] = {
    let mut table: [[Option<Known>; FIELDS_PER_LEN]; NAME_BLOCK] = [[None; FIELDS_PER_LEN]; NAME_BLOCK];
    let mut i = 0;
    while i < FIELDS.len() {
        let (name, field) = (FIELDS[i].0.as_bytes(), FIELDS[i].1);
        let mut block = [0u8; NAME_BLOCK];
        let mut b = 0;
        while b < name.len() {
            assert!(!name[b].is_ascii_uppercase(), "FIELDS names are lowercase");
            block[b] = name[b];
            b += 1;
        }
        let slots = &mut table[name.len()];
        let mut s = 0;
        while s < FIELDS_PER_LEN && slots[s].is_some() {
            s += 1;
        }
        assert!(s < FIELDS_PER_LEN, "more FIELDS names of one length than FIELDS_PER_LEN");
        slots[s] = Some((block, field));
        i += 1;
    }
    table
};

impl Field {
    /// The field a header name is, in any case.
    fn of(name: &[u8]) -> Option<Field> {
        let candidates = FIELDS_BY_LEN.get(name.len())?;
        if candidates.iter().all(Option::is_none) {
            return None;
        }
        let mut folded = [0u8; NAME_BLOCK];
        folded.get_mut(..name.len())?.copy_from_slice(name);
        folded.make_ascii_lowercase();
        candidates.iter().flatten().find(|(known, _)| *known == folded).map(|&(_, field)| field)
    }
}

/// httparse reports a non-UTF-8 target as a bad token; tell the two apart by looking at the
/// request line again (only on this error path).
fn map_error(e: httparse::Error, head: &[u8]) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
        httparse::Error::Version => HeadError::BadVersion,
        httparse::Error::HeaderName | httparse::Error::HeaderValue => HeadError::BadHeader,
        httparse::Error::Token if target_is_not_utf8(head) => HeadError::NotUtf8Target,
        httparse::Error::Token | httparse::Error::NewLine | httparse::Error::Status => HeadError::BadRequestLine,
    }
}

fn target_is_not_utf8(head: &[u8]) -> bool {
    let line = head.iter().position(|&b| b != b'\r' && b != b'\n').and_then(|start| head.get(start..)).unwrap_or(&[]);
    let line = line.split(|&b| b == b'\n').next().unwrap_or(&[]);
    line.split(|&b| b == b' ').nth(1).is_some_and(|target| std::str::from_utf8(target).is_err())
}

/// Split a request target into (path, query), reducing absolute-form to origin-form.
fn split_target(target: &str) -> (&str, &str) {
    let (rest, absolute) = match strip_scheme_and_authority(target) {
        Some(rest) => (rest, true),
        None => (target, false),
    };
    // '?' and '#' are ASCII, so the bytes found are char boundaries; searched as bytes, with
    // memchr, rather than as chars (a char search, with a search for "://" first, was about
    // 5 % of the agent's instructions).
    let (path, query) = match memchr::memchr2(b'?', b'#', rest.as_bytes()).and_then(|i| rest.split_at_checked(i)) {
        Some((path, after)) => match after.strip_prefix('?') {
            Some(query) => (path, split_ascii(query, b'#').map_or(query, |(query, _)| query)),
            None => (path, ""),
        },
        None => (rest, ""),
    };
    let path = if path.is_empty() && absolute { "/" } else { path };
    (path, query)
}

/// For an absolute-form target ("scheme://authority/path?q"), what follows the authority.
fn strip_scheme_and_authority(target: &str) -> Option<&str> {
    // A scheme is a letter, then letters, digits, '+', '-' or '.': the run of those ends
    // where "://" must start (no earlier "://" can exist, ':' is not among them), so an
    // origin-form target ('/' first) is done without a search.
    let bytes = target.as_bytes();
    if !bytes.first().is_some_and(u8::is_ascii_alphabetic) {
        return None;
    }
    let scheme_len = bytes
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')))
        .unwrap_or(bytes.len());
    let rest = target.get(scheme_len..)?.strip_prefix("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest.get(authority_end..)
}

/// Strict decimal (RFC 9110 §8.6), tolerating a list of identical values ("5, 5") as the RFC
/// allows.
fn parse_content_length(value: &[u8]) -> Result<u64, HeadError> {
    let mut result = None;
    for item in value.split(|&b| b == b',') {
        let item = trim(item);
        if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
            return Err(HeadError::BadContentLength);
        }
        let n = item.iter().try_fold(0u64, |acc, &d| acc.checked_mul(10)?.checked_add(u64::from(d.wrapping_sub(b'0'))));
        let n = n.ok_or(HeadError::BadContentLength)?;
        if result.is_some_and(|prev| prev != n) {
            return Err(HeadError::ConflictingLength);
        }
        result = Some(n);
    }
    result.ok_or(HeadError::BadContentLength)
}

/// Non-empty, trimmed elements of a comma-separated header list (RFC 9110 §5.6.1).
fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(trim).filter(|item| !item.is_empty())
}

fn trim(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !is_ows(b)).map_or(start, |i| i.saturating_add(1));
    bytes.get(start..end).unwrap_or(&[])
}

/// Iterate over raw (still percent-encoded) query pairs "a=b&c" -> ("a","b"), ("c","").
/// Empty pairs ("a=b&&c") are skipped.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    let mut rest = Some(query);
    std::iter::from_fn(move || {
        loop {
            let query = rest?;
            let (pair, after) = split_ascii(query, b'&').map_or((query, None), |(pair, after)| (pair, Some(after)));
            rest = after;
            if !pair.is_empty() {
                return Some(split_ascii_near(pair, b'=').unwrap_or((pair, "")));
            }
        }
    })
}

/// `s.split_once(delimiter)` for an ASCII delimiter, which is always a char boundary: found
/// with memchr, several times cheaper than a char search on the strings of a request.
pub fn split_ascii(s: &str, delimiter: u8) -> Option<(&str, &str)> {
    debug_assert!(delimiter.is_ascii());
    split_around(s, memchr::memchr(delimiter, s.as_bytes())?)
}

/// [`split_ascii`] for a delimiter expected within a few bytes (the '=' after a query
/// parameter's name, the '/' after an API version): a byte loop, cheaper there than a call
/// into memchr.
pub fn split_ascii_near(s: &str, delimiter: u8) -> Option<(&str, &str)> {
    debug_assert!(delimiter.is_ascii());
    split_around(s, s.bytes().position(|b| b == delimiter)?)
}

/// What is before and after the one-byte delimiter at `at`.
fn split_around(s: &str, at: usize) -> Option<(&str, &str)> {
    let (before, from) = s.split_at_checked(at)?;
    Some((before, from.get(1..)?))
}

/// Percent-decode (and '+' → space for query values when `plus_as_space`); invalid escapes
/// are kept literally.
///
/// The output is allocated once at the input's length (decoding never grows), so a decoded
/// secret is never left behind in a buffer freed by reallocation: wrapping the result in
/// `Zeroizing` erases the only copy.
pub fn percent_decode(input: &[u8], plus_as_space: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while let Some(&b) = input.get(i) {
        let escaped = match (b, input.get(i.wrapping_add(1)), input.get(i.wrapping_add(2))) {
            (b'%', Some(&hi), Some(&lo)) => hex_value(hi).zip(hex_value(lo)),
            _ => None,
        };
        match escaped {
            Some((hi, lo)) => {
                out.push(hi << 4 | lo);
                i = i.saturating_add(3);
            }
            None => {
                out.push(if b == b'+' && plus_as_space { b' ' } else { b });
                i = i.saturating_add(1);
            }
        }
    }
    out
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head as Element Web sends it through a reverse proxy: 40 headers before the
    /// Authorization header, which comes last.
    fn element_head(target: &str) -> Vec<u8> {
        let mut h = format!("GET {target} HTTP/1.1\r\nHost: matrix.example.org\r\n");
        h.push_str("User-Agent: Mozilla/5.0 (X11; Linux x86_64) Element/1.11.85\r\n");
        h.push_str("X-Forwarded-For: 203.0.113.7, 10.0.0.1\r\n");
        h.push_str("Accept: application/json\r\nAccept-Language: en-US,en;q=0.5\r\n");
        h.push_str("Accept-Encoding: gzip, deflate, br\r\nOrigin: https://app.element.io\r\n");
        for i in 0..34 {
            h.push_str(&format!("X-Extra-{i}: value-{i}\r\n"));
        }
        h.push_str("authorization: Bearer syt_YWxpY2U_secret_123\r\n\r\n");
        h.into_bytes()
    }

    #[test]
    fn a_framed_head_parses_exactly_as_the_whole_buffer_does() {
        let mut many = b"GET /x HTTP/1.1\r\n".to_vec();
        for i in 0..HEADERS_FIRST_TRY + 5 {
            many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"Authorization: Bearer t\r\n\r\n");
        let heads: Vec<Vec<u8>> = vec![
            element_head("/_matrix/client/v3/rooms/!r:x/messages?dir=b&limit=30"),
            b"POST /_matrix/client/v3/keys/upload HTTP/1.1\r\nCONTENT-LENGTH: 5\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_vec(),
            b"PUT /p HTTP/1.0\r\nconnection: Keep-Alive\r\nEXPECT: 100-continue\r\nSec-Fetch-Mode: cors\r\nContent-Length: 3\r\n\r\n".to_vec(),
            b"GET /a HTTP/1.1\r\nX-A: \x01\r\nUser-Agent: mautrix\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n".to_vec(),
            b"GET /b HTTP/1.1\nHost: bare-lf\nAuthorization: Bearer u\n\n".to_vec(),
            b"GET /c HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".to_vec(),
            b"GET /d HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
            b"GARBAGE\r\n\r\n".to_vec(),
            many,
        ];
        for head in heads {
            let mut buf = head.clone();
            buf.extend_from_slice(b"body bytes GET /next HTTP/1.1\r\n\r\n");
            let end = head_end(&buf).expect("a whole head");
            assert_eq!(end, head.len());
            assert_eq!(parse_framed_head(&buf[..end]), parse_head(&buf), "{}", String::from_utf8_lossy(&head));
        }
        let huge = [b'a'; MAX_HEAD_BYTES + 1];
        assert_eq!(parse_framed_head(&huge), Err(HeadError::TooLarge));
    }

    #[test]
    fn head_end_is_just_past_the_crlf_blank_line() {
        let buf = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY";
        assert_eq!(head_end(buf), Some(buf.len() - 4));
    }

    #[test]
    fn head_end_accepts_bare_lf_line_endings() {
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\nBODY"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\nX"), Some(26));
    }

    /// The substring searches against the definition they replace: the first line end, after
    /// the leading empty lines, followed by an empty line.
    #[test]
    fn head_end_is_the_first_empty_line_after_the_leading_ones() {
        fn by_lines(buf: &[u8]) -> Option<usize> {
            let start = buf.iter().position(|&b| b != b'\r' && b != b'\n')?;
            (start..buf.len()).filter(|&i| buf[i] == b'\n').find_map(|nl| match &buf[nl + 1..] {
                [b'\n', ..] => Some(nl + 2),
                [b'\r', b'\n', ..] => Some(nl + 3),
                _ => None,
            })
        }
        // Every string of up to 9 bytes over "\r", "\n" and "a", then longer random ones.
        let alphabet = [b'\r', b'\n', b'a'];
        let mut buf = Vec::new();
        for len in 0..=9u32 {
            for mut n in 0..3usize.pow(len) {
                buf.clear();
                for _ in 0..len {
                    buf.push(alphabet[n % 3]);
                    n /= 3;
                }
                assert_eq!(head_end(&buf), by_lines(&buf), "{buf:?}");
            }
        }
        let mut x: u32 = 0x9e37_79b9;
        for _ in 0..20_000 {
            buf.clear();
            for _ in 0..(x % 200) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                buf.push(if x % 16 < 3 { alphabet[(x >> 8) as usize % 2] } else { b'a' });
            }
            assert_eq!(head_end(&buf), by_lines(&buf), "{buf:?}");
        }
    }

    /// Framed and parsed at once, a head gets the end `head_end` finds and what
    /// `parse_framed_head` reads up to it; heads it does not read go the usual way.
    #[test]
    fn a_whole_head_read_at_once_is_framed_and_parsed_as_usual() {
        let starts: [&[u8]; 4] =
            [b"GET /_matrix/client/v3/sync?since=s1 HTTP/1.1", b"POST /p HTTP/1.0", b"GET", b"\x16\x03"];
        let headers: [&[u8]; 10] = [
            b"Host: h",
            b"Authorization: Bearer syt_a",
            b"Content-Length: 3",
            b"Content-Length: 4",
            b"Transfer-Encoding: chunked",
            b"X-A: \x01",
            b"Bad Name: x",
            b" folded",
            b"\r",
            b"Connection: close, Keep-Alive",
        ];
        let ends: [&[u8]; 4] = [b"\r\n", b"\n", b"\r", b""];
        let tails: [&[u8]; 3] = [b"", b"body{}", b"GET /b HTTP/1.1\r\n\r\n"];
        let mut x: u32 = 0x1234_5678;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as usize % n
        };
        let (mut read, mut tried) = (0, 0);
        while tried < 100_000 {
            tried += 1;
            let mut buf = Vec::new();
            for _ in 0..next(3) {
                buf.extend_from_slice(ends[next(2)]);
            }
            // Mostly well-formed line ends, now and then a bare '\r' or none.
            let eol = [0, 0, 0, 1, 1, 2, 3];
            buf.extend_from_slice(starts[next(10).min(3)]);
            buf.extend_from_slice(ends[eol[next(7)]]);
            for _ in 0..next(5) {
                buf.extend_from_slice(headers[next(16).min(9)]);
                buf.extend_from_slice(ends[eol[next(7)]]);
            }
            buf.extend_from_slice(ends[eol[next(7)]]);
            buf.extend_from_slice(tails[next(3)]);
            if let Some((end, head)) = parse_whole_head(&buf) {
                read += 1;
                assert_eq!(head_end(&buf), Some(end), "{:?}", String::from_utf8_lossy(&buf));
                assert_eq!(parse_framed_head(&buf[..end]), Ok(head), "{:?}", String::from_utf8_lossy(&buf));
            }
        }
        assert!(read > 2_000, "{read} of {tried}");
        let huge = element_head("/x").into_iter().chain(std::iter::repeat_n(b'a', MAX_HEAD_BYTES)).collect::<Vec<_>>();
        assert_eq!(parse_whole_head(&huge).map(|(end, _)| end), head_end(&huge));
    }

    #[test]
    fn truncated_head_has_no_end() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r"), None);
        assert_eq!(head_end(b""), None);
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n"), Err(HeadError::Incomplete));
    }

    #[test]
    fn leading_empty_lines_do_not_end_the_head() {
        let buf = b"\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(head_end(buf), Some(buf.len()));
        assert_eq!(parse_head(buf).map(|h| h.path), Ok("/"));
        assert_eq!(head_end(b"\r\n\r\n"), None);
    }

    #[test]
    fn request_start_is_an_uppercase_method_and_a_space() {
        assert!(looks_like_request_start(b"GET /sync HTTP/1.1"));
        assert!(looks_like_request_start(b"OPTIONS * HTTP/1.1"));
        assert!(looks_like_request_start(b"PROPFIND / HTTP/1.1"));
        assert!(!looks_like_request_start(b"get / HTTP/1.1"));
        assert!(!looks_like_request_start(b"GE / HTTP/1.1"));
        assert!(!looks_like_request_start(b"VERYLONGMETHOD / HTTP/1.1"));
        assert!(!looks_like_request_start(b"\x16\x03\x01\x02\x00"));
        assert!(!looks_like_request_start(b"{\"json\":1}"));
        assert!(!looks_like_request_start(b""));
    }

    #[test]
    fn a_partial_method_may_still_become_a_request_start() {
        assert!(looks_like_request_start(b"G"));
        assert!(looks_like_request_start(b"GE"));
        assert!(looks_like_request_start(b"OPTIONSXYZ"));
        assert!(!looks_like_request_start(b"OPTIONSXYZW"));
        assert!(!looks_like_request_start(b"GE\r"));
    }

    #[test]
    fn element_request_with_authorization_after_forty_headers_is_parsed() {
        let buf = element_head("/_matrix/client/v3/sync?timeout=30000&since=s72594_4483");
        let head = parse_head(&buf).expect("parses");
        assert_eq!(head.method, "GET");
        assert_eq!(head.path, "/_matrix/client/v3/sync");
        assert_eq!(head.query, "timeout=30000&since=s72594_4483");
        assert_eq!(head.minor_version, 1);
        assert_eq!(head.authorization, Some(&b"Bearer syt_YWxpY2U_secret_123"[..]));
        assert_eq!(head.user_agent, Some(&b"Mozilla/5.0 (X11; Linux x86_64) Element/1.11.85"[..]));
        assert_eq!(head.forwarded_for, Some(&b"203.0.113.7, 10.0.0.1"[..]));
        assert_eq!(head.content_length, None);
        assert!(!head.chunked && !head.connection_close && !head.expect_continue);
    }

    #[test]
    fn nio_style_post_with_body_reports_its_length_and_ignores_the_body() {
        let buf = b"PUT /_matrix/client/r0/rooms/%21a%3Ab/send/m.room.message/t1 HTTP/1.1\r\n\
            Host: h\r\nUser-Agent: nio\r\nContent-Type: application/json\r\n\
            Content-Length: 17\r\nAuthorization: Bearer tok\r\n\r\n{\"body\":\"hello\"}";
        let head = parse_head(buf).expect("parses");
        assert_eq!(head.method, "PUT");
        assert_eq!(head.content_length, Some(17));
        assert_eq!(head.authorization, Some(&b"Bearer tok"[..]));
    }

    #[test]
    fn keep_alive_heads_are_parsed_one_after_another() {
        let two = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n";
        let first_end = head_end(two).expect("first head");
        assert_eq!(parse_head(two).map(|h| h.path), Ok("/a"));
        let rest = two.get(first_end..).expect("second head");
        assert_eq!(parse_head(rest).map(|h| h.path), Ok("/b"));
    }

    #[test]
    fn http_1_0_closes_unless_keep_alive_is_asked() {
        let close = parse_head(b"GET / HTTP/1.0\r\n\r\n").expect("parses");
        assert!(close.connection_close);
        let kept = parse_head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").expect("parses");
        assert!(!kept.connection_close);
        let closed = parse_head(b"GET / HTTP/1.1\r\nConnection: upgrade, CLOSE\r\n\r\n").expect("parses");
        assert!(closed.connection_close);
    }

    #[test]
    fn expect_continue_is_recognised() {
        let head = parse_head(b"POST /u HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 9\r\n\r\n");
        assert!(head.expect("parses").expect_continue);
    }

    #[test]
    fn absolute_form_targets_are_reduced_to_path_and_query() {
        let p = |t: &str| {
            let buf = format!("GET {t} HTTP/1.1\r\n\r\n").into_bytes();
            parse_head(&buf).map(|h| (h.path.to_owned(), h.query.to_owned()))
        };
        let pq = |a: &str, b: &str| Ok((a.to_owned(), b.to_owned()));
        assert_eq!(p("http://m.example.org/_matrix/client/v3/sync?since=1"), pq("/_matrix/client/v3/sync", "since=1"));
        assert_eq!(p("HTTPS://m.example.org:8448/x"), pq("/x", ""));
        assert_eq!(p("http://m.example.org"), pq("/", ""));
        assert_eq!(p("http://m.example.org?q=1"), pq("/", "q=1"));
        assert_eq!(p("/p?q=1#frag"), pq("/p", "q=1"));
        assert_eq!(p("*"), pq("*", ""));
        assert_eq!(p("/redirect?to=http://x/y"), pq("/redirect", "to=http://x/y"));
    }

    /// The byte searches against the plain reading of RFC 9112 §3.2 they replace: the first
    /// "://" after a valid scheme, then the fragment, then the query, by chars.
    #[test]
    fn targets_split_as_by_their_plain_reading() {
        fn by_chars(target: &str) -> (&str, &str) {
            let absolute = target.split_once("://").and_then(|(scheme, rest)| {
                let mut chars = scheme.chars();
                let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
                    && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
                valid.then(|| rest.get(rest.find(['/', '?', '#']).unwrap_or(rest.len())..)).flatten()
            });
            let rest = absolute.unwrap_or(target);
            let (before_fragment, _) = rest.split_once('#').unwrap_or((rest, ""));
            let (path, query) = before_fragment.split_once('?').unwrap_or((before_fragment, ""));
            (if path.is_empty() && absolute.is_some() { "/" } else { path }, query)
        }
        let parts = ["", "/", "?", "#", "://", ":", "a", "h+t.p-s", "1x", "é", "/p", "q=1", "x://y", "%3F"];
        let mut n = 0;
        for a in parts {
            for b in parts {
                for c in parts {
                    let target = format!("{a}{b}{c}");
                    assert_eq!(split_target(&target), by_chars(&target), "{target:?}");
                    n += 1;
                }
            }
        }
        assert_eq!(n, parts.len().pow(3));
    }

    #[test]
    fn every_field_is_found_by_its_name_in_any_case_and_nothing_else_is() {
        for (name, field) in FIELDS {
            assert_eq!(Field::of(name.as_bytes()), Some(field), "{name}");
            assert_eq!(Field::of(name.to_ascii_uppercase().as_bytes()), Some(field), "{name}");
            let mut near = name.as_bytes().to_vec();
            near[0] ^= 1;
            assert_eq!(Field::of(&near), None, "{name}");
            assert_eq!(Field::of(&name.as_bytes()[1..]), None, "{name}");
        }
        for other in ["", "host", "accept", "content-type", "accept-language", "sec-fetch-site", "x-forwarded-forx"] {
            assert_eq!(Field::of(other.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn malformed_request_lines_are_refused() {
        assert_eq!(parse_head(b"GET\r\n\r\n"), Err(HeadError::BadRequestLine));
        assert_eq!(parse_head(b"GET  HTTP/1.1\r\n\r\n"), Err(HeadError::BadRequestLine));
        assert_eq!(parse_head(b"G(T / HTTP/1.1\r\n\r\n"), Err(HeadError::BadRequestLine));
        assert_eq!(parse_head(b"GET / HTTP/2.0\r\n\r\n"), Err(HeadError::BadVersion));
        assert_eq!(parse_head(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Err(HeadError::BadVersion));
        assert_eq!(parse_head(b"GET / FTP/1.1\r\n\r\n"), Err(HeadError::BadVersion));
    }

    #[test]
    fn a_non_utf8_target_is_its_own_error() {
        assert_eq!(parse_head(b"GET /\xff\xfe HTTP/1.1\r\n\r\n"), Err(HeadError::NotUtf8Target));
    }

    #[test]
    fn nul_bytes_are_refused_wherever_they_are() {
        assert_eq!(parse_head(b"GET /\0 HTTP/1.1\r\n\r\n"), Err(HeadError::BadRequestLine));
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nA: b\0c\r\n\r\n"), Err(HeadError::BadHeader));
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nA\0: b\r\n\r\n"), Err(HeadError::BadHeader));
        assert!(parse_head(b"\0\0\0\0\n\n").is_err());
    }

    #[test]
    fn a_megabyte_of_garbage_is_refused_without_panicking() {
        let mut garbage = vec![0u8; 1 << 20];
        let mut x: u32 = 0x1234_5678;
        for b in garbage.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x.to_le_bytes()[0];
        }
        assert!(parse_head(&garbage).is_err());
        let _ = head_end(&garbage);
        let _ = looks_like_request_start(&garbage);
        assert_eq!(parse_head(&vec![b'A'; 1 << 20]), Err(HeadError::TooLarge));
    }

    #[test]
    fn heads_over_the_limit_are_too_large_even_when_complete() {
        let mut buf = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        buf.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        buf.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_head(&buf), Err(HeadError::TooLarge));
    }

    #[test]
    fn header_values_with_obs_text_are_kept_raw_and_names_match_any_case() {
        let head = parse_head(b"GET / HTTP/1.1\r\nuSeR-aGeNt: caf\xc3\xa9 \xff\tx\r\n\r\n").expect("parses");
        assert_eq!(head.user_agent, Some(&b"caf\xc3\xa9 \xff\tx"[..]));
    }

    #[test]
    fn header_lines_with_invalid_names_or_control_bytes_are_refused() {
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"), Err(HeadError::BadHeader));
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nA(b): x\r\n\r\n"), Err(HeadError::BadHeader));
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nNoColon\r\n\r\n"), Err(HeadError::BadHeader));
    }

    #[test]
    fn a_control_byte_in_a_header_value_skips_that_line_like_synapse_serves_it() {
        // Twisted answers these (200 with a valid token): refusing the head would hide the
        // request from per-token accounting. The line itself is skipped.
        for ctl in [1u8, 8, 0x0b, 0x0c, 0x1f, 0x7f] {
            let mut buf = b"GET /_matrix/client/v3/sync HTTP/1.1\r\nX-Evil: a".to_vec();
            buf.push(ctl);
            buf.extend_from_slice(b"b\r\nAuthorization: Bearer syt_ok\r\n\r\n");
            let head = parse_head(&buf).unwrap_or_else(|e| panic!("{ctl:#x}: {e:?}"));
            assert_eq!(head.authorization, Some(&b"Bearer syt_ok"[..]));
            assert_eq!(head.path, "/_matrix/client/v3/sync");
        }
        // In the Authorization value itself: the token is invalid for Synapse too (401); the
        // request stays countable, without a token.
        let head = parse_head(b"GET / HTTP/1.1\r\nAuthorization: Bearer syt_\x01x\r\n\r\n").expect("parses");
        assert_eq!(head.authorization, None);
        // NUL is still refused (Twisted answers 400 to it).
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nA: \x01\0\r\n\r\n"), Err(HeadError::BadHeader));
    }

    #[test]
    fn up_to_512_headers_are_accepted_and_more_are_refused() {
        let with = |n: usize| {
            let mut h = b"GET / HTTP/1.1\r\n".to_vec();
            for i in 0..n {
                h.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
            }
            h.extend_from_slice(b"Authorization: Bearer last\r\n\r\n");
            h
        };
        let buf = with(HEADERS_MAX - 1);
        assert_eq!(parse_head(&buf).map(|h| h.authorization), Ok(Some(&b"Bearer last"[..])));
        assert_eq!(parse_head(&with(HEADERS_MAX)), Err(HeadError::TooManyHeaders));
    }

    #[test]
    fn content_length_must_be_a_plain_decimal() {
        let cl = |v: &str| {
            let buf = format!("POST / HTTP/1.1\r\nContent-Length: {v}\r\n\r\n").into_bytes();
            parse_head(&buf).map(|h| h.content_length)
        };
        assert_eq!(cl("0"), Ok(Some(0)));
        assert_eq!(cl("18446744073709551615"), Ok(Some(u64::MAX)));
        assert_eq!(cl("18446744073709551616"), Err(HeadError::BadContentLength));
        assert_eq!(cl("-1"), Err(HeadError::BadContentLength));
        assert_eq!(cl("+1"), Err(HeadError::BadContentLength));
        assert_eq!(cl("0x10"), Err(HeadError::BadContentLength));
        assert_eq!(cl(""), Err(HeadError::BadContentLength));
        assert_eq!(cl("12, 12"), Ok(Some(12)));
    }

    #[test]
    fn conflicting_content_lengths_are_refused() {
        let two = b"POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 6\r\n\r\n";
        assert_eq!(parse_head(two), Err(HeadError::ConflictingLength));
        let same = b"POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n";
        assert_eq!(parse_head(same).map(|h| h.content_length), Ok(Some(5)));
        let list = b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n";
        assert_eq!(parse_head(list), Err(HeadError::ConflictingLength));
    }

    #[test]
    fn chunked_is_the_last_transfer_coding() {
        let te = |v: &str| {
            let buf = format!("POST / HTTP/1.1\r\nTransfer-Encoding: {v}\r\n\r\n").into_bytes();
            parse_head(&buf).map(|h| h.chunked)
        };
        assert_eq!(te("chunked"), Ok(true));
        assert_eq!(te("gzip, CHUNKED"), Ok(true));
        assert_eq!(te("chunked, gzip"), Err(HeadError::BadTransferEncoding));
        assert_eq!(te("gzip"), Err(HeadError::BadTransferEncoding));
        let split = b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_head(split).map(|h| h.chunked), Ok(true));
    }

    #[test]
    fn content_length_with_transfer_encoding_is_refused() {
        let both = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_head(both), Err(HeadError::ConflictingLength));
    }

    #[test]
    fn debug_output_redacts_authorization_and_query() {
        let buf = b"GET /sync?access_token=qsecret HTTP/1.1\r\nAuthorization: Bearer hsecret\r\n\r\n";
        let shown = format!("{:?}", parse_head(buf).expect("parses"));
        assert!(!shown.contains("qsecret") && !shown.contains("hsecret"), "{shown}");
        assert!(shown.contains("/sync"));
    }

    #[test]
    fn every_error_has_a_distinct_snake_case_reason() {
        let all = HeadError::ALL;
        let reasons: std::collections::BTreeSet<_> = all.iter().map(|e| e.reason()).collect();
        assert_eq!(reasons.len(), all.len());
        for r in reasons {
            assert!(r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{r}");
        }
    }

    #[test]
    fn query_pairs_split_on_ampersand_and_first_equals() {
        let pairs: Vec<_> = query_pairs("a=b&c&&d=e=f&=g").collect();
        assert_eq!(pairs, [("a", "b"), ("c", ""), ("d", "e=f"), ("", "g")]);
        assert_eq!(query_pairs("").count(), 0);
        let parts = ["", "&", "=", "a", "é=", "b=c", "&&", "==x"];
        for a in parts {
            for b in parts {
                for c in parts {
                    let q = format!("{a}{b}{c}");
                    let by_chars: Vec<_> =
                        q.split('&').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, ""))).collect();
                    assert_eq!(query_pairs(&q).collect::<Vec<_>>(), by_chars, "{q:?}");
                    for d in [b'&', b'=', b'a'] {
                        assert_eq!(split_ascii(&q, d), q.split_once(char::from(d)), "{q:?} {d}");
                        assert_eq!(split_ascii_near(&q, d), q.split_once(char::from(d)), "{q:?} {d}");
                    }
                }
            }
        }
    }

    #[test]
    fn percent_decoding_keeps_invalid_escapes_literally() {
        assert_eq!(percent_decode(b"%21abc%3Aexample.org", false), b"!abc:example.org");
        assert_eq!(percent_decode(b"a+b%2Bc", true), b"a b+c");
        assert_eq!(percent_decode(b"a+b", false), b"a+b");
        assert_eq!(percent_decode(b"%zz%4%", false), b"%zz%4%");
        assert_eq!(percent_decode(b"%e2%9C%93", false), "✓".as_bytes());
        assert_eq!(percent_decode(b"%00", false), b"\0");
    }
}
