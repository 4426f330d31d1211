//! The pool's bookkeeping with a fake connection: reuse by key, the size
//! limit, FIFO waiters, eviction, timeouts, and no leaked room.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;

#[derive(Default)]
struct Fake {
    id: usize,
    dead: Arc<AtomicBool>,
    closed: Arc<AtomicUsize>,
    reset_fails: bool,
}

impl ServerConnection for Fake {
    fn is_alive(&mut self) -> bool {
        !self.dead.load(Ordering::Relaxed)
    }
    async fn reset(&mut self, _limit: Duration) -> Result<(), String> {
        if self.reset_fails {
            Err("no".into())
        } else {
            Ok(())
        }
    }
    async fn close(self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
    }
}

fn settings(size: usize) -> PoolSettings {
    PoolSettings {
        size,
        idle_timeout: Duration::from_secs(60),
        max_lifetime: Duration::from_secs(600),
    }
}

fn pool(size: usize) -> (Pool<Fake>, Arc<PoolMetrics>) {
    let metrics = Arc::new(PoolMetrics::default());
    (
        Pool::new(
            settings(size),
            metrics.clone(),
            CancellationToken::new(),
            CancellationToken::new(),
        ),
        metrics,
    )
}

const WAIT: Duration = Duration::from_secs(5);

async fn open(pool: &Pool<Fake>, key: &[u8], id: usize) -> Lease<Fake> {
    match pool.checkout(key, WAIT).await {
        Ok(Grant::Open(slot)) => slot.fill(
            Fake {
                id,
                ..Fake::default()
            },
            key.into(),
        ),
        Ok(Grant::Reuse(_)) => panic!("expected room to open"),
        Err(e) => panic!("{e}"),
    }
}

async fn reuse(pool: &Pool<Fake>, key: &[u8]) -> Lease<Fake> {
    match pool.checkout(key, WAIT).await {
        Ok(Grant::Reuse(lease)) => lease,
        Ok(Grant::Open(_)) => panic!("expected a pooled connection"),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn a_released_connection_goes_to_the_next_client_of_its_key_only() {
    let (pool, metrics) = pool(4);
    let lease = open(&pool, b"a", 1).await;
    assert_eq!((metrics.in_use(), metrics.idle()), (1, 0));
    assert_eq!(lease.release(WAIT).await, None);
    assert_eq!((metrics.in_use(), metrics.idle()), (0, 1));
    let mut again = reuse(&pool, b"a").await;
    assert_eq!(again.conn().map(|c| c.id), Some(1));
    assert!(again.reused());
    // Another key opens its own.
    let other = open(&pool, b"b", 2).await;
    drop(other);
    assert_eq!(again.release(WAIT).await, None);
    assert_eq!(metrics.opened_total(), 2);
    assert_eq!(metrics.reused_total(), 1);
}

#[tokio::test]
async fn a_full_pool_queues_clients_in_order_and_times_them_out() {
    let (pool, metrics) = pool(1);
    let pool = Arc::new(pool);
    let first = open(&pool, b"a", 1).await;
    let waiting = {
        let pool = pool.clone();
        tokio::spawn(async move {
            match pool.checkout(b"a", WAIT).await {
                Ok(Grant::Reuse(mut lease)) => lease.conn().map(|c| c.id),
                _ => None,
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(metrics.waits(), 1);
    assert_eq!(first.release(WAIT).await, None);
    assert_eq!(waiting.await.ok().flatten(), Some(1));

    // Nobody gives one back: the wait ends with the pool's reason.
    let _held = open_or_reuse(&pool, b"a").await;
    let err = pool
        .checkout(b"a", Duration::from_millis(100))
        .await
        .err()
        .expect("exhausted");
    assert!(err.to_string().contains("pool-size=1"), "{err}");
}

async fn open_or_reuse(pool: &Pool<Fake>, key: &[u8]) -> Lease<Fake> {
    match pool.checkout(key, WAIT).await {
        Ok(Grant::Open(slot)) => slot.fill(Fake::default(), key.into()),
        Ok(Grant::Reuse(lease)) => lease,
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn a_waiter_of_another_key_gets_the_room_of_a_released_connection() {
    let (pool, metrics) = pool(1);
    let pool = Arc::new(pool);
    let first = open(&pool, b"a", 1).await;
    let waiting = {
        let pool = pool.clone();
        tokio::spawn(async move { matches!(pool.checkout(b"b", WAIT).await, Ok(Grant::Open(_))) })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(first.release(WAIT).await, Some(CloseReason::Evicted));
    assert!(waiting.await.unwrap_or(false));
    // And an idle connection of another key makes room at once.
    let (pool, metrics2) = self::pool(1);
    let a = open(&pool, b"a", 1).await;
    assert_eq!(a.release(WAIT).await, None);
    let _b = open(&pool, b"b", 2).await;
    assert_eq!(metrics2.closed_counts(), [("evicted", 1)]);
    drop(metrics);
}

#[tokio::test]
async fn dropped_leases_and_failed_logins_give_their_room_back() {
    let (pool, metrics) = pool(1);
    for _ in 0..3 {
        // A login that failed: the slot is dropped unfilled.
        match pool.checkout(b"a", WAIT).await {
            Ok(Grant::Open(slot)) => drop(slot),
            _ => panic!("room expected"),
        }
    }
    // A client that vanished: the lease is dropped, the connection closed.
    let lease = open(&pool, b"a", 1).await;
    let closed = lease_closed(&lease);
    drop(lease);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(closed.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.closed_counts(), [("not_reusable", 1)]);
    assert_eq!(metrics.in_use(), 0);
    let _again = open(&pool, b"a", 2).await;
}

fn lease_closed(lease: &Lease<Fake>) -> Arc<AtomicUsize> {
    lease
        .conn
        .as_ref()
        .map(|c| c.closed.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn dead_old_and_unresettable_connections_are_not_handed_out() {
    let (pool, metrics) = pool(2);
    let mut lease = open(&pool, b"a", 1).await;
    let dead = lease.conn().map(|c| c.dead.clone()).unwrap_or_default();
    assert_eq!(lease.release(WAIT).await, None);
    dead.store(true, Ordering::Relaxed);
    // The dead one is closed and the client gets room to open another.
    assert!(matches!(
        pool.checkout(b"a", WAIT).await,
        Ok(Grant::Open(_))
    ));
    assert!(metrics.closed_counts().contains(&("server_closed", 1)));

    let mut lease = open(&pool, b"a", 2).await;
    if let Some(c) = lease.conn() {
        c.reset_fails = true;
    }
    assert_eq!(lease.release(WAIT).await, Some(CloseReason::ResetFailed));
    assert_eq!(pool.idle(), 0);
}

#[tokio::test]
async fn idle_and_lifetime_limits_close_parked_connections() {
    let metrics = Arc::new(PoolMetrics::default());
    let pool: Pool<Fake> = Pool::new(
        PoolSettings {
            size: 4,
            idle_timeout: Duration::from_millis(200),
            max_lifetime: Duration::from_secs(600),
        },
        metrics.clone(),
        CancellationToken::new(),
        CancellationToken::new(),
    );
    let lease = open(&pool, b"a", 1).await;
    assert_eq!(lease.release(WAIT).await, None);
    assert_eq!(pool.idle(), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.idle() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pool.idle(), 0);
    assert_eq!(metrics.closed_counts(), [("idle_timeout", 1)]);

    let pool: Pool<Fake> = Pool::new(
        PoolSettings {
            size: 4,
            idle_timeout: Duration::from_secs(600),
            max_lifetime: Duration::from_millis(100),
        },
        metrics.clone(),
        CancellationToken::new(),
        CancellationToken::new(),
    );
    let lease = open(&pool, b"a", 1).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(lease.release(WAIT).await, Some(CloseReason::MaxLifetime));
}

#[tokio::test]
async fn a_dropped_pool_closes_its_idle_connections_and_refuses_more() {
    let (pool, metrics) = pool(2);
    let lease = open(&pool, b"a", 1).await;
    let closed = lease_closed(&lease);
    let held = open(&pool, b"a", 2).await;
    assert_eq!(lease.release(WAIT).await, None);
    drop(pool);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(closed.load(Ordering::Relaxed), 1);
    // The one in use is closed when its client gives it back.
    assert_eq!(held.release(WAIT).await, Some(CloseReason::Shutdown));
    assert_eq!(metrics.idle(), 0);
    assert_eq!(metrics.in_use(), 0);
}

/// Waits (up to 5 s) until `done` holds.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn draining_closes_idle_connections_at_once_and_parks_nothing_more() {
    let metrics = Arc::new(PoolMetrics::default());
    let drain = CancellationToken::new();
    let pool: Pool<Fake> = Pool::new(
        settings(2),
        metrics.clone(),
        drain.clone(),
        CancellationToken::new(),
    );
    let parked = open(&pool, b"a", 1).await;
    let parked_closed = lease_closed(&parked);
    let held = open(&pool, b"a", 2).await;
    let held_closed = lease_closed(&held);
    assert_eq!(parked.release(WAIT).await, None);
    assert_eq!(pool.idle(), 1);

    drain.cancel();
    eventually("the idle connection is closed at the drain", || {
        parked_closed.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!((metrics.idle(), metrics.in_use()), (0, 1));
    assert_eq!(metrics.closed_counts(), [("shutdown", 1)]);
    assert_eq!(held_closed.load(Ordering::Relaxed), 0, "in use: left alone");

    // A client accepted before the drain is still served (its room was the
    // idle connection's), and a waiter of the key still gets a connection
    // given back; the last one given back is closed, not parked.
    let late = open(&pool, b"a", 3).await;
    let late_closed = lease_closed(&late);
    let pool = Arc::new(pool);
    let waiting = tokio::spawn({
        let pool = pool.clone();
        async move { reuse(&pool, b"a").await }
    });
    eventually("the third client waits", || {
        pool.inner.lock().waiters.len() == 1
    })
    .await;
    assert_eq!(held.release(WAIT).await, None, "handed to the waiter");
    let handed = waiting.await.expect("the waiter");
    assert_eq!(handed.conn.as_ref().map(|c| c.id), Some(2));
    assert_eq!(handed.release(WAIT).await, Some(CloseReason::Shutdown));
    assert_eq!(late.release(WAIT).await, Some(CloseReason::Shutdown));
    eventually("both closed", || {
        held_closed.load(Ordering::Relaxed) == 1 && late_closed.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(pool.idle(), 0);
    assert_eq!((metrics.idle(), metrics.in_use()), (0, 0));
    assert_eq!(pool.inner.lock().open, 0, "no room leaked");
}
