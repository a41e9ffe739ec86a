//! A fault-injecting TCP proxy for one directed link between two daemons.
//!
//! Each node's config names, for every peer, the address of a [`Proxy`] that
//! forwards to that peer instead of the peer itself, so a test controls each
//! directed link (the connections node X opens to node Y) on its own:
//!
//! * [`Proxy::pass`]: forward everything (and heal every other fault);
//! * [`Proxy::partition`]: cut the open connections, then accept new ones only to
//!   close them at once (the dialer sees the connection reset or closed);
//! * [`Proxy::stall`]: one-way: bytes in one [`Direction`] are held (not read,
//!   not dropped) while the other direction flows;
//! * [`Proxy::flaky`]: cut the open connections at random intervals drawn from a
//!   seeded RNG, and delay every chunk of bytes by a fixed latency;
//! * [`Proxy::throttle`]: forward at most a given number of bytes per second in
//!   each direction.
//!
//! # One-way partitions
//!
//! TCP needs both directions, so a one-way partition cannot be "drop every packet
//! from X to Y" at this level: no connection would ever be set up and the
//! partition would look symmetric. The model here is a stall: bytes from X to Y
//! stay unread in the socket buffers (TCP flow control then stops X's writes) and
//! reach Y if the fault heals before a side gives up on the connection, exactly
//! as retransmissions would after a real outage. For a peer session (a gRPC
//! bidirectional stream the sender opens) a one-way partition "X cannot reach Y"
//! is therefore: on the link X→Y, [`Direction::ToServer`] stalls (X's Hello,
//! batches and HTTP/2 pings never arrive: Y applies nothing from X, X's acks and
//! keepalives time out); on the link Y→X, [`Direction::ToClient`] stalls (Y's
//! batches reach X and are applied, but X's Welcome and acks never come back: Y
//! cannot record progress, its window fills, and after its ack timeout it
//! reconnects into the same stall). [`Proxy::stall`] sets one link's half;
//! tests set both halves for a node-level one-way partition.
//!
//! Bytes pass through in chunks of at most [`CHUNK`] bytes; latency delays each
//! chunk before it is written, so it also caps a connection's throughput at
//! about `CHUNK / latency` per direction.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::daemon::Topology;

/// Largest chunk read and forwarded at once.
pub const CHUNK: usize = 16 * 1024;

/// Which way bytes flow on a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the dialing node (a sender: Hello, batches) to the node it dials.
    ToServer,
    /// From the dialed node (a receiver: Welcome, acks) back to the dialer.
    ToClient,
}

/// What a link does to its traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LinkState {
    /// Accepting and carrying connections (false: partitioned).
    up: bool,
    to_server_open: bool,
    to_client_open: bool,
    latency: Duration,
    /// Bytes per second per direction per connection; 0: unlimited.
    rate: u64,
    /// Random cuts: (min, max) interval between two cuts.
    flaky: Option<(Duration, Duration)>,
    /// Bumped to cut every open connection.
    cuts: u64,
}

impl LinkState {
    fn healthy() -> Self {
        LinkState {
            up: true,
            to_server_open: true,
            to_client_open: true,
            latency: Duration::ZERO,
            rate: 0,
            flaky: None,
            cuts: 0,
        }
    }

    fn open(&self, dir: Direction) -> bool {
        self.up
            && match dir {
                Direction::ToServer => self.to_server_open,
                Direction::ToClient => self.to_client_open,
            }
    }
}

/// Counters of one proxy, for assertions and failure messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    pub accepted: u64,
    /// Connections closed at accept because the link was partitioned.
    pub refused: u64,
    /// Times open connections were cut (partition or flaky).
    pub cuts: u64,
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
}

/// One directed link's proxy; stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    pub name: String,
    port: u16,
    seed: u64,
    state: watch::Sender<LinkState>,
    stats: Arc<Mutex<ProxyStats>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `127.0.0.1:target`.
    /// `seed` drives the flaky mode's random cuts.
    pub async fn start(name: impl Into<String>, target: u16, seed: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy listener");
        let port = listener.local_addr().expect("proxy address").port();
        let (state, _) = watch::channel(LinkState::healthy());
        let stats = Arc::new(Mutex::new(ProxyStats::default()));
        let accept = tokio::spawn(accept_loop(
            listener,
            target,
            state.subscribe(),
            stats.clone(),
        ));
        let chaos = tokio::spawn(chaos_loop(state.clone(), state.subscribe(), seed));
        Proxy {
            name: name.into(),
            port,
            seed,
            state,
            stats,
            tasks: vec![accept, chaos],
        }
    }

    /// The port peers dial.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The seed of this proxy's RNG.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn stats(&self) -> ProxyStats {
        let mut stats = *self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.cuts = self.state.borrow().cuts;
        stats
    }

    /// Heals every fault: connections flow at full speed, none is cut.
    pub fn pass(&self) {
        self.state.send_modify(|s| {
            let cuts = s.cuts;
            *s = LinkState::healthy();
            s.cuts = cuts;
        });
    }

    /// Cuts open connections and refuses new ones until healed.
    pub fn partition(&self) {
        self.state.send_modify(|s| {
            s.up = false;
            s.cuts += 1;
        });
    }

    /// Holds every byte flowing in `dir` (the other direction keeps flowing).
    pub fn stall(&self, dir: Direction) {
        self.state.send_modify(|s| match dir {
            Direction::ToServer => s.to_server_open = false,
            Direction::ToClient => s.to_client_open = false,
        });
    }

    /// Cuts open connections at random intervals in `[min, max]` (seeded) and
    /// delays every chunk by `latency`.
    pub fn flaky(&self, min: Duration, max: Duration, latency: Duration) {
        assert!(
            min <= max && !min.is_zero(),
            "flaky interval {min:?}..{max:?}"
        );
        self.state.send_modify(|s| {
            s.flaky = Some((min, max));
            s.latency = latency;
        });
    }

    /// Limits every connection to `bytes_per_sec` in each direction.
    pub fn throttle(&self, bytes_per_sec: u64) {
        assert!(bytes_per_sec > 0, "a throttle of 0 bytes/s is a partition");
        self.state.send_modify(|s| s.rate = bytes_per_sec);
    }

    /// Cuts the open connections once (new ones are accepted).
    pub fn cut(&self) {
        self.state.send_modify(|s| s.cuts += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Closing the state ends every connection task too.
        for t in &self.tasks {
            t.abort();
        }
        if std::thread::panicking() {
            eprintln!(
                "proxy {} (seed {}): {:?}",
                self.name,
                self.seed,
                self.stats()
            );
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: u16,
    state: watch::Receiver<LinkState>,
    stats: Arc<Mutex<ProxyStats>>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let snapshot = state.borrow().clone();
        if !snapshot.up {
            stats.lock().unwrap_or_else(|p| p.into_inner()).refused += 1;
            drop(client);
            continue;
        }
        stats.lock().unwrap_or_else(|p| p.into_inner()).accepted += 1;
        // Reap finished connections so the set does not grow.
        while conns.try_join_next().is_some() {}
        conns.spawn(connection(client, target, state.clone(), stats.clone()));
    }
}

/// Carries one connection until either side closes it or the link cuts it.
async fn connection(
    client: TcpStream,
    target: u16,
    mut state: watch::Receiver<LinkState>,
    stats: Arc<Mutex<ProxyStats>>,
) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
        // The target is down: the dialer sees its connection closed.
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let cuts = state.borrow_and_update().cuts;
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, Direction::ToServer, state.clone(), stats.clone());
    let down = pump(sr, cw, Direction::ToClient, state.clone(), stats);
    let cut = async {
        loop {
            if state.changed().await.is_err() {
                return;
            }
            let s = state.borrow_and_update();
            if s.cuts != cuts || !s.up {
                return;
            }
        }
    };
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        // Dropping the halves closes both sockets.
        _ = cut => {}
    }
}

/// Forwards one direction, honouring stalls, latency and the throttle.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    dir: Direction,
    mut state: watch::Receiver<LinkState>,
    stats: Arc<Mutex<ProxyStats>>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        // Stalled: read nothing (the bytes wait in the kernel's buffers).
        let Ok(s) = state.wait_for(|s| s.open(dir)).await.map(|s| s.clone()) else {
            return;
        };
        let max = if s.rate > 0 {
            // Up to a tenth of a second's worth per chunk.
            ((s.rate / 10) as usize).clamp(1, CHUNK)
        } else {
            CHUNK
        };
        let n = match from.read(&mut buf[..max]).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if !s.latency.is_zero() {
            tokio::time::sleep(s.latency).await;
        }
        // A stall that began while the chunk was in hand holds it too.
        if state.wait_for(|s| s.open(dir)).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        {
            let mut st = stats.lock().unwrap_or_else(|p| p.into_inner());
            match dir {
                Direction::ToServer => st.bytes_to_server += n as u64,
                Direction::ToClient => st.bytes_to_client += n as u64,
            }
        }
        if s.rate > 0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / s.rate as f64)).await;
        }
    }
}

/// Cuts every open connection at random intervals while the link is flaky.
async fn chaos_loop(
    state: watch::Sender<LinkState>,
    mut watch: watch::Receiver<LinkState>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    loop {
        let Ok(s) = watch
            .wait_for(|s| s.flaky.is_some())
            .await
            .map(|s| s.clone())
        else {
            return;
        };
        let Some((min, max)) = s.flaky else { continue };
        let wait = rng.random_range(min..=max);
        tokio::time::sleep(wait).await;
        state.send_modify(|s| {
            if s.flaky.is_some() {
                s.cuts += 1;
            }
        });
    }
}

/// A seed for a test's proxies: `$TIDEMARK_FAULT_SEED` when set (to replay a
/// failure), else a fresh one. Printed either way, so a failing run shows it.
pub fn fault_seed() -> u64 {
    let seed = std::env::var("TIDEMARK_FAULT_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("fault seed: {seed} (replay with TIDEMARK_FAULT_SEED={seed})");
    seed
}

/// A proxy on every directed link of a cluster (a mesh or a chain): node `i`
/// reaches node `j` only through `link(i, j)`.
#[derive(Debug)]
pub struct Links {
    proxies: std::collections::BTreeMap<(usize, usize), Proxy>,
    pub seed: u64,
}

impl Links {
    /// Starts one proxy per ordered pair of nodes and rewrites every node's config
    /// (cluster `cluster_id`, extra TOML `extra`) so its peers are dialled through
    /// them. Call before the nodes start.
    pub async fn mesh(
        cluster: &crate::daemon::Cluster,
        cluster_id: &str,
        extra: &str,
        seed: u64,
    ) -> Links {
        Links::new(cluster, Topology::Mesh, cluster_id, extra, seed).await
    }

    /// Like [`Links::mesh`] for a chain: node `i` peers with `i - 1` and `i + 1`
    /// only, through `link(i, i ± 1)`.
    pub async fn chain(
        cluster: &crate::daemon::Cluster,
        cluster_id: &str,
        extra: &str,
        seed: u64,
    ) -> Links {
        Links::new(cluster, Topology::Chain, cluster_id, extra, seed).await
    }

    async fn new(
        cluster: &crate::daemon::Cluster,
        topology: Topology,
        cluster_id: &str,
        extra: &str,
        seed: u64,
    ) -> Links {
        let n = cluster.nodes.len();
        let peers = |i: usize| {
            (0..n).filter(move |j| match topology {
                Topology::Mesh => *j != i,
                Topology::Chain => j.abs_diff(i) == 1,
            })
        };
        let mut proxies = std::collections::BTreeMap::new();
        for i in 0..n {
            for j in peers(i) {
                let proxy = Proxy::start(
                    format!("{}->{}", cluster.nodes[i].name, cluster.nodes[j].name),
                    cluster.nodes[j].port,
                    seed.wrapping_add((i * n + j) as u64),
                )
                .await;
                proxies.insert((i, j), proxy);
            }
        }
        for (i, node) in cluster.nodes.iter().enumerate() {
            let peers: Vec<(ulid::Ulid, u16)> = peers(i)
                .map(|j| (cluster.nodes[j].id, proxies[&(i, j)].port()))
                .collect();
            node.write_config(cluster_id, &peers, extra);
        }
        Links { proxies, seed }
    }

    /// The link node `from` dials to reach node `to`.
    pub fn link(&self, from: usize, to: usize) -> &Proxy {
        &self.proxies[&(from, to)]
    }

    pub fn all(&self) -> impl Iterator<Item = &Proxy> {
        self.proxies.values()
    }

    /// Cuts node `i` off from every other node, both ways.
    pub fn isolate(&self, i: usize) {
        for ((a, b), p) in &self.proxies {
            if *a == i || *b == i {
                p.partition();
            }
        }
    }

    /// Node `from` can no longer reach node `to` (`to` still reaches `from`): on
    /// `from`'s link to `to` its requests stall; on `to`'s link to `from` the
    /// replies stall. See the module docs for what this does to a session.
    pub fn one_way(&self, from: usize, to: usize) {
        self.link(from, to).stall(Direction::ToServer);
        self.link(to, from).stall(Direction::ToClient);
    }

    /// Heals every link.
    pub fn heal(&self) {
        for p in self.proxies.values() {
            p.pass();
        }
    }
}
