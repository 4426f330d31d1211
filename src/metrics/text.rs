//! Writing the Prometheus text exposition format (version 0.0.4): one
//! `# HELP` and one `# TYPE` line per family, then its samples, each
//! `name{label="value",...} value`. Label values are escaped here, so the
//! rest of the registry hands over raw strings.

use std::fmt::{self, Display, Write};

/// The content type of what [`Exposition`] writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// A metric family's type, as the `# TYPE` line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A float as the format wants it: `+Inf`, `-Inf`, `NaN`, otherwise the
/// shortest decimal that reads back as the same number.
#[derive(Debug, Clone, Copy)]
pub(super) struct Float(pub f64);

impl Display for Float {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let x = self.0;
        if x.is_nan() {
            f.write_str("NaN")
        } else if x.is_infinite() {
            f.write_str(if x > 0.0 { "+Inf" } else { "-Inf" })
        } else {
            write!(f, "{x}")
        }
    }
}

/// Labels: (name, raw value) pairs, in the order they are written.
pub(super) type Labels<'a> = [(&'a str, &'a str)];

/// The whole text being built, family by family.
#[derive(Debug, Default)]
pub(super) struct Exposition {
    out: String,
}

impl Exposition {
    /// Writes one family: `fill` adds its samples. A family left without
    /// samples is omitted entirely, header lines included.
    pub(super) fn family(
        &mut self,
        name: &str,
        help: &str,
        kind: Kind,
        fill: impl FnOnce(&mut Samples),
    ) {
        let mut samples = Samples::default();
        fill(&mut samples);
        if samples.body.is_empty() {
            return;
        }
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        self.out.push_str(&samples.body);
    }

    pub(super) fn finish(self) -> String {
        self.out
    }
}

/// The sample lines of one family.
#[derive(Debug, Default)]
pub(super) struct Samples {
    body: String,
}

impl Samples {
    /// `name{labels} value`, or `name value` with no labels.
    pub(super) fn push(&mut self, name: &str, labels: &Labels, value: impl Display) {
        self.body.push_str(name);
        if !labels.is_empty() {
            self.body.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.body.push(',');
                }
                self.body.push_str(key);
                self.body.push_str("=\"");
                escape_label_into(&mut self.body, value);
                self.body.push('"');
            }
            self.body.push('}');
        }
        let _ = writeln!(self.body, " {value}");
    }
}

/// `base` followed by one more label.
pub(super) fn with<'a>(base: &Labels<'a>, key: &'a str, value: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut labels = base.to_vec();
    labels.push((key, value));
    labels
}

/// A label value escaped: backslash, double quote and newline.
fn escape_label_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Help text escaped: backslash and newline.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut samples = Samples::default();
        samples.push("m", &[("target", "a\\b\"c\nd"), ("x", "plain")], 1);
        assert_eq!(
            samples.body,
            "m{target=\"a\\\\b\\\"c\\nd\",x=\"plain\"} 1\n"
        );
    }

    #[test]
    fn a_sample_without_labels_has_no_braces() {
        let mut samples = Samples::default();
        samples.push("m", &[], Float(0.25));
        assert_eq!(samples.body, "m 0.25\n");
    }

    #[test]
    fn floats_use_the_formats_spelling() {
        assert_eq!(Float(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Float(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(Float(f64::NAN).to_string(), "NaN");
        assert_eq!(Float(1.0).to_string(), "1");
        assert_eq!(Float(0.0005).to_string(), "0.0005");
    }

    #[test]
    fn a_family_without_samples_is_omitted() {
        let mut exp = Exposition::default();
        exp.family("empty", "nothing", Kind::Gauge, |_| {});
        exp.family("one", "a line\\ of help\nwrapped", Kind::Counter, |s| {
            s.push("one", &[], 3)
        });
        assert_eq!(
            exp.finish(),
            "# HELP one a line\\\\ of help\\nwrapped\n# TYPE one counter\none 3\n"
        );
    }
}
