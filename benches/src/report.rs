//! Reports: one human-readable block per run, one JSON line per run for scripts, and the
//! median of repeated runs. JSON is written by hand: flat objects of numbers and strings.

use std::fmt::Write as _;

use crate::procstat::CpuTimes;
use crate::size::format_bytes;

/// What was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Server,
    Floor,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Server => "server",
            Mode::Floor => "floor",
        }
    }
}

/// Peak RSS and CPU of the watched server process over one run.
#[derive(Debug, Clone)]
pub struct ProcFigures {
    pub label: &'static str,
    pub pid: u32,
    pub peak_rss_kib: Option<u64>,
    /// RSS when the run started: a peak that cannot drop below it shows memory kept from
    /// earlier work.
    pub start_rss_kib: Option<u64>,
    /// The peak was reset before the run (else it is the peak since the process started).
    pub peak_reset: bool,
    pub cpu: Option<CpuTimes>,
}

/// Everything one run found.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub mode: Mode,
    pub target: String,
    pub size: u64,
    pub n: usize,
    pub pipes: usize,
    pub chunked: bool,
    pub checksum: bool,
    /// Seconds from the first sender's first byte to the last receiver's last byte.
    pub wall: Option<f64>,
    pub receivers_ok: usize,
    pub senders_ok: usize,
    /// The last line of the first sender's response.
    pub sender_line: Option<String>,
    /// One line per failed client; empty when every byte arrived.
    pub failures: Vec<String>,
    pub notes: Vec<String>,
    pub proc: Option<ProcFigures>,
    pub load_cpu: CpuTimes,
}

impl RunReport {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    /// Bytes delivered in all: size × n × pipes.
    pub fn delivered(&self) -> u64 {
        self.size * (self.n * self.pipes) as u64
    }

    /// Aggregate delivered GB/s (10⁹ bytes), for a run where every byte arrived.
    pub fn gbps(&self) -> Option<f64> {
        self.wall
            .filter(|&w| w > 0.0 && self.ok())
            .map(|w| self.delivered() as f64 / w / 1e9)
    }

    /// The human-readable block, FAIL lines included.
    pub fn human(&self, run: usize, runs: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "fanpipe-load: {} {}  run {run} of {runs}",
            self.mode.name(),
            self.target
        );
        let _ = writeln!(
            out,
            "  payload     {} ({} bytes) x n={} x pipes={}{}",
            format_bytes(self.size),
            self.size,
            self.n,
            self.pipes,
            if self.chunked { ", chunked upload" } else { "" }
        );
        match self.wall {
            Some(wall) => {
                let _ = writeln!(out, "  wall        {wall:.3} s (first sender's first byte to last receiver's last byte)");
            }
            None => {
                let _ = writeln!(out, "  wall        none (no transfer completed)");
            }
        }
        match self.gbps() {
            Some(gbps) => {
                let _ = writeln!(
                    out,
                    "  delivered   {gbps:.3} GB/s aggregate ({} in all, {:.1} MB/s per receiver)",
                    format_bytes(self.delivered()),
                    gbps * 1e3 / (self.n * self.pipes) as f64
                );
            }
            None => {
                let _ = writeln!(out, "  delivered   no figure: the run failed");
            }
        }
        let _ = writeln!(
            out,
            "  receivers   {} of {} got every byte ({}); senders {} of {} ok",
            self.receivers_ok,
            self.n * self.pipes,
            if self.checksum {
                "length and CRC-32 checked"
            } else {
                "length checked"
            },
            self.senders_ok,
            self.pipes
        );
        if let Some(line) = &self.sender_line {
            let _ = writeln!(out, "  sender      last line: {line}");
        }
        if let Some(p) = &self.proc {
            let rss = p.peak_rss_kib.map_or("unknown".into(), |k| {
                format!("{:.1} MiB", k as f64 / 1024.0)
            });
            let reset = match (p.peak_reset, p.start_rss_kib) {
                (true, Some(k)) => format!(
                    "reset before the run, when RSS was {:.1} MiB",
                    k as f64 / 1024.0
                ),
                (true, None) => "reset before the run".to_string(),
                (false, _) => "since it started".to_string(),
            };
            let cpu = p.cpu.map_or("unknown".into(), |c| {
                format!(
                    "{:.2} s (user {:.2} + system {:.2})",
                    c.total(),
                    c.user,
                    c.system
                )
            });
            let _ = writeln!(
                out,
                "  {:<11} pid {}: peak RSS {rss} ({reset}), CPU {cpu}",
                p.label, p.pid
            );
        }
        let c = self.load_cpu;
        let _ = writeln!(
            out,
            "  load gen    CPU {:.2} s (user {:.2} + system {:.2})",
            c.total(),
            c.user,
            c.system
        );
        for note in &self.notes {
            let _ = writeln!(out, "  note        {note}");
        }
        for failure in &self.failures {
            let _ = writeln!(out, "FAIL {failure}");
        }
        out
    }

    /// One JSON line for scripts.
    pub fn json(&self, run: usize, runs: usize) -> String {
        let mut j = Json::new();
        j.str("mode", self.mode.name());
        j.str("target", &self.target);
        j.num("run", run as f64);
        j.num("runs", runs as f64);
        self.shape(&mut j);
        j.opt("wall_s", self.wall);
        j.opt("gbps", self.gbps());
        j.num("receivers_ok", self.receivers_ok as f64);
        j.num("senders_ok", self.senders_ok as f64);
        if let Some(p) = &self.proc {
            j.num("pid", p.pid as f64);
            j.opt("peak_rss_kib", p.peak_rss_kib.map(|k| k as f64));
            j.opt("start_rss_kib", p.start_rss_kib.map(|k| k as f64));
            j.bool("peak_rss_reset", p.peak_reset);
            j.opt("cpu_s", p.cpu.map(CpuTimes::total));
            j.opt("cpu_user_s", p.cpu.map(|c| c.user));
            j.opt("cpu_system_s", p.cpu.map(|c| c.system));
        }
        j.num("load_cpu_s", self.load_cpu.total());
        if let Some(line) = &self.sender_line {
            j.str("sender_last_line", line);
        }
        j.num("failures", self.failures.len() as f64);
        j.bool("ok", self.ok());
        j.finish()
    }

    fn shape(&self, j: &mut Json) {
        j.num("payload_bytes", self.size as f64);
        j.num("n", self.n as f64);
        j.num("pipes", self.pipes as f64);
        j.bool("chunked", self.chunked);
    }
}

/// Median figures over repeated runs (all of which succeeded).
#[derive(Debug, Clone)]
pub struct Summary {
    pub first: RunReport,
    pub runs: usize,
    pub wall: Option<f64>,
    pub gbps: Option<f64>,
    pub cpu: Option<f64>,
    pub peak_rss_kib: Option<u64>,
    pub load_cpu: Option<f64>,
}

/// The median of some numbers (the mean of the middle two for an even count).
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.into_iter().collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

impl Summary {
    /// Summarises runs of one mode; `None` if there are none.
    pub fn of(reports: &[RunReport]) -> Option<Summary> {
        let first = reports.first()?.clone();
        let proc = || reports.iter().filter_map(|r| r.proc.as_ref());
        Some(Summary {
            runs: reports.len(),
            wall: median(reports.iter().filter_map(|r| r.wall)),
            gbps: median(reports.iter().filter_map(RunReport::gbps)),
            cpu: median(proc().filter_map(|p| p.cpu.map(CpuTimes::total))),
            peak_rss_kib: proc().filter_map(|p| p.peak_rss_kib).max(),
            load_cpu: median(reports.iter().map(|r| r.load_cpu.total())),
            first,
        })
    }

    pub fn human(&self) -> String {
        let r = &self.first;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "fanpipe-load: {} {}  median of {} runs: {} x n={} x pipes={}",
            r.mode.name(),
            r.target,
            self.runs,
            format_bytes(r.size),
            r.n,
            r.pipes
        );
        let fmt = |v: Option<f64>, digits: usize, unit: &str| {
            v.map_or("none".to_string(), |v| format!("{v:.digits$}{unit}"))
        };
        let _ = writeln!(out, "  wall        {}", fmt(self.wall, 3, " s"));
        let _ = writeln!(
            out,
            "  delivered   {}",
            fmt(self.gbps, 3, " GB/s aggregate")
        );
        if let Some(p) = &r.proc {
            let rss = self.peak_rss_kib.map(|k| k as f64 / 1024.0);
            let _ = writeln!(
                out,
                "  {:<11} CPU {} per run, peak RSS {} (highest run)",
                p.label,
                fmt(self.cpu, 2, " s"),
                fmt(rss, 1, " MiB")
            );
        }
        let _ = writeln!(
            out,
            "  load gen    CPU {} per run",
            fmt(self.load_cpu, 2, " s")
        );
        out
    }

    pub fn json(&self) -> String {
        let r = &self.first;
        let mut j = Json::new();
        j.str("mode", r.mode.name());
        j.str("target", &r.target);
        j.str("run", "median");
        j.num("runs", self.runs as f64);
        r.shape(&mut j);
        j.opt("wall_s", self.wall);
        j.opt("gbps", self.gbps);
        if r.proc.is_some() {
            j.opt("peak_rss_kib", self.peak_rss_kib.map(|k| k as f64));
            j.opt("cpu_s", self.cpu);
        }
        j.opt("load_cpu_s", self.load_cpu);
        j.finish()
    }
}

/// A flat JSON object built field by field.
pub struct Json(String);

impl Default for Json {
    fn default() -> Self {
        Json::new()
    }
}

impl Json {
    pub fn new() -> Self {
        Json(String::from("{"))
    }

    fn key(&mut self, key: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        escape_into(&mut self.0, key);
        self.0.push(':');
    }

    pub fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        escape_into(&mut self.0, value);
    }

    pub fn num(&mut self, key: &str, value: f64) {
        self.key(key);
        if !value.is_finite() {
            self.0.push_str("null");
        } else if value.fract() == 0.0 && value.abs() < 1e15 {
            let _ = write!(self.0, "{}", value as i64);
        } else {
            let _ = write!(self.0, "{value:.6}");
        }
    }

    pub fn opt(&mut self, key: &str, value: Option<f64>) {
        match value {
            Some(v) => self.num(key, v),
            None => {
                self.key(key);
                self.0.push_str("null");
            }
        }
    }

    pub fn bool(&mut self, key: &str, value: bool) {
        self.key(key);
        self.0.push_str(if value { "true" } else { "false" });
    }

    pub fn finish(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

fn escape_into(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_json() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0]), Some(2.5));
        assert_eq!(median([]), None);
        let mut j = Json::new();
        j.str("a\"", "x\ny");
        j.num("n", 30.0);
        j.num("r", 0.5);
        j.opt("none", None);
        j.bool("ok", true);
        assert_eq!(
            j.finish(),
            r#"{"a\"":"x\ny","n":30,"r":0.500000,"none":null,"ok":true}"#
        );
    }
}
