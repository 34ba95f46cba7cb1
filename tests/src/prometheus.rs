//! A real Prometheus (Debian's `prometheus` package) for tests: started inside a host's
//! network namespace on loopback with a temp config and data directory, scraping targets
//! in that namespace every second, and queried through its HTTP API. Dropping it kills the
//! server and removes its directory.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::netns::{run_in_named, Netns};
use crate::wait_until;

/// Where Prometheus listens inside the namespace.
pub const LISTEN: &str = "127.0.0.1:9090";

/// One running Prometheus.
pub struct Prometheus {
    netns: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Start Prometheus in `netns`, scraping each of `targets` (`host:port`, in `netns`) at
    /// `/metrics` every second; waits until it answers.
    pub fn start(netns: &Netns, targets: &[&str]) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("tandem-prometheus")
            .tempdir()
            .expect("create prometheus dir");
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: tandem\n    static_configs:\n      - targets: [{list}]\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("write config");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = netns
            .command("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={LISTEN}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus (apt-get install prometheus)");
        let prometheus = Prometheus {
            netns: netns.name().to_string(),
            child,
            dir,
        };
        let ready = wait_until(Duration::from_secs(30), || {
            prometheus
                .get("/-/ready")
                .is_ok_and(|body| body.contains("Ready"))
        });
        assert!(ready, "prometheus did not start:\n{}", prometheus.log());
        prometheus
    }

    /// Prometheus's own log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET path` on Prometheus.
    pub fn get(&self, path: &str) -> std::io::Result<String> {
        http_get(&self.netns, LISTEN, path)
    }

    /// `query_range` of `query` from `start` to `end` (Unix seconds), one step a second:
    /// every series' labels and its (time, value) samples.
    pub fn query_range(
        &self,
        query: &str,
        start: f64,
        end: f64,
    ) -> Vec<(serde_json::Value, Vec<(f64, f64)>)> {
        let path = format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=1",
            percent_encode(query)
        );
        let body = self
            .get(&path)
            .unwrap_or_else(|e| panic!("query {query}: {e}"));
        let reply: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("query {query}: {e}: {body}"));
        assert_eq!(reply["status"], "success", "query {query}: {body}");
        reply["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|series| {
                let samples = series["values"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|v| {
                        let t = v[0].as_f64()?;
                        let x = v[1].as_str()?.parse().ok()?;
                        Some((t, x))
                    })
                    .collect();
                (series["metric"].clone(), samples)
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encode a query parameter (RFC 3986 unreserved characters stay).
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET path` from `addr` inside the namespace `netns` (HTTP/1.0, whole body); an error
/// for anything but 200.
pub fn http_get(netns: &str, addr: &str, path: &str) -> std::io::Result<String> {
    let addr = addr.to_string();
    let path = path.to_string();
    run_in_named(netns, move || -> std::io::Result<String> {
        let mut stream = TcpStream::connect(&addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return Err(std::io::Error::other(format!("GET {path}: {head}")));
        }
        Ok(body.to_string())
    })
    .map_err(std::io::Error::other)?
}

/// Run `promtool ARGS` with `stdin` as its input; (success, stdout + stderr).
pub fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (apt-get install prometheus)");
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.as_bytes())
            .expect("write to promtool");
    }
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Metric names in a Prometheus text exposition (samples' names and `# TYPE` names).
pub fn metric_names(exposition: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in exposition.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        };
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            names.insert(name.to_string());
        }
    }
    names
}
