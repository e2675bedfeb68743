//! Signed URLs: with a secret file, every pipe request must carry `exp`, `kid` and `sig`,
//! an HMAC-SHA256 of what the URL may do (role, name, `n`, expiry) under one of the keys.
//!
//! Pure functions: the wall-clock time comes in as unix seconds, so the rules (and the
//! clock-skew edge) are tested with no clock.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::Reject;
use crate::request::Role;

/// Fewest secret bytes a key may have: a key shorter than the hash is easier to guess
/// than the signature it makes.
pub const MIN_SECRET_BYTES: usize = 32;

/// Longest key id: ids travel in every URL.
pub const MAX_KID_LEN: usize = 64;

/// Seconds a URL is still taken past its `exp`: the host that signed it and this server
/// may disagree on the time by that much.
pub const CLOCK_SKEW: u64 = 60;

/// What the canonical string starts with: a later format signs another prefix, so a
/// signature of one is never taken for the other.
const VERSION: &str = "fanpipe-v1";

/// One key: the id URLs name it by, and its secret.
#[derive(Clone)]
pub struct Key {
    pub id: String,
    secret: Vec<u8>,
}

/// Never print a secret: Debug shows the key id only.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key").field("id", &self.id).finish()
    }
}

/// The keys of a secret file, in its order: the first signs, every one verifies, so a new
/// key is put first and the old one kept below it until its URLs have expired.
#[derive(Debug, Clone)]
pub struct Keys {
    keys: Vec<Key>,
}

/// Why a secret file cannot be used; one line, with the line number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFileError(pub String);

impl fmt::Display for KeyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Keys {
    /// Parses a secret file: one key per line as `ID SECRET`, SECRET in hex (at least
    /// [`MIN_SECRET_BYTES`] bytes); blank lines and lines starting with `#` are skipped.
    pub fn parse(text: &str) -> Result<Keys, KeyFileError> {
        let mut keys: Vec<Key> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |why: &str| KeyFileError(format!("line {}: {why}", i + 1));
            let mut words = line.split_whitespace();
            let (Some(id), Some(secret), None) = (words.next(), words.next(), words.next()) else {
                return Err(at("expected `ID SECRET` (two words)"));
            };
            if id.len() > MAX_KID_LEN
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(at(&format!(
                    "the key id must be 1 to {MAX_KID_LEN} letters, digits, '-', '_' or '.'"
                )));
            }
            if keys.iter().any(|k| k.id == id) {
                return Err(at(&format!("key id {id} is used twice")));
            }
            let secret = decode_hex(secret).ok_or_else(|| at("the secret is not hex"))?;
            if secret.len() < MIN_SECRET_BYTES {
                return Err(at(&format!(
                    "the secret has {} bytes, at least {MIN_SECRET_BYTES} are needed (make one with `openssl rand -hex 32`)",
                    secret.len()
                )));
            }
            keys.push(Key {
                id: id.to_owned(),
                secret,
            });
        }
        if keys.is_empty() {
            return Err(KeyFileError(
                "no key: write one line `ID SECRET` (SECRET from `openssl rand -hex 32`)".into(),
            ));
        }
        Ok(Keys { keys })
    }

    /// The key that signs new URLs: the file's first.
    pub fn signing(&self) -> &Key {
        &self.keys[0]
    }

    fn find(&self, id: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            let hex = |c: u8| (c as char).to_digit(16);
            Some((hex(pair[0])? * 16 + hex(pair[1])?) as u8)
        })
        .collect()
}

/// The word a role signs as.
fn role_word(role: Role) -> &'static str {
    match role {
        Role::Sender => "send",
        Role::Receiver => "recv",
    }
}

/// What a URL's signature covers: the role, the decoded pipe name (so `/NAME` and
/// `/api/v1/pipe/NAME` sign the same), `n` and the expiry, NUL-separated.
pub fn canonical(role: Role, name: &str, n: usize, exp: u64) -> Vec<u8> {
    format!("{VERSION}\0{}\0{name}\0{n}\0{exp}", role_word(role)).into_bytes()
}

fn mac(key: &Key, role: Role, name: &str, n: usize, exp: u64) -> Hmac<Sha256> {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key.secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
    mac.update(&canonical(role, name, n, exp));
    mac
}

/// The query parameters that make a URL signed for `role` on `name` with `n` receivers
/// until `exp` (unix seconds): `exp=..&kid=..&sig=..`.
pub fn sign(key: &Key, role: Role, name: &str, n: usize, exp: u64) -> String {
    let sig = mac(key, role, name, n, exp).finalize().into_bytes();
    format!(
        "exp={exp}&kid={}&sig={}",
        key.id,
        URL_SAFE_NO_PAD.encode(sig)
    )
}

/// A request's signature parameters, as sent (absent ones are `None`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub exp: Option<String>,
    pub kid: Option<String>,
    pub sig: Option<String>,
}

impl Credentials {
    /// The `exp`, `kid` and `sig` of a request target's query string.
    pub fn from_target(target: &str) -> Credentials {
        let target = target.split('#').next().unwrap_or("");
        Credentials::from_query(target.split_once('?').map_or("", |(_, q)| q))
    }

    /// The `exp`, `kid` and `sig` of a query string (the first of each).
    pub fn from_query(query: &str) -> Credentials {
        let mut c = Credentials::default();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match key {
                "exp" => &mut c.exp,
                "kid" => &mut c.kid,
                "sig" => &mut c.sig,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(value.to_owned());
            }
        }
        c
    }
}

/// Whether a request for `role` on `name` with `n` receivers may go on at `now` (unix
/// seconds): `401` without a signature, `403` for one that does not match (or matches
/// the other role), `410` once expired (past [`CLOCK_SKEW`]).
pub fn verify(
    keys: &Keys,
    creds: &Credentials,
    role: Role,
    name: &str,
    n: usize,
    now: u64,
) -> Result<(), Reject> {
    let (Some(exp), Some(kid), Some(sig)) = (&creds.exp, &creds.kid, &creds.sig) else {
        return Err(Reject::SignatureMissing);
    };
    let exp: u64 = match exp.parse() {
        Ok(v) if !exp.starts_with('+') => v,
        _ => return Err(Reject::SignatureBad),
    };
    let Some(key) = keys.find(kid) else {
        return Err(Reject::SignatureUnknownKey);
    };
    let Ok(sig) = URL_SAFE_NO_PAD.decode(sig) else {
        return Err(Reject::SignatureBad);
    };
    if mac(key, role, name, n, exp).verify_slice(&sig).is_err() {
        let other = match role {
            Role::Sender => Role::Receiver,
            Role::Receiver => Role::Sender,
        };
        if mac(key, other, name, n, exp).verify_slice(&sig).is_ok() {
            return Err(Reject::SignatureWrongRole { signed_for: other });
        }
        return Err(Reject::SignatureBad);
    }
    if now > exp.saturating_add(CLOCK_SKEW) {
        return Err(Reject::SignatureExpired { ago: now - exp });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "a 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const B: &str = "old ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    fn keys(text: &str) -> Keys {
        Keys::parse(text).unwrap()
    }

    fn creds(query: &str) -> Credentials {
        Credentials::from_query(query)
    }

    #[test]
    fn a_signed_url_is_valid_for_its_role_name_n_and_time_only() {
        let k = keys(A);
        let q = sign(k.signing(), Role::Receiver, "build/12", 30, 1000);
        let c = creds(&q);
        assert_eq!(verify(&k, &c, Role::Receiver, "build/12", 30, 900), Ok(()));
        assert_eq!(
            verify(&k, &c, Role::Receiver, "build/13", 30, 900),
            Err(Reject::SignatureBad)
        );
        assert_eq!(
            verify(&k, &c, Role::Receiver, "build/12", 31, 900),
            Err(Reject::SignatureBad)
        );
        let wrong = verify(&k, &c, Role::Sender, "build/12", 30, 900).unwrap_err();
        assert_eq!(
            wrong,
            Reject::SignatureWrongRole {
                signed_for: Role::Receiver
            }
        );
        assert_eq!(wrong.status(), 403);
        assert!(wrong.to_string().contains("receiving"), "{wrong}");
        let later = q.replace("exp=1000", "exp=2000");
        assert_eq!(
            verify(&k, &creds(&later), Role::Receiver, "build/12", 30, 900),
            Err(Reject::SignatureBad),
            "a moved expiry breaks the signature"
        );
    }

    #[test]
    fn the_expiry_edge_allows_the_clock_skew_and_not_a_second_more() {
        let k = keys(A);
        let c = creds(&sign(k.signing(), Role::Sender, "x", 1, 1000));
        for now in [0, 1000, 1000 + CLOCK_SKEW] {
            assert_eq!(verify(&k, &c, Role::Sender, "x", 1, now), Ok(()), "{now}");
        }
        let e = verify(&k, &c, Role::Sender, "x", 1, 1001 + CLOCK_SKEW).unwrap_err();
        assert_eq!(e, Reject::SignatureExpired { ago: 61 });
        assert_eq!(e.status(), 410);
        assert!(e.to_string().contains("expired 61 s ago"), "{e}");
    }

    #[test]
    fn missing_or_mangled_parameters_are_401_and_403() {
        let k = keys(A);
        let q = sign(k.signing(), Role::Sender, "x", 1, 1000);
        let check = |q: &str| verify(&k, &creds(q), Role::Sender, "x", 1, 10);
        assert_eq!(check(""), Err(Reject::SignatureMissing));
        assert_eq!(check("n=1&exp=1000&kid=a"), Err(Reject::SignatureMissing));
        assert_eq!(Reject::SignatureMissing.status(), 401);
        let sig = q.split("sig=").nth(1).unwrap().to_owned();
        for bad in [
            format!("exp=+1000&kid=a&sig={sig}"),
            format!("exp=1e3&kid=a&sig={sig}"),
            format!("exp=1000&kid=a&sig={sig}="),
            format!("exp=1000&kid=a&sig=%%%{sig}"),
            format!("exp=1000&kid=a&sig={}", &sig[1..]),
            "exp=1000&kid=a&sig=".to_owned(),
        ] {
            assert_eq!(check(&bad), Err(Reject::SignatureBad), "{bad}");
        }
        let unknown = check(&format!("exp=1000&kid=z&sig={sig}")).unwrap_err();
        assert_eq!(unknown.status(), 403);
        assert!(unknown.to_string().contains("key"), "{unknown}");
    }

    #[test]
    fn every_key_of_the_file_verifies_and_the_first_signs() {
        let old = keys(B);
        let rotated = keys(&format!("# new key first\n{A}\n\n{B}\n"));
        assert_eq!(rotated.signing().id, "a");
        let by_old = creds(&sign(old.signing(), Role::Receiver, "x", 2, 50));
        assert_eq!(verify(&rotated, &by_old, Role::Receiver, "x", 2, 0), Ok(()));
        let by_new = creds(&sign(rotated.signing(), Role::Receiver, "x", 2, 50));
        assert_eq!(
            verify(&old, &by_new, Role::Receiver, "x", 2, 0),
            Err(Reject::SignatureUnknownKey),
            "a retired file does not know the new key"
        );
    }

    #[test]
    fn a_bad_secret_file_says_which_line_and_why() {
        let short = "a 0011";
        let e = Keys::parse(short).unwrap_err().to_string();
        assert!(e.starts_with("line 1: the secret has 2 bytes"), "{e}");
        let cases = [
            ("", "no key"),
            ("# only a comment\n", "no key"),
            ("a", "line 1: expected `ID SECRET`"),
            (&format!("{A} extra"), "two words"),
            (
                &format!("\n{}", A.replace("0a", "zz")),
                "line 2: the secret is not hex",
            ),
            (&format!("{A}\n{A}"), "line 2: key id a is used twice"),
            (&A.replacen('a', "a/b", 1), "key id must be"),
        ];
        for (text, want) in cases {
            let e = Keys::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        let shown = format!("{:?}", keys(A));
        assert!(
            !shown.contains("0001020304"),
            "Debug shows no secret: {shown}"
        );
    }

    #[test]
    fn the_canonical_string_is_documented() {
        assert_eq!(
            canonical(Role::Sender, "a/b", 3, 1700000000),
            b"fanpipe-v1\0send\0a/b\x003\x001700000000".to_vec()
        );
    }
}
