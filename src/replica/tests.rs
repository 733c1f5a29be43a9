//! Unit tests of the replication rules, one rule per test.

use super::*;
use crate::storage::MemStore;

fn replica(site: SiteId, n: usize) -> Replica<MemStore> {
    Replica::new(ReplicaConfig::new(site, n), MemStore::new())
}

fn b(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

/// Persists everything (instantly durable) and returns the records.
fn flush(r: &mut Replica<MemStore>) -> Vec<Record> {
    let ready = r.take_ready();
    r.advance(&ready.applied, ready.lease);
    ready.records
}

/// Sends everything `from` has for `to`, after a hello from `to`.
fn sync(from: &mut Replica<MemStore>, to: &mut Replica<MemStore>) {
    flush(from);
    from.on_peer_connected(to.site(), &to.durable().clone());
    while let Some(batch) = from.poll_batch(to.site(), 2) {
        to.receive(from.site(), batch);
    }
    flush(to);
}

#[test]
fn read_waits_until_applied_covers_context() {
    let mut a = replica(0, 2);
    let mut ctx = VClock::zero(2);
    ctx.raise(1, 10);
    assert_eq!(
        a.get(b"k", &ctx),
        Err(NotReady {
            site: 1,
            have: 0,
            need: 10
        })
    );
    assert!(a.put(1, b("k"), Some(b("v")), &ctx).is_err());
    // A marker from site 1 covering ts 10 makes it ready.
    a.receive(1, [Item::Marker(10)]);
    assert!(a.get(b"k", &ctx).is_ok());
}

#[test]
fn causally_later_write_wins_lww_despite_a_slow_clock() {
    let mut a = replica(0, 2);
    let mut b_ = replica(1, 2);
    let v1 = a
        .put(1_000, b("k"), Some(b("first")), &VClock::zero(2))
        .unwrap();
    sync(&mut a, &mut b_);
    let mut ctx = VClock::zero(2);
    ctx.raise(v1.site, v1.ts);
    // Site b's physical clock is far behind, but the write follows v1 causally.
    let v2 = b_.put(5, b("k"), Some(b("second")), &ctx).unwrap();
    assert!(v2 > v1);
    sync(&mut b_, &mut a);
    for r in [&a, &b_] {
        assert_eq!(
            r.get(b"k", &VClock::zero(2)).unwrap().value,
            Some(b("second"))
        );
    }
}

#[test]
fn update_waits_in_buffer_until_its_dependency_arrives() {
    // x written at a, read at b, y written at b; c receives y before x.
    let (mut a, mut b_, mut c) = (replica(0, 3), replica(1, 3), replica(2, 3));
    let vx = a.put(10, b("x"), Some(b("1")), &VClock::zero(3)).unwrap();
    sync(&mut a, &mut b_);
    let mut ctx = VClock::zero(3);
    ctx.raise(vx.site, vx.ts);
    b_.get(b"x", &ctx).unwrap();
    b_.put(20, b("y"), Some(b("2")), &ctx).unwrap();
    sync(&mut b_, &mut c);
    assert_eq!(c.get(b"y", &VClock::zero(3)).unwrap().value, None);
    assert_eq!(c.buffer().len(), 1);
    sync(&mut a, &mut c);
    assert_eq!(c.get(b"y", &VClock::zero(3)).unwrap().value, Some(b("2")));
    assert_eq!(c.get(b"x", &VClock::zero(3)).unwrap().value, Some(b("1")));
    assert!(c.buffer().is_empty());
}

#[test]
fn switching_dependency_checks_off_shows_effect_before_cause() {
    let mut cfg = ReplicaConfig::new(2, 3);
    cfg.check_deps = false;
    let (mut a, mut b_) = (replica(0, 3), replica(1, 3));
    let mut c = Replica::new(cfg, MemStore::new());
    let vx = a.put(10, b("x"), Some(b("1")), &VClock::zero(3)).unwrap();
    sync(&mut a, &mut b_);
    let mut ctx = VClock::zero(3);
    ctx.raise(vx.site, vx.ts);
    b_.put(20, b("y"), Some(b("2")), &ctx).unwrap();
    flush(&mut b_);
    b_.on_peer_connected(2, &VClock::zero(3));
    let batch = b_.poll_batch(2, 10).unwrap();
    c.receive(1, batch);
    assert_eq!(c.get(b"y", &VClock::zero(3)).unwrap().value, Some(b("2")));
    assert_eq!(c.get(b"x", &VClock::zero(3)).unwrap().value, None);
}

#[test]
fn duplicates_after_a_resend_are_ignored() {
    let (mut a, mut b_) = (replica(0, 2), replica(1, 2));
    for i in 0..5 {
        a.put(
            i,
            b("k"),
            Some(Bytes::from(format!("{i}"))),
            &VClock::zero(2),
        )
        .unwrap();
    }
    flush(&mut a);
    a.on_peer_connected(1, &VClock::zero(2));
    let batch = a.poll_batch(1, 100).unwrap();
    b_.receive(0, batch.clone());
    b_.receive(0, batch); // the same batch again, as after a reconnect
    assert_eq!(b_.stats().remote_applied, 5);
    assert_eq!(b_.stats().duplicates, 5);
}

#[test]
fn resend_starts_from_the_peers_applied_entry() {
    let (mut a, mut b_) = (replica(0, 2), replica(1, 2));
    a.put(1, b("k1"), Some(b("1")), &VClock::zero(2)).unwrap();
    sync(&mut a, &mut b_);
    a.put(2, b("k2"), Some(b("2")), &VClock::zero(2)).unwrap();
    flush(&mut a);
    // The connection dropped; b says hello again with what it has.
    a.on_peer_connected(1, &b_.durable().clone());
    let batch = a.poll_batch(1, 100).unwrap();
    assert_eq!(
        batch
            .iter()
            .filter(|i| matches!(i, Item::Update(_)))
            .count(),
        1
    );
}

#[test]
fn retained_log_is_pruned_only_when_every_peer_acked() {
    let (mut a, mut b_, mut c) = (replica(0, 3), replica(1, 3), replica(2, 3));
    a.put(1, b("k"), Some(b("v")), &VClock::zero(3)).unwrap();
    sync(&mut a, &mut b_);
    a.on_peer_applied(1, &b_.durable().clone());
    assert_eq!(a.retained_len(), 1, "c has not acked yet");
    assert_eq!(a.acked_by(a.applied().get(0)), 1);
    sync(&mut a, &mut c);
    a.on_peer_applied(2, &c.durable().clone());
    assert_eq!(a.retained_len(), 0);
}

#[test]
fn retained_log_gives_back_a_backlogs_capacity_once_acked() {
    // Site b acks nothing for 20,000 writes (a partition), then everything at once.
    let mut a = replica(0, 2);
    for ts in 1..=20_000u64 {
        a.put(ts, b("k"), Some(b("v")), &VClock::zero(2)).unwrap();
    }
    flush(&mut a);
    assert_eq!(a.retained_len(), 20_000);
    assert!(a.retained.capacity() >= 20_000);
    a.on_peer_applied(1, &a.durable().clone());
    assert_eq!(a.retained_len(), 0);
    let cap = a.retained.capacity();
    assert!(cap <= 2048, "capacity {cap} kept after every peer acked");
}

#[test]
fn tombstone_is_collected_only_when_every_site_has_the_delete_and_no_older_write_can_come() {
    let (mut a, mut b_) = (replica(0, 2), replica(1, 2));
    a.put(10, b("k"), Some(b("v")), &VClock::zero(2)).unwrap();
    a.put(20, b("k"), None, &VClock::zero(2)).unwrap();
    a.tick(30);
    assert_eq!(
        a.store().len(),
        1,
        "b's entry is still 0: keep the tombstone"
    );
    // b is idle: its marker moves a's entry for b past the tombstone.
    b_.tick(10_000);
    sync(&mut b_, &mut a);
    flush(&mut a);
    a.tick(40);
    assert_eq!(
        a.store().len(),
        1,
        "b has not acked the delete: a session that saw \"absent\" here could read v at b"
    );
    // b applies and acks a's writes, the delete included: now every site has it.
    sync(&mut a, &mut b_);
    a.on_peer_applied(1, &b_.durable().clone());
    a.tick(50);
    assert_eq!(a.store().len(), 0);
    assert_eq!(a.stats().tombstones_collected, 1);
}

#[test]
fn tombstones_wait_while_a_snapshot_holds_collection() {
    // Everything is in place for collection (as in the test above), but a snapshot is copying
    // the store: the tombstone stays until the hold is released.
    let (mut a, mut b_) = (replica(0, 2), replica(1, 2));
    a.put(10, b("k"), Some(b("v")), &VClock::zero(2)).unwrap();
    a.put(20, b("k"), None, &VClock::zero(2)).unwrap();
    b_.tick(10_000);
    sync(&mut b_, &mut a);
    flush(&mut a);
    sync(&mut a, &mut b_);
    a.on_peer_applied(1, &b_.durable().clone());
    a.hold_tombstones();
    a.hold_tombstones();
    a.tick(50);
    a.release_tombstones();
    a.tick(60);
    assert_eq!(a.store().len(), 1, "held twice, released once: keep it");
    a.release_tombstones();
    a.tick(70);
    assert_eq!(a.store().len(), 0);
    assert_eq!(a.stats().tombstones_collected, 1);
}

#[test]
fn a_late_older_write_cannot_resurrect_a_collected_key() {
    // b writes k at ts 5 (slow link); a deletes k at ts 50. a must not collect the tombstone
    // before b's entry passes 50, or the late write would resurrect k at a only.
    let (mut a, mut b_) = (replica(0, 2), replica(1, 2));
    b_.put(5, b("k"), Some(b("old")), &VClock::zero(2)).unwrap();
    a.put(50, b("k"), None, &VClock::zero(2)).unwrap();
    a.tick(60);
    sync(&mut b_, &mut a);
    a.tick(70);
    assert_eq!(a.get(b"k", &VClock::zero(2)).unwrap().value, None);
}

#[test]
fn recovery_restores_state_and_never_undercuts_a_sent_marker() {
    let mut a = replica(0, 2);
    let mut disk = Vec::new();
    a.put(10, b("k"), Some(b("v")), &VClock::zero(2)).unwrap();
    a.tick(10_000);
    disk.extend(flush(&mut a));
    a.on_peer_connected(1, &VClock::zero(2));
    let sent = a.poll_batch(1, 100).unwrap();
    let marker = sent.last().unwrap().ts();
    let mut a2 = Replica::recover(ReplicaConfig::new(0, 2), MemStore::new(), disk);
    assert_eq!(a2.get(b"k", &VClock::zero(2)).unwrap().value, Some(b("v")));
    // Physical time went backwards across the restart; the next write still lands above the
    // marker that was sent.
    let v = a2.put(1, b("k"), Some(b("w")), &VClock::zero(2)).unwrap();
    assert!(v.ts > marker);
    assert_eq!(a2.retained_len(), 2);
}

/// Found in review: a recovered partition reported no durable write to its siblings, so a
/// write made durable just before a crash got no urgent marker from them, and remote readers
/// waited up to an idle interval for it.
#[test]
fn a_recovered_partition_reports_its_newest_durable_write() {
    let mut a = Replica::new(
        ReplicaConfig::new(0, 2).with_partition(0, 2),
        MemStore::new(),
    );
    let v = a.put(10, b("k"), Some(b("v")), &VClock::zero(2)).unwrap();
    let disk = flush(&mut a);
    assert_eq!(a.durable_write(), v.ts);
    let a2 = Replica::recover(a.config().clone(), MemStore::new(), disk);
    assert_eq!(a2.durable_write(), v.ts);
}

/// Two keys that live in different partitions of two.
fn keys_in_two_partitions() -> (&'static str, &'static str) {
    let cands = ["w", "y", "x", "z", "k1", "k2", "k3"];
    let w = cands[0];
    let pw = crate::sharding::partition_of(w.as_bytes(), 2);
    let y = cands
        .iter()
        .find(|k| crate::sharding::partition_of(k.as_bytes(), 2) != pw)
        .expect("some key in the other partition");
    (w, y)
}

/// Site c (id 2) split in two partitions; y from a depends on w from k, and w's partition at c
/// has not received w yet while y's partition has y and k's marker past w. Returns c's two
/// partition replicas (w's, y's), w and y.
fn partitioned_scenario(
    check_stable: bool,
    close_contexts: bool,
) -> (Replica<MemStore>, Replica<MemStore>, Update, Update) {
    let (kw, ky) = keys_in_two_partitions();
    let (pw, py) = (
        crate::sharding::partition_of(kw.as_bytes(), 2),
        crate::sharding::partition_of(ky.as_bytes(), 2),
    );
    let (mut a, mut k) = (replica(0, 3), replica(1, 3));
    let vw = k.put(10, b(kw), Some(b("w")), &VClock::zero(3)).unwrap();
    let w = k.retained().next().unwrap().clone();
    sync(&mut k, &mut a);
    let mut ctx = VClock::zero(3);
    ctx.raise(vw.site, vw.ts);
    a.get(kw.as_bytes(), &ctx).unwrap();
    a.put(20, b(ky), Some(b("y")), &ctx).unwrap();
    let y = a.retained().next().unwrap().clone();
    assert_eq!(y.deps.get(1), vw.ts, "y depends on w");
    let part = |p: u32| {
        let mut rc = ReplicaConfig::new(2, 3).with_partition(p, 2);
        rc.check_stable = check_stable;
        rc.close_contexts = close_contexts;
        Replica::new(rc, MemStore::new())
    };
    let (mut cw, mut cy) = (part(pw), part(py));
    // y's partition at c: y from a, and k's stream in that partition has moved past w.
    cy.receive(0, [Item::Update(y.clone())]);
    cy.receive(1, [Item::Marker(vw.ts + 5)]);
    flush(&mut cy);
    // w's partition has heard nothing from k yet; the partitions exchange contributions.
    flush(&mut cw);
    cy.on_sibling(pw, &cw.contribution(), cw.durable_write());
    cw.on_sibling(py, &cy.contribution(), cy.durable_write());
    flush(&mut cy);
    (cw, cy, w, y)
}

/// The context of a fresh session that read `key` at `r`.
fn after_reading(r: &Replica<MemStore>, key: &[u8]) -> VClock {
    let got = r.get(key, &VClock::zero(3)).unwrap();
    let v = got.version.expect("a version");
    let mut ctx = VClock::zero(3);
    ctx.raise(v.site, v.ts);
    ctx.merge(&got.deps);
    ctx
}

/// Found in review: a partitioned site took any own-site entry a session's context named (a
/// sibling may have issued it), and a write under it ticked the clock past it: `u64::MAX`
/// overflowed, and a far-future entry moved the site's clock there for good. Such an entry now
/// waits (and times out) unless some partition here could have issued it.
#[test]
fn a_partitioned_write_refuses_an_own_entry_no_partition_issued() {
    let mut p0 = Replica::new(
        ReplicaConfig::new(0, 3).with_partition(0, 2),
        MemStore::new(),
    );
    let lease = p0.config().clock_lease;
    let now = 1_000_000;
    for forged in [u64::MAX, u64::MAX - 1, 1 << 62, now + lease + 1] {
        let mut ctx = VClock::zero(3);
        ctx.raise(0, forged);
        let err = p0.put(now, b("k"), Some(b("v")), &ctx).unwrap_err();
        assert_eq!((err.site, err.need), (0, forged));
    }
    // The clock did not move: the next write is stamped near the physical time.
    let v = p0.put(now, b("k"), Some(b("v")), &VClock::zero(3)).unwrap();
    assert!(v.ts < now + lease, "{v:?}");
    // Within the lease of the physical clock (a sibling's clock a little ahead), and up to what
    // a sibling reported, the entry is taken.
    let mut ctx = VClock::zero(3);
    ctx.raise(0, now + lease / 2);
    assert!(p0.put(now, b("k"), Some(b("v")), &ctx).is_ok());
    let ahead = now + 10 * lease;
    let mut sibling = VClock::zero(3);
    sibling.raise(0, ahead);
    p0.on_sibling(1, &sibling, ahead);
    let mut ctx = VClock::zero(3);
    ctx.raise(0, ahead);
    let v = p0.put(now, b("k"), Some(b("v")), &ctx).unwrap();
    assert!(v.ts > ahead);
}

#[test]
fn partitioned_update_waits_for_the_site_stable_vector() {
    let (mut cw, mut cy, w, y) = partitioned_scenario(true, true);
    let zero = VClock::zero(3);
    assert_eq!(
        cy.get(&y.key, &zero).unwrap().value,
        None,
        "y before w is visible at c"
    );
    assert_eq!(cy.buffer().len(), 1);
    // w arrives in its partition: received is enough for its contribution.
    cw.receive(1, [Item::Update(w.clone())]);
    flush(&mut cw);
    assert_eq!(cw.get(&w.key, &zero).unwrap().value, Some(b("w")));
    cy.on_sibling(
        cw.config().partition,
        &cw.contribution(),
        cw.durable_write(),
    );
    flush(&mut cy);
    // y also waits until every partition has received a's stream up to y itself, so that a
    // session that reads it never waits at c for a's entry.
    assert_eq!(cy.get(&y.key, &zero).unwrap().value, None);
    cw.receive(0, [Item::Marker(y.version.ts)]);
    cy.on_sibling(
        cw.config().partition,
        &cw.contribution(),
        cw.durable_write(),
    );
    flush(&mut cy);
    assert_eq!(cy.get(&y.key, &zero).unwrap().value, Some(b("y")));
    // A session that read y carries what y depends on, and w's partition serves it at once.
    let ctx = after_reading(&cy, &y.key);
    assert!(ctx.get(w.version.site) >= w.version.ts, "y's deps name w");
    assert_eq!(cw.get(&w.key, &ctx).unwrap().value, Some(b("w")));
}

#[test]
fn a_partition_answers_only_once_its_own_applied_covers_the_context() {
    // w has reached its partition (so the stable vector covers it) but waits there behind an
    // earlier update from k whose own dependency has not arrived: a session that depends on w
    // waits, even though the stable vector says w is at the site.
    let (mut cw, _, w, _) = partitioned_scenario(true, true);
    let mut dep = VClock::zero(3);
    dep.raise(0, 5); // something from a that c has not received
    let earlier = Update {
        key: w.key.clone(),
        value: Some(b("earlier")),
        version: crate::clock::Version::new(w.version.ts - 1, 1),
        deps: dep,
    };
    cw.receive(1, [Item::Update(earlier), Item::Update(w.clone())]);
    flush(&mut cw);
    let mut ctx = VClock::zero(3);
    ctx.raise(w.version.site, w.version.ts);
    assert!(cw.contribution().get(1) >= w.version.ts, "w is received");
    assert!(cw.get(&w.key, &ctx).is_err(), "w is not applied yet");
}

#[test]
fn skipping_the_stable_vector_check_makes_sessions_wait_but_not_miss() {
    // The planted bug: y's partition checks y's deps against its own `applied` only, and shows
    // y while w is still on its way.
    let (mut cw, cy, w, y) = partitioned_scenario(false, true);
    let zero = VClock::zero(3);
    assert_eq!(cy.get(&y.key, &zero).unwrap().value, Some(b("y")));
    // A session read y: its context names w, so w's partition waits for w, even once a's
    // marker and an exchange have made it ready for y's own entry.
    let ctx = after_reading(&cy, &y.key);
    cw.receive(0, [Item::Marker(y.version.ts)]);
    flush(&mut cw);
    cw.on_sibling(
        cy.config().partition,
        &cy.contribution(),
        cy.durable_write(),
    );
    assert!(cw.get(&w.key, &ctx).is_err(), "waits for w");
}

#[test]
fn open_session_contexts_show_effect_before_cause() {
    // Planted bugs: the stable-vector check skipped, and reads that do not hand back what
    // their value depends on.
    let (mut cw, cy, w, y) = partitioned_scenario(false, false);
    let zero = VClock::zero(3);
    assert_eq!(cy.get(&y.key, &zero).unwrap().value, Some(b("y")));
    let ctx = after_reading(&cy, &y.key);
    cw.receive(0, [Item::Marker(y.version.ts)]);
    flush(&mut cw);
    cw.on_sibling(
        cy.config().partition,
        &cy.contribution(),
        cy.durable_write(),
    );
    assert_eq!(
        cw.get(&w.key, &ctx).unwrap().value,
        None,
        "effect before cause"
    );
}

#[test]
fn batches_stop_at_the_byte_budget_but_always_carry_one_update() {
    let mut a = replica(0, 2);
    let ctx = VClock::zero(2);
    let big = Bytes::from(vec![b'v'; 1000]);
    for (i, now) in (1..=5u64).enumerate() {
        a.put(now, Bytes::from(format!("k{i}")), Some(big.clone()), &ctx)
            .unwrap();
    }
    flush(&mut a);
    a.on_peer_connected(1, &VClock::zero(2));
    // Each update costs 2 + 1000 + 16 + ITEM_OVERHEAD bytes against the budget.
    let per = 2 + 1000 + 16 + ITEM_OVERHEAD;
    let sizes: Vec<usize> = std::iter::from_fn(|| {
        a.poll_batch_refs(1, 100, 2 * per + 10)
            .map(|(updates, _)| updates.count())
    })
    .collect();
    assert_eq!(
        sizes,
        vec![2, 2, 1],
        "two updates fit the budget, a third does not"
    );
    a.on_peer_connected(1, &VClock::zero(2));
    let (updates, _) = a.poll_batch_refs(1, 100, 1).unwrap();
    assert_eq!(
        updates.count(),
        1,
        "an update larger than the budget still goes alone"
    );
    a.on_peer_connected(1, &VClock::zero(2));
    let (updates, _) = a.poll_batch_refs(1, 100, usize::MAX).unwrap();
    assert_eq!(updates.count(), 5);
}

/// An update from `origin` at `ts` with dependency vector `deps`, as a peer sends it.
fn remote(origin: SiteId, ts: u64, key: &'static str, deps: Vec<u64>) -> Item {
    Item::Update(Update {
        key: b(key),
        value: Some(b("v")),
        version: Version::new(ts, origin),
        deps: VClock::from_vec(deps),
    })
}

#[test]
fn vectors_shorter_than_the_site_count_read_as_zeros() {
    // Site 2 was added after the 2-site vectors below were written: every vector that counts
    // only sites 0 and 1 has nothing from site 2, and none of them is refused or misread.
    let mut c = replica(2, 3);
    let old_ctx = VClock::from_vec(vec![5, 0]);
    assert_eq!(
        c.get(b"k", &old_ctx),
        Err(NotReady {
            site: 0,
            have: 0,
            need: 5
        })
    );
    // From site 1, with a 2-entry dependency vector that waits on site 0: buffered on entry 0.
    c.receive(1, [remote(1, 7, "y", vec![5, 0])]);
    assert_eq!(c.buffer().len(), 1);
    // A short dependency vector waits on no entry it lacks.
    assert_eq!(
        DependencyBuffer::first_missing(&VClock::zero(3), &VClock::from_vec(vec![0, 3]), 2),
        Some((1, 3))
    );
    assert_eq!(
        DependencyBuffer::first_missing(&VClock::zero(3), &VClock::from_vec(vec![0]), 1),
        None
    );
    // Site 0's update at 5 (its own vector is as short) unblocks site 1's.
    c.receive(0, [remote(0, 5, "x", vec![0, 0])]);
    assert!(c.buffer().is_empty());
    assert_eq!(c.get(b"y", &old_ctx).unwrap().value, Some(b("v")));
    // A write under a short context depends on it padded to every site.
    let v = c.put(100, b("z"), Some(b("w")), &old_ctx).unwrap();
    assert!(v.ts > 5);
    let sent: Vec<Record> = flush(&mut c);
    let deps = sent
        .iter()
        .find_map(|r| match r {
            Record::Update(u) if u.key == b("z") => Some(u.deps.clone()),
            _ => None,
        })
        .expect("the write is logged");
    assert_eq!(deps.as_slice(), &[5, 0, 0]);
    // A peer's short applied vector acks what it names; the missing entry is zero.
    c.on_peer_applied(0, &VClock::from_vec(vec![5, 7]));
    assert_eq!(c.peer_applied(0).as_slice(), &[5, 7, 0]);
    // A context longer than the cluster names a site this one does not know: never ready.
    let e = c
        .get(b"k", &VClock::from_vec(vec![0, 0, 0, 1]))
        .unwrap_err();
    assert_eq!((e.site, e.need), (3, 1));
    // A fitted item keeps its entries and adds zeros, or cuts zeros for sites not counted
    // here; one that depends on such a site keeps its entries up to that site (it waits in the
    // buffer, see below); one longer than any cluster is refused.
    let mut it = remote(1, 9, "q", vec![4]);
    it.fit_deps(3, 64).unwrap();
    assert_eq!(deps_of(it), [4, 0, 0]);
    let mut it = remote(1, 9, "q", vec![4, 0, 0, 0]);
    it.fit_deps(3, 64).unwrap();
    assert_eq!(deps_of(it), [4, 0, 0]);
    let mut it = remote(1, 9, "q", vec![4, 0, 0, 2, 0, 0]);
    it.fit_deps(3, 64).unwrap();
    assert_eq!(deps_of(it), [4, 0, 0, 2]);
    let mut it = remote(1, 9, "q", vec![0; 65]);
    let e = it.fit_deps(3, 64).unwrap_err();
    assert!(
        e.contains("65 entries") && e.contains("at most 64 sites"),
        "{e}"
    );
}

fn deps_of(it: Item) -> Vec<u64> {
    match it {
        Item::Update(u) => u.deps.into_vec(),
        Item::Marker(_) => unreachable!(),
    }
}

/// A peer that applied a site's addition before this replica did sends an update that depends
/// on the new site: the update is accepted and waits in the dependency buffer until this
/// replica counts the site and covers the dependency, then applies (and is logged with a
/// vector of the new length).
#[test]
fn an_update_naming_a_site_not_counted_yet_waits_until_it_is_counted_and_covered() {
    let mut c = replica(0, 3);
    // Site 1 counts site 3 already; its update depends on site 3's write at 5.
    let mut it = remote(1, 9, "q", vec![0, 0, 0, 5]);
    it.fit_deps(3, 64).expect("accepted, not refused");
    c.receive(1, [it]);
    assert_eq!(c.buffer().len(), 1, "it waits");
    assert_eq!(c.applied().get(1), 0);
    // A later item of the same stream waits behind it (stream order).
    c.receive(1, [Item::Marker(12)]);
    assert_eq!(c.buffer().len(), 2);
    // This replica applies the addition: still waiting, site 3's entry is 0 here.
    c.add_sites(4);
    assert_eq!(c.buffer().len(), 2);
    assert_eq!(c.get(b"q", &VClock::default()).unwrap().value, None);
    // Site 3's stream reaches 5: the update applies, then the marker.
    c.receive(3, [remote(3, 5, "n", vec![0, 0, 0, 0])]);
    assert!(c.buffer().is_empty());
    assert_eq!(c.applied().get(1), 12);
    assert_eq!(c.get(b"q", &VClock::default()).unwrap().value, Some(b("v")));
    let logged = flush(&mut c)
        .into_iter()
        .find_map(|r| match r {
            Record::Update(u) if u.key == b("q") => Some(u.deps.into_vec()),
            _ => None,
        })
        .expect("the update is logged");
    assert_eq!(logged, [0, 0, 0, 5]);
    // The same on a partitioned site, where it waits on the site's stable vector.
    let mut p = Replica::new(
        ReplicaConfig::new(0, 3).with_partition(0, 2),
        MemStore::new(),
    );
    p.receive(1, [remote(1, 9, "q", vec![0, 0, 0, 5])]);
    assert_eq!(p.buffer().len(), 1);
    p.add_sites(4);
    assert_eq!(p.buffer().len(), 1);
}

/// A partition passes a sibling's durable write on its own streams at once with a clock marker
/// (remote readers of the write wait for every partition's stream to pass it), but a sibling's
/// own entry moved by markers alone asks for no marker: an idle partitioned site does not
/// echo markers between its partitions.
#[test]
fn a_siblings_write_is_passed_with_an_urgent_marker_and_its_markers_are_not() {
    let part = |p: u32| {
        Replica::new(
            ReplicaConfig::new(0, 2).with_partition(p, 2),
            MemStore::new(),
        )
    };
    let (mut p0, mut p1) = (part(0), part(1));
    let (kw, _) = keys_in_two_partitions();
    let key = if crate::sharding::partition_of(kw.as_bytes(), 2) == 0 {
        kw
    } else {
        keys_in_two_partitions().1
    };
    // p0 writes; once durable, its newest durable write is that update.
    let v = p0
        .put(1_000, b(key), Some(b("v")), &VClock::zero(2))
        .unwrap();
    assert_eq!(p0.durable_write(), 0, "not durable yet");
    flush(&mut p0);
    assert_eq!(p0.durable_write(), v.ts);
    // p0 idles: markers move its own entry, not its newest write.
    p0.tick(50_000);
    flush(&mut p0);
    assert!(p0.contribution().get(0) > v.ts);
    assert_eq!(p0.durable_write(), v.ts);
    // p1 hears of the markers alone: no marker of its own.
    let before = p1.contribution().get(0);
    p1.on_sibling(0, &p0.contribution(), 0);
    assert_eq!(p1.contribution().get(0), before, "a marker for markers");
    assert_eq!(p1.urgent_marker(), 0);
    // p1 hears of the write: it passes it at once.
    p1.on_sibling(0, &p0.contribution(), p0.durable_write());
    flush(&mut p1);
    assert!(p1.urgent_marker() >= v.ts);
    assert!(p1.contribution().get(0) >= v.ts);
    // p1's own markers already passed p0's next write: no new marker, but its entry is what
    // the links must send at once.
    let w = p0
        .put(60_000, b(key), Some(b("w")), &VClock::zero(2))
        .unwrap();
    flush(&mut p0);
    p1.tick(200_000);
    flush(&mut p1);
    let own = p1.contribution().get(0);
    assert!(own > w.ts);
    p1.on_sibling(0, &p0.contribution(), p0.durable_write());
    assert_eq!(
        p1.urgent_marker(),
        own,
        "the entry past the write is urgent"
    );
    assert_eq!(p1.contribution().get(0), own, "no new marker");
}

#[test]
fn a_marker_the_link_held_back_is_polled_again() {
    // An idle link sends one marker per idle interval and holds the others back; a held-back
    // marker must stay in the stream, or an urgent marker at or below it would never be sent.
    let mut r = replica(0, 2);
    r.tick(10_000);
    flush(&mut r);
    let poll = |r: &mut Replica<MemStore>| {
        r.poll_batch_refs(1, 64, usize::MAX)
            .map(|(u, m)| (u.count(), m))
    };
    let cursor = r.sent_to(1);
    let (n, marker) = poll(&mut r).expect("a marker to send");
    assert_eq!(n, 0, "markers only");
    let m = marker.expect("a marker");
    assert!(
        poll(&mut r).is_none(),
        "polled once, the marker counts as sent"
    );
    r.rewind_sent(1, cursor);
    assert_eq!(
        poll(&mut r),
        Some((0, Some(m))),
        "held back, it is polled again"
    );
    assert!(poll(&mut r).is_none());
}

#[test]
fn a_dead_sites_updates_are_relayed_from_the_survivor_that_has_them() {
    // c (2) reached b (1) but not a (0); then c is removed with the cut b holds.
    let (mut a, mut b_, mut c) = (replica(0, 3), replica(1, 3), replica(2, 3));
    for (i, k) in ["x", "y", "z"].into_iter().enumerate() {
        c.put(10 + i as u64, b(k), Some(b("c")), &VClock::zero(3))
            .unwrap();
    }
    sync(&mut c, &mut b_);
    let cut = b_.applied().get(2);
    assert!(cut >= 12);
    assert_eq!(a.applied().get(2), 0);
    // b keeps c's updates for a, which has not acked them.
    b_.on_peer_applied(0, &a.durable().clone());
    assert_eq!(b_.relayed_len(), 3);
    a.set_removed(2, Removal::Dead { cut });
    b_.set_removed(2, Removal::Dead { cut });
    // The relay: a asks b for c's stream after its own entry, in batches.
    let mut asked = 0;
    while a.applied().get(2) < cut {
        let items = b_
            .relay_batch(2, a.applied().get(2), 2)
            .expect("relay log complete");
        a.receive(2, items);
        asked += 1;
        assert!(asked < 10, "the relay does not progress");
    }
    assert_eq!(asked, 2);
    for k in ["x", "y", "z"] {
        assert_eq!(
            a.get(k.as_bytes(), &VClock::zero(3)).unwrap().value,
            Some(b("c"))
        );
    }
    // Once a acks, b's relay log is pruned; c no longer counts as a peer anywhere.
    flush(&mut a);
    b_.on_peer_applied(0, &a.durable().clone());
    assert_eq!(b_.relayed_len(), 0);
    assert_eq!(a.peers().collect::<Vec<_>>(), vec![1]);
    assert_eq!(a.removed(2), Some(Removal::Dead { cut }));
    // A context beyond the cut names updates that died with c; at the cut it is fine.
    let mut ctx = VClock::zero(3);
    ctx.raise(2, cut);
    assert_eq!(a.lost(&ctx), None);
    ctx.raise(2, cut + 5);
    assert_eq!(
        a.lost(&ctx),
        Some(Lost {
            site: 2,
            have: cut,
            need: cut + 5
        })
    );
    // A relay log that a snapshot cut short cannot serve from before the snapshot.
    let rec = Replica::recover(
        ReplicaConfig::new(1, 3),
        MemStore::new(),
        [Record::Marker { origin: 2, ts: cut }],
    );
    assert_eq!(rec.relay_batch(2, 0, 10), None);
    assert_eq!(rec.relay_batch(2, cut, 10), Some(Vec::new()));
}

#[test]
fn a_removed_peer_holds_neither_retention_nor_tombstones() {
    let mut a = replica(0, 3);
    let mut b_ = replica(1, 3);
    a.put(5, b("k"), None, &VClock::zero(3)).unwrap();
    sync(&mut a, &mut b_);
    a.on_peer_applied(1, &b_.durable().clone());
    // Site 2 never acked: the delete stays retained and its tombstone uncollected.
    a.tick(1_000_000);
    assert_eq!(a.retained_len(), 1);
    assert_eq!(a.tombstones_pending(), 1);
    // Decommissioned (cut 0): it no longer holds either back.
    a.set_removed(2, Removal::Drained);
    assert_eq!(a.retained_len(), 0);
    a.tick(2_000_000);
    sync(&mut a, &mut b_);
    b_.tick(2_000_000);
    sync(&mut b_, &mut a);
    a.on_peer_applied(1, &b_.durable().clone());
    a.tick(3_000_000);
    assert_eq!(a.tombstones_pending(), 0);
    assert_eq!(a.acked_by(5), 1);
}

#[test]
fn an_added_site_is_counted_live_retention_waits_for_it_and_a_floor_holds_answers() {
    let mut a = replica(0, 2);
    let mut b_ = replica(1, 2);
    a.put(10, b("k"), Some(b("before")), &VClock::zero(2))
        .unwrap();
    sync(&mut a, &mut b_);
    a.on_peer_applied(1, &b_.durable().clone());
    assert_eq!(a.retained_len(), 0, "b acked everything");
    // Site 2 joins: a counts three sites from now on.
    a.add_sites(3);
    assert_eq!(a.applied().len(), 3);
    assert_eq!(a.peers().collect::<Vec<_>>(), vec![1, 2]);
    let v = a
        .put(20, b("k"), Some(b("after")), &VClock::zero(3))
        .unwrap();
    sync(&mut a, &mut b_);
    a.on_peer_applied(1, &b_.durable().clone());
    // b acked it, but the new site has not: it stays retained.
    assert_eq!(a.retained_len(), 1);
    assert_eq!(a.unacked_by(2), 1);
    // The new site starts from a snapshot at a's `applied` before the write and says hello
    // with it: a resends from there.
    let mut c = replica(2, 3);
    c.receive(0, [Item::Marker(10)]);
    flush(&mut c);
    sync(&mut a, &mut c);
    assert_eq!(c.applied().get(0), v.ts);
    a.on_peer_applied(2, &c.durable().clone());
    assert_eq!(a.retained_len(), 0);
    // An update from the new site is received at a.
    let w = c
        .put(30, b("j"), Some(b("from c")), &VClock::zero(3))
        .unwrap();
    sync(&mut c, &mut a);
    assert_eq!(a.applied().get(2), w.ts);
    // A floor holds every answer until `applied` covers it, whatever the context.
    let mut floor = VClock::zero(3);
    floor.raise(1, 99);
    c.set_floor(floor);
    assert!(!c.caught_up_to_floor());
    assert_eq!(
        c.get(b"k", &VClock::default()).unwrap_err(),
        NotReady {
            site: 1,
            have: 0,
            need: 99
        }
    );
    c.receive(1, [Item::Marker(99)]);
    assert!(c.caught_up_to_floor());
    assert_eq!(
        c.get(b"k", &VClock::default()).unwrap().value,
        Some(b("after"))
    );
}

/// The join's retention race: origin `x` (site 0) has not counted the added site 3 yet when
/// the old members ack its update `u`, one of them (the snapshot's source) with a vector of
/// the new length. `hold` is the switch under test.
fn prune_while_a_peer_counts_an_added_site(hold: bool) -> Replica<MemStore> {
    let mut cfg = ReplicaConfig::new(0, 3);
    cfg.hold_for_added = hold;
    let mut x = Replica::new(cfg, MemStore::new());
    let u = x.put(10, b("k"), Some(b("u")), &VClock::zero(3)).unwrap();
    flush(&mut x);
    // Site 1 (the source) counts the new site: its ack is four entries long.
    let mut from_source = VClock::zero(4);
    from_source.raise(0, u.ts);
    x.on_peer_counts(4);
    x.on_peer_applied(1, &from_source.resized(3));
    let mut from_other = VClock::zero(3);
    from_other.raise(0, u.ts);
    x.on_peer_counts(3);
    x.on_peer_applied(2, &from_other);
    x
}

#[test]
fn an_origin_prunes_nothing_while_a_peer_counts_a_site_it_does_not_and_then_keeps_it_for_it() {
    let mut x = prune_while_a_peer_counts_an_added_site(true);
    let u = x.retained().next().unwrap().version.ts;
    assert!(x.retention_held());
    assert_eq!(
        x.retained_len(),
        1,
        "every old member acked u, but site 3 may need it"
    );
    // x applies the change: site 3's entry is zero, so u stays until site 3 acks it.
    x.add_sites(4);
    assert!(!x.retention_held());
    let mut acked = VClock::zero(4);
    acked.raise(0, u);
    x.on_peer_applied(1, &acked);
    assert_eq!(x.retained_len(), 1);
    assert_eq!(x.unacked_by(3), 1);
    let mut joined = VClock::zero(4);
    joined.raise(0, u);
    x.on_peer_applied(3, &joined);
    assert_eq!(x.retained_len(), 0, "pruned once the added site acked it");
    // Switched off (tests only), the old members' acks prune it before site 3 is counted.
    let x = prune_while_a_peer_counts_an_added_site(false);
    assert!(!x.retention_held());
    assert_eq!(x.retained_len(), 0);
}

/// Site 0's `updates` updates in frames of `per_frame`, as its stream to site 1 carries them.
fn frames(updates: u64, per_frame: usize) -> Vec<Vec<Item>> {
    let mut a = replica(0, 2);
    for i in 0..updates {
        a.put(
            1_000 * (i + 1),
            Bytes::from(format!("k{i}")),
            Some(b("v")),
            &VClock::zero(2),
        )
        .unwrap();
    }
    flush(&mut a);
    a.on_peer_connected(1, &VClock::zero(2));
    std::iter::from_fn(|| a.poll_batch(1, per_frame)).collect()
}

#[test]
fn a_copy_ahead_of_its_place_waits_for_the_stream() {
    let f = frames(6, 2);
    let last = |i: usize| f[i].last().unwrap().ts();
    let mut b_ = replica(1, 2);
    b_.receive(0, f[0].clone());
    // The third frame's copy arrives first: the second frame is missing, so it is held.
    b_.receive_copy(0, last(1), f[2].clone());
    assert_eq!(b_.held_copies(0), 1);
    assert_eq!(b_.received().get(0), last(0));
    assert_eq!(b_.get(b"k4", &VClock::zero(2)).unwrap().value, None);
    // The second frame's copy fills the gap: both copies are taken, in order.
    b_.receive_copy(0, last(0), f[1].clone());
    assert_eq!(b_.held_copies(0), 0);
    assert_eq!(b_.received().get(0), last(2));
    assert_eq!(b_.get(b"k5", &VClock::zero(2)).unwrap().value, Some(b("v")));
    assert_eq!(b_.stats().copies_used, 2);
    // The stream's own frames then come as duplicates.
    b_.receive(0, f[1].clone());
    b_.receive(0, f[2].clone());
    assert_eq!(b_.stats().remote_applied, 6);
    assert_eq!(b_.stats().duplicates, 4);
}

#[test]
fn held_copies_are_bounded_and_dropped_once_the_stream_passes_them() {
    let n = COPIES_HELD as u64 + 20;
    let f = frames(n, 1);
    let mut b_ = replica(1, 2);
    // Every frame's copy but the first's arrives; the first frame is late on the stream.
    for i in 1..f.len() {
        b_.receive_copy(0, f[i - 1][0].ts(), f[i].clone());
    }
    assert_eq!(b_.held_copies(0), COPIES_HELD);
    assert_eq!(b_.stats().remote_applied, 0);
    // The stream brings the first frame: the held copies follow it at once, up to the first
    // one dropped (the furthest ahead went first).
    b_.receive(0, f[0].clone());
    assert_eq!(b_.held_copies(0), 0);
    assert_eq!(b_.stats().remote_applied, COPIES_HELD as u64 + 1);
    for frame in &f[1..] {
        b_.receive(0, frame.clone());
    }
    assert_eq!(b_.stats().remote_applied, n);
    // A copy of what was received already is not even held.
    b_.receive_copy(0, f[0][0].ts(), f[1].clone());
    assert_eq!(b_.held_copies(0), 0);
}
