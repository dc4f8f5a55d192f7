//! The monitoring files of `deploy/monitoring/` as tests read them, and a real
//! Prometheus (Debian's `prometheus` package) to run against a test cluster.
//!
//! - [`documented_metrics`]: the metric reference of `docs/METRICS.md` (name → type).
//! - [`metric_names`]: the metric names a PromQL expression selects;
//!   [`rule_exprs`] and [`dashboard_exprs`]: every expression of the alert rules and of
//!   the Grafana dashboard.
//! - [`http_get`] and [`scrape`]: one bounded HTTP/1.0 GET; [`exported_metrics`]: the
//!   metric names a `/metrics` body exports (sample names and `# TYPE` families).
//! - [`Prometheus`]: a Prometheus process on a free 127.0.0.1 port with its own storage
//!   in a temporary directory, queried through its HTTP API; killed on drop.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

/// `deploy/monitoring/`.
pub fn monitoring_dir() -> PathBuf {
    crate::deploy::deploy_dir().join("monitoring")
}

/// The repository's `docs/MONITORING.md`.
pub fn monitoring_doc() -> PathBuf {
    crate::deploy::deploy_dir()
        .parent()
        .expect("repo root")
        .join("docs/MONITORING.md")
}

/// The metric reference tables of `docs/METRICS.md`: every row
/// ``| `name` | type | ...`` whose name starts with `mdcluster_`, name → type.
pub fn documented_metrics() -> BTreeMap<String, String> {
    let path = monitoring_doc().with_file_name("METRICS.md");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "", "`name`", "type", ...
        if cells.len() < 4 || !cells[1].starts_with("`mdcluster_") {
            continue;
        }
        let name = cells[1].trim_matches('`');
        out.insert(name.to_string(), cells[2].to_string());
    }
    out
}

/// The documented name a series name belongs to: a histogram's `_bucket`, `_sum` and
/// `_count` series map to the histogram; anything else to itself.
pub fn family_of(series: &str, documented: &BTreeMap<String, String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix) {
            if documented.get(base).map(String::as_str) == Some("histogram") {
                return base.to_string();
            }
        }
    }
    series.to_string()
}

/// The metric names `expr` selects: identifiers outside label matchers and strings
/// that start with `mdcluster_`, and `up`.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let (mut i, mut braces) = (0, 0usize);
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' | b'\'' | b'`' => {
                // Skip the string (PromQL escapes with a backslash).
                i += 1;
                while i < b.len() && b[i] != c {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'{' => {
                braces += 1;
                i += 1;
            }
            b'}' => {
                braces = braces.saturating_sub(1);
                i += 1;
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b':' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
                {
                    i += 1;
                }
                let word = &expr[start..i];
                // A duration unit after a number (5m) starts with a digit: not here.
                if braces == 0 && (word.starts_with("mdcluster_") || word == "up") {
                    out.insert(word.to_string());
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// Loads a YAML file.
pub fn load_yaml(path: &Path) -> Yaml {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// Every rule of a rule file's `groups` (a plain file, or a PrometheusRule's `spec`).
pub fn rules_of(groups: &Yaml) -> Vec<Yaml> {
    groups
        .as_sequence()
        .expect("groups is a list")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules is a list").clone())
        .collect()
}

/// (alert name, expression) of every rule of `deploy/monitoring/mdcluster.rules.yml`.
pub fn rule_exprs() -> Vec<(String, String)> {
    let rules = load_yaml(&monitoring_dir().join("mdcluster.rules.yml"));
    rules_of(&rules["groups"])
        .iter()
        .map(|r| {
            let name = r["alert"]
                .as_str()
                .or(r["record"].as_str())
                .expect("alert or record name");
            (
                name.to_string(),
                r["expr"].as_str().expect("expr").to_string(),
            )
        })
        .collect()
}

/// The Grafana dashboard JSON.
pub fn dashboard() -> Json {
    let path = monitoring_dir().join("grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("read grafana-dashboard.json");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// (where, expression) of every query of the dashboard: panel targets' `expr` and the
/// template variables' queries.
pub fn dashboard_exprs(d: &Json) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        let title = p["title"].as_str().unwrap_or("?");
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((format!("panel {title:?}"), e.to_string()));
            }
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["query"]["query"].as_str() {
            out.push((format!("variable {}", v["name"]), q.to_string()));
        }
    }
    out
}

/// `label_values(SELECTOR, label)` → `SELECTOR`; anything else unchanged.
pub fn variable_selector(q: &str) -> &str {
    q.strip_prefix("label_values(")
        .and_then(|r| r.rsplit_once(','))
        .map(|(sel, _)| sel.trim())
        .unwrap_or(q)
}

/// A dashboard expression with its Grafana variables replaced so Prometheus can run it
/// (every node and array, a 5 s rate interval).
pub fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "5s")
        .replace("$instance", ".*")
        .replace("$array", ".*")
}

/// One HTTP/1.0 GET of `path` on `addr` (host:port), bounded by `timeout`: (status,
/// body), or `None` when the server does not answer.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Option<(u16, String)> {
    let sa = addr.parse::<std::net::SocketAddr>().ok()?;
    let mut s = TcpStream::connect_timeout(&sa, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// One scrape of `http://addr/metrics`; panics unless it answers 200.
pub fn scrape(addr: &str) -> String {
    match http_get(addr, "/metrics", Duration::from_secs(10)) {
        Some((200, body)) => body,
        other => panic!("scrape of http://{addr}/metrics failed: {other:?}"),
    }
}

/// The metric names a `/metrics` body exports: every sample's name, and every `# TYPE`
/// family (also those without samples yet), a counter family as its `_total` name and
/// an info family as its `_info` name (OpenMetrics names families without the suffix).
pub fn exported_metrics(body: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            let name = match kind {
                "counter" if !name.ends_with("_total") => format!("{name}_total"),
                "info" if !name.ends_with("_info") => format!("{name}_info"),
                _ => name.to_string(),
            };
            out.insert(name);
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            out.insert(line[..end].to_string());
        }
    }
    out
}

/// Percent-encodes a query parameter value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Bound of Prometheus' start (TSDB open, first rule load).
pub const PROMETHEUS_START_TIMEOUT: Duration = Duration::from_secs(60);

/// A Prometheus process; killed on drop. Its log is `<dir>/prometheus.log`.
pub struct Prometheus {
    child: Option<Child>,
    /// `127.0.0.1:<port>` of its web/API listener.
    pub addr: String,
    /// The directory holding its configuration, data and log.
    pub dir: PathBuf,
}

impl Prometheus {
    /// Writes `config` (prometheus.yml) into `dir`, starts `prometheus` on a free port
    /// with its TSDB in `dir/data`, and waits until `/-/ready` answers 200.
    pub fn start(dir: &Path, config: &str) -> anyhow::Result<Prometheus> {
        std::fs::create_dir_all(dir).context("create prometheus dir")?;
        let cfg = dir.join("prometheus.yml");
        std::fs::write(&cfg, config).context("write prometheus.yml")?;
        let port = crate::etcd::free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("prometheus.log")).context("prometheus log")?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start prometheus (apt-get install prometheus)")?;
        let mut p = Prometheus {
            child: Some(child),
            addr,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + PROMETHEUS_START_TIMEOUT;
        loop {
            if let Some((200, _)) = http_get(&p.addr, "/-/ready", Duration::from_secs(2)) {
                return Ok(p);
            }
            if let Some(c) = p.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    p.child = None;
                    bail!("prometheus exited ({st}) at start; log:\n{}", p.log_text());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "prometheus not ready within {PROMETHEUS_START_TIMEOUT:?}; log:\n{}",
                    p.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>`: the `data` of a `success` answer, or why not.
    pub fn api(&self, path: &str) -> Result<Json, String> {
        let (status, body) = http_get(
            &self.addr,
            &format!("/api/v1/{path}"),
            Duration::from_secs(10),
        )
        .ok_or_else(|| format!("prometheus at {} does not answer", self.addr))?;
        let v: Json = serde_json::from_str(&body)
            .map_err(|e| format!("/api/v1/{path}: HTTP {status}, not JSON ({e}): {body}"))?;
        if v["status"] != "success" {
            return Err(format!("/api/v1/{path}: HTTP {status}: {v}"));
        }
        Ok(v["data"].clone())
    }

    /// An instant query: its `result` (a vector's samples), or Prometheus' error.
    pub fn query(&self, expr: &str) -> Result<Vec<Json>, String> {
        let d = self.api(&format!("query?query={}", url_encode(expr)))?;
        Ok(d["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of each sample of an instant query, keyed by the sample's labels
    /// (`{k="v",...}`, sorted, `__name__` left out).
    pub fn values(&self, expr: &str) -> Result<BTreeMap<String, f64>, String> {
        let mut out = BTreeMap::new();
        for s in self.query(expr)? {
            let labels = s["metric"]
                .as_object()
                .map(|m| {
                    let mut kv: Vec<String> = m
                        .iter()
                        .filter(|(k, _)| *k != "__name__")
                        .map(|(k, v)| format!("{k}={}", v))
                        .collect();
                    kv.sort();
                    format!("{{{}}}", kv.join(","))
                })
                .unwrap_or_default();
            let v = s["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{expr}: sample without a value: {s}"))?;
            out.insert(labels, v);
        }
        Ok(out)
    }

    /// The single value of an instant query, `None` when it has no sample; panics on an
    /// error or on more than one sample.
    pub fn value(&self, expr: &str) -> Option<f64> {
        let v = self.values(expr).unwrap_or_else(|e| panic!("{e}"));
        assert!(v.len() <= 1, "{expr}: more than one sample: {v:?}");
        v.into_values().next()
    }

    /// Polls `expr` (every 200 ms) until `pred` holds for its samples; panics after
    /// `timeout` with the last answer.
    pub fn wait(
        &self,
        what: &str,
        expr: &str,
        timeout: Duration,
        pred: impl Fn(&BTreeMap<String, f64>) -> bool,
    ) -> BTreeMap<String, f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.values(expr);
            if let Ok(v) = &got {
                if pred(v) {
                    return v.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "{what}: `{expr}` did not get there within {timeout:?}; last answer: {got:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The active alerts (`/api/v1/alerts`): (alert name, labels, state) each.
    pub fn alerts(&self) -> Vec<(String, Json, String)> {
        let d = self.api("alerts").unwrap_or_else(|e| panic!("{e}"));
        d["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap_or("").to_string(),
                    a["labels"].clone(),
                    a["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_skips_labels_strings_and_functions() {
        let e = r#"histogram_quantile(0.99, sum by (le, op) (rate(mdcluster_x_bucket{array=~"$array",op="mdcluster_no"}[5m])))
            / ignoring(state) mdcluster_y{state="in_sync"} and up{job="mdagent"} == 0"#;
        let got: Vec<String> = metric_names(e).into_iter().collect();
        assert_eq!(got, ["mdcluster_x_bucket", "mdcluster_y", "up"]);
    }

    #[test]
    fn exported_metrics_reads_samples_and_families() {
        let body = "# HELP a_requests Requests.\n# TYPE a_requests counter\n\
                    a_requests_total{op=\"read\"} 1\n# TYPE b_seconds histogram\n\
                    # TYPE c counter\n# TYPE d_total counter\nd_total 0\n# EOF\n";
        let got: Vec<String> = exported_metrics(body).into_iter().collect();
        assert_eq!(got, ["a_requests_total", "b_seconds", "c_total", "d_total"]);
    }

    #[test]
    fn family_of_maps_histogram_series_only() {
        let doc: BTreeMap<String, String> = [
            ("h_seconds".to_string(), "histogram".to_string()),
            ("c".to_string(), "counter".to_string()),
        ]
        .into();
        assert_eq!(family_of("h_seconds_bucket", &doc), "h_seconds");
        assert_eq!(family_of("h_seconds_count", &doc), "h_seconds");
        assert_eq!(family_of("c_count", &doc), "c_count");
    }

    #[test]
    fn url_encode_escapes_promql() {
        assert_eq!(
            url_encode("up{a=\"b\"} > 0"),
            "up%7Ba%3D%22b%22%7D%20%3E%200"
        );
    }
}
