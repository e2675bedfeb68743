//! A newcomer for a place another party holds: held while the pipe looks whether that
//! party has gone, then seated or refused.

use super::*;

/// `curl URL` killed and run again at once: the new receiver is held while the old one,
/// whose end was just read, is probed; the probe finds it gone and the new one takes its
/// place, then gets the transfer.
#[test]
fn a_receiver_retried_at_once_takes_the_place_of_the_one_that_went() {
    let mut h = Harness::new(1);
    let old = h.join(RECEIVER);
    h.eof(old);
    assert_eq!(h.text(old), "HTTP/1.1 102 Processing\r\n\r\n");
    let new = h.join(RECEIVER);
    assert_eq!(h.text(new), "", "held: told nothing yet");
    assert!(h.take_events().is_empty(), "not refused");
    assert!(!h.pipe.take_check(old), "no verdict yet");
    h.pass(REPROBE);
    assert_eq!(
        h.text(old),
        "HTTP/1.1 102 Processing\r\n\r\n".repeat(2),
        "written to again: a client that has gone fails this write"
    );
    assert!(!h.pipe.take_check(old), "no verdict yet");
    h.pass(REPROBE);
    // The kernel says the probes drew a reset: it has gone.
    h.check(old, PeerState::Reset);
    assert_eq!(h.take_events(), [Event::Left(Role::Receiver)]);
    assert!(h.pipe.is_closed(old));
    let s = h.join(SENDER);
    assert_eq!(h.take_events(), [Event::Started]);
    assert!(
        h.text(new).starts_with("HTTP/1.1 200 OK\r\n"),
        "{}",
        h.text(new)
    );
    assert!(h
        .text(s)
        .contains("[INFO] all 1 receiver(s) joined, sending"));
}

/// A receiver that half-closed and still reads is there: the newcomer held for its place
/// gets, once the probe says so, the 409 the registry would have given.
#[test]
fn a_newcomer_for_a_half_closed_receiver_still_there_gets_409_after_the_verdict() {
    let mut h = Harness::new(1);
    let old = h.join(RECEIVER);
    h.eof(old);
    let new = h.join(RECEIVER);
    h.until_verdict();
    assert_eq!(h.text(new), "");
    h.check(old, PeerState::Closed);
    let why = Reject::ReceiversFull { n: 1 };
    assert_eq!(
        h.take_events(),
        [Event::Refused(Role::Receiver, why.clone())]
    );
    let text = h.text(new);
    assert!(text.starts_with("HTTP/1.1 409 Conflict\r\n"), "{text}");
    assert!(text.ends_with(&format!("{why}\n")), "{text}");
    assert!(
        !h.pipe.is_closed(old),
        "the half-closed receiver keeps its place"
    );
    // It gets the transfer.
    h.join(SENDER);
    assert_eq!(h.take_events(), [Event::Started]);
    assert!(h.text(old).contains("HTTP/1.1 200 OK\r\n"));
}

/// `curl -T file URL` killed while it waits, and run again at once: the waiting sender is
/// written a heartbeat line at once (its socket may look open: a body still in its
/// kernel holds its FIN back), the reset that answers it frees the place, and the new
/// sender takes it. It got no `100 Continue` while it was held.
#[test]
fn a_sender_retried_at_once_has_the_old_one_probed_at_once_and_takes_its_place() {
    let mut h = Harness::new(1);
    let old = h.join(SENDER);
    let before = h.text(old).len();
    let new = h.join(SENDER_EXPECTING);
    assert_eq!(h.text(new), "", "no go-ahead while held");
    assert!(h.text(old)[before..].contains("[INFO] still waiting"));
    assert!(h.take_events().is_empty());
    assert!(!h.pipe.take_check(old), "the verdict comes REPROBE later");
    h.pass(REPROBE);
    h.check(old, PeerState::Reset);
    assert_eq!(h.take_events(), [Event::Left(Role::Sender)]);
    // Its go-ahead now, alone; its head after its first body bytes.
    assert_eq!(h.text(new), "HTTP/1.1 100 Continue\r\n\r\n");
    let buf = h.pipe.read_buf(new).expect("its first bytes are read");
    buf[..3].copy_from_slice(b"abc");
    h.pipe.handle_read(new, 3, h.now);
    h.flush();
    let text = h.text(new);
    assert!(
        text.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"),
        "{text}"
    );
    assert!(
        text.contains("[INFO] waiting for 1 receiver(s), 0 here"),
        "{text}"
    );
}

/// A newcomer for places whose parties are all there is refused as soon as they have
/// been looked at: the same 409 as the registry's, with no `100 Continue`.
#[test]
fn a_newcomer_for_places_whose_parties_are_there_is_refused_once_they_are_looked_at() {
    let mut h = Harness::new(1);
    let s = h.join(SENDER);
    let second = h.join(SENDER_EXPECTING);
    assert!(h.take_events().is_empty());
    h.pass(REPROBE);
    h.check(s, PeerState::Open);
    assert_eq!(
        h.take_events(),
        [Event::Refused(Role::Sender, Reject::SenderTaken)]
    );
    let text = h.text(second);
    assert!(text.starts_with("HTTP/1.1 409 Conflict\r\n"), "{text}");
    assert!(
        text.ends_with("this pipe already has its sender\n"),
        "{text}"
    );
    let mut h = Harness::new(2);
    let rs = [h.join(RECEIVER), h.join(RECEIVER)];
    let third = h.join(RECEIVER);
    h.check(rs[0], PeerState::Open);
    assert!(h.take_events().is_empty(), "the other is not looked at yet");
    h.check(rs[1], PeerState::Open);
    assert_eq!(
        h.take_events(),
        [Event::Refused(
            Role::Receiver,
            Reject::ReceiversFull { n: 2 }
        )]
    );
    assert!(h.text(third).starts_with("HTTP/1.1 409 Conflict\r\n"));
}

/// A receiver's FIN that the kernel has but the pipe has not read yet is enough to put
/// it in doubt when a newcomer comes; an HTTP/1.0 receiver, which cannot be probed, has
/// gone when it closed.
#[test]
fn a_fin_not_read_yet_puts_a_receiver_in_doubt_and_ends_an_http10_one() {
    let mut h = Harness::new(1);
    let old = h.join(RECEIVER);
    let new = h.join(RECEIVER);
    h.check(old, PeerState::Closed);
    assert_eq!(h.text(old), "HTTP/1.1 102 Processing\r\n\r\n");
    h.until_verdict();
    h.check(old, PeerState::Reset);
    assert_eq!(h.take_events(), [Event::Left(Role::Receiver)]);
    h.join(SENDER);
    assert_eq!(h.take_events(), [Event::Started]);
    assert!(h.text(new).starts_with("HTTP/1.1 200 OK\r\n"));

    let mut h = Harness::new(1);
    let old = h.join("GET /x HTTP/1.0\r\n\r\n");
    let new = h.join(RECEIVER);
    h.check(old, PeerState::Closed);
    assert_eq!(h.take_events(), [Event::Left(Role::Receiver)]);
    assert!(h.pipe.is_closed(old));
    h.join(SENDER);
    assert!(h.text(new).starts_with("HTTP/1.1 200 OK\r\n"));
}

/// Two newcomers for one place in doubt: the first takes it, the second is refused.
#[test]
fn newcomers_take_freed_places_in_the_order_they_came() {
    let mut h = Harness::new(1);
    let old = h.join(RECEIVER);
    h.eof(old);
    let first = h.join(RECEIVER);
    let second = h.join(RECEIVER);
    h.until_verdict();
    h.check(old, PeerState::Reset);
    assert_eq!(
        h.take_events(),
        [
            Event::Left(Role::Receiver),
            Event::Refused(Role::Receiver, Reject::ReceiversFull { n: 1 })
        ]
    );
    assert_eq!(h.text(first), "");
    assert!(h.text(second).starts_with("HTTP/1.1 409 Conflict\r\n"));
    h.join(SENDER);
    assert!(h.text(first).starts_with("HTTP/1.1 200 OK\r\n"));
}

/// The transfer does not start with a party in doubt: it may have gone, and a newcomer
/// may be about to take its place. Once it is found there, it starts.
#[test]
fn the_transfer_waits_for_the_verdict_on_a_party_in_doubt() {
    let mut h = Harness::new(1);
    let r = h.join(RECEIVER);
    h.eof(r);
    h.join(SENDER);
    assert!(
        h.take_events().is_empty(),
        "not started with a receiver in doubt"
    );
    h.until_verdict();
    h.check(r, PeerState::Closed);
    assert_eq!(h.take_events(), [Event::Started]);
    assert!(h.text(r).contains("HTTP/1.1 200 OK\r\n"));
}

/// A hold is bounded: a newcomer whose verdict never comes (its check is never answered)
/// gets its 409 at [`HOLD`].
#[test]
fn a_hold_ends_with_409_at_the_bound() {
    let mut h = Harness::new(1);
    let old = h.join(RECEIVER);
    h.eof(old);
    let new = h.join(RECEIVER);
    assert!(h.pipe.poll_timeout().is_some_and(|t| t <= h.now + HOLD));
    h.pass(HOLD);
    assert_eq!(
        h.take_events(),
        [Event::Refused(
            Role::Receiver,
            Reject::ReceiversFull { n: 1 }
        )]
    );
    assert!(h.text(new).starts_with("HTTP/1.1 409 Conflict\r\n"));
}

/// A newcomer that reaches a pipe whose transfer started (the registry had not heard
/// yet) is refused at once; a shutdown lets a held one go with 503.
#[test]
fn a_running_pipe_refuses_at_once_and_a_shutdown_lets_the_held_go() {
    let mut h = Harness::new(1);
    h.join(RECEIVER);
    h.join(SENDER);
    assert_eq!(h.take_events(), [Event::Started]);
    let late = h.join(RECEIVER);
    assert_eq!(
        h.take_events(),
        [Event::Refused(
            Role::Receiver,
            Reject::ReceiversFull { n: 1 }
        )]
    );
    assert!(h.text(late).starts_with("HTTP/1.1 409 Conflict\r\n"));

    let mut h = Harness::new(1);
    let old = h.join(RECEIVER);
    h.eof(old);
    let held = h.join(RECEIVER);
    h.pipe.handle_shutdown(h.now);
    h.flush();
    assert!(h
        .take_events()
        .contains(&Event::Refused(Role::Receiver, Reject::ShuttingDown)));
    assert!(h.text(held).starts_with("HTTP/1.1 503 "));
}

/// Where the kernel cannot tell (it says `Open`), the second probe's write is the
/// verdict: it fails on a client that has gone, and the held newcomer takes the place.
#[test]
fn where_the_kernel_cannot_tell_the_second_probe_is_the_verdict() {
    let mut h = Harness::new(1);
    let old = h.join(RECEIVER);
    h.eof(old);
    let new = h.join(RECEIVER);
    h.now += REPROBE;
    h.pipe.handle_timeout(h.now);
    // The second probe's write fails.
    h.pipe.handle_error(old, h.now);
    h.flush();
    assert_eq!(h.take_events(), [Event::Left(Role::Receiver)]);
    h.join(SENDER);
    assert!(h.text(new).starts_with("HTTP/1.1 200 OK\r\n"));
    // One that is there is kept when the kernel says nothing, and the held one refused.
    let mut h = Harness::new(1);
    let old = h.join(RECEIVER);
    h.eof(old);
    let new = h.join(RECEIVER);
    h.until_verdict();
    h.check(old, PeerState::Open);
    assert_eq!(
        h.take_events(),
        [Event::Refused(
            Role::Receiver,
            Reject::ReceiversFull { n: 1 }
        )]
    );
    assert!(h.text(new).starts_with("HTTP/1.1 409 Conflict\r\n"));
}
