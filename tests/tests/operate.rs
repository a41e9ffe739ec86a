//! Operating a cluster: the metrics endpoint (format checked by promtool, lag
//! right when idle, with a peer down, and with skewed clocks), health endpoints,
//! and the Admin RPC's authentication and separate listener.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tidemark_replicator::pb::{self, admin_client::AdminClient};
use tidemark_tests::daemon::{Cluster, TestNode, Topology, free_port, tidemark_bin};
use tonic::Code;
use ulid::Ulid;

const CONVERGE: Duration = Duration::from_secs(60);

fn promtool_check(body: &str) {
    let promtool = std::env::var("TIDEMARK_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {promtool} (Debian: apt-get install prometheus): {e}")
        });
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write metrics");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn lag(node: &TestNode, peer: &TestNode) -> (f64, f64) {
    let label = format!("{{peer=\"{}\"}}", peer.id);
    (
        node.metric(&format!("tidemark_peer_unacked_events{label}"))
            .await
            .unwrap_or(-1.0),
        node.metric(&format!("tidemark_peer_oldest_unacked_age_seconds{label}"))
            .await
            .unwrap_or(-1.0),
    )
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + CONVERGE;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {CONVERGE:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_lag_follows_the_peer() {
    let mut cluster = Cluster::start(&["sqlite", "sqlite"], Topology::Mesh).await;
    for i in 0..3 {
        cluster.nodes[0]
            .put(Ulid::generate(), json!({"title": format!("n{i}")}))
            .await;
        cluster.nodes[1].db.sql(&format!(
            "INSERT INTO notes (id, title) VALUES ('{}', 'sql')",
            Ulid::generate()
        ));
    }
    cluster.converged(CONVERGE).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    assert_eq!(a.http_get("/healthz").await.0, 200);
    assert_eq!(a.http_get("/readyz").await.0, 200);
    wait_for("lag back to zero", async || lag(a, b).await == (0.0, 0.0)).await;
    let (_, body) = a.http_get("/metrics").await;
    promtool_check(&body);
    for name in [
        "tidemark_peer_connected",
        "tidemark_events_sent_total",
        "tidemark_events_applied_total",
        "tidemark_apply_delay_seconds_bucket",
        "tidemark_events_captured_total",
        "tidemark_hlc_wall_seconds",
        "tidemark_conflicts_open",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics:\n{body}");
    }
    // Every series the Grafana dashboard queries is exported by a running node
    // (histograms by their _bucket/_sum/_count series, once a batch applied).
    let exported: std::collections::BTreeSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let used = dashboard_metrics();
    assert!(used.len() >= 20, "metrics found in the dashboard: {used:?}");
    for name in &used {
        assert!(
            exported.contains(name.as_str()),
            "config/grafana/tidemark.json queries {name}, which a running node does not export"
        );
    }
    assert_eq!(
        a.metric(&format!("tidemark_peer_connected{{peer=\"{}\"}}", b.id))
            .await,
        Some(1.0)
    );
    // Idle: the lag stays at zero.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(lag(a, b).await, (0.0, 0.0), "lag grew on an idle cluster");

    // Peer down: unacked events and their age grow.
    cluster.nodes[1].stop();
    let a = &cluster.nodes[0];
    let b_id = cluster.nodes[1].id;
    for i in 0..5 {
        a.put(
            Ulid::generate(),
            json!({"title": format!("while down {i}")}),
        )
        .await;
    }
    wait_for("5 unacked events", async || {
        lag(a, &cluster.nodes[1]).await.0 == 5.0
    })
    .await;
    let (_, first_age) = lag(a, &cluster.nodes[1]).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (unacked, later_age) = lag(a, &cluster.nodes[1]).await;
    assert_eq!(unacked, 5.0);
    assert!(
        later_age >= first_age + 1.0,
        "age did not grow: {first_age} -> {later_age}"
    );
    assert_eq!(
        a.metric(&format!("tidemark_peer_connected{{peer=\"{b_id}\"}}"))
            .await,
        Some(0.0)
    );
    promtool_check(&a.http_get("/metrics").await.1);

    // Back up: lag returns to zero.
    cluster.nodes[1].start().await;
    cluster.converged(CONVERGE).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    wait_for("lag back to zero after catch-up", async || {
        lag(a, b).await == (0.0, 0.0)
    })
    .await;
    // node1 restarted (its counters with it) and applied exactly the 5 it missed.
    let applied = b
        .metric(&format!(
            "tidemark_apply_delay_seconds_count{{peer=\"{}\"}}",
            a.id
        ))
        .await
        .unwrap_or(0.0);
    assert_eq!(applied, 5.0, "apply delays recorded after the restart");
}

/// Every `tidemark_*` series named in an `expr` of the Grafana dashboard.
fn dashboard_metrics() -> std::collections::BTreeSet<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let text = include_str!("../../config/grafana/tidemark.json");
    let dashboard: serde_json::Value = serde_json::from_str(text).expect("dashboard JSON");
    let mut exprs = Vec::new();
    walk(&dashboard, &mut exprs);
    let mut names = std::collections::BTreeSet::new();
    for expr in exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("tidemark_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    names
}

/// Every counter `crates/node/src/http.rs` describes.
fn documented_counters() -> Vec<String> {
    let src = include_str!("../../crates/node/src/http.rs");
    src.split("describe_counter!(")
        .skip(1)
        .map(|rest| {
            rest.split('"')
                .nth(1)
                .expect("a described counter's name")
                .to_owned()
        })
        .collect()
}

/// Every metric the daemon describes is in docs/METRICS.md, and the alert
/// rules shipped beside it load and pass their unit tests.
#[test]
fn metrics_reference_and_alert_rules_are_complete() {
    let src = include_str!("../../crates/node/src/http.rs");
    let reference = include_str!("../../docs/METRICS.md");
    let mut described = Vec::new();
    for kind in [
        "describe_counter!(",
        "describe_gauge!(",
        "describe_histogram!(",
    ] {
        for rest in src.split(kind).skip(1) {
            described.push(rest.split('"').nth(1).expect("a described name").to_owned());
        }
    }
    assert!(
        described.len() >= 30,
        "metrics parsed from http.rs: {described:?}"
    );
    for name in &described {
        assert!(
            reference.contains(&format!("| `{name}` |")),
            "{name} is not in docs/METRICS.md"
        );
    }
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/prometheus");
    let promtool = std::env::var("TIDEMARK_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
        // The compose "monitoring" profile's Prometheus, with those rules.
        ["check", "config", "prometheus.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(rules)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run {promtool} (Debian: apt-get install prometheus): {e}")
            });
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every alert names a metric the daemon exports (or `up`).
    let alerts = std::fs::read_to_string(format!("{rules}/alerts.yml")).expect("alerts.yml");
    for expr in alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr: "))
    {
        assert!(
            expr.contains("up{") || described.iter().any(|m| expr.contains(m.as_str())),
            "alert expression names no exported metric: {expr}"
        );
    }
}

/// The `op` values any crate counts `tidemark_store_errors_total` with.
fn store_error_ops() -> Vec<String> {
    fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read crates dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read source");
                for rest in text
                    .split("\"tidemark_store_errors_total\", \"op\" => \"")
                    .skip(1)
                {
                    out.push(rest.split('"').next().expect("op value").to_owned());
                }
            }
        }
    }
    let mut ops = Vec::new();
    walk(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates"),
        &mut ops,
    );
    ops.sort();
    ops.dedup();
    assert!(!ops.is_empty(), "no store error op found in crates/");
    ops
}

/// The samples of `name` (with or without labels) in a /metrics body.
fn samples<'a>(body: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(sample, _)| {
            *sample == name
                || sample
                    .strip_prefix(name)
                    .is_some_and(|r| r.starts_with('{'))
        })
        .map(|(sample, value)| (sample, value.parse().expect("sample value")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_counter_is_exported_at_zero_from_start() {
    let cluster = Cluster::start(&["sqlite", "sqlite"], Topology::Mesh).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (_, body) = a.http_get("/metrics").await;
    promtool_check(&body);
    let counters = documented_counters();
    assert!(
        counters.len() >= 10,
        "counters parsed from http.rs: {counters:?}"
    );
    for name in &counters {
        let found = samples(&body, name);
        assert!(!found.is_empty(), "{name} not exported at start:\n{body}");
        for (sample, value) in found {
            assert_eq!(value, 0.0, "{sample} before any write:\n{body}");
        }
    }
    let peer = format!("peer=\"{}\"", b.id);
    let mut expected: Vec<String> = vec![
        "tidemark_events_captured_total{source=\"api\"}".into(),
        "tidemark_events_captured_total{source=\"sql\"}".into(),
        format!("tidemark_drift_rejections_total{{{peer}}}"),
        format!("tidemark_events_sent_total{{{peer}}}"),
        format!("tidemark_events_applied_total{{{peer}}}"),
        format!("tidemark_events_skipped_total{{{peer},reason=\"duplicate\"}}"),
        format!("tidemark_events_held_total{{{peer},code=\"OUT_OF_RANGE\"}}"),
        format!("tidemark_events_quarantined_total{{{peer},code=\"INVALID_ARGUMENT\"}}"),
    ];
    for op in store_error_ops() {
        expected.push(format!("tidemark_store_errors_total{{op=\"{op}\"}}"));
    }
    for sample in &expected {
        assert_eq!(
            a.metric(sample).await,
            Some(0.0),
            "{sample} at start:\n{body}"
        );
    }
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        a.metric(&format!("tidemark_build_info{{version=\"{version}\"}}"))
            .await,
        Some(1.0),
        "build info:\n{body}"
    );
    // Each peer's configured name, to join on (unnamed here).
    assert_eq!(
        a.metric(&format!("tidemark_peer_info{{{peer},name=\"\"}}"))
            .await,
        Some(1.0),
        "peer info:\n{body}"
    );

    // A direct SQL write moves the sql source, not the api one.
    a.db.sql(&format!(
        "INSERT INTO notes (id, title) VALUES ('{}', 'sql')",
        Ulid::generate()
    ));
    let sql = "tidemark_events_captured_total{source=\"sql\"}";
    wait_for("the sql capture counted", async || {
        a.metric(sql).await == Some(1.0)
    })
    .await;
    assert_eq!(
        a.metric("tidemark_events_captured_total{source=\"api\"}")
            .await,
        Some(0.0)
    );
}

/// A direct write captured between two polls of the capture loop is stamped by
/// whichever transaction drains the queue first (here an API write): it is
/// still a direct write and counts as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_write_drained_by_an_api_write_counts_as_sql() {
    let mut cluster = Cluster::prepare(&["sqlite"], Topology::Mesh, "test", "");
    let node = &mut cluster.nodes[0];
    // The capture loop polls once a minute: the API write drains the capture.
    node.set_config("replication", "capture_poll_ms", "60000");
    node.start().await;
    node.db.sql(&format!(
        "INSERT INTO notes (id, title) VALUES ('{}', 'sql')",
        Ulid::generate()
    ));
    node.put(Ulid::generate(), json!({"title": "api"})).await;
    assert_eq!(
        node.metric("tidemark_events_captured_total{source=\"api\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        node.metric("tidemark_events_captured_total{source=\"sql\"}")
            .await,
        Some(1.0),
        "the direct write stamped inside the API write's transaction"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_clocks_never_show_negative_lag_and_beyond_drift_is_refused() {
    // node1's clock is 3 s behind (within the 5 s drift bound); node2's is 60 s
    // ahead (beyond it).
    let mut cluster = Cluster::prepare(&["sqlite", "sqlite", "sqlite"], Topology::Mesh, "test", "");
    for (i, offset) in [(1usize, -3_000i64), (2, 60_000)] {
        let node = &cluster.nodes[i];
        let path = node.config_path();
        let text = std::fs::read_to_string(&path).expect("config");
        std::fs::write(
            &path,
            text.replacen(
                "[[tables]]",
                &format!("[clock]\noffset_ms = {offset}\n\n[[tables]]"),
                1,
            ),
        )
        .expect("config");
    }
    for node in cluster.nodes.iter_mut() {
        node.start().await;
    }
    let (n0, n1, n2) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    n0.put(
        Ulid::generate(),
        json!({"title": "from the node with the right time"}),
    )
    .await;
    n1.put(Ulid::generate(), json!({"title": "from the node behind"}))
        .await;
    let ahead = n2
        .put(Ulid::generate(), json!({"title": "from the future"}))
        .await;
    // node0 and node1 converge on their own events; node2's are refused.
    wait_for("node0 and node1 hold both", async || {
        n0.reader().rows().await.len() >= 2 && n1.reader().rows().await.len() >= 2
    })
    .await;
    wait_for("drift rejections counted", async || {
        n0.metric(&format!(
            "tidemark_drift_rejections_total{{peer=\"{}\"}}",
            n2.id
        ))
        .await
        .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    assert!(n0.log_contains("beyond max drift"));
    assert!(
        n2.reader().is_unsynced(&ahead.event_id).await,
        "a refused event must stay unsynced"
    );
    assert!(
        !n0.reader()
            .rows()
            .await
            .values()
            .any(|r| r.contains("from the future"))
    );
    // Lag and delay metrics are never negative, on either side of the skew.
    for node in [n0, n1] {
        let (_, body) = node.http_get("/metrics").await;
        promtool_check(&body);
        for line in body.lines().filter(|l| {
            l.starts_with("tidemark_peer_oldest_unacked_age_seconds")
                || l.starts_with("tidemark_apply_delay_seconds_sum")
        }) {
            let value: f64 = line
                .rsplit_once(' ')
                .and_then(|(_, v)| v.parse().ok())
                .expect("value");
            assert!(value >= 0.0, "negative lag on {}: {line}", node.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requires_its_token_and_can_listen_apart() {
    let dir = tempfile::tempdir().expect("dir");
    let token_path = dir.path().join("admin.token");
    std::fs::write(&token_path, "s3cret-admin-token-0123456789\n").expect("token");
    let admin_port = free_port();
    let extra = format!(
        "[admin]\nlisten_addr = \"127.0.0.1:{admin_port}\"\ntoken_file = \"{}\"\n",
        token_path.display()
    );
    let mut cluster = Cluster::prepare(&["sqlite"], Topology::Mesh, "test", &extra);
    cluster.nodes[0].start().await;
    let node = &cluster.nodes[0];
    let admin_url = format!("http://127.0.0.1:{admin_port}");

    // Not on the peer listener.
    let status = AdminClient::connect(node.grpc_url())
        .await
        .expect("connect")
        .status(pb::StatusRequest {})
        .await
        .expect_err("admin is not served on the peer port");
    assert_eq!(status.code(), Code::Unimplemented);

    let call = async |token: Option<&str>| {
        let channel = tonic::transport::Channel::from_shared(admin_url.clone())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut req = tonic::Request::new(pb::StatusRequest {});
        if let Some(t) = token {
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {t}").parse().expect("header"),
            );
        }
        AdminClient::new(channel).status(req).await
    };
    let missing = call(None).await.expect_err("no token");
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(
        missing
            .message()
            .contains("requires `authorization: Bearer <token>`"),
        "{}",
        missing.message()
    );
    let wrong = call(Some("s3cret-admin-token-0123456788"))
        .await
        .expect_err("wrong token");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert_eq!(wrong.message(), "invalid admin token");
    let ok = call(Some("s3cret-admin-token-0123456789"))
        .await
        .expect("right token")
        .into_inner();
    assert_eq!(ok.node_id, node.id.to_string());
    assert!(node.log_contains("admin call with a wrong token refused"));

    // The CLI reads the token from a file.
    let out = Command::new(tidemark_bin())
        .args(["admin", "--addr", &admin_url, "--token-file"])
        .arg(&token_path)
        .args(["--json", "status"])
        .output()
        .expect("tidemark admin");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(status["node_id"], json!(node.id.to_string()));
    let out = Command::new(tidemark_bin())
        .args(["admin", "--addr", &admin_url, "status"])
        .output()
        .expect("tidemark admin");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A second daemon started on a database another daemon already writes to
/// (the same config started twice, or a copy with another node id) stops at
/// start with a message naming the holder; the first keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_one_database_is_refused() {
    for backend in ["sqlite", "postgres"] {
        let mut cluster = Cluster::prepare(&[backend], Topology::Mesh, "test", "");
        cluster.nodes[0].start().await;
        let node = &cluster.nodes[0];
        // Other ports, same database: only the writer lock stands in the way.
        let config = std::fs::read_to_string(node.config_path()).expect("config");
        let second = node.config_path().with_extension("second.toml");
        std::fs::write(
            &second,
            config
                .replace(&format!(":{}\"", node.port), &format!(":{}\"", free_port()))
                .replace(
                    &format!(":{}\"", node.metrics_port),
                    &format!(":{}\"", free_port()),
                ),
        )
        .expect("second config");
        let mut cmd = Command::new(tidemark_bin());
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("TIDEMARK_")) {
            cmd.env_remove(key);
        }
        let mut child = cmd
            .args(["run", "--config"])
            .arg(&second)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().expect("wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "{backend}: a second daemon on the same database kept running"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let out = child.wait_with_output().expect("output");
        assert!(!out.status.success(), "{backend}: {:?}", out.status);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("another tidemark daemon already writes to"),
            "{backend}: {text}"
        );
        // The first daemon was not disturbed.
        let id = Ulid::generate();
        node.put(id, json!({"title": "still here"})).await;
        assert!(node.is_running(), "{backend}");
        let rows = node.reader().rows().await;
        assert!(
            rows.get(&id.to_string())
                .is_some_and(|row| row.contains("still here")),
            "{backend}: {rows:?}"
        );
    }
}

/// A peer's second outage is reported as soon as its first was: a session that
/// came back ends the count of failures, so the log does not wait for the
/// tenth failure (and its backoff) to say the peer is gone again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_outage_is_reported_like_the_first() {
    let mut cluster = Cluster::start(&["sqlite", "sqlite"], Topology::Mesh).await;
    let first_failures = |node: &TestNode| {
        std::fs::read_to_string(node.log_path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("reconnecting with backoff") && l.contains("failures=1"))
            .count()
    };
    for outage in 1..=2 {
        cluster.nodes[1].kill();
        wait_for(
            &format!("outage {outage} reported as a first failure"),
            async || first_failures(&cluster.nodes[0]) >= outage,
        )
        .await;
        cluster.nodes[1].start().await;
        // The session is back once a new write arrives.
        let id = Ulid::generate();
        cluster.nodes[0].put(id, json!({"title": "back"})).await;
        wait_for("the session to come back", async || {
            cluster.nodes[1]
                .reader()
                .rows()
                .await
                .contains_key(&id.to_string())
        })
        .await;
    }
}
