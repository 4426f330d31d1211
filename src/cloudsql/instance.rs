//! One Cloud SQL instance: what the connector knows about it (settings,
//! client certificate, TLS configuration) and how that is kept fresh.
//!
//! - Refresh ahead (the default): [`Instance::start`] fetches at once and a
//!   task renews before the certificate expires, so a new connection never
//!   waits on the API.
//! - Lazy (`--lazy-refresh`): nothing runs in the background; a connection
//!   that finds no valid certificate fetches one itself (Cloud Run throttles
//!   CPU between requests, which starves background work).
//!
//! Either way at most one refresh runs at a time, refreshes are rate
//! limited per instance (a burst of two, then one per 30 s), a failed
//! refresh keeps the certificate that is still valid and is retried with
//! backoff, a failed dial or handshake asks for a refresh ([`Instance::invalidate`]),
//! and an HTTP 429 puts the instance in a cool-down that errors name.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::api::{ApiError, ConnectSettings, IpType};
use super::cert::{self, InstanceIdentity, InstanceVerifier};
use super::name::InstanceName;
use super::{Connector, ConnectorError, IpPreference};
use crate::config::Protocol;
use crate::metrics::TargetMetrics;

/// The port of Cloud SQL's server-side proxy.
pub const SERVER_PROXY_PORT: u16 = 3307;

/// Refresh when this much of the certificate's life is left, or half its
/// life if that is shorter (a short-lived certificate, as in tests).
const REFRESH_AHEAD: Duration = Duration::from_secs(4 * 60);
/// A certificate this close to expiry is not handed to a new connection.
const MIN_VALIDITY: Duration = Duration::from_secs(2);
/// The refresh rate limit: a burst of this many, then one per [`REFILL`].
const BURST: f64 = 2.0;
const REFILL: Duration = Duration::from_secs(30);
/// Retries after a failed refresh: 1 s, 2 s, 4 s, ... up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// In lazy mode, a failure this recent is reported again rather than
/// retried.
const RECENT_FAILURE: Duration = Duration::from_secs(1);
/// How long an HTTP 429 keeps the instance from asking again.
const QUOTA_COOL_DOWN: Duration = Duration::from_secs(60);

/// Everything a connection to the instance needs, valid until `expires_at`.
pub struct ConnectInfo {
    pub settings: ConnectSettings,
    pub protocol: Protocol,
    /// Where to dial: an address, or the PSC DNS name to resolve.
    pub dial: Dial,
    pub tls: Arc<rustls::ClientConfig>,
    /// The earlier of the certificate's notAfter and, with automatic IAM
    /// login, the token's expiry.
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for ConnectInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectInfo")
            .field("database_version", &self.settings.database_version)
            .field("dial", &self.dial)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The address a connection dials (port 3307).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dial {
    Ip(IpAddr),
    /// The PSC DNS name, resolved at each dial.
    Name(String),
}

impl Dial {
    pub fn describe(&self) -> String {
        match self {
            Dial::Ip(ip) => SocketAddr::new(*ip, SERVER_PROXY_PORT).to_string(),
            Dial::Name(name) => format!("{name}:{SERVER_PROXY_PORT}"),
        }
    }
}

impl ConnectInfo {
    fn valid_for_new_connections(&self) -> bool {
        self.expires_at
            .duration_since(SystemTime::now())
            .is_ok_and(|left| left >= MIN_VALIDITY)
    }
}

/// One instance target's connector state.
pub struct Instance {
    pub name: InstanceName,
    ip: IpPreference,
    auto_iam: bool,
    lazy: bool,
    connector: Arc<Connector>,
    metrics: Arc<TargetMetrics>,
    state: Mutex<State>,
    /// One refresh at a time; the lazy path waits on it.
    refreshing: tokio::sync::Mutex<()>,
    /// Wakes the refresh-ahead task early (a dial failed).
    wake: Notify,
    /// A new state was stored (settings learned or an error recorded).
    changed: Notify,
}

#[derive(Default)]
struct State {
    current: Option<Arc<ConnectInfo>>,
    last_error: Option<ConnectorError>,
    /// Refreshes done so far (for the rate limit).
    tokens: Option<(f64, Instant)>,
    cool_down_until: Option<Instant>,
    /// When the last refresh failed.
    failed_at: Option<Instant>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Instance {
    pub fn new(
        name: InstanceName,
        ip: IpPreference,
        auto_iam: bool,
        lazy: bool,
        connector: Arc<Connector>,
        metrics: Arc<TargetMetrics>,
    ) -> Arc<Instance> {
        Arc::new(Instance {
            name,
            ip,
            auto_iam,
            lazy,
            connector,
            metrics,
            state: Mutex::new(State::default()),
            refreshing: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            changed: Notify::new(),
        })
    }

    pub fn is_lazy(&self) -> bool {
        self.lazy
    }

    pub fn auto_iam(&self) -> bool {
        self.auto_iam
    }

    /// Starts the refresh-ahead task (not in lazy mode); it ends with `stop`.
    pub fn start(self: &Arc<Self>, stop: CancellationToken) {
        if self.lazy {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = me.refresh_ahead() => {}
            }
        });
    }

    /// The engine, if a refresh has told it already (no waiting, no call).
    pub fn known_protocol(&self) -> Option<Protocol> {
        lock(&self.state).current.as_ref().map(|c| c.protocol)
    }

    /// The engine, once known: waits for the first refresh if needed
    /// (refresh ahead), or fetches (lazy), or returns the first error.
    pub async fn protocol(&self) -> Result<Protocol, ConnectorError> {
        if let Some(current) = &lock(&self.state).current {
            return Ok(current.protocol);
        }
        Ok(self.connect_info().await?.protocol)
    }

    /// A valid [`ConnectInfo`] for a new connection.
    pub async fn connect_info(&self) -> Result<Arc<ConnectInfo>, ConnectorError> {
        loop {
            // Registered before the state is read, so no result is missed.
            let mut notified = std::pin::pin!(self.changed.notified());
            notified.as_mut().enable();
            {
                let state = lock(&self.state);
                if let Some(current) = &state.current {
                    if current.valid_for_new_connections() {
                        return Ok(current.clone());
                    }
                    if !self.lazy {
                        // Expired while the task slept (a suspended host):
                        // wake it now.
                        self.wake.notify_one();
                    }
                }
                if !self.lazy {
                    // The background task owns refreshing: report its last
                    // failure, or wait for its next result.
                    if let Some(e) = &state.last_error {
                        return Err(e.clone());
                    }
                }
            }
            if self.lazy {
                return self.refresh_now(false).await;
            }
            notified.await;
        }
    }

    /// A dial or TLS handshake with the current settings failed: refresh
    /// soon (rate limited), in case the address, CA or certificate moved.
    pub fn invalidate(&self) {
        if self.lazy {
            // The next connection refreshes (rate limited) before dialling.
            let mut state = lock(&self.state);
            if let Some(current) = state.current.take() {
                // Keep what is known about the engine for `protocol()`.
                state.current = Some(Arc::new(ConnectInfo {
                    expires_at: SystemTime::UNIX_EPOCH,
                    settings: current.settings.clone(),
                    protocol: current.protocol,
                    dial: current.dial.clone(),
                    tls: current.tls.clone(),
                }));
            }
        } else {
            self.wake.notify_one();
        }
    }

    /// Why the instance has no valid certificate, for `/readiness`; `None`
    /// when it has one.
    pub fn not_ready(&self) -> Option<String> {
        let state = lock(&self.state);
        match (&state.current, &state.last_error) {
            (Some(c), _) if c.valid_for_new_connections() => None,
            // Lazy instances fetch on demand: not having one yet is normal.
            (None, None) if self.lazy => None,
            (_, Some(e)) => Some(e.to_string()),
            (_, None) => Some("no valid client certificate yet".to_owned()),
        }
    }

    /// The background loop of refresh-ahead mode.
    async fn refresh_ahead(self: Arc<Self>) {
        let mut backoff = Duration::from_secs(1);
        let mut forced = false;
        loop {
            let wait = match self.refresh_now(forced).await {
                Ok(info) => {
                    backoff = Duration::from_secs(1);
                    refresh_delay(info.expires_at)
                }
                Err(e) => {
                    tracing::warn!(instance = %self.name, error = %e, retry_in_secs = backoff.as_secs(), "Cloud SQL refresh failed; the current certificate (if any) stays in use");
                    let wait = match &e {
                        ConnectorError::CoolDown { left, .. } => *left,
                        ConnectorError::RateLimited { left, .. } => *left,
                        _ => backoff,
                    };
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    wait
                }
            };
            forced = tokio::select! {
                _ = tokio::time::sleep(wait) => false,
                _ = self.wake.notified() => true,
            };
        }
    }

    /// Refreshes now unless the rate limit or a cool-down says no. In lazy
    /// mode a caller that finds a valid certificate stored by a refresh it
    /// waited for takes that one.
    async fn refresh_now(&self, forced: bool) -> Result<Arc<ConnectInfo>, ConnectorError> {
        let _one = self.refreshing.lock().await;
        if self.lazy && !forced {
            // Another connection's refresh may have finished meanwhile, or
            // failed a moment ago (one client must not cause two calls).
            let state = lock(&self.state);
            if let Some(current) = &state.current {
                if current.valid_for_new_connections() {
                    return Ok(current.clone());
                }
            }
            if let (Some(e), Some(at)) = (&state.last_error, state.failed_at) {
                if at.elapsed() < RECENT_FAILURE {
                    return Err(e.clone());
                }
            }
        }
        match self.admit() {
            Ok(()) => {}
            // It names the 429 and when keyhole asks again.
            Err(e @ ConnectorError::CoolDown { .. }) => return Err(e),
            // The last failure says more than "not now": a client retrying
            // after a 403 should read the 403 again.
            Err(refused) => return Err(lock(&self.state).last_error.clone().unwrap_or(refused)),
        }
        let result = match self.fetch().await {
            Err(ConnectorError::Api(e @ ApiError::Quota { .. })) => {
                lock(&self.state).cool_down_until = Some(Instant::now() + QUOTA_COOL_DOWN);
                Err(ConnectorError::CoolDown {
                    instance: self.name.to_string(),
                    left: QUOTA_COOL_DOWN,
                    cause: e.to_string(),
                })
            }
            other => other,
        };
        let mut state = lock(&self.state);
        match &result {
            Ok(info) => {
                self.metrics.cloudsql_refreshed("ok");
                self.metrics.cloudsql_cert_expires(info.expires_at);
                state.current = Some(info.clone());
                state.last_error = None;
                state.failed_at = None;
            }
            Err(e) => {
                self.metrics.cloudsql_refreshed(e.label());
                state.last_error = Some(e.clone());
                state.failed_at = Some(Instant::now());
            }
        }
        drop(state);
        self.changed.notify_waiters();
        result
    }

    /// The rate limit and the quota cool-down, checked before a refresh.
    fn admit(&self) -> Result<(), ConnectorError> {
        let mut state = lock(&self.state);
        let now = Instant::now();
        if let Some(until) = state.cool_down_until {
            if until > now {
                let cause = match &state.last_error {
                    Some(ConnectorError::CoolDown { cause, .. }) => cause.clone(),
                    _ => "the SQL Admin API's quota is exhausted (HTTP 429)".to_owned(),
                };
                return Err(ConnectorError::CoolDown {
                    instance: self.name.to_string(),
                    left: until - now,
                    cause,
                });
            }
            state.cool_down_until = None;
        }
        let (tokens, at) = state.tokens.unwrap_or((BURST, now));
        let refilled =
            (tokens + now.duration_since(at).as_secs_f64() / REFILL.as_secs_f64()).min(BURST);
        if refilled < 1.0 {
            let left = REFILL.mul_f64(1.0 - refilled);
            state.tokens = Some((refilled, now));
            return Err(ConnectorError::RateLimited {
                instance: self.name.to_string(),
                left,
            });
        }
        state.tokens = Some((refilled - 1.0, now));
        Ok(())
    }

    /// One refresh: settings, then a certificate for keyhole's key.
    async fn fetch(&self) -> Result<Arc<ConnectInfo>, ConnectorError> {
        let connector = &self.connector;
        let settings = connector
            .api
            .connect_settings(&self.name, &self.metrics)
            .await?;
        let protocol = engine(&self.name, &settings.database_version)?;
        let dial = choose_address(&self.name, self.ip, &settings)?;
        let key = connector.key().await?;
        let login = if self.auto_iam {
            Some(connector.login_token().await?)
        } else {
            None
        };
        let pem = connector
            .api
            .generate_ephemeral_cert(
                &self.name,
                &key.public_key_pem(),
                login.as_ref(),
                &self.metrics,
            )
            .await?;
        let (chain, not_after) = cert::parse_cert_pem(&pem).map_err(ConnectorError::certificate)?;
        let identity = InstanceIdentity {
            project: self.name.project.clone(),
            instance: self.name.instance.clone(),
            dns_names: settings.dns_names.clone(),
        };
        let verifier = InstanceVerifier::new(&settings.server_ca_pem, identity)
            .map_err(ConnectorError::certificate)?;
        let tls = cert::client_config(Arc::new(verifier), chain, key.private_key())
            .map_err(ConnectorError::certificate)?;
        let expires_at = match &login {
            Some(token) => not_after.min(token.expires_at()),
            None => not_after,
        };
        tracing::info!(instance = %self.name, engine = %settings.database_version, address = %dial.describe(), ca_mode = %settings.server_ca_mode, expires_in_secs = expires_at.duration_since(SystemTime::now()).map_or(0, |d| d.as_secs()), "Cloud SQL client certificate refreshed");
        Ok(Arc::new(ConnectInfo {
            settings,
            protocol,
            dial,
            tls: Arc::new(tls),
            expires_at,
        }))
    }
}

/// How long until the next refresh of a certificate expiring at `expires_at`.
fn refresh_delay(expires_at: SystemTime) -> Duration {
    let left = expires_at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    let ahead = REFRESH_AHEAD.min(left / 2);
    left.saturating_sub(ahead)
}

/// The frontend an engine gets.
pub fn engine(name: &InstanceName, version: &str) -> Result<Protocol, ConnectorError> {
    if version.starts_with("POSTGRES") {
        Ok(Protocol::Postgres)
    } else if version.starts_with("MYSQL") {
        Ok(Protocol::Mysql)
    } else {
        Err(ConnectorError::Engine {
            instance: name.to_string(),
            version: version.to_owned(),
        })
    }
}

/// The address `preference` picks, or an error naming what the instance has.
fn choose_address(
    name: &InstanceName,
    preference: IpPreference,
    settings: &ConnectSettings,
) -> Result<Dial, ConnectorError> {
    let of = |kind: IpType| {
        settings
            .ip_addresses
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, ip)| Dial::Ip(*ip))
    };
    let psc = || {
        settings
            .psc_dns_name
            .as_ref()
            .filter(|_| settings.psc_enabled)
            .map(|n| Dial::Name(n.trim_end_matches('.').to_owned()))
    };
    let found = match preference {
        IpPreference::Public => of(IpType::Public),
        IpPreference::Private => of(IpType::Private),
        IpPreference::Psc => psc(),
        IpPreference::Auto => of(IpType::Public).or_else(|| of(IpType::Private)),
    };
    found.ok_or_else(|| {
        let mut has: Vec<&str> = settings
            .ip_addresses
            .iter()
            .map(|(k, _)| match k {
                IpType::Public => "public",
                IpType::Private => "private",
            })
            .collect();
        if psc().is_some() {
            has.push("PSC");
        }
        ConnectorError::NoAddress {
            instance: name.to_string(),
            asked: preference.describe(),
            has: if has.is_empty() {
                "none".to_owned()
            } else {
                has.join(", ")
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(ips: &[(IpType, &str)], psc: Option<&str>) -> ConnectSettings {
        ConnectSettings {
            region: "r".into(),
            database_version: "POSTGRES_15".into(),
            ip_addresses: ips
                .iter()
                .map(|(k, ip)| (*k, ip.parse().expect("ip")))
                .collect(),
            psc_enabled: psc.is_some(),
            psc_dns_name: psc.map(str::to_owned),
            dns_names: vec![],
            server_ca_pem: String::new(),
            server_ca_mode: String::new(),
        }
    }

    fn name() -> InstanceName {
        InstanceName::parse("p:r:i").expect("valid")
    }

    #[test]
    fn address_choice_follows_the_preference_and_names_what_exists() {
        let both = settings(
            &[(IpType::Public, "34.1.1.1"), (IpType::Private, "10.1.1.1")],
            None,
        );
        let pick = |p, s: &ConnectSettings| choose_address(&name(), p, s);
        assert_eq!(
            pick(IpPreference::Public, &both).expect("public"),
            Dial::Ip("34.1.1.1".parse().expect("ip"))
        );
        assert_eq!(
            pick(IpPreference::Private, &both).expect("private"),
            Dial::Ip("10.1.1.1".parse().expect("ip"))
        );
        let private_only = settings(&[(IpType::Private, "10.1.1.1")], None);
        assert_eq!(
            pick(IpPreference::Auto, &private_only).expect("auto"),
            Dial::Ip("10.1.1.1".parse().expect("ip"))
        );
        let e = pick(IpPreference::Public, &private_only).expect_err("no public");
        assert!(
            e.to_string()
                .contains("has no public IP address (it has: private)"),
            "{e}"
        );
        let psc = settings(&[], Some("x.sql.goog."));
        assert_eq!(
            pick(IpPreference::Psc, &psc).expect("psc"),
            Dial::Name("x.sql.goog".into())
        );
        let e = pick(IpPreference::Private, &psc).expect_err("no private");
        assert!(e.to_string().contains("(it has: PSC)"), "{e}");
    }

    #[test]
    fn engines_from_the_database_version() {
        assert_eq!(
            engine(&name(), "POSTGRES_16").ok(),
            Some(Protocol::Postgres)
        );
        assert_eq!(engine(&name(), "MYSQL_8_0_31").ok(), Some(Protocol::Mysql));
        let e = engine(&name(), "SQLSERVER_2019_STANDARD").expect_err("sql server");
        assert!(e.to_string().contains("SQL Server"), "{e}");
    }

    /// An instance whose API nobody answers (the tests below never call it).
    fn offline_instance(lazy: bool) -> Arc<Instance> {
        struct NoToken;
        impl crate::credentials::TokenSource for NoToken {
            fn provider(&self) -> &'static str {
                "gcp"
            }
            fn fetch<'a>(
                &'a self,
                _request: &'a crate::credentials::TokenRequest,
            ) -> crate::credentials::TokenFuture<'a> {
                Box::pin(async {
                    Err(crate::credentials::CredentialsError::Missing {
                        provider: "gcp",
                        reason: "test".into(),
                    })
                })
            }
        }
        let tokens = crate::credentials::TokenCache::new(Arc::new(NoToken), Duration::from_secs(1));
        let api = super::super::api::AdminApi::new(
            "http://127.0.0.1:9",
            tokens,
            None,
            Duration::from_secs(1),
        )
        .expect("an endpoint");
        Instance::new(
            name(),
            IpPreference::Public,
            false,
            lazy,
            Arc::new(Connector::new(api, None)),
            Arc::new(TargetMetrics::default()),
        )
    }

    #[test]
    fn refreshes_come_in_a_burst_of_two_then_one_per_30_seconds() {
        let instance = offline_instance(true);
        assert!(instance.admit().is_ok());
        assert!(instance.admit().is_ok());
        match instance.admit() {
            Err(ConnectorError::RateLimited { left, .. }) => {
                assert!(left > Duration::from_secs(28) && left <= REFILL, "{left:?}")
            }
            other => panic!("expected the rate limit, got {other:?}"),
        }
        // Half a refill later, still not; a whole one later, one more.
        lock(&instance.state).tokens = Some((0.5, Instant::now()));
        assert!(instance.admit().is_err());
        lock(&instance.state).tokens = Some((0.0, Instant::now() - REFILL));
        assert!(instance.admit().is_ok());
        assert!(instance.admit().is_err());
    }

    #[test]
    fn a_quota_cool_down_is_named_until_it_ends() {
        let instance = offline_instance(false);
        lock(&instance.state).cool_down_until = Some(Instant::now() + Duration::from_secs(40));
        let e = instance.admit().expect_err("cooling down");
        assert!(
            e.to_string().contains("quota is exhausted") && e.to_string().contains("cool-down"),
            "{e}"
        );
        lock(&instance.state).cool_down_until = Some(Instant::now() - Duration::from_secs(1));
        assert!(instance.admit().is_ok());
    }

    #[tokio::test]
    async fn a_failed_lazy_refresh_is_reported_again_not_repeated_at_once() {
        let instance = offline_instance(true);
        let first = instance.connect_info().await.expect_err("no token");
        assert_eq!(first.label(), "credentials");
        // Within a second the same error comes back without a new attempt
        // (a new attempt would spend the second refresh of the burst).
        let again = instance.connect_info().await.expect_err("no token");
        assert_eq!(again.to_string(), first.to_string());
        assert_eq!(
            lock(&instance.state).tokens.map(|(t, _)| t < 1.5),
            Some(true)
        );
        assert!(instance.admit().is_ok(), "the second refresh was not spent");
        // Lazy instances are not "unready" for having fetched nothing yet,
        // but one that failed says why.
        assert!(instance
            .not_ready()
            .is_some_and(|why| why.contains("no gcp credentials")));
    }

    #[test]
    fn refresh_ahead_of_expiry() {
        let in_an_hour = SystemTime::now() + Duration::from_secs(3600);
        let d = refresh_delay(in_an_hour);
        assert!(
            d <= Duration::from_secs(3360) && d > Duration::from_secs(3350),
            "{d:?}"
        );
        let soon = SystemTime::now() + Duration::from_secs(10);
        let d = refresh_delay(soon);
        assert!(
            d <= Duration::from_secs(5) && d >= Duration::from_secs(4),
            "{d:?}"
        );
        assert_eq!(refresh_delay(SystemTime::UNIX_EPOCH), Duration::ZERO);
    }
}
