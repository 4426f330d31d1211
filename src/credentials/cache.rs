//! One token per (endpoint, user), minted once and shared by every
//! connection that needs it, refreshed in the background before it expires.
//!
//! Rules:
//! - A connection that finds a token with time left takes it at once; it
//!   never waits on a refresh it does not need.
//! - Without a usable token, the first connection starts one fetch (in its
//!   own task, so it completes for the others even if that client goes
//!   away) and every connection that arrives meanwhile waits on the same
//!   fetch: a burst of clients is one request to the credential endpoint.
//! - After a successful fetch a refresher task sleeps until shortly before
//!   expiry and mints the next token. A failed refresh keeps the still-valid
//!   token and retries with backoff (1 s doubling to 1 min) until it
//!   succeeds or the token expires; then the next connection fetches anew
//!   and sees the error itself.
//! - A refresher whose token nobody has used for an hour stops, so users
//!   who went away cost nothing; their next connection fetches again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use super::{CredentialsError, Token, TokenRequest, TokenSource};
use crate::metrics::TargetMetrics;

/// A token is handed out only while at least this much validity is left:
/// the server checks it a moment later, after connect and TLS.
const MIN_VALIDITY: Duration = Duration::from_secs(30);
/// Refresh this long before expiry (or at two thirds of a shorter life).
const REFRESH_AHEAD: Duration = Duration::from_secs(5 * 60);
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A refresher stops when its token has gone unused this long.
const IDLE_STOP: Duration = Duration::from_secs(60 * 60);

type Outcome = Option<Result<Token, CredentialsError>>;

pub struct TokenCache {
    source: Arc<dyn TokenSource>,
    /// Bound on one fetch.
    timeout: Duration,
    slots: Mutex<HashMap<TokenRequest, Arc<Slot>>>,
    /// The target's counters: each fetch's result.
    metrics: Option<Arc<TargetMetrics>>,
}

#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    current: Option<Cached>,
    /// The fetch in flight, if any: its outcome arrives here.
    fetching: Option<watch::Receiver<Outcome>>,
    last_used: Option<Instant>,
    refresher_running: bool,
}

#[derive(Clone)]
struct Cached {
    token: Token,
    /// Handed out until then.
    usable_until: Instant,
    refresh_at: Instant,
}

impl Cached {
    fn new(token: Token) -> Cached {
        let now = Instant::now();
        let life = token.remaining();
        let ahead = REFRESH_AHEAD.min(life / 3);
        Cached {
            usable_until: now + life.saturating_sub(MIN_VALIDITY),
            refresh_at: now + life.saturating_sub(ahead),
            token,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these maps half-updated in a way that
    // matters more than losing the proxy: keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl TokenCache {
    pub fn new(source: Arc<dyn TokenSource>, timeout: Duration) -> Arc<TokenCache> {
        Self::build(source, timeout, None)
    }

    /// A cache that counts its fetches in `metrics` and reports when its
    /// soonest token expires there.
    pub fn counted(
        source: Arc<dyn TokenSource>,
        timeout: Duration,
        metrics: Arc<TargetMetrics>,
    ) -> Arc<TokenCache> {
        let cache = Self::build(source, timeout, Some(metrics.clone()));
        let weak = Arc::downgrade(&cache);
        metrics.watch_token_expiry(Arc::new(move || weak.upgrade()?.soonest_expiry()));
        cache
    }

    fn build(
        source: Arc<dyn TokenSource>,
        timeout: Duration,
        metrics: Option<Arc<TargetMetrics>>,
    ) -> Arc<TokenCache> {
        Arc::new(TokenCache {
            source,
            timeout,
            slots: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// When the soonest of the cached tokens expires (`None`: no token).
    /// Takes each lock briefly; never waits on a fetch.
    pub fn soonest_expiry(&self) -> Option<SystemTime> {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        slots
            .iter()
            .filter_map(|slot| {
                lock(&slot.state)
                    .current
                    .as_ref()
                    .map(|c| c.token.expires_at())
            })
            .min()
    }

    pub fn source(&self) -> &dyn TokenSource {
        &*self.source
    }

    /// A token for `request`: the cached one if it has time left, else the
    /// outcome of the (shared) fetch.
    pub async fn get(self: &Arc<Self>, request: &TokenRequest) -> Result<Token, CredentialsError> {
        let slot = lock(&self.slots)
            .entry(request.clone())
            .or_default()
            .clone();
        let mut outcome = {
            let mut state = lock(&slot.state);
            let now = Instant::now();
            state.last_used = Some(now);
            if let Some(cached) = state.current.as_ref().filter(|c| c.usable_until > now) {
                return Ok(cached.token.clone());
            }
            match &state.fetching {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    state.fetching = Some(rx.clone());
                    tokio::spawn(self.clone().first_fetch(slot.clone(), request.clone(), tx));
                    rx
                }
            }
        };
        let result = match outcome.wait_for(Option::is_some).await {
            Ok(done) => done.clone(),
            Err(_) => None,
        };
        result.unwrap_or_else(|| {
            Err(CredentialsError::Source {
                provider: self.source.provider(),
                origin: "the token cache".into(),
                reason: "the fetch ended without a result".into(),
            })
        })
    }

    async fn fetch(&self, request: &TokenRequest) -> Result<Token, CredentialsError> {
        let result = match tokio::time::timeout(self.timeout, self.source.fetch(request)).await {
            Ok(result) => result,
            Err(_) => Err(CredentialsError::Timeout {
                provider: self.source.provider(),
                after: self.timeout,
            }),
        };
        if let Some(metrics) = &self.metrics {
            metrics.token_refreshed(result.is_ok());
        }
        result
    }

    async fn first_fetch(
        self: Arc<Self>,
        slot: Arc<Slot>,
        request: TokenRequest,
        done: watch::Sender<Outcome>,
    ) {
        let result = self.fetch(&request).await;
        let start_refresher = {
            let mut state = lock(&slot.state);
            state.fetching = None;
            match &result {
                Ok(token) => {
                    state.current = Some(Cached::new(token.clone()));
                    !std::mem::replace(&mut state.refresher_running, true)
                }
                Err(_) => {
                    if state.current.is_none() && !state.refresher_running {
                        self.forget(&request);
                    }
                    false
                }
            }
        };
        if start_refresher {
            tokio::spawn(self.clone().refresh_loop(slot, request));
        }
        let _ = done.send(Some(result));
    }

    /// Drops a slot nobody needs any more, so that the map holds only
    /// (endpoint, user) pairs in use: a client trying many user names costs
    /// nothing that lasts. A connection still holding the slot finishes with
    /// it; the next one starts afresh.
    fn forget(&self, request: &TokenRequest) {
        lock(&self.slots).remove(request);
    }

    /// Number of (endpoint, user) pairs with a slot, for tests.
    #[cfg(test)]
    fn slots(&self) -> usize {
        lock(&self.slots).len()
    }

    /// Keeps the slot's token fresh until it goes unused or cannot be renewed.
    async fn refresh_loop(self: Arc<Self>, slot: Arc<Slot>, request: TokenRequest) {
        loop {
            let Some(refresh_at) = lock(&slot.state).current.as_ref().map(|c| c.refresh_at) else {
                lock(&slot.state).refresher_running = false;
                return;
            };
            tokio::time::sleep_until(refresh_at).await;
            {
                let mut state = lock(&slot.state);
                let idle = state
                    .last_used
                    .is_none_or(|used| used.elapsed() >= IDLE_STOP);
                if idle {
                    state.refresher_running = false;
                    drop(state);
                    self.forget(&request);
                    return;
                }
            }
            let mut backoff = BACKOFF_FIRST;
            loop {
                match self.fetch(&request).await {
                    Ok(token) => {
                        tracing::debug!(provider = self.source.provider(), host = %request.host, user = %request.user, "token refreshed");
                        lock(&slot.state).current = Some(Cached::new(token));
                        break;
                    }
                    Err(e) => {
                        let usable_until =
                            lock(&slot.state).current.as_ref().map(|c| c.usable_until);
                        let now = Instant::now();
                        match usable_until.filter(|&until| until > now) {
                            Some(until) => {
                                tracing::warn!(provider = self.source.provider(), host = %request.host, user = %request.user, error = %e, retry_in_secs = backoff.as_secs(), "token refresh failed; the current token stays in use");
                                tokio::time::sleep_until((now + backoff).min(until)).await;
                                backoff = (backoff * 2).min(BACKOFF_MAX);
                            }
                            None => {
                                tracing::warn!(provider = self.source.provider(), host = %request.host, user = %request.user, error = %e, "token refresh failed and the token has expired; the next connection will try again");
                                let mut state = lock(&slot.state);
                                state.current = None;
                                state.refresher_running = false;
                                drop(state);
                                self.forget(&request);
                                return;
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::TokenFuture;
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::SystemTime;

    /// Answers from a script; each answer is a token lifetime or an error,
    /// after an optional delay. Counts calls.
    struct Scripted {
        calls: AtomicUsize,
        script: Mutex<VecDeque<(Duration, Result<Duration, &'static str>)>>,
    }

    impl Scripted {
        fn new(script: &[(u64, Result<u64, &'static str>)]) -> Arc<Scripted> {
            Arc::new(Scripted {
                calls: AtomicUsize::new(0),
                script: Mutex::new(
                    script
                        .iter()
                        .map(|(d, r)| (Duration::from_secs(*d), r.map(Duration::from_secs)))
                        .collect(),
                ),
            })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl TokenSource for Scripted {
        fn provider(&self) -> &'static str {
            "test"
        }
        fn fetch<'a>(&'a self, _request: &'a TokenRequest) -> TokenFuture<'a> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                let (delay, answer) = lock(&self.script)
                    .pop_front()
                    .unwrap_or((Duration::ZERO, Err("script exhausted")));
                tokio::time::sleep(delay).await;
                match answer {
                    // Tokens are numbered by call, so tests see which one they got.
                    Ok(life) => Ok(Token::new(format!("token-{n}"), SystemTime::now() + life)),
                    Err(reason) => Err(CredentialsError::Source {
                        provider: "test",
                        origin: "the script".into(),
                        reason: reason.into(),
                    }),
                }
            })
        }
    }

    fn request() -> TokenRequest {
        TokenRequest {
            host: "db.example".into(),
            port: 5432,
            user: "app".into(),
        }
    }

    /// Lets spawned tasks run without moving the paused clock much.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    // The clock is paused: sleeps advance it instantly, so minutes pass in
    // no time. Token lifetimes are SystemTime-based and measured once, when
    // cached, so they follow the paused clock from then on.

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_connections_makes_one_fetch_and_later_ones_reuse_it() {
        let source = Scripted::new(&[(2, Ok(900))]);
        let cache = TokenCache::new(source.clone(), Duration::from_secs(10));
        let waits: Vec<_> = (0..20)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&request()).await })
            })
            .collect();
        for w in waits {
            let token = w.await.expect("task").expect("token");
            assert_eq!(token.expose(), "token-1");
        }
        assert_eq!(source.calls(), 1);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            cache.get(&request()).await.expect("cached").expose(),
            "token-1"
        );
        assert_eq!(source.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_refresh_happens_ahead_of_expiry_without_a_connection_waiting() {
        // 15-minute tokens: refreshed at 10 minutes. The refresh itself is
        // slow (5 s), yet a connection during it gets the old token at once.
        let source = Scripted::new(&[(0, Ok(900)), (5, Ok(900))]);
        let cache = TokenCache::new(source.clone(), Duration::from_secs(10));
        assert_eq!(
            cache.get(&request()).await.expect("first").expose(),
            "token-1"
        );
        tokio::time::sleep(Duration::from_secs(599)).await;
        assert_eq!(source.calls(), 1, "not refreshed before 10 minutes");
        tokio::time::sleep(Duration::from_secs(2)).await;
        settle().await;
        assert_eq!(source.calls(), 2, "refresh started at 10 minutes");
        let during = Instant::now();
        assert_eq!(
            cache.get(&request()).await.expect("during").expose(),
            "token-1"
        );
        assert_eq!(during.elapsed(), Duration::ZERO, "no wait on the refresh");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(
            cache.get(&request()).await.expect("after").expose(),
            "token-2"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_keeps_the_valid_token_and_retries_with_backoff() {
        let source = Scripted::new(&[
            (0, Ok(900)),
            (0, Err("endpoint down")),
            (0, Err("endpoint down")),
            (0, Err("endpoint down")),
            (0, Ok(900)),
        ]);
        let cache = TokenCache::new(source.clone(), Duration::from_secs(10));
        cache.get(&request()).await.expect("first");
        tokio::time::sleep(Duration::from_secs(600)).await;
        settle().await;
        assert_eq!(source.calls(), 2);
        assert_eq!(
            cache.get(&request()).await.expect("kept").expose(),
            "token-1"
        );
        // Retries after 1 s, then 2 s more, then 4 s more.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        settle().await;
        assert_eq!(source.calls(), 3);
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        settle().await;
        assert_eq!(source.calls(), 4);
        assert_eq!(
            cache.get(&request()).await.expect("still kept").expose(),
            "token-1"
        );
        tokio::time::sleep(Duration::from_millis(4_000)).await;
        settle().await;
        assert_eq!(source.calls(), 5);
        assert_eq!(
            cache.get(&request()).await.expect("renewed").expose(),
            "token-5"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn errors_reach_the_caller_and_the_next_connection_tries_again() {
        let source = Scripted::new(&[(0, Err("no role attached")), (0, Ok(900))]);
        let cache = TokenCache::new(source.clone(), Duration::from_secs(10));
        let err = cache.get(&request()).await.expect_err("first fails");
        assert_eq!(
            err.to_string(),
            "test credentials from the script: no role attached"
        );
        assert_eq!(
            cache.slots(),
            0,
            "a failed first fetch leaves nothing behind"
        );
        assert_eq!(
            cache.get(&request()).await.expect("second").expose(),
            "token-2"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_source_times_out() {
        let source = Scripted::new(&[(3600, Ok(900))]);
        let cache = TokenCache::new(source, Duration::from_secs(3));
        let err = cache.get(&request()).await.expect_err("times out");
        assert_eq!(err.to_string(), "test credentials: no answer within 3s");
    }

    #[tokio::test(start_paused = true)]
    async fn users_and_endpoints_have_tokens_of_their_own() {
        let source = Scripted::new(&[(0, Ok(900)), (0, Ok(900))]);
        let cache = TokenCache::new(source.clone(), Duration::from_secs(10));
        let other = TokenRequest {
            user: "report".into(),
            ..request()
        };
        assert_eq!(
            cache.get(&request()).await.expect("app").expose(),
            "token-1"
        );
        assert_eq!(cache.get(&other).await.expect("report").expose(), "token-2");
        assert_eq!(
            cache.get(&request()).await.expect("app again").expose(),
            "token-1"
        );
        assert_eq!(cache.slots(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_nobody_uses_stops_refreshing_and_is_forgotten() {
        let source = Scripted::new(&[(0, Ok(900)); 7]);
        let cache = TokenCache::new(source.clone(), Duration::from_secs(10));
        cache.get(&request()).await.expect("first");
        // Refreshed every 10 minutes while the last use is under an hour old.
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_secs(600)).await;
            settle().await;
        }
        assert_eq!(
            source.calls(),
            6,
            "refreshed at 10, 20, ... 50 minutes, not at 60"
        );
        assert_eq!(cache.slots(), 0);
    }
}
