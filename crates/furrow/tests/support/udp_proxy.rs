//! A fault-injecting UDP proxy for QUIC tests, on loopback.
//!
//! It listens on 127.0.0.1:0 and forwards each client's datagrams to the
//! upstream (the gateway's QUIC port) from a socket of that client's own,
//! and the answers back. On the way every datagram, in both directions, is
//! delayed by `one_way` (so a round trip through the proxy takes at least
//! twice that), dropped with probability `loss`, or held back by `hold`
//! with probability `reorder`, so the datagrams behind it overtake it.
//! The draws come from a seeded RNG; counters tell the test what was
//! injected, so it can fail when the proxy did nothing.
//!
//! It also records each client's first flight (what the client sent
//! before the gateway's first answer reached it), so a test can replay it
//! to the gateway from a new address: what an attacker who captured a
//! 0-RTT flight would do.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// What the proxy does to datagrams.
#[derive(Debug, Clone)]
pub struct UdpFaults {
    /// Delay of every datagram, each way.
    pub one_way: Duration,
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a datagram is held back by `hold` (reordered).
    pub reorder: f64,
    /// How much longer a reordered datagram takes.
    pub hold: Duration,
    /// The RNG's seed.
    pub seed: u64,
    /// Extra delay of what a client sends once it can have seen the
    /// gateway's first answer (the answer's arrival at the proxy plus
    /// `one_way`): its later flights, its handshake's completion among
    /// them. Made long, what the client receives before it passes was sent
    /// by the gateway on the first flight alone.
    pub later_flights: Duration,
}

impl Default for UdpFaults {
    fn default() -> Self {
        Self {
            one_way: Duration::ZERO,
            loss: 0.0,
            reorder: 0.0,
            hold: Duration::from_millis(5),
            seed: 1,
            later_flights: Duration::ZERO,
        }
    }
}

/// What was injected.
#[derive(Debug, Default)]
pub struct UdpStats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub reordered: AtomicU64,
    /// Later flights held back by `later_flights`.
    pub held: AtomicU64,
}

/// One client's first flight, and whether it is complete.
#[derive(Default)]
struct Flight {
    datagrams: Vec<Vec<u8>>,
    /// When the gateway's first answer reached the proxy.
    answered: Option<tokio::time::Instant>,
}

/// A running proxy; stops when dropped.
pub struct UdpProxy {
    /// Where clients send.
    pub addr: SocketAddr,
    upstream: SocketAddr,
    pub stats: Arc<UdpStats>,
    flights: Arc<Mutex<Vec<Flight>>>,
    task: JoinHandle<()>,
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One direction toward one socket: datagrams leave in the order they
/// came, each `one_way` after it came. (A task per datagram, as before,
/// reordered datagrams of the same delay now and then: a 0-RTT packet
/// overtaking its Initial is dropped by the gateway, which made the 0-RTT
/// tests flaky.)
#[derive(Clone)]
struct Lane {
    tx: tokio::sync::mpsc::UnboundedSender<(tokio::time::Instant, Vec<u8>)>,
    sock: Arc<UdpSocket>,
    to: Option<SocketAddr>,
}

impl Lane {
    fn new(sock: Arc<UdpSocket>, to: Option<SocketAddr>) -> Self {
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        let (s, t) = (Arc::clone(&sock), to);
        // Ends when the proxy (every sender) is gone.
        tokio::spawn(async move {
            while let Some((due, data)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                send(&s, t, &data).await;
            }
        });
        Self { tx, sock, to }
    }
}

async fn send(sock: &UdpSocket, to: Option<SocketAddr>, data: &[u8]) {
    let _ = match to {
        Some(to) => sock.send_to(data, to).await,
        None => sock.send(data).await,
    };
}

/// Sends `data` down `lane` after the fault draws; never blocks the
/// caller. A reordered datagram leaves on its own, `hold` later, so the
/// ones behind it overtake it.
fn forward(lane: &Lane, data: Vec<u8>, faults: &UdpFaults, rng: &Mutex<StdRng>, stats: &UdpStats) {
    let (drop, reorder) = {
        let mut rng = rng.lock().unwrap();
        (rng.gen_bool(faults.loss), rng.gen_bool(faults.reorder))
    };
    if drop {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    stats.forwarded.fetch_add(1, Ordering::Relaxed);
    if reorder {
        stats.reordered.fetch_add(1, Ordering::Relaxed);
        let (sock, to, delay) = (
            Arc::clone(&lane.sock),
            lane.to,
            faults.one_way + faults.hold,
        );
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            send(&sock, to, &data).await;
        });
        return;
    }
    let _ = lane
        .tx
        .send((tokio::time::Instant::now() + faults.one_way, data));
}

impl UdpProxy {
    /// A proxy in front of `upstream`.
    pub async fn start(upstream: SocketAddr, faults: UdpFaults) -> Self {
        let front = Arc::new(
            UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind the proxy"),
        );
        let addr = front.local_addr().expect("the proxy's address");
        let stats = Arc::new(UdpStats::default());
        let flights: Arc<Mutex<Vec<Flight>>> = Arc::default();
        let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(faults.seed)));
        let task = {
            let (stats, flights) = (Arc::clone(&stats), Arc::clone(&flights));
            tokio::spawn(async move {
                // Each client's socket toward the gateway, and its flight.
                let mut backs: HashMap<SocketAddr, (Lane, usize)> = HashMap::new();
                // Dropped with this task (the proxy): the readers stop too.
                let mut readers = tokio::task::JoinSet::new();
                let mut buf = vec![0u8; 65_536];
                loop {
                    let Ok((n, client)) = front.recv_from(&mut buf).await else {
                        return;
                    };
                    let (up, flight) = match backs.get(&client) {
                        Some(b) => b.clone(),
                        None => {
                            let Ok(back) = UdpSocket::bind("127.0.0.1:0").await else {
                                return;
                            };
                            if back.connect(upstream).await.is_err() {
                                return;
                            }
                            let back = Arc::new(back);
                            let up = Lane::new(Arc::clone(&back), None);
                            let flight = {
                                let mut f = flights.lock().unwrap();
                                f.push(Flight::default());
                                f.len() - 1
                            };
                            // The gateway's answers to this client.
                            let (b, down, rng, stats, flights, faults) = (
                                Arc::clone(&back),
                                Lane::new(Arc::clone(&front), Some(client)),
                                Arc::clone(&rng),
                                Arc::clone(&stats),
                                Arc::clone(&flights),
                                faults.clone(),
                            );
                            readers.spawn(async move {
                                let mut buf = vec![0u8; 65_536];
                                while let Ok(n) = b.recv(&mut buf).await {
                                    flights.lock().unwrap()[flight]
                                        .answered
                                        .get_or_insert_with(tokio::time::Instant::now);
                                    forward(&down, buf[..n].to_vec(), &faults, &rng, &stats);
                                }
                            });
                            backs.insert(client, (up.clone(), flight));
                            (up, flight)
                        }
                    };
                    let later = {
                        let mut f = flights.lock().unwrap();
                        let f = &mut f[flight];
                        if f.answered.is_none() {
                            f.datagrams.push(buf[..n].to_vec());
                        }
                        // Sent once the client can have seen the answer.
                        f.answered.is_some_and(|at| at.elapsed() >= faults.one_way)
                    };
                    if later && !faults.later_flights.is_zero() {
                        stats.held.fetch_add(1, Ordering::Relaxed);
                        let (up, data, faults, rng, stats) = (
                            up.clone(),
                            buf[..n].to_vec(),
                            faults.clone(),
                            Arc::clone(&rng),
                            Arc::clone(&stats),
                        );
                        tokio::spawn(async move {
                            tokio::time::sleep(faults.later_flights).await;
                            forward(&up, data, &faults, &rng, &stats);
                        });
                        continue;
                    }
                    forward(&up, buf[..n].to_vec(), &faults, &rng, &stats);
                }
            })
        };
        Self {
            addr,
            upstream,
            stats,
            flights,
            task,
        }
    }

    /// The first flight of the `i`th client (in order of first datagram).
    pub fn first_flight(&self, i: usize) -> Vec<Vec<u8>> {
        self.flights
            .lock()
            .unwrap()
            .get(i)
            .map(|f| f.datagrams.clone())
            .unwrap_or_default()
    }

    /// Sends the `i`th client's first flight to the gateway again, from a
    /// new address, and keeps the socket open
    /// for `linger` so the gateway's answers have somewhere to go.
    pub async fn replay_first_flight(&self, i: usize, linger: Duration) -> usize {
        let flight = self.first_flight(i);
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        for d in &flight {
            sock.send_to(d, self.upstream).await.expect("replay");
        }
        let mut buf = vec![0u8; 65_536];
        let _ = tokio::time::timeout(linger, async { while sock.recv(&mut buf).await.is_ok() {} })
            .await;
        flight.len()
    }

    pub fn dropped(&self) -> u64 {
        self.stats.dropped.load(Ordering::Relaxed)
    }

    pub fn held(&self) -> u64 {
        self.stats.held.load(Ordering::Relaxed)
    }

    pub fn reordered(&self) -> u64 {
        self.stats.reordered.load(Ordering::Relaxed)
    }
}
