//! Reading Prometheus text (exposition format 0.0.4): what the router scrapes from its workers
//! and the autoscaler from the router and the workers. Comments (`# HELP`, `# TYPE`) are
//! skipped; each sample line is `name[{label="value",…}] value [timestamp]`.

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample of `text`; a line that is not one is an error naming it.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_line(line).ok_or_else(|| {
            format!(
                "metrics line {}: not a sample: {:?}",
                i + 1,
                line.chars().take(120).collect::<String>()
            )
        })?);
    }
    Ok(out)
}

fn parse_line(line: &str) -> Option<Sample> {
    let end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = &line[..end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut r = r.trim_start();
        loop {
            if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = r.find('=')?;
            let key = r[..eq].trim().to_string();
            r = r[eq + 1..].trim_start().strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = r.char_indices();
            let close = loop {
                let (j, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break j,
                    c => value.push(c),
                }
            };
            labels.push((key, value));
            r = r[close + 1..].trim_start();
            r = r.strip_prefix(',').unwrap_or(r).trim_start();
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// The sum of `name`'s samples over all label sets (None: no sample of that name). A line that
/// does not parse is skipped.
pub fn sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(s) = parse_line(line.trim()) {
            *found.get_or_insert(0.0) += s.value;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_labels_and_special_values_parse_and_bad_lines_are_named() {
        let text = "# HELP x y\n# TYPE x counter\nvllm:num_requests_waiting{model_name=\"m\",engine=\"0\"} 3\nplain 1.5e3 1700000000\nh_bucket{le=\"+Inf\", path=\"a\\\"b\\\\c\"} 7\nneg -Inf\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].name, "vllm:num_requests_waiting");
        assert_eq!(s[0].label("engine"), Some("0"));
        assert_eq!(s[0].value, 3.0);
        assert_eq!((s[1].name.as_str(), s[1].value), ("plain", 1500.0));
        assert_eq!(s[2].label("le"), Some("+Inf"));
        assert_eq!(s[2].label("path"), Some("a\"b\\c"));
        assert_eq!(s[3].value, f64::NEG_INFINITY);
        let e = parse("ok 1\nbroken{a=\"1\" 2\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        assert!(parse("x{a=\"1\"} notanumber\n").is_err());
    }

    #[test]
    fn sums_add_every_label_set_of_one_name_only() {
        let text = "# HELP vllm:num_requests_waiting x\nvllm:num_requests_waiting{model_name=\"m\"} 3\nvllm:num_requests_waiting{model_name=\"n\"} 2\nvllm:num_requests_waiting_for_kv{model_name=\"m\"} 9\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.25\n";
        assert_eq!(sum(text, "vllm:num_requests_waiting"), Some(5.0));
        assert_eq!(sum(text, "vllm:kv_cache_usage_perc"), Some(0.25));
        assert_eq!(sum(text, "vllm:num_requests_running"), None);
    }
}
