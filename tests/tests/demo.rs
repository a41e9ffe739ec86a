//! `tidemark demo` as a newcomer runs it: it shows the conflict it creates
//! (both versions, the winner, and a reason that matches the versions and the
//! converged table), ends quietly when its output is closed (`| head -3`)
//! while still stopping its daemons and removing its files, and with
//! `--keep-running` serves the cluster on the ports given, the commands it
//! prints work, and SIGTERM stops it cleanly.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tidemark_tests::daemon::{free_port, tidemark_bin};

/// One demo at a time: each starts three daemons, and the normal mode picks
/// random ports from the range `free_port` hands out.
static ONE_DEMO: Mutex<()> = Mutex::new(());

fn one_demo() -> std::sync::MutexGuard<'static, ()> {
    ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running `tidemark demo`; dropped early (a failed assertion), it is sent
/// SIGTERM and waited for, so its daemons do not outlive the test.
struct Demo {
    child: Child,
    /// Its stdout, line by line, read by a thread.
    lines: Option<mpsc::Receiver<String>>,
    seen: Vec<String>,
}

impl Demo {
    fn start(args: &[&str]) -> Demo {
        let mut child = Command::new(tidemark_bin())
            .arg("demo")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tidemark demo");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Demo {
            child,
            lines: Some(rx),
            seen: Vec::new(),
        }
    }

    /// Reads lines until one contains `needle`; fails after `timeout`.
    fn read_until(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let rx = self.lines.as_ref().expect("stdout still read");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(e) => panic!(
                    "no line with {needle:?} ({e}); stdout so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the exit; returns the status, all of stdout and stderr.
    fn finish(&mut self, timeout: Duration) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "tidemark demo did not exit within {timeout:?}; stdout so far:\n{}",
                    self.seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if let Some(rx) = self.lines.take() {
            // The process is gone: the reader ends at EOF.
            self.seen.extend(rx.iter());
        }
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        (status, self.seen.join("\n"), stderr)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
        }
    }
}

/// One version line of the conflict section:
/// `  node-a  lost  HLC 2026-11-30T22:19:38.529Z + counter 0  event 01M8...`.
#[derive(Debug)]
struct Version {
    node: String,
    won: bool,
    wall_ms: i64,
    counter: u16,
    values: String,
}

fn parse_version(line: &str, values: &str) -> Version {
    let t: Vec<&str> = line.split_whitespace().collect();
    assert!(
        t.len() == 9 && t[2] == "HLC" && t[4] == "+" && t[5] == "counter" && t[7] == "event",
        "not a version line: {line:?}"
    );
    let wall = time::OffsetDateTime::parse(t[3], &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("HLC time {:?} is not RFC 3339: {e}", t[3]));
    Version {
        node: t[0].to_owned(),
        won: match t[1] {
            "won" => true,
            "lost" => false,
            other => panic!("verdict {other:?} in {line:?}"),
        },
        wall_ms: i64::try_from(wall.unix_timestamp_nanos() / 1_000_000).expect("ms"),
        counter: t[6].parse().expect("counter"),
        values: values
            .trim()
            .strip_prefix("values ")
            .unwrap_or_else(|| panic!("no values after {line:?}: {values:?}"))
            .to_owned(),
    }
}

/// The node id the demo printed for `name` (`  node-a  id 01M8...  grpc ...`).
fn node_id<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find_map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            (t.len() >= 3 && t[0] == name && t[1] == "id").then_some(t[2])
        })
        .unwrap_or_else(|| panic!("no id line for {name}:\n{out}"))
}

#[test]
fn demo_shows_the_conflict_it_creates_and_why_it_was_decided() {
    let _one = one_demo();
    let mut demo = Demo::start(&[]);
    let (status, out, err) = demo.finish(Duration::from_secs(90));
    assert!(status.success(), "tidemark demo: {status}\n{err}\n{out}");
    assert!(!err.contains("panicked"), "{err}");

    let lines: Vec<&str> = out.lines().collect();
    let head = lines
        .iter()
        .position(|l| l.starts_with("conflict on notes "))
        .unwrap_or_else(|| panic!("no conflict section:\n{out}"));
    let record = lines[head]
        .split_whitespace()
        .nth(3)
        .expect("the conflict's record id");
    assert_eq!(record.len(), 26, "{}", lines[head]);
    let a = parse_version(lines[head + 1], lines[head + 2]);
    let c = parse_version(lines[head + 3], lines[head + 4]);
    assert_eq!(
        (a.node.as_str(), c.node.as_str()),
        ("node-a", "node-c"),
        "{out}"
    );
    assert!(
        a.values.contains("\"body\":\"edited on node-a"),
        "{}",
        a.values
    );
    assert!(
        c.values.contains("\"body\":\"edited on node-c"),
        "{}",
        c.values
    );
    assert!(a.won != c.won, "exactly one version wins: {a:?} {c:?}");
    let (won, lost) = if a.won { (&a, &c) } else { (&c, &a) };

    let winner_line = lines[head + 5];
    assert!(
        winner_line.contains(&format!("winner: {}.", won.node))
            && winner_line.contains("lww")
            && winner_line.contains("the later HLC wins")
            && winner_line.contains("greater node id"),
        "{winner_line}"
    );
    // The reason given is the one these two HLCs call for.
    let reason = lines[head + 6];
    if won.wall_ms != lost.wall_ms {
        assert!(
            won.wall_ms > lost.wall_ms,
            "an earlier HLC won: {won:?} {lost:?}"
        );
        let expected = format!(
            "{}'s HLC is later, by {} ms",
            won.node,
            won.wall_ms - lost.wall_ms
        );
        assert!(
            reason.contains(&expected),
            "{reason:?}, expected {expected:?}"
        );
    } else if won.counter != lost.counter {
        assert!(
            won.counter > lost.counter,
            "a lower counter won: {won:?} {lost:?}"
        );
        assert!(reason.contains("logical counter is higher"), "{reason}");
    } else {
        assert!(
            reason.contains("exactly equal, so the greater node id wins"),
            "{reason}"
        );
        assert!(
            node_id(&out, &won.node) > node_id(&out, &lost.node),
            "the tie went to the smaller node id:\n{out}"
        );
        assert_eq!(won.node, "node-c", "the demo gives node-c the greatest id");
    }
    assert!(
        out.contains("the winner can differ"),
        "the run-to-run variation is not explained:\n{out}"
    );

    // The converged table shows the winning version on note 1.
    let row = lines
        .iter()
        .find(|l| l.starts_with(record) && l.contains("note 1"))
        .unwrap_or_else(|| panic!("no row of note 1 in the table:\n{out}"));
    assert!(
        row.contains(&format!("edited on {}", won.node)),
        "the table shows {row:?} but {} won",
        won.node
    );
    assert!(out.contains("converged in"), "{out}");
    let temp = out
        .lines()
        .next()
        .and_then(|l| l.split(" in ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the demo's directory");
    assert!(!Path::new(temp).exists(), "{temp} was not removed");
}

#[test]
fn demo_into_a_closed_pipe_stops_quietly_and_cleans_up() {
    let _one = one_demo();
    // `tidemark demo | head -n 3`: read three lines, close the pipe.
    let mut child = Command::new(tidemark_bin())
        .arg("demo")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tidemark demo");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut demo = Demo {
        child,
        lines: None,
        seen: Vec::new(),
    };
    let mut first = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read a line");
        first.push(line.trim_end().to_owned());
    }
    drop(stdout);
    let (status, _, err) = demo.finish(Duration::from_secs(60));
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
    assert!(status.success(), "exit {status}: {err}");

    // It ended the run: its directory is gone and its daemons are stopped.
    let temp = first[0]
        .split(" in ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the demo's directory");
    assert!(temp.contains("tidemark-demo-"), "{}", first[0]);
    assert!(!Path::new(temp).exists(), "{temp} was not removed");
    for line in &first[1..] {
        let t: Vec<&str> = line.split_whitespace().collect();
        let grpc = t[t.iter().position(|w| *w == "grpc").expect("grpc") + 1];
        assert!(
            TcpStream::connect(grpc).is_err(),
            "{} still listens on {grpc} after the demo ended",
            t[0]
        );
    }
}

/// A first port of three free consecutive ones.
fn three_free_ports() -> u16 {
    for _ in 0..100 {
        let p = free_port();
        if free_port() == p + 1 && free_port() == p + 2 {
            return p;
        }
    }
    panic!("no three consecutive free ports")
}

/// `GET path` over plain HTTP/1.1; the body.
fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    assert!(text.starts_with("HTTP/1.1 200"), "{addr}{path}: {text}");
    text
}

#[test]
fn demo_keep_running_serves_on_the_given_ports_until_sigterm() {
    let _one = one_demo();
    let (grpc, metrics) = (three_free_ports(), three_free_ports());
    let mut demo = Demo::start(&[
        "--keep-running",
        "--grpc-port",
        &grpc.to_string(),
        "--metrics-port",
        &metrics.to_string(),
    ]);
    demo.read_until("runs until Ctrl-C", Duration::from_secs(60));
    let out = demo.seen.join("\n");
    assert!(out.contains("conflict on notes "), "{out}");
    assert!(out.contains("try next"), "{out}");

    // The printed status commands work as printed, one per node's port.
    let status_lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(" admin --addr ") && l.trim_end().ends_with(" status"))
        .collect();
    assert!(
        !status_lines.is_empty(),
        "no admin status command printed:\n{out}"
    );
    for line in status_lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert!(
            words[0].ends_with("tidemark"),
            "the command does not run tidemark: {line}"
        );
        assert_eq!(words[3], format!("http://127.0.0.1:{grpc}"), "{line}");
        let ran = Command::new(tidemark_bin())
            .args(&words[1..])
            .stdin(Stdio::null())
            .output()
            .expect("run the printed command");
        let text = String::from_utf8_lossy(&ran.stdout);
        assert!(
            ran.status.success(),
            "{line}: {}\n{text}",
            String::from_utf8_lossy(&ran.stderr)
        );
        assert!(text.contains("(node-a)"), "{line}:\n{text}");
        assert_eq!(
            text.lines()
                .filter(|l| l.split_whitespace().any(|w| w == "connected"))
                .count(),
            2,
            "node-a is not connected to both peers:\n{text}"
        );
    }
    // Metrics are on, at the documented ports.
    let page = http_get(&format!("127.0.0.1:{metrics}"), "/metrics");
    assert!(page.contains("tidemark_peer_connected"), "{page}");
    assert!(
        out.contains(&format!(
            "curl -s 127.0.0.1:{metrics}/metrics | grep tidemark_peer"
        )),
        "{out}"
    );

    demo.signal("TERM");
    let (status, out, err) = demo.finish(Duration::from_secs(60));
    assert!(status.success(), "exit {status}: {err}\n{out}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.contains("SIGTERM: stopping the three nodes"), "{out}");
    assert!(
        out.contains("stopped: node-a, node-b and node-c shut down cleanly"),
        "{out}"
    );
    assert!(
        out.contains("removed "),
        "the temporary directory was not removed:\n{out}"
    );
    for port in [grpc, grpc + 1, grpc + 2, metrics] {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "something still listens on {port} after the demo stopped"
        );
    }
}
