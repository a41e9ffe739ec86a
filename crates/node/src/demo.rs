//! `tidemark demo`: a three-node cluster on local SQLite files, in one process.
//! It writes through the API and directly with SQL (as an application would),
//! makes two nodes update the same record concurrently, and prints what
//! converged. The configs it writes can be run again with `tidemark run`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use tidemark_replicator::pb::{self, records_client::RecordsClient};
use tokio_util::sync::CancellationToken;
use ulid::Ulid;

use crate::config::Config;
use crate::{Node, Settings};

const NAMES: [&str; 3] = ["node-a", "node-b", "node-c"];
const NOTES_DDL: &str = "CREATE TABLE IF NOT EXISTS notes (\
    id TEXT PRIMARY KEY CHECK (length(id) = 26), \
    title TEXT NOT NULL, \
    body TEXT, \
    author TEXT)";

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Writes three node configs (a full mesh) into `dir` and returns their paths.
fn write_configs(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let ids: Vec<Ulid> = (0..3).map(|_| Ulid::generate()).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
    let mut paths = Vec::new();
    for i in 0..3 {
        let mut peers = String::new();
        for j in (0..3).filter(|j| *j != i) {
            peers.push_str(&format!(
                "\n[[peers]]\nname = \"{}\"\nnode_id = \"{}\"\naddress = \"http://127.0.0.1:{}\"\n",
                NAMES[j], ids[j], ports[j]
            ));
        }
        let text = format!(
            "# {name} of the tidemark demo cluster\n\n[node]\nid = \"{id}\"\nname = \"{name}\"\ncluster_id = \"demo\"\n\n\
             [store]\nurl = \"sqlite://{db}\"\n\n[server]\nlisten_addr = \"127.0.0.1:{port}\"\nmetrics_listen_addr = \"\"\n\n\
             [tls]\ninsecure = true\n\n[[tables]]\nname = \"notes\"\nconflict_policy = \"lww\"\n{peers}",
            name = NAMES[i],
            id = ids[i],
            db = dir.join(format!("{}.db", NAMES[i])).display(),
            port = ports[i],
        );
        let path = dir.join(format!("{}.toml", NAMES[i]));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

async fn open_db(path: &Path) -> anyhow::Result<SqliteConnection> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .busy_timeout(Duration::from_secs(10));
    Ok(SqliteConnection::connect_with(&opts).await?)
}

type Row = (String, String, Option<String>, Option<String>);

async fn rows(db: &mut SqliteConnection) -> anyhow::Result<Vec<Row>> {
    Ok(
        sqlx::query_as("SELECT id, title, body, author FROM notes ORDER BY title, id")
            .fetch_all(db)
            .await?,
    )
}

async fn event_ids(db: &mut SqliteConnection) -> anyhow::Result<Vec<String>> {
    let ids: Vec<(String,)> =
        sqlx::query_as("SELECT event_id FROM change_events ORDER BY event_id")
            .fetch_all(db)
            .await?;
    Ok(ids.into_iter().map(|r| r.0).collect())
}

async fn put(
    client: &mut RecordsClient<tonic::transport::Channel>,
    id: Ulid,
    values: serde_json::Value,
) -> anyhow::Result<()> {
    client
        .put(pb::PutRequest {
            table: "notes".into(),
            id: id.to_string(),
            values_json: values.to_string(),
        })
        .await?;
    Ok(())
}

/// Runs the demo in `dir` (a temporary directory when `None`).
pub async fn run(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let temp;
    let temp_dir_used = dir.is_none();
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            d
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    println!("tidemark demo: three nodes on SQLite in {}", dir.display());
    let configs = write_configs(&dir)?;
    let mut settings: Vec<Settings> = Vec::new();
    for path in &configs {
        let cfg = Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let s = cfg.validate().map_err(|errs| {
            anyhow::anyhow!(
                errs.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
        settings.push(s);
    }
    // The application's table, created on every node before the daemons start.
    let mut dbs = Vec::new();
    for name in NAMES {
        let mut db = open_db(&dir.join(format!("{name}.db"))).await?;
        sqlx::query(NOTES_DDL).execute(&mut db).await?;
        dbs.push(db);
    }

    let shutdown = CancellationToken::new();
    let mut nodes = Vec::new();
    for s in settings {
        nodes.push(Node::start(s, shutdown.clone(), None).await?);
    }
    for (name, node) in NAMES.iter().zip(&nodes) {
        println!(
            "  {name}  id {}  grpc {}",
            node.store.node_id(),
            node.grpc_addr
        );
    }
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(RecordsClient::connect(format!("http://{}", node.grpc_addr)).await?);
    }

    let started = Instant::now();
    println!("\n1. node-a writes three notes through the Records API");
    let ids: Vec<Ulid> = (0..5).map(|_| Ulid::generate()).collect();
    for (i, id) in ids.iter().take(3).enumerate() {
        put(
            &mut clients[0],
            *id,
            json!({"title": format!("note {}", i + 1), "author": "node-a api"}),
        )
        .await?;
    }
    println!("2. node-b's application inserts two notes directly with SQL");
    for (i, id) in ids.iter().skip(3).enumerate() {
        sqlx::query("INSERT INTO notes (id, title, author) VALUES ($1, $2, 'node-b sql')")
            .bind(id.to_string())
            .bind(format!("note {}", i + 4))
            .execute(&mut dbs[1])
            .await?;
    }
    // Let note 1 reach every node first, so both updates below are updates.
    let deadline = Instant::now() + Duration::from_secs(30);
    for db in dbs.iter_mut() {
        loop {
            let found: Option<(String,)> = sqlx::query_as("SELECT id FROM notes WHERE id = $1")
                .bind(ids[0].to_string())
                .fetch_optional(&mut *db)
                .await?;
            if found.is_some() {
                break;
            }
            if Instant::now() > deadline {
                bail!("note 1 did not replicate within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    println!("3. node-a and node-c update note 1 at the same time (last writer wins everywhere)");
    let (a, c) = clients.split_at_mut(2);
    let (ra, rc) = tokio::join!(
        put(&mut a[0], ids[0], json!({"body": "edited on node-a"})),
        put(&mut c[0], ids[0], json!({"body": "edited on node-c"})),
    );
    ra?;
    rc?;
    println!("4. node-c deletes note 2; node-b's application edits note 4 with SQL");
    clients[2]
        .delete(pb::DeleteRequest {
            table: "notes".into(),
            id: ids[1].to_string(),
        })
        .await?;
    sqlx::query("UPDATE notes SET body = 'edited with sqlite3-style SQL' WHERE id = $1")
        .bind(ids[3].to_string())
        .execute(&mut dbs[1])
        .await?;

    println!("\nwaiting for the three nodes to converge...");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut snapshots = Vec::new();
        for db in dbs.iter_mut() {
            snapshots.push((rows(db).await?, event_ids(db).await?));
        }
        let mut unsynced = 0;
        for node in &nodes {
            unsynced += node.store.count_unsynced().await?;
        }
        let same = snapshots.windows(2).all(|w| w[0] == w[1]);
        if same && unsynced == 0 && snapshots[0].0.len() == 4 {
            println!(
                "converged in {} ms: all three nodes hold the same {} notes and the same {} change events, every event synced\n",
                started.elapsed().as_millis(),
                snapshots[0].0.len(),
                snapshots[0].1.len()
            );
            println!("{:<28} {:<8} {:<32} author", "id", "title", "body");
            for (id, title, body, author) in &snapshots[0].0 {
                println!(
                    "{id:<28} {title:<8} {:<32} {}",
                    body.as_deref().unwrap_or("-"),
                    author.as_deref().unwrap_or("-")
                );
            }
            break;
        }
        if Instant::now() > deadline {
            shutdown.cancel();
            bail!("the nodes did not converge within 60 s (unsynced events: {unsynced})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if temp_dir_used {
        println!("\n(the demo's files are removed now; pass --dir DIR to keep them)");
    } else {
        println!(
            "\nthe files stay in {}; run a node again with: tidemark run --config {}",
            dir.display(),
            configs[0].display()
        );
    }
    shutdown.cancel();
    for node in nodes {
        node.stopped().await;
    }
    Ok(())
}
