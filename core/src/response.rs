//! Response heads and the short bodies the server writes itself.

use std::io::Write;

use crate::error::Reject;
use crate::filename;
use crate::request::{Disposition, Page, PassOn};

/// Headers on every response: nothing here may be cached, sniffed or indexed.
const COMMON: &str = "Access-Control-Allow-Origin: *\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nX-Robots-Tag: none\r\n";

/// The allowed methods, for `Allow` and CORS.
pub const METHODS: &str = "GET, HEAD, POST, PUT, OPTIONS";

/// The fixed reason phrase of a status.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        102 => "Processing",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        410 => "Gone",
        429 => "Too Many Requests",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        502 => "Bad Gateway",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// `100 Continue`, written to a sender that asked for it once it is admitted.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// An interim response that a live HTTP/1.1 client ignores and a closed socket resets on.
pub const PROBE: &[u8] = b"HTTP/1.1 102 Processing\r\n\r\n";

/// Written where a chunk-size line is due when a receiver's chunked response is cut: a line that is
/// no chunk size (it starts with no hex digit, and has no `;` that lenient parsers read
/// as an empty size, the last chunk). Every client then reports an error, even one that
/// would take the end of the connection for the end of the response.
pub const CUT: &[u8] = b"!transfer cut\r\n";

/// A complete response with a short text body.
pub fn text(
    out: &mut Vec<u8>,
    status: u16,
    body: &str,
    keep_alive: bool,
    head_only: bool,
    extra: &str,
) {
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{COMMON}{extra}{}\r\n",
        reason(status),
        body.len(),
        connection(keep_alive),
    );
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
}

/// The answer to a refused request.
pub fn reject(out: &mut Vec<u8>, why: &Reject, keep_alive: bool) {
    let extra = if *why == Reject::Method {
        format!("Allow: {METHODS}\r\n")
    } else {
        String::new()
    };
    text(
        out,
        why.status(),
        &format!("{why}\n"),
        keep_alive,
        false,
        &extra,
    );
}

/// The answer to a CORS preflight.
pub fn preflight(out: &mut Vec<u8>, requested: Option<&str>, keep_alive: bool) {
    preflight_private(out, requested, keep_alive, false);
}

/// The answer to a CORS preflight; `private_network`: it asked
/// `Access-Control-Request-Private-Network: true` (Private Network Access: a public
/// page may reach a fanpipe on a private address), and is allowed.
pub fn preflight_private(
    out: &mut Vec<u8>,
    requested: Option<&str>,
    keep_alive: bool,
    private_network: bool,
) {
    let _ = write!(
        out,
        "HTTP/1.1 204 No Content\r\nAccess-Control-Allow-Origin: *\r\nAccess-Control-Allow-Methods: {METHODS}\r\n"
    );
    if private_network {
        out.extend_from_slice(b"Access-Control-Allow-Private-Network: true\r\n");
    }
    if let Some(h) = requested.filter(|h| !h.is_empty()) {
        let _ = write!(out, "Access-Control-Allow-Headers: {h}\r\n");
    }
    let _ = write!(
        out,
        "Access-Control-Max-Age: 86400\r\n{}\r\n",
        connection(keep_alive)
    );
}

/// The answer to a reserved page.
pub fn page(
    out: &mut Vec<u8>,
    page: Page,
    base_url: &str,
    metrics: &str,
    keep_alive: bool,
    head_only: bool,
) {
    match page {
        Page::Usage => text(out, 200, &usage(base_url), keep_alive, head_only, ""),
        Page::Version => text(
            out,
            200,
            &format!("fanpipe {}\n", crate::VERSION),
            keep_alive,
            head_only,
            "",
        ),
        Page::Health => text(out, 200, "ok\n", keep_alive, head_only, ""),
        Page::Metrics => text(out, 200, metrics, keep_alive, head_only, ""),
        Page::Robots => text(
            out,
            200,
            "User-agent: *\nDisallow: /\n",
            keep_alive,
            head_only,
            "",
        ),
        // Served by `page.rs`; a text answer if asked here.
        Page::Script | Page::Style | Page::Noscript => {
            text(out, 404, "not found\n", keep_alive, head_only, "")
        }
        Page::Favicon => {
            let _ = write!(
                out,
                "HTTP/1.1 204 No Content\r\n{COMMON}{}\r\n",
                connection(keep_alive)
            );
        }
    }
}

pub(crate) fn usage(base: &str) -> String {
    [
        "fanpipe: stream bytes from one sender to n receivers over plain HTTP.",
        "",
        "Send (the sender waits until all n receivers are there):",
        &format!("  tar c . | curl -fsS -T - '{base}/api/v1/pipe/NAME?n=3'"),
        &format!("  curl -fsS --data-binary @file '{base}/NAME?n=3'"),
        "",
        "Receive (each of the n receivers):",
        &format!("  curl -fsS '{base}/api/v1/pipe/NAME?n=3' | tar x"),
        "",
        "/NAME and /api/v1/pipe/NAME are the same pipe; n defaults to 1.",
        "Receivers get the same bytes at the pace of the slowest; nothing is stored.",
        "The sender's curl exits non-zero unless every receiver got every byte;",
        "-f makes a refusal (409 taken, 400 bad n) or a proxy's error page fail too.",
        "Behind a proxy that stops forwarding an upload once the answer has begun",
        "(nginx), add report=end: the sender's answer then comes when the transfer",
        "is over, 200 only if every receiver got every byte.",
        "",
        "Watch a pipe without taking a place (server-sent events; ?status: one JSON):",
        &format!("  curl -N '{base}/NAME?progress'"),
        "Save under a name: add download or filename=NAME to a receiver's URL.",
        &format!("In a browser, {base}/ is a page that sends and receives files"),
        &format!("({base}/noscript without JavaScript)."),
        "",
    ]
    .join("\n")
}

fn connection(keep_alive: bool) -> &'static str {
    if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    }
}

/// The head of the sender's progress response. HTTP/1.1 gets chunked, so a cut response
/// shows as an error; HTTP/1.0 can only be closed. No `Connection: close`: some clients
/// (Node's fetch) then take the end of the connection for the end of the response.
pub fn sender_head(out: &mut Vec<u8>, status: u16, chunked: bool) {
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\n{}{COMMON}\r\n",
        reason(status),
        if chunked {
            "Transfer-Encoding: chunked\r\n"
        } else {
            ""
        }
    );
}

/// The head each receiver gets when the transfer starts (no `Connection: close`, as for
/// the sender).
pub fn receiver_head(out: &mut Vec<u8>, pass: &PassOn, length: Option<u64>) {
    receiver_head_as(out, pass, length, &Disposition::Sender, "");
}

/// The head of a receiver that chose how its body is named (`?download`, `?filename=`);
/// `pipe` is the pipe's name, the last fallback of a file name.
pub fn receiver_head_as(
    out: &mut Vec<u8>,
    pass: &PassOn,
    length: Option<u64>,
    disposition: &Disposition,
    pipe: &str,
) {
    let named;
    let pass = match disposition {
        Disposition::Sender => pass,
        Disposition::Inline => {
            named = PassOn {
                content_disposition: None,
                ..pass.clone()
            };
            &named
        }
        Disposition::Attachment(name) => {
            let senders = pass
                .content_disposition
                .as_deref()
                .and_then(filename::from_disposition);
            let last = pipe.rsplit('/').next().unwrap_or(pipe);
            let name = name.clone().or(senders).unwrap_or_else(|| last.to_owned());
            named = PassOn {
                content_disposition: Some(filename::attachment(&name, "download")),
                ..pass.clone()
            };
            &named
        }
    };
    let content_type = match pass.content_type.as_deref() {
        None | Some("") => "application/octet-stream".to_owned(),
        Some(ct) => neutralize_html(ct),
    };
    let _ = write!(out, "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n");
    match length {
        Some(n) => {
            let _ = write!(out, "Content-Length: {n}\r\n");
        }
        None => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
    }
    let mut exposed = vec!["Content-Type"];
    if length.is_some() {
        exposed.push("Content-Length");
    }
    if let Some(cd) = &pass.content_disposition {
        let _ = write!(out, "Content-Disposition: {cd}\r\n");
        exposed.push("Content-Disposition");
    }
    for (name, value) in &pass.x_piping {
        let _ = write!(out, "{name}: {value}\r\n");
        exposed.push(name);
    }
    let _ = write!(
        out,
        "Access-Control-Expose-Headers: {}\r\n{COMMON}\r\n",
        exposed.join(", ")
    );
}

/// Types a browser would run or render as a document with scripts: HTML, XHTML, SVG,
/// any XML, JavaScript, XSLT, and the streaming `multipart/x-mixed-replace`.
pub fn is_active(essence: &str) -> bool {
    let e = essence.trim().to_ascii_lowercase();
    matches!(
        e.as_str(),
        "text/html"
            | "text/xml"
            | "application/xml"
            | "text/xsl"
            | "text/javascript"
            | "application/javascript"
            | "application/x-javascript"
            | "application/ecmascript"
            | "text/ecmascript"
            | "text/jscript"
            | "multipart/x-mixed-replace"
    ) || e.ends_with("+xml")
}

/// An active type (any case, parameters kept; see [`is_active`]) becomes `text/plain`: a
/// pipe never serves a page, an image with scripts, or a script.
fn neutralize_html(ct: &str) -> String {
    let (essence, params) = ct.split_once(';').map_or((ct, None), |(e, p)| (e, Some(p)));
    if is_active(essence) {
        match params {
            Some(p) => format!("text/plain;{p}"),
            None => "text/plain".to_owned(),
        }
    } else {
        ct.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(pass: &PassOn, length: Option<u64>) -> String {
        let mut out = Vec::new();
        receiver_head(&mut out, pass, length);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn receivers_get_the_senders_headers_and_safe_defaults() {
        let pass = PassOn {
            content_type: Some("TEXT/HTML; charset=utf-8".into()),
            content_disposition: Some("attachment; filename=a.tar".into()),
            x_piping: vec![("X-Piping-Id".into(), "7".into())],
        };
        let h = head_of(&pass, Some(12));
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(h.contains("Content-Type: text/plain; charset=utf-8\r\n"));
        assert!(h.contains("Content-Length: 12\r\n"));
        assert!(h.contains("Content-Disposition: attachment; filename=a.tar\r\n"));
        assert!(h.contains("X-Piping-Id: 7\r\n"));
        assert!(h.contains("Access-Control-Expose-Headers: Content-Type, Content-Length, Content-Disposition, X-Piping-Id\r\n"));
        for must in [
            "Access-Control-Allow-Origin: *",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            "X-Robots-Tag: none",
        ] {
            assert!(h.contains(must), "{must}");
        }
        let h = head_of(&PassOn::default(), None);
        assert!(h.contains("Content-Type: application/octet-stream\r\n"));
        assert!(h.contains("Transfer-Encoding: chunked\r\n"));
        assert!(!h.contains("Content-Length"));
    }

    #[test]
    fn refusals_carry_status_message_and_allow() {
        let mut out = Vec::new();
        reject(&mut out, &Reject::Method, true);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(s.contains("Allow: GET, HEAD, POST, PUT, OPTIONS\r\n"));
        assert!(s.ends_with("OPTIONS for CORS preflight)\n"));
    }
}

#[cfg(test)]
mod web_tests {
    use super::*;

    fn head_as(ct: Option<&str>, cd: Option<&str>, d: &Disposition) -> String {
        let pass = PassOn {
            content_type: ct.map(Into::into),
            content_disposition: cd.map(Into::into),
            x_piping: vec![],
        };
        let mut out = Vec::new();
        receiver_head_as(&mut out, &pass, Some(1), d, "dir/build.tar");
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn active_types_reach_receivers_as_plain_text_with_their_parameters() {
        for (sent, served) in [
            ("image/svg+xml", "text/plain"),
            (
                "Application/XML; charset=utf-8",
                "text/plain; charset=utf-8",
            ),
            ("text/xml", "text/plain"),
            ("application/xhtml+xml", "text/plain"),
            ("text/javascript;charset=x", "text/plain;charset=x"),
            ("application/javascript", "text/plain"),
            ("application/ecmascript", "text/plain"),
            ("text/html", "text/plain"),
            ("image/png", "image/png"),
            ("application/json", "application/json"),
        ] {
            let h = head_as(Some(sent), None, &Disposition::Sender);
            assert!(
                h.contains(&format!("Content-Type: {served}\r\n")),
                "{sent}: {h}"
            );
        }
    }

    #[test]
    fn receivers_choose_download_and_file_name() {
        let sender = Some("attachment; filename=\"a.txt\"");
        let h = head_as(None, sender, &Disposition::Sender);
        assert!(h.contains("Content-Disposition: attachment; filename=\"a.txt\"\r\n"));
        let h = head_as(None, sender, &Disposition::Inline);
        assert!(!h.contains("Content-Disposition"));
        let h = head_as(None, sender, &Disposition::Attachment(None));
        assert!(h.contains("Content-Disposition: attachment; filename=\"a.txt\"\r\n"));
        let h = head_as(None, None, &Disposition::Attachment(None));
        assert!(h.contains("Content-Disposition: attachment; filename=\"build.tar\"\r\n"));
        let h = head_as(None, sender, &Disposition::Attachment(Some("ü/\"x".into())));
        assert!(h.contains(
            "Content-Disposition: attachment; filename=\"___x\"; filename*=UTF-8''%C3%BC__x\r\n"
        ), "{h}");
    }

    #[test]
    fn a_private_network_preflight_is_allowed() {
        let mut out = Vec::new();
        preflight_private(&mut out, None, true, true);
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("Access-Control-Allow-Private-Network: true\r\n"));
        let mut out = Vec::new();
        preflight(&mut out, None, true);
        assert!(!String::from_utf8(out).unwrap().contains("Private-Network"));
    }
}
