//! The Prometheus text exposition format (version 0.0.4), written one way for every
//! `/metrics` kycd serves: `# HELP`/`# TYPE` once per family, then its samples, label values
//! escaped (`\\`, `\"`, `\n`).

use std::fmt::{Display, Write as _};

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets on restart).
    Counter,
    /// Goes up and down.
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// Text being exposed.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {}", kind.as_str());
        self
    }

    /// One sample of `name` with `labels` (name, value) in the order given.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Display) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// Appends text rendered elsewhere (already in the format).
    pub fn append(&mut self, text: &str) -> &mut Self {
        self.out.push_str(text);
        self
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A label value escaped for the text format.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escaping() {
        let mut e = Exposition::new();
        e.family("kycd_x_total", Kind::Counter, "Things.")
            .sample("kycd_x_total", &[("kind", "a\"b\\c\nd")], 3)
            .sample("kycd_x_total", &[("kind", "e"), ("listener", "socket")], 1.5);
        e.single("kycd_up", Kind::Gauge, "Up.", 1);
        assert_eq!(
            e.finish(),
            "# HELP kycd_x_total Things.\n# TYPE kycd_x_total counter\n\
             kycd_x_total{kind=\"a\\\"b\\\\c\\nd\"} 3\n\
             kycd_x_total{kind=\"e\",listener=\"socket\"} 1.5\n\
             # HELP kycd_up Up.\n# TYPE kycd_up gauge\nkycd_up 1\n"
        );
    }
}
