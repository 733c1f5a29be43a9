//! Criterion micro-benchmarks of the replication core's hot paths.
//!
//! Run everything with `cargo bench --bench core` (about a minute); one group with
//! `cargo bench --bench core -- vclock`; a smoke run that executes each benchmark once without
//! measuring with `cargo bench --bench core -- --test`. Every group uses a 0.5 s warm-up, 2 s of
//! measurement and 20 samples.
//!
//! Groups:
//! - `vclock`: [`VClock`] `partial_cmp` (`compare`), `covers` and in-place `merge` for 3 and 16
//!   sites, on an `ordered` pair (every entry of `b` above `a`) and a `concurrent` pair (`b` above
//!   `a` everywhere except the last entry). Both pairs are worst cases: the answer is only known at
//!   the last entry, so every call scans the whole vector. Time per call.
//! - `dependency_buffer`: [`Replica::receive`] throughput (updates/s) of a 3-site replica (site 0)
//!   taking 1000 remote updates per iteration, 500 from each of origins 1 and 2, where origin 1's
//!   i-th update depends on origin 2's i-th update. Deliveries alternate between the origins in
//!   chunks (`chunk=1`: one update per `receive` call; `chunk=100`: network-sized batches).
//!   `in_order` delivers origin 2's chunk first, so every dependency is already satisfied;
//!   `half_ahead` delivers origin 1's chunk first, so half of the updates wait in the buffer and are
//!   released when origin 2's chunk arrives (with `chunk=1` each of them is blocked and woken
//!   individually). The same items are used in both orders. A fresh replica per iteration comes
//!   from `iter_batched` (setup and teardown not timed); the timed part ends with `take_ready()`.
//!   Applying includes the LWW merge of 1000 new keys (100 B values) into the `MemStore`.
//! - `store`: [`MemStore`] with 100 B values, 1000 operations per iteration (updates/s; divide
//!   into 1e9 for ns per operation): `merge_new` (1000 new keys into an empty store, created
//!   untimed), `merge_overwrite` (1000 existing keys, each write a newer version that wins),
//!   `get_hit` / `get_miss` (lookups in a 10 000-key store; a hit clones the entry out).
//! - `wire`: [`encode_batch`] and [`decode_batch`] (unpacking with every field checked, items
//!   whose keys and values are slices of the frame) of one 1000-update batch with 100 B values
//!   and 3-site dependency vectors (updates/s).

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use causalkv::clock::{SiteId, VClock, Version};
use causalkv::peer_wire::{StreamBase, decode_batch, encode_batch};
use causalkv::replica::{Item, Replica, ReplicaConfig, Update};
use causalkv::storage::{Entry, MemStore, Store};
use causalkv::wire::Limits;
use criterion::measurement::WallTime;
use criterion::{
    BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};

/// Value size used by the store, buffer and wire benchmarks.
const VALUE_LEN: usize = 100;
/// Updates per iteration in the buffer, store and wire benchmarks.
const BATCH: usize = 1000;
/// Sites in the replica and in the encoded dependency vectors.
const SITES: usize = 3;

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(20);
}

fn key(prefix: &str, i: usize) -> Bytes {
    Bytes::from(format!("{prefix}:{i:08}"))
}

fn value() -> Bytes {
    Bytes::from(vec![0xab; VALUE_LEN])
}

// ---------------------------------------------------------------------------------------------
// vclock

/// `(a, b)` with `a < b`: every entry of `b` is one above `a`'s.
fn ordered_pair(n: usize) -> (VClock, VClock) {
    let a: Vec<u64> = (0..n).map(|i| 1_000 + 10 * i as u64).collect();
    let b = a.iter().map(|x| x + 1).collect();
    (VClock::from_vec(a), VClock::from_vec(b))
}

/// Concurrent `(a, b)`: `b` is above `a` everywhere but the last entry, which is below.
fn concurrent_pair(n: usize) -> (VClock, VClock) {
    let (a, b) = ordered_pair(n);
    let mut b = b.into_vec();
    b[n - 1] -= 2;
    (a, VClock::from_vec(b))
}

fn bench_vclock(c: &mut Criterion) {
    let mut group = c.benchmark_group("vclock");
    configure(&mut group);
    for n in [3usize, 16] {
        for (shape, (a, b)) in [
            ("ordered", ordered_pair(n)),
            ("concurrent", concurrent_pair(n)),
        ] {
            let expect = if shape == "ordered" {
                Some(std::cmp::Ordering::Less)
            } else {
                None
            };
            assert_eq!(a.partial_cmp(&b), expect);
            assert_eq!(b.covers(&a), shape == "ordered");
            let param = format!("{n}_sites/{shape}");
            group.bench_with_input(
                BenchmarkId::new("compare", &param),
                &(&a, &b),
                |bench, (a, b)| bench.iter(|| black_box(*a).partial_cmp(black_box(*b))),
            );
            group.bench_with_input(
                BenchmarkId::new("covers", &param),
                &(&a, &b),
                |bench, (a, b)| bench.iter(|| black_box(*b).covers(black_box(*a))),
            );
            group.bench_with_input(
                BenchmarkId::new("merge", &param),
                &(&a, &b),
                |bench, (a, b)| {
                    bench.iter_batched_ref(
                        || (*a).clone(),
                        |x| black_box(x).merge(black_box(*b)),
                        BatchSize::SmallInput,
                    )
                },
            );
        }
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// dependency_buffer

/// The origin whose updates depend on the other origin's.
const DEPENDENT: SiteId = 1;
/// The origin the dependent one depends on.
const SOURCE: SiteId = 2;

/// The deliveries of one iteration, as `(origin, items)` per `receive` call.
fn buffer_workload(ahead: bool, chunk: usize) -> Vec<(SiteId, Vec<Item>)> {
    let per_origin = BATCH / 2;
    let val = value();
    // Source update i has ts 10(i+1); dependent update i has ts 10(i+1)+1, above its dependency
    // as the HLC floor guarantees.
    let ts = |origin: SiteId, i: usize| 10 * (i as u64 + 1) + u64::from(origin == DEPENDENT);
    let prev = |origin: SiteId, i: usize| if i == 0 { 0 } else { ts(origin, i - 1) };
    let update = |origin: SiteId, i: usize| {
        let mut deps = vec![0; SITES];
        deps[origin as usize] = prev(origin, i);
        if origin == DEPENDENT {
            deps[SOURCE as usize] = ts(SOURCE, i);
        }
        Item::Update(Update {
            key: key(&format!("o{origin}"), i),
            value: Some(val.clone()),
            version: Version::new(ts(origin, i), origin),
            deps: VClock::from_vec(deps),
        })
    };
    let order = if ahead {
        [DEPENDENT, SOURCE]
    } else {
        [SOURCE, DEPENDENT]
    };
    let mut out = Vec::new();
    for start in (0..per_origin).step_by(chunk) {
        let end = (start + chunk).min(per_origin);
        for origin in order {
            out.push((origin, (start..end).map(|i| update(origin, i)).collect()));
        }
    }
    out
}

fn fresh_replica() -> Replica<MemStore> {
    Replica::new(ReplicaConfig::new(0, SITES), MemStore::new())
}

fn deliver(mut r: Replica<MemStore>, deliveries: Vec<(SiteId, Vec<Item>)>) -> Replica<MemStore> {
    for (origin, items) in deliveries {
        r.receive(origin, items);
    }
    black_box(r.take_ready());
    r
}

fn bench_dependency_buffer(c: &mut Criterion) {
    let mut group = c.benchmark_group("dependency_buffer");
    configure(&mut group);
    group.throughput(Throughput::Elements(BATCH as u64));
    for chunk in [1usize, 100] {
        for (name, ahead) in [("in_order", false), ("half_ahead", true)] {
            let work = buffer_workload(ahead, chunk);
            // Check the workload does what it claims before timing it.
            let r = deliver(fresh_replica(), work.clone());
            assert_eq!(r.stats().remote_applied, BATCH as u64);
            assert!(r.buffer().is_empty());
            let blocked = if ahead {
                (BATCH / 2).div_ceil(chunk)
            } else {
                0
            };
            assert_eq!(r.stats().buffered_total, blocked as u64);
            group.bench_with_input(
                BenchmarkId::new(name, format!("chunk={chunk}")),
                &work,
                |b, work| {
                    b.iter_batched(
                        || (fresh_replica(), work.clone()),
                        |(r, work)| deliver(r, work),
                        BatchSize::LargeInput,
                    )
                },
            );
        }
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// store

fn entry(ts: u64, val: &Bytes) -> Entry {
    Entry::new(Version::new(ts, 1), Some(val.clone()))
}

fn bench_store(c: &mut Criterion) {
    let mut group = c.benchmark_group("store");
    configure(&mut group);
    group.throughput(Throughput::Elements(BATCH as u64));
    let val = value();
    let keys: Vec<Bytes> = (0..BATCH).map(|i| key("user", i)).collect();

    group.bench_function("merge_new", |b| {
        b.iter_batched(
            MemStore::new,
            |store| {
                for k in &keys {
                    store.merge(k.clone(), entry(1, &val));
                }
                store
            },
            BatchSize::LargeInput,
        )
    });

    let store = MemStore::new();
    for k in &keys {
        store.merge(k.clone(), entry(1, &val));
    }
    let mut ts = 1;
    group.bench_function("merge_overwrite", |b| {
        b.iter(|| {
            ts += 1;
            for k in &keys {
                assert!(store.merge(k.clone(), entry(ts, &val)));
            }
        })
    });

    let big = MemStore::new();
    let all: Vec<Bytes> = (0..10 * BATCH).map(|i| key("user", i)).collect();
    for k in &all {
        big.merge(k.clone(), entry(1, &val));
    }
    let hits: Vec<&Bytes> = all.iter().step_by(10).collect();
    let misses: Vec<Bytes> = (0..BATCH).map(|i| key("nobody", i)).collect();
    group.bench_function("get_hit", |b| {
        b.iter(|| {
            for k in &hits {
                black_box(big.get(black_box(k)).expect("hit"));
            }
        })
    });
    group.bench_function("get_miss", |b| {
        b.iter(|| {
            for k in &misses {
                assert!(big.get(black_box(k)).is_none());
            }
        })
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// wire

fn bench_wire(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire");
    configure(&mut group);
    group.throughput(Throughput::Elements(BATCH as u64));
    let origin: SiteId = 1;
    let val = value();
    let items: Vec<Item> = (0..BATCH)
        .map(|i| {
            let ts = 1_000 + 10 * i as u64;
            Item::Update(Update {
                key: key("user", i),
                value: Some(val.clone()),
                version: Version::new(ts, origin),
                deps: VClock::from_vec(vec![ts - 5, ts - 10, ts - 3]),
            })
        })
        .collect();
    let limits = Limits::default();
    let frame = Bytes::from_owner(encode_batch(&StreamBase::default(), &items));
    assert_eq!(
        decode_batch(&frame, &mut StreamBase::default(), origin, SITES, &limits)
            .expect("valid batch"),
        items
    );

    group.bench_function("encode_batch", |b| {
        b.iter(|| encode_batch(&StreamBase::default(), black_box(&items)))
    });
    group.bench_function("decode_batch", |b| {
        b.iter(|| {
            decode_batch(
                black_box(&frame),
                &mut StreamBase::default(),
                origin,
                SITES,
                &limits,
            )
            .expect("valid batch")
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_vclock,
    bench_dependency_buffer,
    bench_store,
    bench_wire
);
criterion_main!(benches);
