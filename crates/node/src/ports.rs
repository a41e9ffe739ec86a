//! Loopback ports for the servers the bench and the tests start (daemons,
//! PostgreSQL), chosen before the server binds them.

use std::sync::atomic::{AtomicU32, Ordering};

/// The first port handed out: below the kernel's default ephemeral range
/// (32768 and up).
const LOW: u32 = 20_000;
/// How many ports, from [`LOW`], are handed out.
const SPAN: u32 = 12_000;

/// A port that was free a moment ago and that no other call of this process
/// returned, below the kernel's ephemeral range: a port picked by binding to
/// port 0 and released can be taken by an outgoing connection (a daemon
/// dialling a peer that is not up yet) before the server meant to listen on it
/// starts.
pub fn free_port() -> std::io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    // Each process starts at its own place in the range.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(2_654_435_761) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrNotAvailable,
        format!("no free loopback port between {LOW} and {}", LOW + SPAN),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().expect("port")).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "{ports:?}");
        for p in ports {
            assert!((LOW..LOW + SPAN).contains(&u32::from(p)), "{p}");
            std::net::TcpListener::bind(("127.0.0.1", p)).expect("still free");
        }
    }
}
