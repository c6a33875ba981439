//! QUIC session tickets: what one resumption costs the ticket cache (a
//! device's ticket taken, a new one issued) with the cache holding N
//! tickets, one per device of a fleet. rustls's `ServerSessionMemoryCache`
//! against the gateway's `QuicTickets`.
//!
//! Run: `cargo bench -p furrow --bench tickets`. Figures are per
//! resumption (`Throughput::Elements`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use furrow::ingress::tls::QuicTickets;
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions};

/// A ticket's key (rustls uses 32 random bytes) and a value of about the
/// size rustls stores (the resumption secret and session parameters).
fn key(i: u64) -> Vec<u8> {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&i.to_le_bytes());
    k.to_vec()
}

/// Devices resume one after another, each taking its ticket and receiving
/// a new one, as in a reconnect storm, with `devices` tickets held: the
/// ticket taken sits in the middle of the insertion order (half the
/// fleet's tickets are older), so a cache that searches that order looks
/// through half of them.
fn resume(c: &mut Criterion) {
    let mut g = c.benchmark_group("quic_ticket_resumption");
    g.throughput(Throughput::Elements(1));
    for devices in [1_000u64, 10_000, 100_000] {
        let caches: [(&str, Box<dyn StoresServerSessions>); 2] = [
            (
                "rustls_memory_cache",
                Box::new(ServerSessionMemoryCacheBox(ServerSessionMemoryCache::new(
                    devices as usize * 2,
                ))),
            ),
            (
                "quic_tickets",
                Box::new(QuicTickets::new(devices as usize * 2)),
            ),
        ];
        for (name, cache) in caches {
            for d in 0..devices {
                cache.put(key(d), vec![7; 200]);
            }
            // Device d holds ticket d; resuming hands it ticket d + devices.
            let mut next = devices;
            g.bench_with_input(BenchmarkId::new(name, devices), &devices, |b, &devices| {
                b.iter(|| {
                    let old = next - devices / 2;
                    black_box(cache.take(&key(old)));
                    cache.put(key(next), vec![7; 200]);
                    next += 1;
                })
            });
        }
    }
    g.finish();
}

/// rustls returns its cache in an `Arc`; the trait object wants it owned.
#[derive(Debug)]
struct ServerSessionMemoryCacheBox(std::sync::Arc<ServerSessionMemoryCache>);

impl StoresServerSessions for ServerSessionMemoryCacheBox {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.0.put(key, value)
    }
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.get(key)
    }
    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.take(key)
    }
    fn can_cache(&self) -> bool {
        true
    }
}

criterion_group!(benches, resume);
criterion_main!(benches);
