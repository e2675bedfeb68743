//! Counters for `/metrics`, in the Prometheus text format.

use std::fmt::Write;

use crate::pipe::{Outcome, Summary};

/// What the server has done since it started.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    pub transfers_complete: u64,
    pub transfers_receivers_lost: u64,
    pub transfers_sender_gone: u64,
    pub transfers_malformed: u64,
    pub bytes_received: u64,
    pub bytes_delivered: u64,
}

impl Metrics {
    /// Counts one finished transfer.
    pub fn record(&mut self, s: &Summary) {
        match s.outcome {
            Outcome::Complete => self.transfers_complete += 1,
            Outcome::ReceiversLost => self.transfers_receivers_lost += 1,
            Outcome::SenderGone => self.transfers_sender_gone += 1,
            Outcome::Malformed(_) => self.transfers_malformed += 1,
        }
        self.bytes_received += s.bytes;
        self.bytes_delivered += s.bytes * s.complete as u64;
    }

    /// The text of `/metrics`, given the pipes that exist now.
    pub fn render(&self, waiting: usize, running: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP fanpipe_pipes Pipes by state.\n# TYPE fanpipe_pipes gauge"
        );
        let _ = writeln!(out, "fanpipe_pipes{{state=\"waiting\"}} {waiting}");
        let _ = writeln!(out, "fanpipe_pipes{{state=\"running\"}} {running}");
        let _ = writeln!(out, "# HELP fanpipe_transfers_total Finished transfers by outcome.\n# TYPE fanpipe_transfers_total counter");
        for (label, v) in [
            ("complete", self.transfers_complete),
            ("receivers_lost", self.transfers_receivers_lost),
            ("sender_gone", self.transfers_sender_gone),
            ("malformed", self.transfers_malformed),
        ] {
            let _ = writeln!(out, "fanpipe_transfers_total{{outcome=\"{label}\"}} {v}");
        }
        let _ = writeln!(out, "# HELP fanpipe_bytes_received_total Body bytes read from senders of finished transfers.\n# TYPE fanpipe_bytes_received_total counter");
        let _ = writeln!(out, "fanpipe_bytes_received_total {}", self.bytes_received);
        let _ = writeln!(out, "# HELP fanpipe_bytes_delivered_total Body bytes delivered whole to receivers.\n# TYPE fanpipe_bytes_delivered_total counter");
        let _ = writeln!(
            out,
            "fanpipe_bytes_delivered_total {}",
            self.bytes_delivered
        );
        out
    }
}
