//! `vigie resolve`: from token labels back to the Matrix user and device, for an operator with
//! access to Synapse's database.
//!
//! Labels are one-way: the only way back is to hash every live token with the same key and
//! compare. Synapse keeps access tokens in `access_tokens(token, user_id, device_id, ...)`.
//! Raw tokens are read into zeroized buffers, hashed, and never printed; what is printed is
//! the label, the user, the device, and the localpart a `syt_` token carries (a cross-check
//! that needs no database column).

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result, bail};
use zeroize::Zeroizing;

use crate::token::{TokenKey, TokenLabel};

/// One access token that matched a wanted label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub label: TokenLabel,
    pub user_id: String,
    pub device_id: Option<String>,
    /// Localpart decoded from a `syt_<base64 localpart>_<random>_<crc>` token.
    pub token_localpart: Option<String>,
}

/// Where Synapse's database is.
pub enum Database<'a> {
    Sqlite(&'a Path),
    Postgres(&'a str),
}

/// The localpart a Synapse `syt_` token carries: its second `_`-separated field is the
/// unpadded URL-safe base64 of the localpart.
pub fn syt_localpart(token: &[u8]) -> Option<String> {
    let rest = token.strip_prefix(b"syt_")?;
    let field = rest.split(|&b| b == b'_').next()?;
    let decoded = base64_url_decode(field)?;
    String::from_utf8(decoded).ok()
}

fn base64_url_decode(input: &[u8]) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        } as u32)
    };
    let input: Vec<u8> = input.iter().copied().filter(|&c| c != b'=').collect();
    if input.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    for chunk in input.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// Hash every token in the database and keep those whose label is wanted (all when `wanted`
/// is empty).
pub fn resolve(db: Database<'_>, key: &TokenKey, wanted: &BTreeSet<TokenLabel>) -> Result<Vec<Match>> {
    let mut matches = Vec::new();
    let mut consider = |token: Zeroizing<Vec<u8>>, user_id: String, device_id: Option<String>| {
        let label = key.label(&token);
        if wanted.is_empty() || wanted.contains(&label) {
            matches.push(Match { label, user_id, device_id, token_localpart: syt_localpart(&token) });
        }
    };
    const QUERY: &str = "SELECT token, user_id, device_id FROM access_tokens";
    match db {
        Database::Sqlite(path) => {
            if !path.exists() {
                bail!("no SQLite database at {}", path.display());
            }
            let conn = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .with_context(|| format!("opening {} read-only", path.display()))?;
            let mut stmt = conn
                .prepare(QUERY)
                .with_context(|| format!("{} has no access_tokens table: is it Synapse's database?", path.display()))?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let token: String = row.get(0)?;
                consider(Zeroizing::new(token.into_bytes()), row.get(1)?, row.get(2)?);
            }
        }
        Database::Postgres(url) => {
            let mut client = postgres::Client::connect(url, postgres::NoTls)
                .context("connecting to PostgreSQL (the URL is not repeated here: it may hold a password)")?;
            for row in client.query(QUERY, &[]).context("reading access_tokens: is it Synapse's database?")? {
                let token: String = row.try_get(0)?;
                consider(Zeroizing::new(token.into_bytes()), row.try_get(1)?, row.try_get(2)?);
            }
        }
    }
    matches.sort_by(|a, b| (a.label, &a.user_id).cmp(&(b.label, &b.user_id)));
    Ok(matches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syt_token_carries_its_localpart() {
        // "alice" in unpadded URL-safe base64 is "YWxpY2U".
        assert_eq!(syt_localpart(b"syt_YWxpY2U_AbCdEfGhIjKlMnOpQrSt_0aBcDe").as_deref(), Some("alice"));
        assert_eq!(syt_localpart(b"syt_Ym9iLnNtaXRo_x_y").as_deref(), Some("bob.smith"));
    }

    #[test]
    fn other_tokens_carry_nothing() {
        assert_eq!(syt_localpart(b"mat_abcdef"), None);
        assert_eq!(syt_localpart(b"syt_!!!_x_y"), None);
        assert_eq!(syt_localpart(b""), None);
    }

    #[test]
    fn a_missing_database_is_named() {
        let key = TokenKey::from_bytes([1; 32]);
        let err =
            resolve(Database::Sqlite(Path::new("/nonexistent/homeserver.db")), &key, &BTreeSet::new()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/homeserver.db"));
    }

    #[test]
    fn tokens_in_a_synapse_shaped_table_resolve_to_their_user_and_device() {
        let dir = std::env::temp_dir().join(format!("vigie-resolve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("homeserver.db");
        let _ = std::fs::remove_file(&db);
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "CREATE TABLE access_tokens (id BIGINT, user_id TEXT NOT NULL, device_id TEXT, token TEXT NOT NULL);
             INSERT INTO access_tokens VALUES (1, '@alice:hs', 'DEV1', 'syt_YWxpY2U_aaaa_1111');
             INSERT INTO access_tokens VALUES (2, '@bob:hs', NULL, 'syt_Ym9i_bbbb_2222');",
        )
        .unwrap();
        drop(conn);
        let key = TokenKey::from_bytes([9; 32]);
        let alice = key.label(b"syt_YWxpY2U_aaaa_1111");
        let found = resolve(Database::Sqlite(&db), &key, &BTreeSet::from([alice])).unwrap();
        assert_eq!(
            found,
            vec![Match {
                label: alice,
                user_id: "@alice:hs".into(),
                device_id: Some("DEV1".into()),
                token_localpart: Some("alice".into())
            }]
        );
        assert_eq!(resolve(Database::Sqlite(&db), &key, &BTreeSet::new()).unwrap().len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
