//! The `tidemark admin` and `tidemark records` command lines as an operator
//! types them against a running node: addresses without a scheme, flags after
//! the subcommand, clear errors (the wrong listener, a node that is not there),
//! output into a closed pipe, and 64-bit values in `--json` as strings.

use std::process::{Command, Output, Stdio};

use serde_json::Value;
use tidemark_tests::daemon::{Cluster, Topology, free_port, tidemark_bin};
use ulid::Ulid;

/// `tidemark ARGS...` as an operator runs it.
fn tidemark(args: &[&str]) -> Output {
    Command::new(tidemark_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tidemark")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `tidemark ARGS...`, which must succeed, and parses its JSON output.
fn tidemark_json(args: &[&str]) -> Value {
    let out = tidemark(args);
    assert!(
        out.status.success(),
        "tidemark {args:?}: {}\n{}",
        stderr(&out),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("tidemark {args:?} printed no JSON: {e}"))
}

/// A JSON string holding an integer beyond 2^53 (where a JSON number would be
/// rounded by jq and JavaScript).
fn assert_int64_string(v: &Value, what: &str) {
    let text = v
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a JSON string: {v}"));
    let n: i64 = text
        .parse()
        .unwrap_or_else(|e| panic!("{what} {text:?} is not an integer: {e}"));
    assert!(n > 1 << 53, "{what} {n} is not a 64-bit HLC");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_without_scheme_and_flags_after_the_subcommand_work() {
    let cluster = Cluster::start(&["sqlite"], Topology::Mesh).await;
    let node = &cluster.nodes[0];
    let addr = format!("127.0.0.1:{}", node.port);
    let id = Ulid::generate().to_string();

    // `--addr` without a scheme, before the subcommand.
    let put = tidemark_json(&[
        "records",
        "--addr",
        &addr,
        "put",
        "notes",
        &id,
        r#"{"title":"typed by hand"}"#,
    ]);
    assert_eq!(put["written"], Value::Bool(true), "{put:#}");
    assert_int64_string(&put["hlc"], "records put: hlc");

    // The same flags after the subcommand.
    let got = tidemark_json(&["records", "get", "notes", &id, "--addr", &addr]);
    assert_eq!(got["values"]["title"], "typed by hand", "{got:#}");
    assert_eq!(got["hlc"], put["hlc"], "{got:#}");

    let status = tidemark_json(&["admin", "status", "--addr", &addr, "--json"]);
    assert_eq!(status["node_id"], node.id.to_string(), "{status:#}");
    // The text form reads times, not integers.
    let out = tidemark(&["admin", "status", "--addr", &addr]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    let clock = text
        .lines()
        .find(|l| l.starts_with("clock"))
        .unwrap_or_else(|| panic!("no clock line:\n{text}"));
    assert!(
        clock.contains('T') && clock.contains("Z (") && clock.contains(')'),
        "{clock}"
    );
    assert!(text.to_lowercase().contains("newest event"), "{text}");
    assert_int64_string(&status["hlc"], "admin status: hlc");
    let origin = &status["vector"][node.id.to_string()];
    assert_int64_string(origin, "admin status: vector entry");

    let history = tidemark_json(&["admin", "--json", "history", "notes", &id, "--addr", &addr]);
    let events = history.as_array().expect("history is a list");
    assert_eq!(events.len(), 1, "{history:#}");
    assert_eq!(events[0]["hlc"], put["hlc"], "{history:#}");

    // TLS flags after the subcommand are parsed too (and their files read).
    let out = tidemark(&[
        "admin",
        "status",
        "--addr",
        &addr,
        "--ca-file",
        "/nonexistent/ca.pem",
        "--cert-file",
        "/nonexistent/ops.pem",
        "--key-file",
        "/nonexistent/ops.key",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/ca.pem"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_on_the_wrong_listener_names_the_admin_listen_address() {
    let admin_port = free_port();
    let extra = format!("[admin]\nlisten_addr = \"127.0.0.1:{admin_port}\"\n");
    let mut cluster = Cluster::prepare(&["sqlite"], Topology::Mesh, "test", &extra);
    cluster.nodes[0].start().await;
    let node = &cluster.nodes[0];

    let out = tidemark(&["admin", "--addr", &node.grpc_url(), "status"]);
    assert!(!out.status.success(), "admin answered on the peer listener");
    let err = stderr(&out);
    assert!(err.contains("Unimplemented"), "{err}");
    assert!(err.contains("admin.listen_addr"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // The admin listener answers; the write API is not there.
    let admin_addr = format!("127.0.0.1:{admin_port}");
    let status = tidemark_json(&["admin", "status", "--json", "--addr", &admin_addr]);
    assert_eq!(status["node_id"], node.id.to_string(), "{status:#}");
    let out = tidemark(&[
        "records",
        "--addr",
        &admin_addr,
        "get",
        "notes",
        &Ulid::generate().to_string(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("server.listen_addr"),
        "{}",
        stderr(&out)
    );

    // With the node's config file, each command finds its listener itself.
    let config = node.config_path().display().to_string();
    let status = tidemark_json(&["admin", "status", "--json", "--config", &config]);
    assert_eq!(status["node_id"], node.id.to_string(), "{status:#}");
    let id = Ulid::generate().to_string();
    tidemark_json(&[
        "records",
        "--config",
        &config,
        "put",
        "notes",
        &id,
        r#"{"title":"via config"}"#,
    ]);
    let got = tidemark_json(&["records", "get", "notes", &id, "--config", &config]);
    assert_eq!(got["values"]["title"], "via config", "{got:#}");
    // A flag given beside it wins.
    let out = tidemark(&[
        "admin",
        "status",
        "--config",
        &config,
        "--addr",
        &node.grpc_url(),
    ]);
    assert!(!out.status.success(), "--addr was ignored");
    let out = tidemark(&["admin", "status", "--config", "/nonexistent/node.toml"]);
    assert!(
        stderr(&out).contains("/nonexistent/node.toml"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_error_names_the_address_and_its_cause() {
    // Nothing listens on this port.
    let addr = format!("127.0.0.1:{}", free_port());
    for args in [
        vec!["admin", "--addr", &addr, "status"],
        vec!["records", "get", "notes", "x", "--addr", &addr],
    ] {
        let out = tidemark(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("cannot connect to http://{addr}")),
            "{args:?}: {err}"
        );
        assert!(err.contains("Connection refused"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let out = tidemark(&["admin", "--addr", &format!("https://{addr}"), "status"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--ca-file"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_into_a_closed_pipe_ends_quietly() {
    let cluster = Cluster::start(&["sqlite"], Topology::Mesh).await;
    let addr = cluster.nodes[0].grpc_url();
    let id = Ulid::generate().to_string();
    for args in [
        vec!["admin", "--addr", &addr, "status"],
        vec!["admin", "--addr", &addr, "status", "--json"],
        vec!["records", "--addr", &addr, "put", "notes", &id, "{}"],
    ] {
        // `tidemark ... | head -0`: the reading end is closed before anything
        // is written.
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(tidemark_bin())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("run tidemark");
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains("Broken pipe"), "{args:?}: {err}");
        assert!(out.status.success(), "{args:?}: {:?} {err}", out.status);
    }
}

/// `check-config` shows what was configured, readable: ids as the ULIDs the
/// user wrote, the store without its password, each peer and table.
#[test]
fn check_config_prints_a_readable_summary() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("n.toml");
    let (me, peer) = (Ulid::generate(), Ulid::generate());
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"{me}\"\nname = \"alpha\"\ncluster_id = \"c1\"\n\
             [store]\nurl = \"postgres://tm:s3cret@127.0.0.1:5432/tm\"\n\
             [tls]\ninsecure = true\n\
             [[peers]]\nnode_id = \"{peer}\"\naddress = \"http://10.0.0.2:7070\"\n\
             [[tables]]\nname = \"notes\"\nconflict_policy = \"manual\"\n"
        ),
    )
    .expect("config");
    let out = Command::new(tidemark_bin())
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", stderr(&out));
    assert!(stdout.starts_with("config OK\n"), "{stdout}");
    for want in [
        format!("node        {me} (alpha)"),
        "cluster     c1".to_owned(),
        "plaintext (tls.insecure = true)".to_owned(),
        format!("  {peer} http://10.0.0.2:7070"),
        "  notes (manual)".to_owned(),
    ] {
        assert!(stdout.contains(&want), "{want:?} in:\n{stdout}");
    }
    assert!(stdout.contains("PostgreSQL postgres://tm:"), "{stdout}");
    assert!(
        !stdout.contains("s3cret"),
        "the password is shown:\n{stdout}"
    );
    assert!(!stdout.contains("Settings {"), "a debug dump:\n{stdout}");
}

/// `tidemark bench` at a tiny size runs every run, on SQLite, PostgreSQL and a
/// mixed pair, and reports each: every node received every other node's events
/// (and the marker rows that end each run), the raw baselines of both backends
/// were measured, and nothing was left out.
#[test]
fn bench_runs_every_run_on_both_backends() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let out = tidemark(&[
        "bench",
        "--writes",
        "120",
        "--batched-writes",
        "1000",
        "--backlog",
        "400",
        "--rate",
        "50",
        "--lag-secs",
        "1",
        "--clients",
        "2",
        "--dir",
        dir.path().to_str().expect("utf-8 path"),
        "--json",
        json.to_str().expect("utf-8 path"),
    ]);
    assert!(out.status.success(), "tidemark bench: {}", stderr(&out));
    let report: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("bench JSON")).expect("JSON");
    for (raw, events) in [
        ("raw_single", 120),
        ("raw_batched", 1000),
        ("raw_pg_single", 120),
        ("raw_pg_batched", 1000),
    ] {
        assert_eq!(report[raw]["events"], events, "{raw}: {}", report[raw]);
        assert!(
            report[raw]["per_sec"].as_f64().unwrap_or(0.0) > 0.0,
            "{raw}"
        );
    }
    assert!(
        report["postgres_left_out"].is_null(),
        "{}",
        report["postgres_left_out"]
    );
    let runs = report["runs"].as_array().expect("runs");
    let names: Vec<&str> = runs.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "api-single-2",
            "sql-single-2",
            "sql-batch100-2",
            "api-single-3",
            "pg-api-single-2",
            "pg-batch100-2",
            "mixed-batch100-2"
        ]
    );
    for run in runs {
        let nodes = run["nodes"].as_u64().expect("nodes");
        let events = run["rate"]["events"].as_u64().expect("events");
        let expected = if run["name"].as_str().is_some_and(|n| n.contains("batch")) {
            1000
        } else {
            120
        };
        assert_eq!(events, expected, "{run}");
        // Each node received every event written elsewhere once as new: the
        // workload's and one marker row per node.
        let new = run["received"]["applied"].as_u64().unwrap_or(0)
            + run["received"]["superseded"].as_u64().unwrap_or(0);
        assert_eq!(new, (nodes - 1) * (events + nodes), "{run}");
    }
    assert_eq!(report["catch_up"]["backlog"], 400);
    assert!(report["catch_up"]["per_sec"].as_f64().unwrap_or(0.0) > 0.0);
    assert_eq!(report["lag"]["writes"], 50);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("to raw PostgreSQL batched"),
        "the PostgreSQL ratio is reported:\n{text}"
    );
}
