//! The gateway's one metrics registry (`prometheus-client`): `daemon` builds it at start, every part registers
//! its metrics into it ([`crate::core::Metrics`], [`crate::offramp::OfframpCounters`], the HTTP and SSH
//! inspectors' counters, [`crate::audit::AuditCounters`]), and `admin` renders it at `GET /metrics` in the
//! Prometheus text format (0.0.4).
//!
//! Two ways in, by who writes:
//! - the data path's counters stay plain single-writer atomics that the on-ramp thread bumps with a load and a
//!   store (no lock, no read-modify-write on the packet path); a [`Collector`] reads them at scrape time;
//! - everything else (off-ramp, inspectors, audit) uses `prometheus-client` metrics or atomics bumped with
//!   `fetch_add`, which any number of threads may write.
//!
//! Counters are named without `_total` here; the encoder appends it (`rampart_handshakes` is exported as
//! `rampart_handshakes_total`). Never: a label whose values come from traffic (addresses, host names): only
//! tenants and closed sets (reasons, kinds, decisions).
#![deny(unsafe_code)]

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The `Content-Type` of `GET /metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every metric of one gateway run. Built mutable at start, then shared read-only (scrapes only read).
#[derive(Debug, Default)]
pub struct MetricsRegistry {
    registry: Registry,
}

impl MetricsRegistry {
    pub fn new() -> MetricsRegistry {
        MetricsRegistry::default()
    }

    /// Where parts register their metrics and collectors (at start only).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Adds a collector (counters read at scrape time).
    pub fn collect(&mut self, c: impl Collector) {
        self.registry.register_collector(Box::new(c));
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail; a collector's error would leave a partial text, still valid.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Labels of one sample, in order.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// Writes one family from a collector: `kind` counter (name without `_total`) or gauge, then its samples.
pub fn family<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels<'a>, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in samples {
        let mut s = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => {
                s.encode_counter::<prometheus_client::encoding::NoLabelSet, u64, u64>(&v, None)?
            }
            _ => s.encode_gauge(&v)?,
        }
    }
    Ok(())
}

/// One unlabelled counter (name without `_total`).
pub fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    family(enc, name, help, MetricType::Counter, [(&[][..], v)])
}

/// One unlabelled gauge.
pub fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    family(enc, name, help, MetricType::Gauge, [(&[][..], v)])
}

/// A strict reader of the text exposition, for tests: every sample line must follow a `# TYPE` line of its
/// family, and values must be numbers.
#[cfg(test)]
pub(crate) mod exposition {
    #[derive(Debug, Clone, PartialEq)]
    pub struct Sample {
        pub name: String,
        pub labels: Vec<(String, String)>,
        pub value: f64,
    }

    /// A family as its `# TYPE` line declares it: name, kind.
    pub type Family = (String, String);

    /// Families and samples of `text`, or what is wrong with it.
    pub fn parse(text: &str) -> Result<(Vec<Family>, Vec<Sample>), String> {
        let mut families: Vec<Family> = Vec::new();
        let mut samples = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest
                    .split_once(' ')
                    .ok_or_else(|| bad("TYPE without a kind"))?;
                if !["counter", "gauge"].contains(&kind) {
                    return Err(bad("unexpected kind"));
                }
                if families.iter().any(|(f, _)| f == name) {
                    return Err(bad("family declared twice"));
                }
                families.push((name.to_string(), kind.to_string()));
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                return Err(bad("unexpected line"));
            }
            let (series, value) = line.rsplit_once(' ').ok_or_else(|| bad("no value"))?;
            let value: f64 = value.parse().map_err(|_| bad("value is not a number"))?;
            let (name, labels) = match series.split_once('{') {
                None => (series, Vec::new()),
                Some((name, body)) => {
                    let body = body
                        .strip_suffix('}')
                        .ok_or_else(|| bad("unterminated labels"))?;
                    let mut labels = Vec::new();
                    for pair in body.split(',').filter(|p| !p.is_empty()) {
                        let (k, v) = pair.split_once('=').ok_or_else(|| bad("label without ="))?;
                        let v = v
                            .strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .ok_or_else(|| bad("label value not quoted"))?;
                        labels.push((k.to_string(), v.to_string()));
                    }
                    (name, labels)
                }
            };
            match families.last() {
                Some((f, _)) if f == name => {}
                _ => return Err(bad("sample outside its family")),
            }
            samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        Ok((families, samples))
    }

    /// The value of the series `name` with exactly `labels`.
    pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let (_, samples) = parse(text).expect("valid exposition");
        samples
            .into_iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|s| s.value)
    }
}
