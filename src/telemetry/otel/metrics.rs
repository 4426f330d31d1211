//! The `/metrics` families as OTLP metrics: counters as monotonic
//! cumulative sums, gauges as gauges, histograms as explicit-bucket
//! histograms (cumulative).
//!
//! They are read back from the registry's own Prometheus text
//! ([`crate::metrics::Registry::render`]) rather than from its atomics: the
//! text is the one place that decides which families and label sets exist
//! and how each value is computed, so what OTLP receives is what a scrape
//! shows, family for family, and a family added to the registry is
//! exported without a change here. Keyhole writes that text itself (one
//! escaping rule, one number format), and it is read once per export
//! interval, not per connection.

use super::proto::{Data, HistogramPoint, KeyValue, Metric, Number, NumberPoint};

/// The families in `text` (the text exposition format as keyhole writes
/// it). A line that does not parse is skipped: an export is never refused
/// over one sample.
pub fn from_exposition(text: &str) -> Vec<Metric> {
    let mut out: Vec<Metric> = Vec::new();
    let mut help = String::new();
    let mut current: Option<(String, Kind)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (_, h) = rest.split_once(' ').unwrap_or((rest, ""));
            help = unescape_help(h);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let Some((name, kind)) = rest.split_once(' ') else {
                continue;
            };
            let kind = match kind {
                "counter" => Kind::Counter,
                "gauge" => Kind::Gauge,
                "histogram" => Kind::Histogram,
                _ => continue,
            };
            let data = match kind {
                Kind::Counter => Data::Sum(Vec::new()),
                Kind::Gauge => Data::Gauge(Vec::new()),
                Kind::Histogram => Data::Histogram(Vec::new()),
            };
            out.push(Metric {
                name: name.to_owned(),
                description: std::mem::take(&mut help),
                unit: unit(name).to_owned(),
                data,
            });
            current = Some((name.to_owned(), kind));
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (Some((family, kind)), Some(metric)) = (&current, out.last_mut()) else {
            continue;
        };
        let Some((name, labels, value)) = sample(line) else {
            continue;
        };
        match (&mut metric.data, kind) {
            (Data::Sum(points) | Data::Gauge(points), Kind::Counter | Kind::Gauge)
                if name == *family =>
            {
                points.push(NumberPoint {
                    attributes: attributes(labels),
                    value: number(value),
                });
            }
            (Data::Histogram(points), Kind::Histogram) => {
                histogram_sample(points, family, &name, labels, value)
            }
            _ => {}
        }
    }
    // Histograms come as cumulative counts per bound: OTLP wants each
    // bucket's own count.
    for metric in &mut out {
        if let Data::Histogram(points) = &mut metric.data {
            for p in points {
                let mut previous = 0;
                for c in &mut p.bucket_counts {
                    let cumulative = *c;
                    *c = cumulative.saturating_sub(previous);
                    previous = cumulative;
                }
            }
        }
    }
    out.retain(|m| match &m.data {
        Data::Sum(p) | Data::Gauge(p) => !p.is_empty(),
        Data::Histogram(p) => !p.is_empty(),
    });
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// UCUM units for the names that say them.
fn unit(name: &str) -> &'static str {
    if name.ends_with("_seconds") || name.ends_with("_seconds_total") {
        "s"
    } else if name.ends_with("_bytes") || name == "keyhole_bytes_total" {
        "By"
    } else {
        ""
    }
}

fn histogram_sample(
    points: &mut Vec<HistogramPoint>,
    family: &str,
    name: &str,
    mut labels: Labels,
    value: &str,
) {
    let Some(suffix) = name.strip_prefix(family) else {
        return;
    };
    let le = labels
        .iter()
        .position(|(k, _)| k == "le")
        .map(|i| labels.remove(i).1);
    let attributes = attributes(labels);
    let point = match points.iter_mut().position(|p| p.attributes == attributes) {
        Some(i) => &mut points[i],
        None => {
            points.push(HistogramPoint {
                attributes,
                count: 0,
                sum: 0.0,
                bucket_counts: Vec::new(),
                bounds: Vec::new(),
            });
            let last = points.len() - 1;
            &mut points[last]
        }
    };
    match (suffix, le) {
        ("_bucket", Some(le)) => {
            let count = value.parse::<u64>().unwrap_or(0);
            // The +Inf bucket has no bound of its own.
            if le != "+Inf" {
                match le.parse::<f64>() {
                    Ok(bound) => point.bounds.push(bound),
                    Err(_) => return,
                }
            }
            point.bucket_counts.push(count);
        }
        ("_sum", None) => point.sum = value.parse().unwrap_or(0.0),
        ("_count", None) => point.count = value.parse().unwrap_or(0),
        _ => {}
    }
}

fn number(value: &str) -> Number {
    match value.parse::<i64>() {
        Ok(i) => Number::Int(i),
        Err(_) => Number::Double(value.parse().unwrap_or(f64::NAN)),
    }
}

fn attributes(labels: Labels) -> Vec<KeyValue> {
    labels
        .into_iter()
        .map(|(k, v)| KeyValue::str(&k, v))
        .collect()
}

/// A sample line's labels: (name, unescaped value).
type Labels = Vec<(String, String)>;

/// `name{k="v",...} value` or `name value`.
fn sample(line: &str) -> Option<(String, Labels, &str)> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '"' => break i,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            };
            labels.push((key.to_owned(), value));
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    Some((name, labels, rest.trim()))
}

fn unescape_help(help: &str) -> String {
    let mut out = String::with_capacity(help.len());
    let mut chars = help.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_map_to_sums_gauges_and_histograms() {
        let text = "\
# HELP keyhole_connections_total Client connections accepted.
# TYPE keyhole_connections_total counter
keyhole_connections_total{target=\"a\\\"b\"} 3
# HELP keyhole_token_expiry_seconds Seconds until.
# TYPE keyhole_token_expiry_seconds gauge
keyhole_token_expiry_seconds{target=\"a\"} 12.5
# HELP h A histogram\\nwith a newline.
# TYPE h histogram
h_bucket{target=\"a\",le=\"0.5\"} 1
h_bucket{target=\"a\",le=\"1\"} 3
h_bucket{target=\"a\",le=\"+Inf\"} 4
h_sum{target=\"a\"} 61.25
h_count{target=\"a\"} 4
# HELP keyhole_build_info v
# TYPE keyhole_build_info gauge
keyhole_build_info 1
";
        let metrics = from_exposition(text);
        assert_eq!(metrics.len(), 4);
        assert_eq!(metrics[0].name, "keyhole_connections_total");
        assert_eq!(metrics[0].description, "Client connections accepted.");
        assert_eq!(
            metrics[0].data,
            Data::Sum(vec![NumberPoint {
                attributes: vec![KeyValue::str("target", "a\"b")],
                value: Number::Int(3),
            }])
        );
        assert_eq!(metrics[1].unit, "s");
        assert_eq!(
            metrics[1].data,
            Data::Gauge(vec![NumberPoint {
                attributes: vec![KeyValue::str("target", "a")],
                value: Number::Double(12.5),
            }])
        );
        assert_eq!(metrics[2].description, "A histogram\nwith a newline.");
        assert_eq!(
            metrics[2].data,
            Data::Histogram(vec![HistogramPoint {
                attributes: vec![KeyValue::str("target", "a")],
                count: 4,
                sum: 61.25,
                bucket_counts: vec![1, 2, 1],
                bounds: vec![0.5, 1.0],
            }])
        );
        assert_eq!(
            metrics[3].data,
            Data::Gauge(vec![NumberPoint {
                attributes: vec![],
                value: Number::Int(1),
            }])
        );
    }

    #[test]
    fn the_registrys_own_text_reads_back() {
        let registry = crate::metrics::Registry::new();
        let t = registry.target("pg");
        t.upstream_connected(std::time::Duration::from_millis(3));
        let _open = t.opened();
        let metrics = from_exposition(&registry.render());
        let find = |name: &str| metrics.iter().find(|m| m.name == name);
        assert!(matches!(
            find("keyhole_connections_total").map(|m| &m.data),
            Some(Data::Sum(p)) if p[0].value == Number::Int(1)
        ));
        match find("keyhole_upstream_connect_seconds").map(|m| &m.data) {
            Some(Data::Histogram(p)) => {
                assert_eq!(p[0].count, 1);
                assert_eq!(p[0].bucket_counts.len(), p[0].bounds.len() + 1);
                assert_eq!(p[0].bucket_counts.iter().sum::<u64>(), 1);
            }
            other => panic!("{other:?}"),
        }
    }
}
