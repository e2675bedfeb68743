//! Counters for `/metrics`, in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::budget::MemoryBudget;
use crate::chunked::BodyError;
use crate::client::ClientConn;
use crate::error::Reject;
use crate::pipe::{Outcome, Summary};
use crate::registry::Counts;

/// What the server has done since it started.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    /// Finished transfers by outcome label.
    transfers: BTreeMap<&'static str, u64>,
    /// Refused requests by status.
    rejections: BTreeMap<u16, u64>,
    bytes_received: u64,
    bytes_delivered: u64,
    /// Signed-URL refusals by reason (`missing`, `bad`, `expired`).
    signature_rejections: BTreeMap<&'static str, u64>,
    /// Per-client limit refusals by limit (`connections`, `waiting_pipes`).
    client_limit_rejections: BTreeMap<&'static str, u64>,
}

/// The reasons of `fanpipe_signature_rejections_total`, each listed even at 0.
const SIGNATURE_REASONS: [&str; 3] = ["missing", "bad", "expired"];
/// The limits of `fanpipe_client_limit_rejections_total`, each listed even at 0.
const CLIENT_LIMITS: [&str; 2] = ["connections", "waiting_pipes"];

impl Outcome {
    /// Every outcome, in the order `/metrics` lists them (a malformed body counts once,
    /// whatever was wrong with it).
    pub const ALL: [Outcome; 6] = [
        Outcome::Complete,
        Outcome::ReceiversLost,
        Outcome::SenderGone,
        Outcome::Malformed(BodyError::ChunkSize),
        Outcome::Stalled,
        Outcome::Shutdown,
    ];

    /// The label of this outcome in `/metrics` and the logs.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::ReceiversLost => "receivers_lost",
            Outcome::SenderGone => "sender_gone",
            Outcome::Malformed(_) => "malformed",
            Outcome::Stalled => "stalled",
            Outcome::Shutdown => "shutdown",
        }
    }
}

impl Metrics {
    /// Counts one finished transfer. Bytes are counted when a transfer ends.
    pub fn record(&mut self, s: &Summary) {
        *self.transfers.entry(s.outcome.label()).or_default() += 1;
        self.bytes_received += s.bytes;
        self.bytes_delivered += s.bytes * s.complete as u64;
    }

    /// Counts one refused request.
    pub fn reject(&mut self, why: &Reject) {
        *self.rejections.entry(why.status()).or_default() += 1;
        if let Some(reason) = why.signature_reason() {
            *self.signature_rejections.entry(reason).or_default() += 1;
        }
        let limit = match why {
            Reject::ClientConnections { .. } => Some("connections"),
            Reject::ClientPipes { .. } => Some("waiting_pipes"),
            _ => None,
        };
        if let Some(limit) = limit {
            *self.client_limit_rejections.entry(limit).or_default() += 1;
        }
    }

    /// The text of `/metrics`, given what exists now.
    pub fn render(&self, counts: Counts, connections: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP fanpipe_connections Open client connections.\n# TYPE fanpipe_connections gauge"
        );
        let _ = writeln!(out, "fanpipe_connections {connections}");
        let _ = writeln!(out, "# HELP fanpipe_waiting_parties Senders and receivers waiting for their pipe to fill.\n# TYPE fanpipe_waiting_parties gauge");
        let _ = writeln!(out, "fanpipe_waiting_parties {}", counts.waiting_parties);
        let _ = writeln!(
            out,
            "# HELP fanpipe_pipes Pipes by state.\n# TYPE fanpipe_pipes gauge"
        );
        let _ = writeln!(
            out,
            "fanpipe_pipes{{state=\"waiting\"}} {}",
            counts.waiting_pipes
        );
        let _ = writeln!(
            out,
            "fanpipe_pipes{{state=\"running\"}} {}",
            counts.running_pipes
        );
        let _ = writeln!(out, "# HELP fanpipe_transfers_total Finished transfers by outcome.\n# TYPE fanpipe_transfers_total counter");
        for label in Outcome::ALL.map(|o| o.label()) {
            let v = self.transfers.get(label).copied().unwrap_or(0);
            let _ = writeln!(out, "fanpipe_transfers_total{{outcome=\"{label}\"}} {v}");
        }
        let _ = writeln!(out, "# HELP fanpipe_bytes_received_total Body bytes read from senders, counted when a transfer ends.\n# TYPE fanpipe_bytes_received_total counter");
        let _ = writeln!(out, "fanpipe_bytes_received_total {}", self.bytes_received);
        let _ = writeln!(out, "# HELP fanpipe_bytes_delivered_total Body bytes delivered whole to receivers, counted when a transfer ends.\n# TYPE fanpipe_bytes_delivered_total counter");
        let _ = writeln!(
            out,
            "fanpipe_bytes_delivered_total {}",
            self.bytes_delivered
        );
        let _ = writeln!(out, "# HELP fanpipe_rejections_total Refused requests by status.\n# TYPE fanpipe_rejections_total counter");
        for (status, v) in &self.rejections {
            let _ = writeln!(out, "fanpipe_rejections_total{{status=\"{status}\"}} {v}");
        }
        let _ = writeln!(out, "# HELP fanpipe_signature_rejections_total Pipe requests refused for their URL's signature, by reason.\n# TYPE fanpipe_signature_rejections_total counter");
        for reason in SIGNATURE_REASONS {
            let v = self.signature_rejections.get(reason).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "fanpipe_signature_rejections_total{{reason=\"{reason}\"}} {v}"
            );
        }
        let _ = writeln!(out, "# HELP fanpipe_client_limit_rejections_total Requests refused because their client address was over its share, by limit.\n# TYPE fanpipe_client_limit_rejections_total counter");
        for limit in CLIENT_LIMITS {
            let v = self
                .client_limit_rejections
                .get(limit)
                .copied()
                .unwrap_or(0);
            let _ = writeln!(
                out,
                "fanpipe_client_limit_rejections_total{{limit=\"{limit}\"}} {v}"
            );
        }
        out
    }
}

impl Metrics {
    /// The series of the pipes' buffer memory.
    pub fn render_memory(budget: &MemoryBudget) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP fanpipe_buffer_bytes Bytes the pipes' buffers hold now.\n# TYPE fanpipe_buffer_bytes gauge");
        let _ = writeln!(out, "fanpipe_buffer_bytes {}", budget.used());
        let _ = writeln!(out, "# HELP fanpipe_buffer_limit_bytes What the pipes' buffers may hold together (--memory-limit).\n# TYPE fanpipe_buffer_limit_bytes gauge");
        let _ = writeln!(out, "fanpipe_buffer_limit_bytes {}", budget.limit());
        out
    }
}

/// How many client connections are open, wherever their sockets are (a connection's
/// task, a pipe's task, another core). Shared by the backend's threads.
#[derive(Debug, Clone, Default)]
pub struct Connections(Arc<AtomicUsize>);

/// One open connection; it counts until dropped with its socket (and with it, the count
/// of its client, once known).
#[derive(Debug)]
pub struct OpenConn(Arc<AtomicUsize>, Option<ClientConn>);

impl OpenConn {
    /// The connection is also counted under its client until dropped.
    pub fn hold(&mut self, client: ClientConn) {
        self.1 = Some(client);
    }
}

impl Connections {
    /// Counts a connection just accepted. It is to be answered with the refusal, if
    /// any: past `max`, a connection only gets its `503`.
    pub fn open(&self, max: usize) -> (OpenConn, Option<Reject>) {
        let before = self.0.fetch_add(1, Ordering::Relaxed);
        let full = (before >= max).then_some(Reject::TooManyConnections);
        (OpenConn(self.0.clone(), None), full)
    }

    /// Open connections now.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_series() {
        let mut m = Metrics::default();
        m.record(&Summary {
            name: "a".into(),
            n: 2,
            bytes: 10,
            complete: 2,
            seconds: 1.0,
            outcome: Outcome::Complete,
        });
        m.reject(&Reject::Busy);
        m.reject(&Reject::SignatureExpired { ago: 5 });
        m.reject(&Reject::SignatureWrongRole {
            signed_for: crate::request::Role::Sender,
        });
        m.reject(&Reject::ClientPipes { max: 1 });
        let counts = Counts {
            waiting_pipes: 1,
            running_pipes: 2,
            waiting_parties: 3,
        };
        let text = m.render(counts, 7);
        for line in [
            "fanpipe_connections 7",
            "fanpipe_waiting_parties 3",
            "fanpipe_pipes{state=\"waiting\"} 1",
            "fanpipe_pipes{state=\"running\"} 2",
            "fanpipe_transfers_total{outcome=\"complete\"} 1",
            "fanpipe_transfers_total{outcome=\"stalled\"} 0",
            "fanpipe_bytes_received_total 10",
            "fanpipe_bytes_delivered_total 20",
            "fanpipe_rejections_total{status=\"409\"} 1",
            "fanpipe_rejections_total{status=\"410\"} 1",
            "fanpipe_signature_rejections_total{reason=\"missing\"} 0",
            "fanpipe_signature_rejections_total{reason=\"bad\"} 1",
            "fanpipe_signature_rejections_total{reason=\"expired\"} 1",
            "fanpipe_client_limit_rejections_total{limit=\"connections\"} 0",
            "fanpipe_client_limit_rejections_total{limit=\"waiting_pipes\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn renders_the_buffer_memory() {
        let text = Metrics::render_memory(&MemoryBudget::new(1 << 20));
        assert!(
            text.lines().any(|l| l == "fanpipe_buffer_bytes 0"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l == "fanpipe_buffer_limit_bytes 1048576"),
            "{text}"
        );
    }

    #[test]
    fn every_outcome_has_its_own_label_and_a_series() {
        let labels = Outcome::ALL.map(|o| o.label());
        let mut distinct = labels.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), labels.len(), "{labels:?}");
        let text = Metrics::default().render(Counts::default(), 0);
        for label in labels {
            let line = format!("fanpipe_transfers_total{{outcome=\"{label}\"}} 0");
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        let malformed = Outcome::Malformed(BodyError::TrailerTooLarge);
        assert_eq!(malformed.label(), "malformed");
    }

    #[test]
    fn connections_past_the_limit_get_503_and_count_until_dropped() {
        let c = Connections::default();
        let (a, full) = c.open(2);
        assert!(full.is_none());
        let (b, full) = c.open(2);
        assert!(full.is_none());
        let (d, full) = c.open(2);
        assert_eq!(full.map(|r| r.status()), Some(503));
        assert_eq!(c.count(), 3);
        drop((a, d));
        assert_eq!(c.count(), 1);
        let (_e, full) = c.open(2);
        assert!(full.is_none());
        drop(b);
    }
}
