//! Mutual TLS between peers: nodes with certificates from `tidemark cert`
//! replicate; a client without a certificate, with one from another CA, with an
//! expired one, or with one naming another node fails on its first RPC with a
//! clear error.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
use tidemark_hlc::Hlc;
use tidemark_replicator::PeerTls;
use tidemark_replicator::pb::{self, replication_client::ReplicationClient, sender_message};
use tidemark_tests::daemon::{Cluster, TestNode, Topology, tidemark_bin};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;
use ulid::Ulid;

fn cert_cmd(args: &[&str]) {
    let out = Command::new(tidemark_bin())
        .arg("cert")
        .args(args)
        .output()
        .expect("tidemark cert");
    assert!(
        out.status.success(),
        "tidemark cert {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate signed by the CA in `ca_dir` (or self-made CA when `None`), with
/// the given common name and validity window (days from now).
fn make_cert(ca_dir: Option<&Path>, cn: &str, from_days: i64, to_days: i64) -> (String, String) {
    let (issuer_cert, issuer_key) = match ca_dir {
        Some(dir) => (
            std::fs::read_to_string(dir.join("ca.pem")).expect("ca"),
            KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key")).expect("ca key"))
                .expect("key"),
        ),
        None => {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, "another CA");
            (p.self_signed(&key).expect("ca").pem(), key)
        }
    };
    let issuer = Issuer::from_ca_cert_pem(&issuer_cert, issuer_key).expect("issuer");
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now + time::Duration::days(from_days);
    p.not_after = now + time::Duration::days(to_days);
    (
        p.signed_by(&key, &issuer).expect("sign").pem(),
        key.serialize_pem(),
    )
}

async fn channel(node: &TestNode, ca_pem: &str, identity: Option<(&str, &str)>) -> Channel {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
        .domain_name("127.0.0.1");
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    // With TLS 1.3 a client without a valid certificate still connects: the first
    // RPC is what fails.
    Channel::from_shared(format!("https://127.0.0.1:{}", node.port))
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect")
}

/// The node logs why a TLS handshake failed (target tonic::transport).
async fn wait_log(node: &TestNode, needle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !node.log_contains(needle) {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never logged {needle:?}",
            node.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn hello(channel: Channel, node: &TestNode, sender: Ulid) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(2);
    tx.send(pb::SenderMessage {
        kind: Some(sender_message::Kind::Hello(pb::Hello {
            protocol_version: tidemark_replicator::PROTOCOL_VERSION,
            cluster_id: "test".into(),
            sender_node_id: sender.to_string(),
            receiver_node_id: node.id.to_string(),
            tables: tidemark_tests::daemon::notes_schema(),
            hlc: Hlc::at_wall_ms(tidemark_hlc::system_wall_ms())
                .expect("hlc")
                .encode(),
            // One process per claimed node id.
            instance_id: sender.to_string(),
            receiver_origin_hlc: 0,
            compacted: None,
        })),
    })
    .await
    .expect("queue hello");
    let mut stream = ReplicationClient::new(channel)
        .replicate(ReceiverStream::new(rx))
        .await?
        .into_inner();
    stream.message().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_replicates_and_refuses_bad_certificates() {
    let certs = tempfile::tempdir().expect("dir");
    let dir = certs.path();
    let d = dir.to_str().expect("utf8");
    cert_cmd(&["ca", "--dir", d]);
    let extra = format!(
        "[tls]\nca_file = \"{d}/ca.pem\"\ncert_file = \"{d}/{{name}}.pem\"\nkey_file = \"{d}/{{name}}.key\"\n\n\
         [access]\nwriters = [\"app\"]\noperators = [\"ops\"]\n"
    );
    let mut cluster = Cluster::prepare(&["sqlite", "sqlite"], Topology::Mesh, "test", &extra);
    for node in &cluster.nodes {
        cert_cmd(&[
            "node",
            "--dir",
            d,
            "--node-id",
            &node.id.to_string(),
            "--name",
            &node.name,
            "--host",
            "127.0.0.1",
            "--host",
            "localhost",
        ]);
    }
    for node in cluster.nodes.iter_mut() {
        node.start().await;
    }
    // Replication over mutual TLS.
    for (i, node) in cluster.nodes.iter().enumerate() {
        node.db.sql(&format!(
            "INSERT INTO notes (id, title) VALUES ('{}', 'over tls {i}')",
            Ulid::generate()
        ));
    }
    let snap = cluster.converged(Duration::from_secs(60)).await;
    assert_eq!(snap.rows.len(), 2);
    assert!(!cluster.nodes[0].log_contains("plaintext"));
    // The CLI reaches a node under mutual TLS with what its config names.
    let out = Command::new(tidemark_bin())
        .args(["admin", "status", "--json", "--config"])
        .arg(cluster.nodes[0].config_path())
        .output()
        .expect("run tidemark admin");
    assert!(
        out.status.success(),
        "admin status --config under TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(
        status["node_id"],
        cluster.nodes[0].id.to_string(),
        "{status:#}"
    );
    // The handshakes below claim the peer's node id from this process: the
    // real peer stops first (a second live instance of a node id is refused).
    cluster.nodes[1].stop();

    let node = &cluster.nodes[0];
    let peer = &cluster.nodes[1];
    let ca = std::fs::read_to_string(dir.join("ca.pem")).expect("ca");
    let peer_cert = std::fs::read_to_string(dir.join(format!("{}.pem", peer.name))).expect("cert");
    let peer_key = std::fs::read_to_string(dir.join(format!("{}.key", peer.name))).expect("key");

    // The peer's own certificate works.
    hello(
        channel(node, &ca, Some((&peer_cert, &peer_key))).await,
        node,
        peer.id,
    )
    .await
    .expect("valid certificate");

    // No client certificate.
    let err = hello(channel(node, &ca, None).await, node, peer.id)
        .await
        .expect_err("no client cert");
    assert_ne!(err.code(), Code::Ok);
    wait_log(node, "tls accept error error=peer sent no certificates").await;

    // A certificate from another CA, with the right name.
    let (other_cert, other_key) = make_cert(None, &peer.id.to_string(), -1, 30);
    let err = hello(
        channel(node, &ca, Some((&other_cert, &other_key))).await,
        node,
        peer.id,
    )
    .await
    .expect_err("other CA");
    assert_ne!(err.code(), Code::Ok);
    wait_log(node, "invalid peer certificate: UnknownIssuer").await;

    // An expired certificate from the right CA.
    let (old_cert, old_key) = make_cert(Some(dir), &peer.id.to_string(), -30, -1);
    let err = hello(
        channel(node, &ca, Some((&old_cert, &old_key))).await,
        node,
        peer.id,
    )
    .await
    .expect_err("expired");
    // The client sees the connection refused (how depends on timing: an alert or a
    // closed connection); the node's log says why.
    assert_ne!(err.code(), Code::Ok);
    wait_log(node, "invalid peer certificate: certificate expired").await;

    // A valid certificate naming another node than the one claimed.
    let impostor = Ulid::generate();
    let (cert, key) = make_cert(Some(dir), &impostor.to_string(), -1, 30);
    let err = hello(channel(node, &ca, Some((&cert, &key))).await, node, peer.id)
        .await
        .expect_err("identity");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains(&format!(
            "certificate identity {impostor} does not match the claimed node id {}",
            peer.id
        )),
        "{}",
        err.message()
    );
    // A valid certificate of a node that is not a configured peer.
    let err = hello(
        channel(node, &ca, Some((&cert, &key))).await,
        node,
        impostor,
    )
    .await
    .expect_err("not a peer");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("is not a configured peer"),
        "{}",
        err.message()
    );

    // Roles: certificates of the cluster CA, each allowed only what [access]
    // gives its common name; a peer's node certificate only replicates.
    cert_cmd(&["client", "--dir", d, "--name", "app"]);
    cert_cmd(&["client", "--dir", d, "--name", "ops"]);
    let client_cert = |name: &str| {
        (
            std::fs::read_to_string(dir.join(format!("{name}.pem"))).expect("cert"),
            std::fs::read_to_string(dir.join(format!("{name}.key"))).expect("key"),
        )
    };
    let (app_cert, app_key) = client_cert("app");
    let (ops_cert, ops_key) = client_cert("ops");
    let put = async |cert: &str, key: &str| {
        pb::records_client::RecordsClient::new(channel(node, &ca, Some((cert, key))).await)
            .put(pb::PutRequest {
                table: "notes".into(),
                id: Ulid::generate().to_string(),
                values_json: r#"{"title": "by role"}"#.into(),
            })
            .await
    };
    let status = async |cert: &str, key: &str| {
        pb::admin_client::AdminClient::new(channel(node, &ca, Some((cert, key))).await)
            .status(pb::StatusRequest::default())
            .await
    };
    put(&app_cert, &app_key).await.expect("a writer writes");
    status(&ops_cert, &ops_key)
        .await
        .expect("an operator calls Admin");
    // The audit line names the certificate that made a change.
    pb::admin_client::AdminClient::new(channel(node, &ca, Some((&ops_cert, &ops_key))).await)
        .set_policy(pb::SetPolicyRequest {
            table: "notes".into(),
            conflict_policy: "lww".into(),
        })
        .await
        .expect("an operator sets a policy");
    wait_log(node, "auth=certificate ops").await;
    for (who, result, key) in [
        (
            "app",
            status(&app_cert, &app_key).await.map(|_| ()),
            "access.operators",
        ),
        (
            "ops",
            put(&ops_cert, &ops_key).await.map(|_| ()),
            "access.writers",
        ),
        (
            "a peer",
            put(&peer_cert, &peer_key).await.map(|_| ()),
            "access.writers",
        ),
        (
            "a peer",
            status(&peer_cert, &peer_key).await.map(|_| ()),
            "access.operators",
        ),
    ] {
        let err = result.expect_err(who);
        assert_eq!(err.code(), Code::PermissionDenied, "{who}: {err:?}");
        assert!(err.message().contains(key), "{who}: {}", err.message());
    }

    // Plaintext against the TLS listener fails too.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{}", node.port))
        .expect("url")
        .connect()
        .await;
    if let Ok(ch) = plain {
        let res = tokio::time::timeout(Duration::from_secs(5), hello(ch, node, peer.id)).await;
        assert!(
            !matches!(res, Ok(Ok(()))),
            "a plaintext session was accepted"
        );
    }
    let _ = PeerTls {
        ca_pem: ca,
        cert_pem: peer_cert,
        key_pem: peer_key,
    };
}

#[test]
fn a_node_without_certificates_must_say_insecure() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("n.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"{}\"\ncluster_id = \"c\"\n[store]\nurl = \"sqlite://{}/n.db\"\n",
            Ulid::generate(),
            dir.path().display()
        ),
    )
    .expect("config");
    let out = Command::new(tidemark_bin())
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tls: set ca_file, cert_file and key_file"),
        "{stderr}"
    );
}
