//! The pages a browser gets: `/` (when `Accept` names `text/html`), its script and style
//! sheet (`/page.js`, `/page.css`), and `/noscript`, a form per upload for browsers
//! without JavaScript. Plain HTML, CSS and JavaScript compiled into the binary; no
//! external asset, so a strict Content-Security-Policy holds: scripts and styles from
//! this server only, no inline code, connections to this server only, forms posted here
//! only, never framed.

use std::fmt::Write as _;
use std::io::Write as _;

use crate::request::{percent_decode_query, Page, Request};
use crate::response;

const HTML: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("page.js");
const STYLE: &str = include_str!("page.css");

/// The policy of every page.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// Answers the pages of this module; false for any other page (answered as text).
pub fn respond(out: &mut Vec<u8>, page: Page, req: &Request, keep_alive: bool) -> bool {
    let head_only = req.head_only;
    match page {
        Page::Usage if req.web.html => document(out, HTML, keep_alive, head_only),
        Page::Usage => response::text(
            out,
            200,
            &response::usage(&req.base_url),
            keep_alive,
            head_only,
            "Vary: Accept\r\n",
        ),
        Page::Script => asset(out, "text/javascript", SCRIPT, keep_alive, head_only),
        Page::Style => asset(out, "text/css", STYLE, keep_alive, head_only),
        Page::Noscript => {
            let body = noscript(&req.web.query, &req.base_url);
            document(out, &body, keep_alive, head_only);
        }
        _ => return false,
    }
    true
}

fn document(out: &mut Vec<u8>, body: &str, keep_alive: bool, head_only: bool) {
    let extra = format!(
        "Content-Security-Policy: {CSP}\r\nX-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\nVary: Accept\r\n"
    );
    head(out, "text/html", body.len(), &extra, keep_alive);
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
}

fn asset(out: &mut Vec<u8>, kind: &str, body: &str, keep_alive: bool, head_only: bool) {
    head(out, kind, body.len(), "", keep_alive);
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
}

fn head(out: &mut Vec<u8>, kind: &str, len: usize, extra: &str, keep_alive: bool) {
    let _ = write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: {kind}; charset=utf-8\r\nContent-Length: {len}\r\nAccess-Control-Allow-Origin: *\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nX-Robots-Tag: none\r\n{extra}{}\r\n",
        if keep_alive { "" } else { "Connection: close\r\n" }
    );
}

/// Text made safe inside HTML elements and quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A pipe name as a URL path (`/` kept between segments, everything else but unreserved
/// characters percent-encoded).
pub fn path_of(name: &str) -> String {
    let mut out = String::from("/");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The value of `key` in a query string, decoded.
fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode_query(v).trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// `/noscript`: with no `name`, a form that asks for the name and `n`; with them, a form
/// that posts a file, one that posts text (each `multipart/form-data` to
/// `/NAME?n=N&form`, whose first part the receivers get), a download link, and the curl
/// commands for the other side.
pub fn noscript(query: &str, base: &str) -> String {
    let name = query_param(query, "name").map(|n| n.trim_start_matches('/').to_owned());
    let n = query_param(query, "n")
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1);
    let mut body = String::from(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>fanpipe (no JavaScript)</title>\n<link rel=\"stylesheet\" href=\"/page.css\">\n</head>\n<body>\n<main>\n<h1>fanpipe <small>without JavaScript</small></h1>\n",
    );
    let value = name.as_deref().map(escape).unwrap_or_default();
    let _ = write!(
        body,
        "<form method=\"get\" action=\"/noscript\" class=\"card\">\n<h2>1. Choose a pipe</h2>\n<label for=\"name\">Pipe name</label>\n<input id=\"name\" name=\"name\" required value=\"{value}\" autocomplete=\"off\" spellcheck=\"false\">\n<label for=\"n\">Receivers (n)</label>\n<input id=\"n\" name=\"n\" type=\"number\" min=\"1\" value=\"{n}\">\n<button type=\"submit\">Use this pipe</button>\n</form>\n"
    );
    if let Some(name) = name.filter(|n| !n.is_empty()) {
        let path = path_of(&name);
        let action = escape(&format!("{path}?n={n}&form"));
        let url = escape(&format!("{base}{path}?n={n}"));
        let download = escape(&format!("{path}?n={n}&download"));
        let _ = write!(
            body,
            "<form method=\"post\" enctype=\"multipart/form-data\" accept-charset=\"utf-8\" action=\"{action}\" class=\"card\">\n<h2>2. Send a file</h2>\n<label for=\"file\">File</label>\n<input id=\"file\" name=\"file\" type=\"file\" required>\n<button type=\"submit\">Send the file</button>\n</form>\n<form method=\"post\" enctype=\"multipart/form-data\" accept-charset=\"utf-8\" action=\"{action}\" class=\"card\">\n<h2>or send text</h2>\n<label for=\"text\">Text</label>\n<textarea id=\"text\" name=\"text\" rows=\"5\" required></textarea>\n<button type=\"submit\">Send the text</button>\n</form>\n<section class=\"card\">\n<h2>or receive</h2>\n<p><a id=\"download\" href=\"{download}\">Download what is sent to this pipe</a></p>\n<p>The other side, with curl:</p>\n<pre>curl -fsS -T FILE '{url}'</pre>\n<pre>curl -fsS '{url}' &gt; FILE</pre>\n<p>The sending page stays loading until all {n} receiver(s) are there and the upload is over, then shows the sender's report.</p>\n</section>\n"
        );
    }
    body.push_str("<p><a href=\"/\">The page with JavaScript</a></p>\n</main>\n</body>\n</html>\n");
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noscript_escapes_the_name_and_posts_a_form_to_the_pipe() {
        let page = noscript("name=a%22%3E%3Cscript%3Eb/c+d&n=3", "http://h");
        assert!(!page.contains("<script"), "{page}");
        assert!(page.contains("value=\"a&quot;&gt;&lt;script&gt;b/c d\""));
        assert!(page.contains("action=\"/a%22%3E%3Cscript%3Eb/c%20d?n=3&amp;form\""));
        assert!(page.contains("enctype=\"multipart/form-data\""));
        assert!(page.contains("curl -fsS -T FILE 'http://h/a%22%3E%3Cscript%3Eb/c%20d?n=3'"));
        let empty = noscript("", "http://h");
        assert!(!empty.contains("enctype"));
        assert!(empty.contains("action=\"/noscript\""));
    }

    #[test]
    fn the_page_uses_only_its_own_assets() {
        assert!(HTML.contains("<script src=\"/page.js\""));
        assert!(HTML.contains("href=\"/page.css\""));
        assert!(!HTML.contains("<script>") && !HTML.contains("style=") && !HTML.contains("http"));
    }
}
