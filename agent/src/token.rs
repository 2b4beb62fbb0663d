//! Access-token extraction and keyed hashing into labels; raw tokens never leave this module.
//!
//! A token is turned into a [`TokenLabel`] with a keyed hash: labels are stable across
//! restarts (the key lives in a file) so time series continue, yet nobody reading the
//! metrics can test a guessed or leaked token against them without the key. Raw tokens are
//! only ever held in buffers that are zeroized on drop, and no error, log or `Debug` output
//! of this module contains one.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use zeroize::{Zeroize, Zeroizing};

use crate::http::{RequestHead, percent_decode, query_pairs};

const KEY_LEN: usize = 32;

/// BLAKE3 `derive_key` context of [`TokenKey::fingerprint`]: globally unique, fixed forever
/// (a new string would give every fleet new fingerprints).
const FINGERPRINT_CONTEXT: &str = "vigie 2026-12-01 token key fingerprint v1";

/// 16 lowercase hex characters naming a key without revealing it (see [`TokenKey::fingerprint`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct KeyFingerprint([u8; 8]);

impl fmt::Display for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// The fingerprint of the key file at `path` without creating one: `None` when there is no
/// file yet; an error when the agent would refuse it (mode, size, not a file).
pub fn fingerprint_of_file(path: &Path) -> anyhow::Result<Option<KeyFingerprint>> {
    match load(path) {
        Ok(key) => Ok(Some(key.fingerprint())),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// 32-byte secret key. Zeroized on drop. Debug prints "TokenKey(..)" only.
pub struct TokenKey([u8; KEY_LEN]);

impl TokenKey {
    /// Load the key file; when it does not exist, create it with 32 random bytes, mode 0600,
    /// creating the parent directory (0700) if needed.
    ///
    /// A key file readable or writable by group or others is refused rather than fixed: it
    /// may already have leaked, and whoever holds it can link labels back to tokens. Errors
    /// name the path and the problem, never the content.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        match load(path) {
            Err(e) if is_not_found(&e) => {}
            other => return other,
        }
        match create(path) {
            Ok(key) => Ok(key),
            // Another process created it first: use theirs, so both agree on labels.
            Err(e) if is_already_exists(&e) => {
                load(path).with_context(|| format!("loading key file {}", path.display()))
            }
            Err(e) => Err(e),
        }
    }

    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        TokenKey(bytes)
    }

    /// The key's public name, exported as `vigie_key_info{fingerprint}` and printed by `vigie
    /// check`: hosts of one fleet must show the same one, or their token labels differ.
    ///
    /// It is BLAKE3 in key-derivation mode (`derive_key`) with a context string of its own,
    /// not the keyed hash that makes labels. BLAKE3 separates the two modes by domain flags
    /// fed into every compression, so no token, chosen or guessed, hashes under the key to
    /// anything related to the fingerprint, and knowing it computes no label: that needs the
    /// key itself. Getting the key back means inverting BLAKE3 or searching 2^256 keys; the
    /// 64 bits shown tell at most 64 bits about the key, and only confirm a key already held.
    /// Two fleet keys share a fingerprint with probability 2^-64.
    pub fn fingerprint(&self) -> KeyFingerprint {
        let derived = Zeroizing::new(blake3::derive_key(FINGERPRINT_CONTEXT, &self.0));
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&derived[..8]);
        KeyFingerprint(fp)
    }

    /// BLAKE3 keyed hash of the raw token; the label is its first 8 bytes.
    pub fn label(&self, token: &[u8]) -> TokenLabel {
        let hash = blake3::keyed_hash(&self.0, token);
        let mut label = [0u8; 8];
        label.copy_from_slice(&hash.as_bytes()[..8]);
        TokenLabel(label)
    }
}

impl Drop for TokenKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == ErrorKind::NotFound)
}

fn is_already_exists(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == ErrorKind::AlreadyExists)
}

/// Read an existing key file, checking it before trusting it. A missing file comes back as
/// the bare `io::Error` (NotFound) so the caller can tell it apart.
fn load(path: &Path) -> anyhow::Result<TokenKey> {
    // O_NONBLOCK: opening a FIFO planted at the path must not hang the agent.
    let mut file = match OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(e.into()),
        other => other.with_context(|| format!("opening key file {}", path.display()))?,
    };
    let meta = file.metadata().with_context(|| format!("reading metadata of key file {}", path.display()))?;
    if !meta.is_file() {
        bail!("key file {} is not a regular file", path.display());
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o066 != 0 {
        bail!(
            "key file {} is readable or writable by group or others (mode {mode:04o}); \
             restrict it with `chmod 600`, or replace it if it may have leaked",
            path.display()
        );
    }
    if meta.len() != KEY_LEN as u64 {
        bail!(
            "key file {} is {} bytes long, expected exactly {KEY_LEN}; \
             remove it to have a new key generated",
            path.display(),
            meta.len()
        );
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    file.read_exact(&mut key[..]).with_context(|| format!("reading key file {}", path.display()))?;
    let mut extra = [0u8; 1];
    let more = file.read(&mut extra).with_context(|| format!("reading key file {}", path.display()))?;
    extra.zeroize();
    if more != 0 {
        bail!("key file {} grew while being read, expected exactly {KEY_LEN} bytes", path.display());
    }
    Ok(TokenKey(*key))
}

/// Write a fresh key under a temporary name, then hard-link it into place: the key file
/// appears whole or not at all (a crash cannot leave a truncated key that blocks the next
/// start), and an existing file is never overwritten (the link fails with AlreadyExists).
fn create(path: &Path) -> anyhow::Result<TokenKey> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating key directory {}", dir.display()))?;
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    getrandom::fill(&mut key[..]).map_err(|e| anyhow!("generating a random key: {e}"))?;

    let tmp = temp_path(path)?;
    let written = write_new(&tmp, &key[..]).and_then(|()| fs::hard_link(&tmp, path).map_err(anyhow::Error::from));
    // Best effort: the key is either linked in place or abandoned; the temporary name goes.
    let _ = fs::remove_file(&tmp);
    match written {
        Ok(()) => {}
        Err(e) if is_already_exists(&e) => return Err(e),
        Err(e) => return Err(e.context(format!("creating key file {}", path.display()))),
    }
    if let Some(dir) = parent {
        // Make the new name durable; failure only risks regenerating the key after a crash.
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(TokenKey(*key))
}

/// A name no other process uses: the pid alone is not enough, since an agent in a container
/// is pid 1 after every restart and a crash could leave that name taken.
fn temp_path(path: &Path) -> anyhow::Result<PathBuf> {
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| anyhow!("generating a temporary name: {e}"))?;
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".tmp-{}-{}", std::process::id(), TokenLabel(nonce)));
    Ok(path.with_file_name(name))
}

fn write_new(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating temporary key file {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing temporary key file {}", path.display()))
}

/// Token labels are keyed BLAKE3 output, already uniform: hashing them again is wasted work
/// and they cannot be chosen to collide.
#[derive(Default)]
pub struct LabelHasher(u64);

impl std::hash::Hasher for LabelHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            for (d, s) in w.iter_mut().zip(chunk) {
                *d = *s;
            }
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_usize(&mut self, _: usize) {
        // Only the slice length prefix of the label's array: constant, no information.
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map keyed by token label, with the hasher above.
pub type LabelMap<V> = std::collections::HashMap<TokenLabel, V, std::hash::BuildHasherDefault<LabelHasher>>;

/// A set of token labels, with the hasher above.
pub type LabelSet = std::collections::HashSet<TokenLabel, std::hash::BuildHasherDefault<LabelHasher>>;

/// A token's public name: the first 8 bytes of its keyed hash. 64 bits make collisions
/// negligible among the tokens of one homeserver while keeping labels short.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct TokenLabel(pub [u8; 8]);

impl fmt::Display for TokenLabel {
    /// Exactly 16 lowercase hex characters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl TokenLabel {
    /// The inverse of `Display`, for labels typed into configuration; upper case is
    /// accepted too.
    pub fn parse(hex: &str) -> Option<Self> {
        let digits = hex.as_bytes();
        if digits.len() != 16 {
            return None;
        }
        let mut out = [0u8; 8];
        for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let [hi, lo] = pair else { return None };
            let hi = char::from(*hi).to_digit(16)?;
            let lo = char::from(*lo).to_digit(16)?;
            *byte = u8::try_from(hi << 4 | lo).ok()?;
        }
        Some(TokenLabel(out))
    }
}

/// The access token a request carries: `Authorization: Bearer <token>` (scheme
/// case-insensitive, surrounding whitespace trimmed), else the `access_token` query
/// parameter (percent-decoded). Empty tokens count as none. The returned buffer is zeroized
/// when dropped.
///
/// "Else" means: when the Authorization header yields no token (absent, another scheme such
/// as Basic, or an empty Bearer value), the query is tried.
pub fn extract_token(head: &RequestHead<'_>) -> Option<Zeroizing<Vec<u8>>> {
    with_token(head, |token| Zeroizing::new(token.to_vec()))
}

/// Extract, hash and zeroize: the label of the request's token, if it carries one. Does not
/// copy the token unless it must be percent-decoded.
pub fn label_for_request(key: &TokenKey, head: &RequestHead<'_>) -> Option<TokenLabel> {
    with_token(head, |token| key.label(token))
}

/// Hand the request's token to `f` without keeping it: borrowed from the head when it needs
/// no decoding, otherwise decoded into a buffer zeroized right after.
fn with_token<R>(head: &RequestHead<'_>, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
    if let Some(token) = head.authorization.and_then(bearer_token) {
        return Some(f(token));
    }
    let (_, raw) = query_pairs(head.query).find(|(name, _)| is_access_token_param(name))?;
    if raw.is_empty() {
        return None;
    }
    if raw.contains(['%', '+']) {
        let decoded = Zeroizing::new(percent_decode(raw.as_bytes(), true));
        (!decoded.is_empty()).then(|| f(&decoded))
    } else {
        Some(f(raw.as_bytes()))
    }
}

/// The credentials of a `Bearer` Authorization value, if non-empty.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let split = value.iter().position(|b| b.is_ascii_whitespace()).unwrap_or(value.len());
    let (scheme, rest) = value.split_at_checked(split)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Synapse reads query names decoded, so `access%5Ftoken` is the same parameter.
fn is_access_token_param(name: &str) -> bool {
    name == "access_token" || (name.contains(['%', '+']) && percent_decode(name.as_bytes(), true) == b"access_token")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse_head;
    use std::os::unix::fs::PermissionsExt;

    fn head(buf: &[u8]) -> RequestHead<'_> {
        parse_head(buf).expect("test head parses")
    }

    fn token(buf: &[u8]) -> Option<Vec<u8>> {
        extract_token(&head(buf)).map(|t| t.to_vec())
    }

    fn tmp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vigie-token-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn bearer_token_is_taken_from_authorization() {
        let t = token(b"GET /sync HTTP/1.1\r\nAuthorization: Bearer syt_abc_123\r\n\r\n");
        assert_eq!(t.as_deref(), Some(&b"syt_abc_123"[..]));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_whitespace_is_trimmed() {
        let t = token(b"GET / HTTP/1.1\r\nauthorization:   bearer \t tok  \t\r\n\r\n");
        assert_eq!(t.as_deref(), Some(&b"tok"[..]));
        let t = token(b"GET / HTTP/1.1\r\nAuthorization: BEARER tok\r\n\r\n");
        assert_eq!(t.as_deref(), Some(&b"tok"[..]));
    }

    #[test]
    fn bearer_token_wins_over_query() {
        let t = token(b"GET /?access_token=q HTTP/1.1\r\nAuthorization: Bearer h\r\n\r\n");
        assert_eq!(t.as_deref(), Some(&b"h"[..]));
    }

    #[test]
    fn query_token_is_percent_decoded() {
        let t = token(b"GET /sync?since=1&access_token=syt%5Fa%2Bb+c HTTP/1.1\r\n\r\n");
        assert_eq!(t.as_deref(), Some(&b"syt_a+b c"[..]));
        let t = token(b"GET /sync?access%5Ftoken=plain HTTP/1.1\r\n\r\n");
        assert_eq!(t.as_deref(), Some(&b"plain"[..]));
    }

    #[test]
    fn basic_scheme_is_ignored_and_the_query_used() {
        let buf = b"GET /?access_token=q HTTP/1.1\r\nAuthorization: Basic dXNlcjpwYXNz\r\n\r\n";
        assert_eq!(token(buf).as_deref(), Some(&b"q"[..]));
        assert_eq!(token(b"GET / HTTP/1.1\r\nAuthorization: Basic dXNlcjpwYXNz\r\n\r\n"), None);
        assert_eq!(token(b"GET / HTTP/1.1\r\nAuthorization: Bearertok\r\n\r\n"), None);
    }

    #[test]
    fn empty_tokens_count_as_none() {
        assert_eq!(token(b"GET / HTTP/1.1\r\nAuthorization: Bearer\r\n\r\n"), None);
        assert_eq!(token(b"GET / HTTP/1.1\r\nAuthorization: Bearer    \r\n\r\n"), None);
        assert_eq!(token(b"GET / HTTP/1.1\r\nAuthorization:\r\n\r\n"), None);
        assert_eq!(token(b"GET /?access_token= HTTP/1.1\r\n\r\n"), None);
        assert_eq!(token(b"GET /?access_token HTTP/1.1\r\n\r\n"), None);
        assert_eq!(token(b"GET / HTTP/1.1\r\n\r\n"), None);
        let buf = b"GET /?access_token=q HTTP/1.1\r\nAuthorization: Bearer \r\n\r\n";
        assert_eq!(token(buf).as_deref(), Some(&b"q"[..]));
    }

    #[test]
    fn label_for_request_hashes_the_extracted_token() {
        let key = TokenKey::from_bytes([7; 32]);
        let by_header = head(b"GET / HTTP/1.1\r\nAuthorization: Bearer a b\r\n\r\n");
        assert_eq!(label_for_request(&key, &by_header), Some(key.label(b"a b")));
        let by_query = head(b"GET /?access_token=a%20b HTTP/1.1\r\n\r\n");
        assert_eq!(label_for_request(&key, &by_query), Some(key.label(b"a b")));
        assert_eq!(label_for_request(&key, &head(b"GET / HTTP/1.1\r\n\r\n")), None);
    }

    #[test]
    fn labels_are_stable_for_a_key_and_differ_across_keys() {
        let a = TokenKey::from_bytes([1; 32]);
        let a_again = TokenKey::from_bytes([1; 32]);
        let b = TokenKey::from_bytes([2; 32]);
        assert_eq!(a.label(b"syt_token"), a_again.label(b"syt_token"));
        assert_ne!(a.label(b"syt_token"), b.label(b"syt_token"));
        assert_ne!(a.label(b"syt_token"), a.label(b"syt_other"));
        // Pinned: changing the hash would silently break every existing time series.
        assert_eq!(TokenKey::from_bytes([0; 32]).label(b"").to_string().len(), 16);
        let pinned = blake3::keyed_hash(&[1; 32], b"syt_token");
        assert_eq!(a.label(b"syt_token").0[..], pinned.as_bytes()[..8]);
    }

    #[test]
    fn label_display_is_16_lowercase_hex_chars_and_parses_back() {
        let label = TokenLabel([0x00, 0x1a, 0xff, 0x10, 0xab, 0xcd, 0xef, 0x09]);
        assert_eq!(label.to_string(), "001aff10abcdef09");
        assert_eq!(TokenLabel::parse("001aff10abcdef09"), Some(label));
        assert_eq!(TokenLabel::parse("001AFF10ABCDEF09"), Some(label));
        for bad in
            ["", "001aff10abcdef0", "001aff10abcdef090", "001aff10abcdef0g", "+01aff10abcdef09", "é1aff10abcdef0"]
        {
            assert_eq!(TokenLabel::parse(bad), None, "{bad}");
        }
        let random = TokenKey::from_bytes([9; 32]).label(b"t").to_string();
        assert!(random.len() == 16 && random.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }

    #[test]
    fn the_fingerprint_is_stable_per_key_and_is_no_label() {
        let key = TokenKey::from_bytes([7u8; KEY_LEN]);
        let fp = key.fingerprint().to_string();
        assert_eq!(fp.len(), 16);
        assert!(fp.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{fp}");
        // Fixed for a given key forever: fleets compare it across versions.
        assert_eq!(fp, hex(&blake3::derive_key(FINGERPRINT_CONTEXT, &[7u8; KEY_LEN])[..8]));
        assert_eq!(TokenKey::from_bytes([7u8; KEY_LEN]).fingerprint(), key.fingerprint());
        assert_ne!(TokenKey::from_bytes([8u8; KEY_LEN]).fingerprint(), key.fingerprint());
        // Not the keyed hash of anything obvious: the empty token, the context, the key.
        for input in [&b""[..], FINGERPRINT_CONTEXT.as_bytes(), &[7u8; KEY_LEN]] {
            assert_ne!(key.label(input).to_string(), fp);
        }
        assert!(!format!("{:?}", key.fingerprint()).contains("0707"));
    }

    #[test]
    fn fingerprint_of_file_reads_without_creating() {
        let dir = tmp_dir("fingerprint");
        let path = dir.join("key");
        assert_eq!(fingerprint_of_file(&path).unwrap(), None);
        assert!(!path.exists(), "checking a key must not create one");
        let key = TokenKey::load_or_create(&path).unwrap();
        assert_eq!(fingerprint_of_file(&path).unwrap(), Some(key.fingerprint()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = fingerprint_of_file(&path).unwrap_err();
        assert!(format!("{err:#}").contains("chmod 600"), "{err:#}");
        let _ = fs::remove_dir_all(&dir);
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn key_debug_shows_no_key_bytes() {
        let key = TokenKey::from_bytes([0xAB; 32]);
        let shown = format!("{key:?}");
        assert_eq!(shown, "TokenKey(..)");
        assert!(!shown.contains("171") && !shown.to_lowercase().contains("ab"));
    }

    #[test]
    fn missing_key_file_is_created_0600_in_a_0700_directory() {
        let dir = tmp_dir("create");
        let path = dir.join("sub").join("token.key");
        let key = TokenKey::load_or_create(&path).expect("created");
        let meta = fs::metadata(&path).expect("key file exists");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let dir_mode = fs::metadata(path.parent().expect("parent")).expect("dir").permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let again = TokenKey::load_or_create(&path).expect("loaded");
        assert_eq!(key.label(b"t"), again.label(b"t"));
        let leftovers = fs::read_dir(path.parent().expect("parent")).expect("dir").count();
        assert_eq!(leftovers, 1, "temporary file left behind");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn two_created_keys_differ() {
        let dir = tmp_dir("random");
        let a = TokenKey::load_or_create(&dir.join("a")).expect("a");
        let b = TokenKey::load_or_create(&dir.join("b")).expect("b");
        assert_ne!(a.label(b"t"), b.label(b"t"));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused_without_showing_its_content() {
        let dir = tmp_dir("mode");
        fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("token.key");
        fs::write(&path, [b'S'; 32]).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = format!("{:#}", TokenKey::load_or_create(&path).expect_err("refused"));
        assert!(err.contains(&path.display().to_string()) && err.contains("0644"), "{err}");
        assert!(!err.contains("SSSS"), "{err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o620)).expect("chmod");
        assert!(TokenKey::load_or_create(&path).is_err());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).expect("chmod");
        assert!(TokenKey::load_or_create(&path).is_ok());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_key_file_of_the_wrong_size_is_refused() {
        let dir = tmp_dir("size");
        fs::create_dir_all(&dir).expect("dir");
        for len in [0usize, 31, 33, 64] {
            let path = dir.join(format!("k{len}"));
            fs::write(&path, vec![b'S'; len]).expect("write");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
            let err = format!("{:#}", TokenKey::load_or_create(&path).expect_err("refused"));
            assert!(err.contains(&path.display().to_string()) && err.contains("32"), "{err}");
            assert_eq!(fs::metadata(&path).expect("kept").len(), len as u64, "file must not be replaced");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_at_the_key_path_is_refused() {
        let dir = tmp_dir("isdir");
        fs::create_dir_all(dir.join("token.key")).expect("dir");
        let err = format!("{:#}", TokenKey::load_or_create(&dir.join("token.key")).expect_err("refused"));
        assert!(err.contains("token.key"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
