//! `/metrics` in the Prometheus (OpenMetrics) text format, encoded by `prometheus-client`.
//!
//! The values are read fresh on every scrape, so each scrape fills a registry of its own.
//! Names are given as the samples are written (`relay_x_total` for counters: the encoder adds
//! the suffix, and names the family without it, as OpenMetrics does).

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// One sample's labels, in the order they are written.
pub type Labels = Vec<(&'static str, String)>;

/// What `/metrics` answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Key = Vec<(String, String)>;

#[derive(Default)]
pub struct Exposition {
    registry: Registry,
}

/// The encoder ends every help text with a full stop.
fn help(text: &str) -> &str {
    text.strip_suffix('.').unwrap_or(text)
}

fn key(labels: Labels) -> Key {
    labels.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

impl Exposition {
    pub fn gauge(&mut self, name: &str, text: &str, value: u64) {
        let gauge = Gauge::<u64, std::sync::atomic::AtomicU64>::default();
        gauge.set(value);
        self.registry.register(name, help(text), gauge);
    }

    /// `name` ends in `_total`.
    pub fn counter(&mut self, name: &str, text: &str, value: u64) {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        self.registry.register(
            name.strip_suffix("_total").unwrap_or(name),
            help(text),
            counter,
        );
    }

    pub fn gauges(
        &mut self,
        name: &str,
        text: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) {
        let family = Family::<Key, Gauge<u64, std::sync::atomic::AtomicU64>>::default();
        for (labels, value) in samples {
            family.get_or_create(&key(labels)).set(value);
        }
        self.registry.register(name, help(text), family);
    }

    /// `name` ends in `_total`.
    pub fn counters(
        &mut self,
        name: &str,
        text: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) {
        let family = Family::<Key, Counter<u64>>::default();
        for (labels, value) in samples {
            family.get_or_create(&key(labels)).inc_by(value);
        }
        self.registry.register(
            name.strip_suffix("_total").unwrap_or(name),
            help(text),
            family,
        );
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail; an empty answer would be the worst case.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::Exposition;

    #[test]
    fn names_and_labels_are_written_as_given() {
        let mut e = Exposition::default();
        e.gauge("relay_allocations", "Live allocations.", 3);
        e.counters(
            "relay_relayed_packets_total",
            "Datagrams relayed, by path and direction.",
            [(
                vec![
                    ("path", "socket".to_owned()),
                    ("direction", "to_peer".to_owned()),
                ],
                7,
            )],
        );
        e.counter("relay_unauth_refused_total", "Refused.", 0);
        let text = e.encode();
        for line in [
            "# HELP relay_allocations Live allocations.\n",
            "# TYPE relay_allocations gauge\n",
            "relay_allocations 3\n",
            "# TYPE relay_relayed_packets counter\n",
            "relay_relayed_packets_total{path=\"socket\",direction=\"to_peer\"} 7\n",
            "relay_unauth_refused_total 0\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
