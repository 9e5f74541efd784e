//! A small parser for the Prometheus text exposition format served at `/metrics`.

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Result<Metrics, String> {
        let mut samples = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            samples.push(parse_line(line).map_err(|e| format!("line {}: {e}: {line:?}", n + 1))?);
        }
        Ok(Metrics {
            samples,
            text: text.to_string(),
        })
    }

    /// Sum over the series of `name` whose labels include all of `labels`; `None` if there is
    /// no such series at all.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = false;
        let mut total = 0.0;
        for s in self.samples.iter().filter(|s| s.name == name) {
            let matches = labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v));
            if matches {
                found = true;
                total += s.value;
            }
        }
        found.then_some(total)
    }

    /// Like `sum`, but an absent series counts as 0 (counters may appear on first increment).
    pub fn sum_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sum(name, labels).unwrap_or(0.0)
    }

    /// Like `sum`, but the series must exist; the panic lists what the gateway does export.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sum(name, labels).unwrap_or_else(|| {
            panic!(
                "no series {name}{labels:?} in /metrics; series of that name:\n{}",
                self.describe(name)
            )
        })
    }

    /// Every series of `name`, one per line (for assertion messages).
    pub fn describe(&self, name: &str) -> String {
        let lines: Vec<String> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| format!("  {}{:?} {}", s.name, s.labels, s.value))
            .collect();
        if lines.is_empty() {
            "  (none)".to_string()
        } else {
            lines.join("\n")
        }
    }
}

fn parse_line(line: &str) -> Result<Sample, String> {
    let (name, rest) = match line.find(['{', ' ', '\t']) {
        Some(i) => line.split_at(i),
        None => return Err("no value".into()),
    };
    let mut labels = Vec::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let end;
        loop {
            // label name
            let mut key = String::new();
            loop {
                match chars.next() {
                    Some((_, '=')) => break,
                    Some((i, '}')) if key.trim().is_empty() => {
                        end = i;
                        return finish(name, labels, &body[end + 1..]);
                    }
                    Some((_, ',')) if key.trim().is_empty() => continue,
                    Some((_, c)) => key.push(c),
                    None => return Err("unterminated labels".into()),
                }
            }
            if !matches!(chars.next(), Some((_, '"'))) {
                return Err("label value must be quoted".into());
            }
            let mut val = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => val.push('\n'),
                        Some((_, c)) => val.push(c),
                        None => return Err("bad escape".into()),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => val.push(c),
                    None => return Err("unterminated label value".into()),
                }
            }
            labels.push((key.trim().to_string(), val));
            match chars.next() {
                Some((_, ',')) => {
                    if let Some(&(i, '}')) = chars.peek() {
                        end = i;
                        break;
                    }
                }
                Some((i, '}')) => {
                    end = i;
                    break;
                }
                _ => return Err("expected , or } after label".into()),
            }
        }
        &body[end + 1..]
    } else {
        rest
    };
    finish(name, labels, rest)
}

fn finish(name: &str, labels: Vec<(String, String)>, rest: &str) -> Result<Sample, String> {
    let value = rest
        .split_whitespace()
        .next()
        .ok_or("no value")?
        .parse::<f64>()
        .map_err(|e| format!("bad value: {e}"))?;
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

#[test]
fn parses_prometheus_text() {
    let m = Metrics::parse(
        "# HELP x y\n# TYPE a counter\na 1\nb{tenant=\"acme\"} 2\n\
         b{tenant=\"acme\",reason=\"spoofed_source\"} 3 1700000000\nb{tenant=\"\",reason=\"q\\\"x\"} 4\n\
         c{} 5\nd{a=\"1\",} 6\n",
    )
    .unwrap();
    assert_eq!(m.sum("a", &[]), Some(1.0));
    assert_eq!(m.sum("b", &[("tenant", "acme")]), Some(5.0));
    assert_eq!(m.sum("b", &[("reason", "spoofed_source")]), Some(3.0));
    assert_eq!(m.sum("b", &[("tenant", ""), ("reason", "q\"x")]), Some(4.0));
    assert_eq!(m.sum("c", &[]), Some(5.0));
    assert_eq!(m.sum("d", &[("a", "1")]), Some(6.0));
    assert_eq!(m.sum("b", &[("tenant", "other")]), None);
}
