//! `/metrics`: the collector's Prometheus metrics, encoded by `prometheus-client`.
//!
//! Two kinds of metrics:
//! - live instruments updated where things happen: the occurrence counter
//!   `hopwatch_breaks_total{kind,severity,namespace,workload,peer}` (one increment per
//!   finding of an analysed trace) and the ingest-lag histogram (seconds);
//! - a [`Snapshot`] of values read at scrape time (the collector's atomics, queue sizes,
//!   stored findings, process figures, build info), registered as a custom collector.
//!
//! The HTTP layer serves the Prometheus text format 0.0.4 (what `promtool check metrics`
//! lints) unless the scraper asks for OpenMetrics in its `Accept` header.
//! Counter names are registered without `_total`: the encoder appends it.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// Labels of `hopwatch_breaks_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakLabels {
    pub kind: String,
    pub severity: String,
    pub namespace: String,
    pub workload: String,
    pub peer: String,
}

/// `hopwatch_breaks_total`: one increment per occurrence of a finding.
pub type BreaksCounter = Family<BreakLabels, Counter>;

/// Lag from the end of a batch's newest hop to its arrival, in seconds.
#[derive(Clone, Debug)]
pub struct LagHistogram(pub Histogram);

impl Default for LagHistogram {
    fn default() -> Self {
        // 5 ms .. ~40 s: a filter flushes every second; minutes mean a stuck reporter.
        LagHistogram(Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
        ]))
    }
}

/// Output format of `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4 (`text/plain; version=0.0.4`).
    PrometheusText,
    /// OpenMetrics 1.0 (`application/openmetrics-text`).
    OpenMetrics,
}

impl Format {
    /// Chooses by the scraper's `Accept` header: OpenMetrics only when asked for.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::PrometheusText,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::PrometheusText => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Counter,
    Gauge,
}

/// A sample value: integers print as integers ("4", not "4.0").
#[derive(Clone, Copy, Debug)]
pub enum Num {
    U(u64),
    F(f64),
}

#[derive(Debug)]
struct ConstFamily {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    kind: Kind,
    samples: Vec<(Vec<(&'static str, String)>, Num)>,
}

/// Metrics whose values are read at scrape time. Names are given without `_total` and
/// without the unit (the encoder appends `_<unit>` then `_total`).
#[derive(Debug, Default)]
pub struct Snapshot(Vec<ConstFamily>);

impl Snapshot {
    fn push(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        unit: Option<Unit>,
    ) -> &mut ConstFamily {
        debug_assert!(!name.ends_with("_total"), "{name}: the encoder adds _total");
        self.0.push(ConstFamily {
            name,
            // The encoder ends the help text with a period.
            help: help.trim_end_matches('.'),
            unit,
            kind,
            samples: Vec::new(),
        });
        let i = self.0.len() - 1;
        &mut self.0[i]
    }

    /// A counter without labels (exported as `<name>_total`).
    pub fn counter(&mut self, name: &'static str, help: &'static str, v: u64) {
        self.push(name, help, Kind::Counter, None)
            .samples
            .push((Vec::new(), Num::U(v)));
    }

    /// A counter with one label, one sample per value.
    pub fn counter_by(
        &mut self,
        name: &'static str,
        help: &'static str,
        label: &'static str,
        values: &[(&str, u64)],
    ) {
        let f = self.push(name, help, Kind::Counter, None);
        for (l, v) in values {
            f.samples.push((vec![(label, l.to_string())], Num::U(*v)));
        }
    }

    /// A counter in seconds (`<name>_seconds_total`).
    pub fn counter_seconds(&mut self, name: &'static str, help: &'static str, v: f64) {
        self.push(name, help, Kind::Counter, Some(Unit::Seconds))
            .samples
            .push((Vec::new(), Num::F(v)));
    }

    /// A gauge without labels (an integer: a count or a size).
    pub fn gauge(&mut self, name: &'static str, help: &'static str, v: u64) {
        self.push(name, help, Kind::Gauge, None)
            .samples
            .push((Vec::new(), Num::U(v)));
    }

    /// A gauge with a unit (exported as `<name>_<unit>`, e.g. `_seconds`, `_bytes`).
    pub fn gauge_unit(&mut self, name: &'static str, help: &'static str, unit: Unit, v: f64) {
        self.push(name, help, Kind::Gauge, Some(unit))
            .samples
            .push((Vec::new(), Num::F(v)));
    }

    /// A gauge with labels.
    pub fn gauge_labelled(
        &mut self,
        name: &'static str,
        help: &'static str,
        samples: Vec<(Vec<(&'static str, String)>, u64)>,
    ) {
        self.push(name, help, Kind::Gauge, None).samples =
            samples.into_iter().map(|(l, v)| (l, Num::U(v))).collect();
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let ty = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut m = encoder.encode_descriptor(f.name, f.help, f.unit.as_ref(), ty)?;
            for (labels, v) in &f.samples {
                let labels: Vec<(&str, &str)> =
                    labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let fe = m.encode_family(&labels)?;
                match (f.kind, *v) {
                    (Kind::Counter, Num::U(v)) => ConstCounter::new(v).encode(fe)?,
                    (Kind::Counter, Num::F(v)) => ConstCounter::new(v).encode(fe)?,
                    (Kind::Gauge, Num::U(v)) => ConstGauge::new(v).encode(fe)?,
                    (Kind::Gauge, Num::F(v)) => ConstGauge::new(v).encode(fe)?,
                }
            }
        }
        Ok(())
    }
}

/// Process figures from `/proc/self` (Linux), as the Prometheus client libraries name them.
pub fn process_metrics(s: &mut Snapshot) {
    let Some(p) = crate::process::ProcessStats::read() else {
        return;
    };
    s.counter_seconds(
        "process_cpu",
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds,
    );
    s.gauge_unit(
        "process_resident_memory",
        "Resident memory size in bytes.",
        Unit::Bytes,
        p.resident_bytes,
    );
    s.gauge_unit(
        "process_virtual_memory",
        "Virtual memory size in bytes.",
        Unit::Bytes,
        p.virtual_bytes,
    );
    s.gauge_unit(
        "process_start_time",
        "Start time of the process since unix epoch in seconds.",
        Unit::Seconds,
        p.start_time_seconds,
    );
    s.gauge(
        "process_open_fds",
        "Number of open file descriptors.",
        p.open_fds,
    );
    s.gauge(
        "process_max_fds",
        "Maximum number of open file descriptors.",
        p.max_fds,
    );
}

/// `hopwatch_build_info{version}` (always 1).
pub fn build_info(s: &mut Snapshot) {
    s.gauge_labelled(
        "hopwatch_build_info",
        "hopwatch collector build information (value 1).",
        vec![(vec![("version", env!("CARGO_PKG_VERSION").to_string())], 1)],
    );
}

/// Encodes the live instruments and a snapshot in `format`.
pub fn encode(
    format: Format,
    breaks: &BreaksCounter,
    lag: &LagHistogram,
    snapshot: Snapshot,
) -> String {
    let mut registry = Registry::default();
    registry.register(
        "hopwatch_breaks",
        "Occurrences of findings (one per finding of an analysed trace), by kind, severity and where",
        breaks.clone(),
    );
    registry.register_with_unit(
        "hopwatch_ingest_lag",
        "Lag from the end of the newest hop of a batch to the batch's arrival",
        Unit::Seconds,
        lag.0.clone(),
    );
    registry.register_collector(Box::new(snapshot));
    let mut out = String::with_capacity(8192);
    let r = match format {
        Format::PrometheusText => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        }
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
    };
    if let Err(e) = r {
        tracing::error!(error = %e, "encoding /metrics failed");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_total_and_units_seconds() {
        let breaks = BreaksCounter::default();
        breaks
            .get_or_create(&BreakLabels {
                kind: "UPSTREAM_FAILURE".into(),
                severity: "ERROR".into(),
                namespace: "shop".into(),
                workload: "recommendations".into(),
                peer: "frontend".into(),
            })
            .inc();
        let lag = LagHistogram::default();
        lag.0.observe(0.2);
        let mut s = Snapshot::default();
        s.counter("hopwatch_hops_received", "Hops.", 3);
        s.counter_by(
            "hopwatch_batches_rejected",
            "Rejected.",
            "reason",
            &[("empty", 1)],
        );
        build_info(&mut s);
        let text = encode(Format::PrometheusText, &breaks, &lag, s);
        assert!(
            text.contains("# TYPE hopwatch_breaks_total counter"),
            "{text}"
        );
        assert!(text.contains("hopwatch_breaks_total{kind=\"UPSTREAM_FAILURE\",severity=\"ERROR\",namespace=\"shop\",workload=\"recommendations\",peer=\"frontend\"} 1"), "{text}");
        assert!(text.contains("hopwatch_hops_received_total 3"), "{text}");
        assert!(
            text.contains("hopwatch_batches_rejected_total{reason=\"empty\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("hopwatch_ingest_lag_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("hopwatch_build_info{version=\""), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        let om = encode(Format::OpenMetrics, &breaks, &lag, Snapshot::default());
        assert!(om.ends_with("# EOF\n"), "{om}");
    }

    #[test]
    fn format_follows_accept() {
        assert_eq!(Format::from_accept(None), Format::PrometheusText);
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::from_accept(Some("text/plain")),
            Format::PrometheusText
        );
    }
}
