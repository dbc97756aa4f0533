//! Merge several Prometheus text expositions (format 0.0.4) into one, labelling every sample with its source.
//!
//! Each worker of the cluster keeps its own metrics registry and serves its own exposition. The cluster's
//! `/metrics` asks every worker for its text and returns one exposition in which each sample carries a
//! `worker="N"` label, so one scrape sees the whole cluster and series from different workers never collide.
//!
//! Concatenating the texts would not do: the format requires all samples of a metric family to follow a
//! single `# HELP` / `# TYPE` header. So the merge groups by family, in order of first appearance, and keeps
//! the first `HELP` and `TYPE` seen for each. It is a pure function over strings; the fetching is elsewhere.
//!
//! Label values are copied through as escaped in the input, never unescaped and re-escaped, so the parser
//! only has to find where each quoted value ends (values may contain `,`, `}`, `{` and `\"`). A sample that
//! already has a label with the merge label's name keeps it as `exported_<label>`, as Prometheus itself does
//! for target labels. Lines that are not a `HELP`, a `TYPE` or a well-formed sample are dropped.

use std::collections::HashMap;

/// Sample-name suffixes that belong to the family named by the preceding `# HELP`/`# TYPE` line: histogram and
/// summary series, and the OpenMetrics-style counter names (`# TYPE requests counter` / `requests_total`).
const FAMILY_SUFFIXES: [&str; 5] = ["_bucket", "_sum", "_count", "_total", "_created"];

/// Merge `(label value, exposition text)` parts into one exposition, adding `label="<value>"` as the first
/// label of every sample.
///
/// Families come out in the order they first appear across the parts; within a family, samples keep their
/// part's order and parts keep the order given. Every line of the result ends with a newline (no parts, or
/// only empty ones, give an empty string).
pub fn merge(parts: &[(String, String)], label: &str) -> String {
    let mut families = Families::default();

    for (source, text) in parts {
        let source = escape_label_value(source);
        // The family named by the latest HELP/TYPE line of this part, which claims suffixed sample names.
        let mut current: Option<usize> = None;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                if let Some((descriptor, name, content)) = parse_descriptor(comment) {
                    let family = families.get(name);
                    current = Some(family);
                    let slot = match descriptor {
                        Descriptor::Help => &mut families.list[family].help,
                        Descriptor::Type => &mut families.list[family].kind,
                    };
                    slot.get_or_insert_with(|| content.to_owned());
                }
                continue;
            }
            let Ok(sample) = parse_sample(line) else {
                continue;
            };
            let family = match current {
                Some(family) if belongs_to(sample.name, &families.list[family].name) => family,
                _ => families.get(sample.name),
            };
            families.list[family]
                .samples
                .push(render_sample(&sample, label, &source));
        }
    }

    let mut out = String::new();
    for family in &families.list {
        for (keyword, text) in [("HELP", &family.help), ("TYPE", &family.kind)] {
            match text.as_deref() {
                Some("") => out.push_str(&format!("# {keyword} {}\n", family.name)),
                Some(text) => out.push_str(&format!("# {keyword} {} {text}\n", family.name)),
                None => {}
            }
        }
        for sample in &family.samples {
            out.push_str(sample);
            out.push('\n');
        }
    }
    out
}

/// Metric families in order of first appearance.
#[derive(Default)]
struct Families {
    list: Vec<Family>,
    by_name: HashMap<String, usize>,
}

impl Families {
    /// The index of the family called `name`, created at the end if new.
    fn get(&mut self, name: &str) -> usize {
        if let Some(&index) = self.by_name.get(name) {
            return index;
        }
        self.list.push(Family {
            name: name.to_owned(),
            help: None,
            kind: None,
            samples: Vec::new(),
        });
        self.by_name.insert(name.to_owned(), self.list.len() - 1);
        self.list.len() - 1
    }
}

struct Family {
    name: String,
    /// The docstring of the first `# HELP` line seen, still escaped.
    help: Option<String>,
    /// The type of the first `# TYPE` line seen (`counter`, `histogram`, …).
    kind: Option<String>,
    /// Rendered sample lines, already carrying the source label.
    samples: Vec<String>,
}

fn belongs_to(sample_name: &str, family: &str) -> bool {
    match sample_name.strip_prefix(family) {
        Some("") => true,
        Some(suffix) => FAMILY_SUFFIXES.contains(&suffix),
        None => false,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Descriptor {
    Help,
    Type,
}

/// Parse the part of a comment line after `#`: `HELP name docstring` or `TYPE name type`. Other comments
/// give `None`.
fn parse_descriptor(comment: &str) -> Option<(Descriptor, &str, &str)> {
    let (keyword, rest) = comment
        .trim_start()
        .split_once(|c: char| c.is_ascii_whitespace())?;
    let descriptor = match keyword {
        "HELP" => Descriptor::Help,
        "TYPE" => Descriptor::Type,
        _ => return None,
    };
    let rest = rest.trim_start();
    let (name, text) = rest
        .split_once(|c: char| c.is_ascii_whitespace())
        .unwrap_or((rest, ""));
    is_metric_name(name).then_some((descriptor, name, text.trim()))
}

/// `(name, value)` pairs of a sample's label set; values are as written between the quotes, escapes included.
type Labels<'a> = Vec<(&'a str, &'a str)>;

/// One sample line, borrowing from the exposition text.
#[derive(Debug, Clone, PartialEq)]
struct Sample<'a> {
    name: &'a str,
    labels: Labels<'a>,
    value: &'a str,
    timestamp: Option<&'a str>,
}

/// Parse `name[{label="value",…}] value [timestamp]`.
///
/// The label set is scanned quote by quote rather than split on `{`, `,` or `}`, because all three may
/// appear inside a label value.
fn parse_sample(line: &str) -> Result<Sample<'_>, &'static str> {
    let name_end = line
        .find(|c: char| !is_metric_name_char(c))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err("a sample must start with a metric name");
    }
    let after_name = &line[name_end..];
    if !after_name.starts_with(|c: char| c == '{' || c.is_ascii_whitespace()) {
        return Err("a metric name must be followed by labels or a value");
    }
    let (labels, rest) = match after_name.trim_start().strip_prefix('{') {
        Some(label_set) => parse_labels(label_set)?,
        None => (Vec::new(), after_name),
    };

    let mut tokens = rest.split_ascii_whitespace();
    let value = tokens.next().ok_or("a sample needs a value")?;
    value
        .parse::<f64>()
        .map_err(|_| "a sample value must be a number, NaN, +Inf or -Inf")?;
    let timestamp = tokens.next();
    if let Some(timestamp) = timestamp {
        timestamp
            .parse::<i64>()
            .map_err(|_| "a timestamp must be integer milliseconds")?;
    }
    if tokens.next().is_some() {
        return Err("unexpected text after the timestamp");
    }
    Ok(Sample {
        name,
        labels,
        value,
        timestamp,
    })
}

/// Parse a label set starting just after its `{`; returns the labels and the text after the closing `}`.
fn parse_labels(mut rest: &str) -> Result<(Labels<'_>, &str), &'static str> {
    let mut labels = Vec::new();
    loop {
        rest = rest.trim_start();
        // Reached straight after `{` or after a `,`: the format allows a trailing comma.
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let name_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..name_end];
        if !is_label_name(name) {
            return Err("expected a label name");
        }
        let quoted = rest[name_end..]
            .trim_start()
            .strip_prefix('=')
            .ok_or("expected `=` after a label name")?
            .trim_start()
            .strip_prefix('"')
            .ok_or("expected a quoted label value")?;
        let end = closing_quote(quoted).ok_or("unterminated label value")?;
        labels.push((name, &quoted[..end]));
        rest = quoted[end + 1..].trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("expected `,` or `}` after a label value");
        }
    }
}

/// The byte index of the first `"` not escaped by a backslash.
fn closing_quote(value: &str) -> Option<usize> {
    // Bytes are enough: `"` and `\` are ASCII and never occur inside a multi-byte UTF-8 character.
    let mut escaped = false;
    for (index, byte) in value.bytes().enumerate() {
        match byte {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'"' => return Some(index),
            _ => {}
        }
    }
    None
}

fn render_sample(sample: &Sample<'_>, label: &str, escaped_source: &str) -> String {
    let mut line = format!("{}{{{label}=\"{escaped_source}\"", sample.name);
    for (name, value) in &sample.labels {
        line.push(',');
        if *name == label {
            line.push_str("exported_");
        }
        line.push_str(&format!("{name}=\"{value}\""));
    }
    line.push_str("} ");
    line.push_str(sample.value);
    if let Some(timestamp) = sample.timestamp {
        line.push(' ');
        line.push_str(timestamp);
    }
    line
}

/// Escape a raw string for use between the quotes of a label value.
fn escape_label_value(raw: &str) -> String {
    let mut escaped = String::with_capacity(raw.len());
    for c in raw.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

fn is_metric_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn is_metric_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && name.chars().all(is_metric_name_char)
}

fn is_label_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(texts: &[(&str, &str)]) -> Vec<(String, String)> {
        texts
            .iter()
            .map(|(source, text)| (source.to_string(), text.to_string()))
            .collect()
    }

    #[test]
    fn counters_from_two_workers_share_one_header() {
        let one = "# HELP http_requests_total Requests served.\n\
                   # TYPE http_requests_total counter\n\
                   http_requests_total{method=\"GET\",status=\"200\"} 3\n\
                   http_requests_total{method=\"POST\",status=\"201\"} 1\n";
        let two = "# HELP http_requests_total Requests served.\n\
                   # TYPE http_requests_total counter\n\
                   http_requests_total{method=\"GET\",status=\"200\"} 7\n";
        assert_eq!(
            merge(&parts(&[("1", one), ("2", two)]), "worker"),
            "# HELP http_requests_total Requests served.\n\
             # TYPE http_requests_total counter\n\
             http_requests_total{worker=\"1\",method=\"GET\",status=\"200\"} 3\n\
             http_requests_total{worker=\"1\",method=\"POST\",status=\"201\"} 1\n\
             http_requests_total{worker=\"2\",method=\"GET\",status=\"200\"} 7\n"
        );
    }

    #[test]
    fn histogram_series_stay_together_under_their_family() {
        let histogram = |count: u32| {
            format!(
                "# HELP latency_seconds Request latency.\n\
                 # TYPE latency_seconds histogram\n\
                 latency_seconds_bucket{{le=\"0.1\"}} {count}\n\
                 latency_seconds_bucket{{le=\"+Inf\"}} {count}\n\
                 latency_seconds_sum 0.25\n\
                 latency_seconds_count {count}\n\
                 # HELP up Whether the worker is up.\n\
                 # TYPE up gauge\n\
                 up 1\n"
            )
        };
        let merged = merge(
            &[
                ("1".to_string(), histogram(2)),
                ("2".to_string(), histogram(5)),
            ],
            "worker",
        );
        assert_eq!(
            merged,
            "# HELP latency_seconds Request latency.\n\
             # TYPE latency_seconds histogram\n\
             latency_seconds_bucket{worker=\"1\",le=\"0.1\"} 2\n\
             latency_seconds_bucket{worker=\"1\",le=\"+Inf\"} 2\n\
             latency_seconds_sum{worker=\"1\"} 0.25\n\
             latency_seconds_count{worker=\"1\"} 2\n\
             latency_seconds_bucket{worker=\"2\",le=\"0.1\"} 5\n\
             latency_seconds_bucket{worker=\"2\",le=\"+Inf\"} 5\n\
             latency_seconds_sum{worker=\"2\"} 0.25\n\
             latency_seconds_count{worker=\"2\"} 5\n\
             # HELP up Whether the worker is up.\n\
             # TYPE up gauge\n\
             up{worker=\"1\"} 1\n\
             up{worker=\"2\"} 1\n"
        );
    }

    #[test]
    fn an_unlabelled_gauge_gets_a_label_set_and_keeps_its_timestamp() {
        let text = "# TYPE temperature gauge\ntemperature 21.5 1700000000000\nplain -Inf\n";
        assert_eq!(
            merge(&parts(&[("3", text)]), "worker"),
            "# TYPE temperature gauge\n\
             temperature{worker=\"3\"} 21.5 1700000000000\n\
             plain{worker=\"3\"} -Inf\n"
        );
    }

    #[test]
    fn label_values_may_contain_commas_braces_and_escaped_quotes() {
        let text = r#"# TYPE hits counter
hits{path="/a,b}c{d",msg="say \"hi\", {ok}",tail="back\\"} 4
hits { path = "/x" , } 5 17
"#;
        assert_eq!(
            merge(&parts(&[("1", text)]), "worker"),
            r#"# TYPE hits counter
hits{worker="1",path="/a,b}c{d",msg="say \"hi\", {ok}",tail="back\\"} 4
hits{worker="1",path="/x"} 5 17
"#
        );
    }

    #[test]
    fn a_family_present_in_only_one_part_is_kept_in_place() {
        let one =
            "# TYPE a counter\na 1\n# TYPE only_one gauge\nonly_one 9\n# TYPE b counter\nb 1\n";
        let two =
            "# TYPE b counter\nb 2\n# TYPE only_two gauge\nonly_two 8\n# TYPE a counter\na 2\n";
        assert_eq!(
            merge(&parts(&[("1", one), ("2", two)]), "worker"),
            "# TYPE a counter\na{worker=\"1\"} 1\na{worker=\"2\"} 2\n\
             # TYPE only_one gauge\nonly_one{worker=\"1\"} 9\n\
             # TYPE b counter\nb{worker=\"1\"} 1\nb{worker=\"2\"} 2\n\
             # TYPE only_two gauge\nonly_two{worker=\"2\"} 8\n"
        );
    }

    #[test]
    fn help_and_type_appear_once_per_family_first_one_wins() {
        let part = |help: &str| format!("# HELP jobs {help}\n# TYPE jobs gauge\njobs 1\n");
        let merged = merge(
            &[
                ("1".into(), part("Jobs queued.")),
                ("2".into(), part("Jobs queued (v2).")),
                ("3".into(), part("Jobs queued.")),
            ],
            "worker",
        );
        assert_eq!(merged.matches("# HELP").count(), 1, "{merged}");
        assert_eq!(merged.matches("# TYPE").count(), 1, "{merged}");
        assert!(merged.starts_with("# HELP jobs Jobs queued.\n# TYPE jobs gauge\n"));
    }

    #[test]
    fn openmetrics_style_counter_samples_join_their_family() {
        let text = "# TYPE requests counter\nrequests_total 3\nrequests_created 1.7e9\n";
        let merged = merge(&parts(&[("1", text), ("2", text)]), "worker");
        assert_eq!(
            merged,
            "# TYPE requests counter\n\
             requests_total{worker=\"1\"} 3\nrequests_created{worker=\"1\"} 1.7e9\n\
             requests_total{worker=\"2\"} 3\nrequests_created{worker=\"2\"} 1.7e9\n"
        );
    }

    #[test]
    fn blank_lines_other_comments_and_malformed_samples_are_dropped() {
        let text = "\n# a free comment\n#\n# TYPE ok gauge\n\nok 1\nbroken{a=\"b\" 1\nnovalue\nok 1 2 3\n-x 1\n";
        assert_eq!(
            merge(&parts(&[("1", text)]), "worker"),
            "# TYPE ok gauge\nok{worker=\"1\"} 1\n"
        );
        assert_eq!(merge(&[], "worker"), "");
        assert_eq!(merge(&parts(&[("1", ""), ("2", "\n")]), "worker"), "");
    }

    #[test]
    fn a_label_already_named_like_the_merge_label_is_kept_as_exported() {
        let text = "jobs{worker=\"inner\",queue=\"mail\"} 2\n";
        assert_eq!(
            merge(&parts(&[("1", text)]), "worker"),
            "jobs{worker=\"1\",exported_worker=\"inner\",queue=\"mail\"} 2\n"
        );
    }

    #[test]
    fn the_source_value_is_escaped() {
        let merged = merge(&parts(&[("a\"b\\c", "x 1\n")]), "worker");
        assert_eq!(merged, "x{worker=\"a\\\"b\\\\c\"} 1\n");
    }

    #[test]
    fn windows_line_endings_are_accepted() {
        let text = "# TYPE x gauge\r\nx 1\r\n";
        assert_eq!(
            merge(&parts(&[("1", text)]), "worker"),
            "# TYPE x gauge\nx{worker=\"1\"} 1\n"
        );
    }

    #[test]
    fn expositions_from_the_exporter_cozy_uses_merge_cleanly() {
        let exposition = |requests: u64| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&[0.1, 1.0])
                .unwrap()
                .build_recorder();
            metrics::with_local_recorder(&recorder, || {
                metrics::describe_counter!("cozy_http_requests_total", "HTTP requests");
                metrics::counter!("cozy_http_requests_total", "route" => "/a,b}", "status" => "200")
                    .increment(requests);
                metrics::histogram!("cozy_http_request_duration_seconds", "route" => "/x")
                    .record(0.5);
                metrics::gauge!("cozy_holds_open").set(3.0);
            });
            recorder.handle().render()
        };
        let merged = merge(
            &[("1".into(), exposition(2)), ("2".into(), exposition(5))],
            "worker",
        );

        for line in merged.lines().filter(|line| !line.starts_with('#')) {
            let sample = parse_sample(line).unwrap_or_else(|err| panic!("{line:?}: {err}"));
            assert_eq!(sample.labels[0].0, "worker", "{line}");
        }
        for family in [
            "cozy_http_requests_total",
            "cozy_http_request_duration_seconds",
            "cozy_holds_open",
        ] {
            let header = format!("# TYPE {family} ");
            assert_eq!(merged.matches(&header).count(), 1, "{family} in\n{merged}");
        }
        assert!(merged
            .contains("cozy_http_requests_total{worker=\"2\",route=\"/a,b}\",status=\"200\"} 5\n"));
        assert!(merged
            .contains("cozy_http_request_duration_seconds_count{worker=\"1\",route=\"/x\"} 1\n"));
    }

    #[test]
    fn every_merged_sample_line_parses_back_with_its_labels_and_value() {
        let one = r#"# HELP http_requests_total Requests.
# TYPE http_requests_total counter
http_requests_total{method="GET",path="/a,b}"} 3 1700000000000
# TYPE latency_seconds histogram
latency_seconds_bucket{le="0.5"} 1
latency_seconds_bucket{le="+Inf"} 2
latency_seconds_sum 0.75
latency_seconds_count 2
up 1
"#;
        let two = r#"# TYPE latency_seconds histogram
latency_seconds_bucket{le="0.5"} 0
latency_seconds_bucket{le="+Inf"} 0
latency_seconds_sum 0
latency_seconds_count 0
# TYPE http_requests_total counter
http_requests_total{method="PUT",note="\"quoted\""} NaN
"#;
        let input = parts(&[("1", one), ("2", two)]);
        let merged = merge(&input, "worker");
        assert!(merged.ends_with('\n'));

        // Every input sample, re-parsed from its part, must appear exactly once in the output with the
        // worker label prepended and nothing else changed.
        let mut expected = Vec::new();
        for (source, text) in &input {
            for line in text.lines().filter(|l| !l.starts_with('#')) {
                let mut sample = parse_sample(line).unwrap();
                sample.labels.insert(0, ("worker", source.as_str()));
                expected.push(sample);
            }
        }
        let mut samples: Vec<Sample<'_>> = merged
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| parse_sample(line).unwrap_or_else(|err| panic!("{line:?}: {err}")))
            .collect();
        assert_eq!(samples.len(), expected.len(), "{merged}");
        for sample in &expected {
            let position = samples
                .iter()
                .position(|s| s == sample)
                .unwrap_or_else(|| panic!("{sample:?} missing from\n{merged}"));
            samples.remove(position);
        }

        let families: Vec<&str> = merged
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            families,
            ["http_requests_total counter", "latency_seconds histogram"]
        );
    }
}
