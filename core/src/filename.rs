//! The file name a receiver's browser saves a body under: `Content-Disposition` as RFC
//! 6266 has it, with the name in UTF-8 (RFC 8187 `filename*=UTF-8''...`) and an ASCII
//! fallback (`filename="..."`) for old clients. Names are cleaned first: no quotes,
//! backslashes, slashes, line breaks or other control characters reach a header or a
//! path.

/// Longest name kept, in characters.
const MAX_CHARS: usize = 200;

/// `name` made safe to save: control characters, quotes and path separators become `_`,
/// leading dots and surrounding spaces go, and it is cut to [`MAX_CHARS`]. `None` if
/// nothing is left.
pub fn sanitize(name: &str) -> Option<String> {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_control() || matches!(c, '"' | '\\' | '/' | '\u{2028}' | '\u{2029}') {
                '_'
            } else {
                c
            }
        })
        .take(MAX_CHARS)
        .collect();
    let cleaned = cleaned.trim().trim_start_matches('.').trim();
    (!cleaned.is_empty() && cleaned.chars().any(|c| c != '_')).then(|| cleaned.to_owned())
}

/// The header value that makes a browser save the body as `name` (cleaned with
/// [`sanitize`]; `fallback` if nothing is left of it).
pub fn attachment(name: &str, fallback: &str) -> String {
    let name = sanitize(name).unwrap_or_else(|| fallback.to_owned());
    let ascii: String = name
        .chars()
        .map(|c| if c.is_ascii() { c } else { '_' })
        .collect();
    let mut value = format!("attachment; filename=\"{ascii}\"");
    if ascii != name {
        value.push_str("; filename*=UTF-8''");
        for b in name.bytes() {
            // RFC 8187 attr-char; anything else is percent-encoded.
            if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
                value.push(b as char);
            } else {
                value.push_str(&format!("%{b:02X}"));
            }
        }
    }
    value
}

/// The file name in a `Content-Disposition` value (`filename*=UTF-8''...` preferred).
pub fn from_disposition(value: &str) -> Option<String> {
    let mut plain = None;
    for p in value.split(';').skip(1) {
        let Some((k, v)) = p.split_once('=') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("filename*") {
            let Some((charset, rest)) = v.split_once('\'') else {
                continue;
            };
            let encoded = rest.split_once('\'').map_or(rest, |(_, e)| e);
            if charset.eq_ignore_ascii_case("utf-8") {
                return Some(crate::request::percent_decode_query(
                    &encoded.replace('+', "%2B"),
                ));
            }
        } else if k.eq_ignore_ascii_case("filename") {
            plain = Some(v.trim_matches('"').to_owned());
        }
    }
    plain
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_lose_what_could_escape_a_header_or_a_directory() {
        assert_eq!(sanitize("a b.txt").as_deref(), Some("a b.txt"));
        assert_eq!(
            sanitize("../../etc/pass\"wd\r\nX: y").as_deref(),
            Some("_.._etc_pass_wd__X: y")
        );
        assert_eq!(sanitize("..\\x\u{7f}\0").as_deref(), Some("_x__"));
        assert_eq!(sanitize(" .. "), None);
        assert_eq!(sanitize("///"), None);
        assert_eq!(sanitize(&"é".repeat(500)).unwrap().chars().count(), 200);
    }

    #[test]
    fn attachments_carry_an_ascii_fallback_and_the_utf8_name() {
        assert_eq!(attachment("a.tar", "x"), "attachment; filename=\"a.tar\"");
        assert_eq!(
            attachment("résumé 1.pdf", "x"),
            "attachment; filename=\"r_sum_ 1.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9%201.pdf"
        );
        assert_eq!(
            attachment("\"/\r\n", "pipe"),
            "attachment; filename=\"pipe\""
        );
        let v = attachment("a\"b\r\nSet-Cookie: x", "f");
        assert!(!v.contains('\r') && !v.contains('\n') && v.matches('"').count() == 2);
    }

    #[test]
    fn a_senders_name_is_read_back() {
        assert_eq!(
            from_disposition("attachment; filename=\"a.txt\"").as_deref(),
            Some("a.txt")
        );
        assert_eq!(
            from_disposition("attachment; filename=a; filename*=UTF-8''%C3%A9+.txt").as_deref(),
            Some("é+.txt")
        );
        assert_eq!(from_disposition("inline"), None);
    }
}
