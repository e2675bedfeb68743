//! Watchers: they see the pipe's states in order, take no place, and a quiet stream still
//! carries bytes now and then.

use super::*;

const WATCHER: &str = "GET /x?progress HTTP/1.1\r\nHost: h\r\n\r\n";
const STATUS: &str = "GET /x?status HTTP/1.1\r\nHost: h\r\n\r\n";

/// The `data` of each event of `kind` a watcher got, in order.
fn events(text: &str, kind: &str) -> Vec<String> {
    let head = format!("event: {kind}\ndata: ");
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix(&head).map(str::to_owned))
        .collect()
}

#[test]
fn a_watcher_sees_waiting_then_sending_then_done_and_takes_no_place() {
    let mut h = Harness::new(2);
    let r = h.join(RECEIVER);
    let w = h.watch(WATCHER);
    assert!(h.watched(w).starts_with("HTTP/1.1 200 OK\r\n"));
    assert!(h.watched(w).contains("Content-Type: text/event-stream"));
    let s = h.join(SENDER);
    let r2 = h.join(RECEIVER);
    assert_eq!(
        h.take_events(),
        [Event::Started],
        "the watcher took no place"
    );
    h.pipe.read_buf(s).expect("the sender is read")[..3].copy_from_slice(b"abc");
    h.pipe.handle_read(s, 3, h.now);
    h.flush();
    assert!(h.text(r).ends_with("abc"), "{}", h.text(r));
    assert!(h.text(r2).ends_with("abc"), "{}", h.text(r2));
    let text = h.watched(w);
    let states = events(&text, "state");
    assert_eq!(
        states,
        [
            r#"{"state":"waiting","n":2,"receivers":1,"sender":false}"#,
            r#"{"state":"waiting","n":2,"receivers":1,"sender":true}"#,
            r#"{"state":"sending","n":2,"receivers":2,"sender":true}"#,
        ],
        "{text}"
    );
    let done = events(&text, "done");
    assert_eq!(done.len(), 1, "{text}");
    assert!(
        done[0].starts_with(r#"{"outcome":"complete","bytes":3,"complete":2,"n":2,"#),
        "{}",
        done[0]
    );
    assert!(h.pipe.watcher_is_closed(w), "the stream ends after `done`");
}

#[test]
fn a_quiet_stream_gets_a_keep_alive_comment_every_heartbeat() {
    let mut h = Harness::new(2);
    h.join(RECEIVER);
    let w = h.watch(WATCHER);
    let before = h.watched(w);
    let heartbeat = Config::default().heartbeat_interval;
    assert!(
        h.pipe
            .poll_timeout()
            .is_some_and(|t| t <= h.now + heartbeat),
        "the pipe asks to be woken for it"
    );
    h.pass(heartbeat - Duration::from_millis(1));
    assert_eq!(h.watched(w), before, "nothing before the heartbeat");
    h.pass(Duration::from_millis(1));
    assert_eq!(h.watched(w), format!("{before}: keep-alive\n\n"));
    h.pass(heartbeat);
    assert!(h.watched(w).ends_with(": keep-alive\n\n: keep-alive\n\n"));
    assert!(!h.pipe.watcher_is_closed(w));
}

#[test]
fn at_most_sixteen_watchers_and_a_snapshot_is_not_counted() {
    let mut h = Harness::new(1);
    h.join(RECEIVER);
    let ws: Vec<WatcherId> = (0..MAX_WATCHERS).map(|_| h.watch(WATCHER)).collect();
    assert!(ws
        .iter()
        .all(|&w| h.watched(w).starts_with("HTTP/1.1 200 OK")));
    let refused = h.watch(WATCHER);
    assert!(
        h.watched(refused).starts_with("HTTP/1.1 503 "),
        "{}",
        h.watched(refused)
    );
    let snapshot = h.watch(STATUS);
    let text = h.watched(snapshot);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.ends_with(&format!(
            r#"{{"state":{{"state":"waiting","n":1,"receivers":1,"sender":false}},"progress":null,"watchers":{MAX_WATCHERS}}}
"#
        )),
        "{text}"
    );
}
