//! What a parsed head asks for: its route, its body framing, and what a pipe passes on.

use crate::error::Reject;
use crate::head::{Head, Method};

/// The path prefix under which every name is a pipe.
pub const API_PREFIX: &str = "/api/v1/pipe/";

/// Bare paths that are not pipe names.
pub const RESERVED: &[&str] = &[
    "/",
    "/help",
    "/version",
    "/healthz",
    "/metrics",
    "/favicon.ico",
    "/robots.txt",
    "/page.js",
    "/page.css",
    "/noscript",
];

/// How the request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Exactly this many bytes (0 when the request has no body).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Which side of a pipe a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Sender,
    Receiver,
}

/// What the request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A party of the pipe named `name`, which is to have `n` receivers.
    Pipe { name: String, role: Role, n: usize },
    /// A reserved path, answered by the server itself.
    Page(Page),
    /// A CORS preflight.
    Preflight,
    /// `GET /NAME?progress` (server-sent events) or `?status` (`once`: one JSON
    /// snapshot): the live state of the pipe named `name`, without taking a place in it.
    Watch { name: String, once: bool },
}

/// The reserved pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Usage,
    Version,
    Health,
    Metrics,
    Favicon,
    Robots,
    /// The page's script and style sheet (`/page.js`, `/page.css`).
    Script,
    Style,
    /// The page for browsers without JavaScript: a form per upload.
    Noscript,
}

/// The sender's headers that its receivers get.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassOn {
    pub content_type: Option<String>,
    pub content_disposition: Option<String>,
    /// Every `X-Piping*` header, name as sent.
    pub x_piping: Vec<(String, String)>,
}

/// When a sender's response head is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Report {
    /// At once, then one line per event: what a person or a CI log watches.
    #[default]
    Live,
    /// Once the transfer is over, with a status that tells the outcome: for a proxy that
    /// stops forwarding a request body once the response has begun (nginx).
    End,
}

/// A request, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub route: Route,
    /// `HEAD`: answer without a body.
    pub head_only: bool,
    pub minor: u8,
    pub framing: Framing,
    pub expect_continue: bool,
    pub keep_alive: bool,
    pub pass_on: PassOn,
    /// `Access-Control-Request-Headers` of a preflight.
    pub cors_headers: Option<String>,
    /// The server's own base URL as the client reached it (for the usage page).
    pub base_url: String,
    /// A sender's `report=live|end`; `None`: the server's default.
    pub report: Option<Report>,
    /// What browsers add: content negotiation, a form upload, a receiver's file name.
    pub web: Web,
}

/// What a request from a browser adds to a pipe's or a page's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Web {
    /// `Accept` names `text/html` (a browser): `/` answers the page, not the text help.
    pub html: bool,
    /// `?form` on a sender: its body is `multipart/form-data` with this boundary, and the
    /// receivers get its first part (see `multipart.rs`).
    pub form: Option<String>,
    /// A receiver's choice of `Content-Disposition` (`?download`, `?filename=`).
    pub disposition: Disposition,
    /// A preflight with `Access-Control-Request-Private-Network: true`.
    pub private_network: bool,
    /// The raw query string, for the pages that read it (`/noscript`).
    pub query: String,
}

/// How a receiver's response names its body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Disposition {
    /// As the sender said (its `Content-Disposition`, if any).
    #[default]
    Sender,
    /// `?download` or `?filename=NAME`: an attachment, named `NAME` if given, else as the
    /// sender named it, else after the pipe.
    Attachment(Option<String>),
    /// `?download=0`: no `Content-Disposition` at all.
    Inline,
}

impl Request {
    /// The pipe name this request is about: a party's or a watcher's.
    pub fn pipe_name(&self) -> Option<&str> {
        match &self.route {
            Route::Pipe { name, .. } | Route::Watch { name, .. } => Some(name),
            _ => None,
        }
    }

    /// Whether a body follows this head.
    pub fn has_body(&self) -> bool {
        self.framing != Framing::Length(0)
    }
}

/// Interprets a head under the server's `max_receivers`.
pub fn interpret(head: &Head, max_receivers: usize) -> Result<Request, Reject> {
    let hosts = head.values("host").count();
    if hosts > 1 || (head.minor == 1 && hosts == 0) {
        return Err(Reject::Malformed("exactly one Host header is required"));
    }
    let framing = framing(head)?;
    let expect_continue = match head.value("expect") {
        None => false,
        Some(v) if v.trim().eq_ignore_ascii_case("100-continue") => head.minor == 1,
        Some(_) => return Err(Reject::Expectation),
    };
    let keep_alive = keep_alive(head);

    let (path, query) = split_target(&head.target)?;
    let route = route(&head.method, path, query, max_receivers)?;
    let sender = matches!(
        route,
        Route::Pipe {
            role: Role::Sender,
            ..
        }
    );
    if sender && head.value("content-range").is_some() {
        // Receivers would take a piece of a file for the whole of it.
        return Err(Reject::Malformed("a sender may not send Content-Range"));
    }
    if head.method == Method::Get
        && head
            .value("service-worker")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("script"))
    {
        return Err(Reject::ServiceWorker);
    }
    let report = match param(query, "report") {
        None => None,
        Some("live") => Some(Report::Live),
        Some("end") => Some(Report::End),
        Some(_) => return Err(Reject::InvalidReport),
    };

    let text = |name: &str| head.value(name).map(|v| v.trim().to_owned());
    let pass_on = PassOn {
        content_type: text("content-type"),
        content_disposition: text("content-disposition"),
        x_piping: head
            .headers
            .iter()
            .filter(|(n, _)| n.len() >= 8 && n[..8].eq_ignore_ascii_case("x-piping"))
            .filter_map(|(n, v)| Some((n.clone(), String::from_utf8(v.clone()).ok()?)))
            .collect(),
    };
    let host = head.value("host").unwrap_or("localhost");
    let scheme = match head.value("x-forwarded-proto") {
        Some(p) if p.trim().eq_ignore_ascii_case("https") => "https",
        _ => "http",
    };
    let web = web(head, &route, query)?;
    Ok(Request {
        route,
        head_only: head.method == Method::Head,
        minor: head.minor,
        framing,
        expect_continue,
        keep_alive,
        pass_on,
        cors_headers: text("access-control-request-headers"),
        base_url: format!("{scheme}://{host}"),
        report,
        web,
    })
}

/// What a browser's request adds (see [`Web`]).
fn web(head: &Head, route: &Route, query: &str) -> Result<Web, Reject> {
    let sender = matches!(
        route,
        Route::Pipe {
            role: Role::Sender,
            ..
        }
    );
    let form = match param(query, "form") {
        Some(_) if sender => {
            let ct = head.value("content-type").unwrap_or("");
            Some(crate::multipart::boundary(ct).ok_or(Reject::Malformed(
                "?form needs a multipart/form-data body with a boundary",
            ))?)
        }
        _ => None,
    };
    let filename = param(query, "filename")
        .map(percent_decode_query)
        .filter(|v| !v.is_empty());
    let disposition = match (param(query, "download"), filename) {
        (Some("0"), _) => Disposition::Inline,
        (Some(_), name) | (None, name @ Some(_)) => Disposition::Attachment(name),
        (None, None) => Disposition::Sender,
    };
    Ok(Web {
        html: accepts_html(head.value("accept").unwrap_or("")),
        form,
        disposition,
        private_network: head
            .value("access-control-request-private-network")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true")),
        query: query.to_owned(),
    })
}

/// Whether an `Accept` value takes `text/html` (or XHTML) with a quality above zero: a
/// browser navigating. `*/*` alone does not count (curl sends it).
pub fn accepts_html(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';');
        let essence = parts.next().unwrap_or("").trim();
        let html = essence.eq_ignore_ascii_case("text/html")
            || essence.eq_ignore_ascii_case("application/xhtml+xml");
        let zero = parts.any(|p| {
            p.split_once('=').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("q")
                    && v.trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
            })
        });
        html && !zero
    })
}

/// A query value: `+` is a space and `%XX` a byte (UTF-8, invalid bytes replaced).
pub fn percent_decode_query(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |c: Option<&u8>| c.and_then(|&c| (c as char).to_digit(16));
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                if let (Some(h), Some(l)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn framing(head: &Head) -> Result<Framing, Reject> {
    let mut lengths = head.values("content-length");
    let length = lengths.next();
    if lengths.next().is_some() {
        return Err(Reject::Malformed("more than one Content-Length"));
    }
    let codings: Vec<&[u8]> = head.values("transfer-encoding").collect();
    if !codings.is_empty() {
        if length.is_some() {
            return Err(Reject::Malformed(
                "Content-Length together with Transfer-Encoding",
            ));
        }
        if head.minor == 0 {
            return Err(Reject::Malformed("Transfer-Encoding in HTTP/1.0"));
        }
        let all: Vec<String> = codings
            .iter()
            .flat_map(|v| v.split(|&c| c == b','))
            .map(|c| String::from_utf8_lossy(c).trim().to_ascii_lowercase())
            .collect();
        if all.iter().any(|c| c.is_empty()) {
            return Err(Reject::Malformed("empty transfer coding"));
        }
        if all.len() != 1 || all[0] != "chunked" {
            return Err(Reject::Coding);
        }
        return Ok(Framing::Chunked);
    }
    match length {
        None => Ok(Framing::Length(0)),
        Some(v) => parse_digits(v)
            .map(Framing::Length)
            .ok_or(Reject::Malformed("Content-Length is not a plain number")),
    }
}

/// A non-empty run of ASCII digits that fits a `u64`.
fn parse_digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn keep_alive(head: &Head) -> bool {
    let mut close = false;
    let mut keep = false;
    for v in head.values("connection") {
        for token in v.split(|&c| c == b',') {
            let t = String::from_utf8_lossy(token).trim().to_ascii_lowercase();
            close |= t == "close";
            keep |= t == "keep-alive";
        }
    }
    !close && (head.minor == 1 || keep)
}

fn split_target(target: &str) -> Result<(&str, &str), Reject> {
    let target = if target.starts_with('/') {
        target
    } else if let Some(rest) = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
    {
        rest.find('/').map_or("/", |i| &rest[i..])
    } else if target == "*" {
        "*"
    } else {
        return Err(Reject::Malformed("request target must be a path"));
    };
    let target = target.split('#').next().unwrap_or("");
    Ok(target.split_once('?').unwrap_or((target, "")))
}

fn route(method: &Method, path: &str, query: &str, max: usize) -> Result<Route, Reject> {
    if *method == Method::Options {
        return Ok(Route::Preflight);
    }
    let name = if let Some(name) = path.strip_prefix(API_PREFIX) {
        name
    } else if path == API_PREFIX.trim_end_matches('/') {
        ""
    } else if RESERVED.contains(&path) {
        return match method {
            Method::Get | Method::Head => Ok(Route::Page(page(path))),
            Method::Put | Method::Post => Err(Reject::Reserved(path.to_owned())),
            _ => Err(Reject::Method),
        };
    } else {
        &path[1.min(path.len())..]
    };
    let role = match method {
        Method::Get => Role::Receiver,
        Method::Put | Method::Post => Role::Sender,
        _ => return Err(Reject::Method),
    };
    if name.is_empty() {
        return Err(Reject::NoName);
    }
    let name = percent_decode(name)?;
    if role == Role::Receiver {
        for (key, once) in [("progress", false), ("status", true)] {
            if param(query, key).is_some() {
                return Ok(Route::Watch { name, once });
            }
        }
    }
    let n = parse_n(query, max)?;
    Ok(Route::Pipe { name, role, n })
}

fn page(path: &str) -> Page {
    match path {
        "/version" => Page::Version,
        "/healthz" => Page::Health,
        "/metrics" => Page::Metrics,
        "/favicon.ico" => Page::Favicon,
        "/robots.txt" => Page::Robots,
        "/page.js" => Page::Script,
        "/page.css" => Page::Style,
        "/noscript" => Page::Noscript,
        _ => Page::Usage,
    }
}

/// The value of the first `key` in the query string (`key` alone has the empty value).
fn param<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|&(k, _)| k == key)
        .map(|(_, v)| v)
}

/// `n` from the query string: absent is 1; anything but 1..=max is refused.
fn parse_n(query: &str, max: usize) -> Result<usize, Reject> {
    let mut found = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "n" {
            if found.is_some() {
                return Err(Reject::InvalidN { max });
            }
            found = Some(value);
        }
    }
    let Some(value) = found else { return Ok(1) };
    match parse_digits(value.as_bytes()) {
        Some(n) if n >= 1 && n <= max as u64 => Ok(n as usize),
        _ => Err(Reject::InvalidN { max }),
    }
}

/// Decodes `%XX` so that `/a%62c` and `/abc` name the same pipe.
fn percent_decode(name: &str) -> Result<String, Reject> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            match (
                bytes.get(i + 1).and_then(|&c| hex(c)),
                bytes.get(i + 2).and_then(|&c| hex(c)),
            ) {
                (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                _ => return Err(Reject::Malformed("bad percent-encoding in the path")),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    // Names are compared as bytes; a lossless string keeps them printable in logs.
    Ok(match String::from_utf8(out) {
        Ok(s) => s,
        Err(e) => e
            .into_bytes()
            .iter()
            .map(|&b| format!("%{b:02X}"))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::HeadReader;

    fn req(raw: &str) -> Result<Request, Reject> {
        let mut r = HeadReader::new(8192, 32768, 100);
        let s = r.space();
        s[..raw.len()].copy_from_slice(raw.as_bytes());
        r.fill(raw.len());
        interpret(&r.poll_head().unwrap()?, 1000)
    }

    fn get(target: &str) -> Result<Request, Reject> {
        req(&format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n"))
    }

    fn pipe(name: &str, role: Role, n: usize) -> Route {
        Route::Pipe {
            name: name.into(),
            role,
            n,
        }
    }

    #[test]
    fn prefix_and_bare_path_name_the_same_pipe() {
        assert_eq!(
            get("/api/v1/pipe/a/b?n=3").unwrap().route,
            pipe("a/b", Role::Receiver, 3)
        );
        assert_eq!(
            get("/a/b?n=3").unwrap().route,
            pipe("a/b", Role::Receiver, 3)
        );
        assert_eq!(get("/a%2Fb").unwrap().route, pipe("a/b", Role::Receiver, 1));
        assert_eq!(
            get("/api/v1/pipe/help").unwrap().route,
            pipe("help", Role::Receiver, 1)
        );
        assert_eq!(
            get("/x?foo=1&n=2#frag").unwrap().route,
            pipe("x", Role::Receiver, 2)
        );
    }

    #[test]
    fn n_outside_one_to_max_is_400_saying_what_is_allowed() {
        for q in [
            "n=0",
            "n=-1",
            "n=abc",
            "n=1.5",
            "n=",
            "n=1001",
            "n=+2",
            "n=99999999999999999999",
            "n=1&n=2",
        ] {
            let e = get(&format!("/x?{q}")).unwrap_err();
            assert_eq!(e.status(), 400, "{q}");
            assert!(e.to_string().contains("from 1 to 1000"), "{q}");
        }
        assert_eq!(
            get("/x?n=1000").unwrap().route,
            pipe("x", Role::Receiver, 1000)
        );
    }

    #[test]
    fn reserved_paths_are_pages_and_refuse_senders() {
        assert_eq!(get("/").unwrap().route, Route::Page(Page::Usage));
        assert_eq!(get("/healthz").unwrap().route, Route::Page(Page::Health));
        let e = req("PUT /help HTTP/1.1\r\nHost: h\r\n\r\n").unwrap_err();
        assert_eq!(e.status(), 400);
        assert_eq!(get("/api/v1/pipe/").unwrap_err(), Reject::NoName);
        assert_eq!(
            req("DELETE /x HTTP/1.1\r\nHost: h\r\n\r\n")
                .unwrap_err()
                .status(),
            405
        );
        assert_eq!(
            req("OPTIONS /x HTTP/1.1\r\nHost: h\r\n\r\n").unwrap().route,
            Route::Preflight
        );
    }

    #[test]
    fn framing_is_strict() {
        let cases = [
            ("Content-Length: 5\r\nTransfer-Encoding: chunked", 400),
            ("Content-Length: 5\r\nContent-Length: 5", 400),
            ("Content-Length: +5", 400),
            ("Content-Length: 0x10", 400),
            ("Content-Length: 5, 5", 400),
            ("Content-Length: 99999999999999999999999", 400),
            ("Transfer-Encoding: gzip", 501),
            ("Transfer-Encoding: gzip, chunked", 501),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
                501,
            ),
            ("Expect: something", 417),
        ];
        for (h, status) in cases {
            let e = req(&format!("PUT /x HTTP/1.1\r\nHost: h\r\n{h}\r\n\r\n")).unwrap_err();
            assert_eq!(e.status(), status, "{h}");
        }
        let e = req("PUT /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err();
        assert_eq!(e.status(), 400);
        assert_eq!(req("GET / HTTP/1.1\r\n\r\n").unwrap_err().status(), 400);
        assert_eq!(
            req("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
                .unwrap_err()
                .status(),
            400
        );
        assert!(req("GET / HTTP/1.0\r\n\r\n").is_ok());
        let r = req("PUT /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\nExpect: 100-Continue\r\n\r\n").unwrap();
        assert_eq!(r.framing, Framing::Chunked);
        assert!(r.expect_continue);
    }

    #[test]
    fn sender_headers_are_kept_for_receivers() {
        let r = req("PUT /x HTTP/1.1\r\nHost: h\r\nContent-Type: text/csv\r\nX-Piping-A: 1\r\nx-piping: 2\r\nX-Other: 3\r\n\r\n").unwrap();
        assert_eq!(r.pass_on.content_type.as_deref(), Some("text/csv"));
        assert_eq!(
            r.pass_on.x_piping,
            vec![
                ("X-Piping-A".into(), "1".into()),
                ("x-piping".into(), "2".into())
            ]
        );
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        assert!(get("/").unwrap().keep_alive);
        assert!(
            !req("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
                .unwrap()
                .keep_alive
        );
        assert!(!req("GET / HTTP/1.0\r\n\r\n").unwrap().keep_alive);
        assert!(
            req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .unwrap()
                .keep_alive
        );
    }

    #[test]
    fn a_ranged_upload_is_refused_and_a_ranged_download_is_not_a_sender() {
        let r = req("PUT /x HTTP/1.1\r\nHost: h\r\nContent-Range: bytes 0-9/100\r\nContent-Length: 10\r\n\r\n");
        assert_eq!(
            r,
            Err(Reject::Malformed("a sender may not send Content-Range"))
        );
        assert_eq!(r.unwrap_err().status(), 400);
    }

    #[test]
    fn report_is_live_or_end() {
        let sender = |q: &str| req(&format!("PUT /x{q} HTTP/1.1\r\nHost: h\r\n\r\n"));
        assert_eq!(sender("").unwrap().report, None);
        assert_eq!(sender("?report=end&n=2").unwrap().report, Some(Report::End));
        assert_eq!(
            sender("?n=2&report=live").unwrap().report,
            Some(Report::Live)
        );
        let bad = sender("?report=later").unwrap_err();
        assert_eq!(bad, Reject::InvalidReport);
        assert_eq!(bad.status(), 400);
        assert!(bad.to_string().contains("live"));
    }

    #[test]
    fn browsers_get_watchers_downloads_and_forms() {
        assert_eq!(
            get("/a/b?progress").unwrap().route,
            Route::Watch {
                name: "a/b".into(),
                once: false
            }
        );
        assert_eq!(
            get("/api/v1/pipe/x?n=3&status").unwrap().route,
            Route::Watch {
                name: "x".into(),
                once: true
            }
        );
        let d = |q: &str| get(&format!("/x?{q}")).unwrap().web.disposition;
        assert_eq!(d(""), Disposition::Sender);
        assert_eq!(d("download"), Disposition::Attachment(None));
        assert_eq!(d("download=0"), Disposition::Inline);
        assert_eq!(
            d("filename=a+b%C3%A9.txt"),
            Disposition::Attachment(Some("a b\u{e9}.txt".into()))
        );
        let sw = req("GET /x HTTP/1.1\r\nHost: h\r\nService-Worker: script\r\n\r\n");
        assert_eq!(sw.unwrap_err().status(), 403);
        let form = |ct: &str| {
            req(&format!("POST /x?form HTTP/1.1\r\nHost: h\r\nContent-Type: {ct}\r\nContent-Length: 1\r\n\r\n"))
        };
        assert_eq!(
            form("multipart/form-data; boundary=zz")
                .unwrap()
                .web
                .form
                .as_deref(),
            Some("zz")
        );
        assert_eq!(form("text/plain").unwrap_err().status(), 400);
        // Without ?form, multipart bytes are piped as they are.
        let plain = req("POST /x HTTP/1.1\r\nHost: h\r\nContent-Type: multipart/form-data; boundary=zz\r\nContent-Length: 1\r\n\r\n");
        assert_eq!(plain.unwrap().web.form, None);
    }

    #[test]
    fn html_is_for_browsers_only() {
        assert!(accepts_html(
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        ));
        assert!(!accepts_html("*/*"));
        assert!(!accepts_html("text/html;q=0, */*"));
        assert!(!accepts_html(""));
    }
}
