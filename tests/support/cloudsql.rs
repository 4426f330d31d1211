//! In-process fakes of Google's Cloud SQL connector endpoints, written from
//! the documented contracts (see `REFERENCE.md`, "Cloud SQL connector"), in
//! front of the REAL PostgreSQL and MariaDB servers the harness starts:
//!
//! - the **SQL Admin API** (v1beta4), an [`HttpFake`] on 127.0.0.1 (give
//!   keyhole `--sqladmin-api-endpoint <url()>`): `connectSettings` and
//!   `generateEphemeralCert`, with bearer-token checks, Google's JSON error
//!   bodies and per-instance failure injection;
//! - one **server-side proxy** per instance and IP type: TCP on
//!   `<its own 127.77.x.y>:3307`, TLS 1.3 only from the first byte, a client
//!   certificate from the fake API required, then bytes both ways to the real
//!   server's Unix socket.
//!
//! Every instance gets its own loopback addresses, so the standard port 3307
//! needs no overriding: addresses come from 127.77.0.0/16 (a process-wide
//! counter with a random start; an address whose port 3307 is taken is
//! skipped). Certificates are made at test time with rcgen (ECDSA P-256 CAs and
//! server keys; the client key is whatever the client sends). Everything runs
//! on the fake's own runtimes and stops when the fake is dropped.
//!
//! # API
//!
//! - [`FakeSqlAdmin`] (derefs to [`HttpFake`]: `port()`, `url()` —
//!   `http://127.0.0.1:PORT`, the value for `--sqladmin-api-endpoint` —,
//!   `requests()`, `clear_requests()`, `errors()`, `set_mode(Mode)`; these
//!   concern the API only, and `clear_requests()` leaves the records below
//!   alone):
//!   - `FakeSqlAdmin::start()`: accepts one random token, `admin_token()`;
//!     `accept_token(&str)`, `revoke_token(&str)`. Every request needs
//!     `Authorization: Bearer <accepted token>`, else 401 (`UNAUTHENTICATED`,
//!     reason `required` when the header is missing, `authError` when the
//!     token is unknown).
//!   - `add_instance(InstanceSpec) -> InstanceHandle` (starts its proxies;
//!     panics on a duplicate name), `instance(name) -> InstanceHandle`.
//!   - `set_failure(instance, Option<Failure>)` (both methods),
//!     `set_method_failure(instance, ApiMethod, Option<Failure>)`,
//!     `set_cert_validity(instance, Duration)` (default 1 hour),
//!     `set_login_token_expiry(token, SystemTime)` (certificates issued with
//!     that `access_token` expire no later, as Cloud SQL does).
//!   - Records: `calls(ApiMethod) -> usize`, `calls_for(instance, ApiMethod)`,
//!     `api_calls() -> Vec<ApiCall>` (every request that named a method, with
//!     the status answered), `login_tokens() -> Vec<String>` (the non-empty
//!     `access_token`s of `generateEphemeralCert` bodies that passed the
//!     bearer check, in order, whatever the answer),
//!     `issued_certs() -> Vec<IssuedCert>`, `connections(instance) ->
//!     Vec<ProxyConnection>`, `handshake_errors(instance) -> Vec<String>`,
//!     `wait_for_connections(instance, n, timeout)`.
//! - `GET /sql/v1beta4/projects/{project}/instances/{instance}/connectSettings`
//!   → `kind`, `serverCaCert {kind, certSerialNumber, cert, commonName,
//!   sha1Fingerprint, instance, createTime, expirationTime}`, `ipAddresses`
//!   (`PRIMARY`/`PRIVATE`, only those the instance has), `region`,
//!   `databaseVersion`, `backendType: SECOND_GEN`, `pscEnabled`, `dnsName` and
//!   `dnsNames` (only if there is a name), `serverCaMode`.
//! - `POST .../instances/{instance}:generateEphemeralCert`, body
//!   `{"public_key": PEM, "access_token": optional}` (camelCase names are
//!   accepted too): the PEM is a PKIX SubjectPublicKeyInfo of an RSA key under
//!   the label `RSA PUBLIC KEY` (what the Go connector sends) or `PUBLIC KEY`;
//!   anything else (PKCS#1 content, another key type, bad base64) → 400
//!   `INVALID_ARGUMENT`. Answer: `ephemeralCert {kind, certSerialNumber, cert,
//!   commonName, sha1Fingerprint, instance, createTime, expirationTime}`,
//!   a certificate for that key signed by the instance's client CA, valid from
//!   now − 1 minute to now + the instance's cert validity.
//! - In paths, `:` may be written `%3A` (any `%XX` is decoded first); the
//!   project may be domain-scoped (`example.com:my-proj`); the query is
//!   ignored. Check order: token, JSON body, instance (unknown, or known under
//!   another project → [`Failure::NotFound`]), injected failure, public key.
//!   A path that names no method (or the wrong HTTP method) → 404 `Method not
//!   found.`, not counted as a call.
//! - [`Failure`]: `NotFound` (404 `NOT_FOUND`, `instanceDoesNotExist`),
//!   `Forbidden` (403 `PERMISSION_DENIED`, `notAuthorized`), `Quota` (429
//!   `RESOURCE_EXHAUSTED`, `rateLimitExceeded`), `Internal` (500 `INTERNAL`,
//!   `backendError`); `status()`, `status_name()`, `reason()`, `message()`,
//!   `body() -> Value`. [`google_error`]`(code, status, reason, message)`.
//! - [`ApiMethod`]: `ConnectSettings`, `GenerateEphemeralCert`; `as_str()`.
//! - [`InstanceSpec`]`{ project, region, name, database_version, ca_mode,
//!   dns_name, san_trailing_dot, api_trailing_dot, public_ip, private_ip, psc,
//!   wrong_name, backend }`: `InstanceSpec::new(name, Backend)`,
//!   `::postgres(name, &PgCluster)`, `::mysql(name, &MariaDb)` (project
//!   [`DEFAULT_PROJECT`], region [`DEFAULT_REGION`], internal CA, public IP
//!   only); change fields with struct update syntax.
//! - [`CaMode`]: `GoogleManagedInternal` (a per-instance self-signed CA `Google
//!   Cloud SQL Server CA`; server certificate CN `{project}:{instance}`, no
//!   SAN; `serverCaCert.cert` = that CA), `GoogleManagedCas` and
//!   `CustomerManagedCas` (root → intermediate → server certificate with SAN
//!   dNSName = the DNS name and CN = the DNS name; the proxy sends server
//!   certificate + intermediate; `serverCaCert.cert` = intermediate PEM + root
//!   PEM). `as_api_str()`.
//! - [`InstanceSpec`] name options: `dns_name` (`None` in a CAS mode →
//!   `{name}.{random}.{region}.sql.goog`; in the internal mode `None` means no
//!   name at all), `san_trailing_dot` (the SAN is written `...sql.goog.`;
//!   rcgen writes it as given), `api_trailing_dot` (`dnsName` and the
//!   instance's names in `dnsNames` end with a dot; a PSC literal never
//!   does), `wrong_name` (server certificate CN `{project}:some-other-
//!   instance`, SAN `other.example.invalid`, whatever the mode).
//! - IP types ([`IpType`]): `public_ip` → `PRIMARY`, `private_ip` →
//!   `PRIVATE`, `psc` → `pscEnabled: true` plus a `dnsNames` entry
//!   `{connectionType: PRIVATE_SERVICE_CONNECT, dnsScope: INSTANCE}` whose
//!   name is the PSC address written as an IP literal (DNS cannot be faked
//!   here; a dialer that resolves names accepts a literal). Each enabled type
//!   has its own address and listener. `dnsName` is the instance's DNS name,
//!   else (PSC only) the PSC literal.
//! - [`Backend`]: `Postgres { socket }` / `Mysql { socket }` (the Unix socket
//!   file: `Backend::postgres(&PgCluster)`, `Backend::mysql(&MariaDb)`),
//!   `Echo` (bytes come back), `None` (TLS close right after the handshake).
//! - [`InstanceHandle`] (`Clone`): `name()`, `project()`, `region()`,
//!   `connection_name()` (`project:region:name`), `public_ip()`,
//!   `private_ip()`, `psc_ip() -> Option<IpAddr>`, `addr(IpType) ->
//!   Option<SocketAddr>`, `psc_dns_name()`, `dns_name()` (without a trailing
//!   dot), `server_ca_pem()`, `server_cert_pem()` (the proxies' own
//!   certificate), `client_ca_pem()`, `instance_cn()`
//!   (`{project}:{name}`), `identity() -> ServerIdentity`.
//! - [`ProxyConnection`]`{ instance, ip_type, local, peer, started,
//!   handshake: Result<(), String> (the rustls error text), client_cert_serial,
//!   client_cert_not_after, issued_by_fake, access_token, backend:
//!   Option<Result<(), String>>, bytes_up, bytes_down, closed }`; the proxy
//!   records each connection once its handshake ends, then updates it.
//! - [`IssuedCert`]`{ instance, serial, not_after, access_token }`.
//! - A reference client, independent of keyhole: [`ClientKey`]`::generate()`
//!   (RSA-2048 by `openssl`; `private_key_pem` PKCS#8, `public_key_pem` PKIX
//!   under `RSA PUBLIC KEY`, `spki_pem` under `PUBLIC KEY`),
//!   [`api_request`]`(url, method, path, bearer, body) -> Result<(u16, Value),
//!   String>`, [`connect_settings_path`], [`generate_ephemeral_cert_path`],
//!   [`client_tls_config`]`(client: Option<(cert_pem, key_pem)>,
//!   server_ca_pem, ServerIdentity)` (TLS 1.3 only, [`CloudSqlVerifier`]:
//!   the chain must end at `serverCaCert`, then a SAN must equal the DNS name
//!   — case and one trailing dot ignored — or else the CN must equal
//!   `{project}:{instance}`), [`dial`]`(addr, config)`.
//! - [`CertInfo`]`{ serial, not_before, not_after, common_name, dns_names }`:
//!   [`cert_info`]`(der)`, [`cert_info_pem`]`(pem)` (the first certificate),
//!   [`cert_infos_pem`]`(pem)` (all of them).
//! - PostgreSQL: only `local all postgres trust` lets anyone in over the Unix
//!   socket by default, so start the cluster with
//!   [`pg_options`]`(iam_users)`: [`PG_HBA`] (`trust_user` trust, `md5_user`
//!   md5, `scram_user` scram-sha-256, everyone else scram-sha-256) with each
//!   IAM user trusted in front (Cloud SQL checks the token, not the database);
//!   [`create_pg_iam_user`]`(&PgCluster, user)` makes the role.
//! - MariaDB: any [`MariaDb`] works as it is. A socket connection counts as
//!   secure transport, so `native_user` logs in with its password although
//!   `require_secure_transport=ON` (the self-test checks both over the socket
//!   and through a proxy). The harness's template is made with
//!   `--skip-test-db`, which also leaves out the anonymous `''@localhost`
//!   account that would otherwise catch every socket login (socket clients
//!   are `localhost`, which sorts before `%`); the self-test checks that
//!   there is none. [`create_mysql_iam_user`]`(&MariaDb, user)` adds a user
//!   without a password for automatic IAM login (MySQL IAM users log in as
//!   the service account's name before the `@`, with no password).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream as StdTcpStream};
use std::ops::Deref;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::runtime::Runtime;
use tokio_rustls::{client, TlsAcceptor, TlsConnector};

use super::cloud::{random_string, HttpFake, Request, Response};
use super::mariadb::{MariaDb, DATABASE};
use super::postgres::{PgCluster, PgOptions};
use super::process::{describe_output, output_with_timeout};
use super::sigv4;

/// The project of [`InstanceSpec::new`].
pub const DEFAULT_PROJECT: &str = "keyhole-test-project";
/// The region of [`InstanceSpec::new`].
pub const DEFAULT_REGION: &str = "us-central1";
/// The port of Cloud SQL's server-side proxy.
pub const SERVER_PROXY_PORT: u16 = 3307;
/// How long a certificate from `generateEphemeralCert` is valid by default.
pub const DEFAULT_CERT_VALIDITY: Duration = Duration::from_secs(3600);
/// The API's path prefix, up to the project.
pub const API_PREFIX: &str = "/sql/v1beta4/projects/";

/// `pg_hba.conf` lines for a cluster behind the fake proxy, which reaches it
/// over the Unix socket (where the harness's own rules only trust
/// `postgres`). See [`pg_options`].
pub const PG_HBA: [&str; 4] = [
    "local all trust_user trust",
    "local all md5_user md5",
    "local all scram_user scram-sha-256",
    "local all all scram-sha-256",
];

/// The project number in quota messages.
const PROJECT_NUMBER: &str = "123456789012";
/// Base64url, for tokens.
const TOKEN_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
/// The time a client may take to finish its TLS handshake with a proxy.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A server CA's and server certificate's validity.
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How far back certificates' notBefore lies.
const BACKDATE: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The one crypto provider of the fakes and the reference client (ring, as
/// keyhole's).
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

// --- times ------------------------------------------------------------------------

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// RFC 3339 with milliseconds, as Google writes timestamps
/// (`2024-05-01T12:34:56.000Z`); whole seconds, like the certificates.
fn rfc3339(t: SystemTime) -> String {
    let text = sigv4::iso8601(t);
    format!("{}.000Z", text.trim_end_matches('Z'))
}

/// Sets a certificate's validity from `SystemTime`s (whole seconds).
fn set_validity(params: &mut CertificateParams, from: SystemTime, until: SystemTime) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(unix_secs(from));
    params.not_after = epoch + Duration::from_secs(unix_secs(until));
}

/// What a test wants to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Lower-case hex, no leading zeros.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub common_name: Option<String>,
    /// The DNS names among the SANs, as written.
    pub dns_names: Vec<String>,
}

/// Parses a DER certificate (rcgen's x509-parser underneath).
pub fn cert_info(der: &[u8]) -> Result<CertInfo, String> {
    let params = CertificateParams::from_ca_cert_der(&CertificateDer::from(der))
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let time = |secs: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    let serial: String = params
        .serial_number
        .as_ref()
        .map(SerialNumber::to_bytes)
        .unwrap_or_default()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let serial = match serial.trim_start_matches('0') {
        "" => "0".to_owned(),
        digits => digits.to_owned(),
    };
    let common_name = params
        .distinguished_name
        .get(&DnType::CommonName)
        .map(|v| match v {
            rcgen::DnValue::Utf8String(s) => s.clone(),
            rcgen::DnValue::PrintableString(s) => s.as_str().to_owned(),
            other => format!("{other:?}"),
        });
    let dns_names = params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::DnsName(name) => Some(name.as_str().to_owned()),
            _ => None,
        })
        .collect();
    Ok(CertInfo {
        serial,
        not_before: time((params.not_before - epoch).whole_seconds()),
        not_after: time((params.not_after - epoch).whole_seconds()),
        common_name,
        dns_names,
    })
}

/// [`cert_info`] of the first certificate in a PEM text.
pub fn cert_info_pem(pem: &str) -> Result<CertInfo, String> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or("no certificate in the PEM")?
        .map_err(|e| format!("bad PEM: {e}"))?;
    cert_info(&der)
}

/// Every certificate in a PEM text, parsed.
pub fn cert_infos_pem(pem: &str) -> Result<Vec<CertInfo>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|der| cert_info(&der.map_err(|e| format!("bad PEM: {e}"))?))
        .collect()
}

// --- errors -----------------------------------------------------------------------

/// Google's JSON error body: `{"error": {code, message, errors: [{message,
/// domain: "global", reason}], status}}`.
pub fn google_error(code: u16, status: &str, reason: &str, message: &str) -> Value {
    json!({
        "error": {
            "code": code,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
            "status": status,
        }
    })
}

fn error_response(code: u16, status: &str, reason: &str, message: &str) -> Response {
    Response::json(code, &google_error(code, status, reason, message))
}

/// What the API answers for an instance instead of the real thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 404 `NOT_FOUND`, reason `instanceDoesNotExist` (also the answer for an
    /// instance the fake does not have).
    NotFound,
    /// 403 `PERMISSION_DENIED`, reason `notAuthorized`.
    Forbidden,
    /// 429 `RESOURCE_EXHAUSTED`, reason `rateLimitExceeded`.
    Quota,
    /// 500 `INTERNAL`, reason `backendError`.
    Internal,
}

impl Failure {
    pub const ALL: [Failure; 4] = [
        Failure::NotFound,
        Failure::Forbidden,
        Failure::Quota,
        Failure::Internal,
    ];

    pub fn status(self) -> u16 {
        match self {
            Failure::NotFound => 404,
            Failure::Forbidden => 403,
            Failure::Quota => 429,
            Failure::Internal => 500,
        }
    }

    /// The `status` field of the error body.
    pub fn status_name(self) -> &'static str {
        match self {
            Failure::NotFound => "NOT_FOUND",
            Failure::Forbidden => "PERMISSION_DENIED",
            Failure::Quota => "RESOURCE_EXHAUSTED",
            Failure::Internal => "INTERNAL",
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Failure::NotFound => "instanceDoesNotExist",
            Failure::Forbidden => "notAuthorized",
            Failure::Quota => "rateLimitExceeded",
            Failure::Internal => "backendError",
        }
    }

    pub fn message(self) -> String {
        match self {
            Failure::NotFound => "The Cloud SQL instance does not exist.".to_owned(),
            Failure::Forbidden => "The client is not authorized to make this request.".to_owned(),
            Failure::Quota => format!(
                "Quota exceeded for quota metric 'Connect Queries' and limit 'Connect Queries \
                 per minute per user' of service 'sqladmin.googleapis.com' for consumer \
                 'project_number:{PROJECT_NUMBER}'."
            ),
            Failure::Internal => "Internal error encountered.".to_owned(),
        }
    }

    /// The whole JSON error body.
    pub fn body(self) -> Value {
        google_error(
            self.status(),
            self.status_name(),
            self.reason(),
            &self.message(),
        )
    }

    fn response(self) -> Response {
        Response::json(self.status(), &self.body())
    }
}

/// The two methods of the API the connectors call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiMethod {
    ConnectSettings,
    GenerateEphemeralCert,
}

impl ApiMethod {
    /// `connectSettings` / `generateEphemeralCert`, as in the path.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiMethod::ConnectSettings => "connectSettings",
            ApiMethod::GenerateEphemeralCert => "generateEphemeralCert",
        }
    }

    fn index(self) -> usize {
        match self {
            ApiMethod::ConnectSettings => 0,
            ApiMethod::GenerateEphemeralCert => 1,
        }
    }
}

/// One request that named a method.
#[derive(Debug, Clone)]
pub struct ApiCall {
    pub method: ApiMethod,
    /// As decoded from the path.
    pub project: String,
    pub instance: String,
    /// The status answered.
    pub status: u16,
    pub at: SystemTime,
}

// --- instances --------------------------------------------------------------------

/// Who signs the server certificate (`serverCaMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaMode {
    /// `GOOGLE_MANAGED_INTERNAL_CA`: a self-signed per-instance CA; the
    /// server certificate's CN is `{project}:{instance}`.
    GoogleManagedInternal,
    /// `GOOGLE_MANAGED_CAS_CA`: root → intermediate → server certificate with
    /// the DNS name as a SAN.
    GoogleManagedCas,
    /// `CUSTOMER_MANAGED_CAS_CA`: the same shape, the customer's CA names.
    CustomerManagedCas,
}

impl CaMode {
    pub fn as_api_str(self) -> &'static str {
        match self {
            CaMode::GoogleManagedInternal => "GOOGLE_MANAGED_INTERNAL_CA",
            CaMode::GoogleManagedCas => "GOOGLE_MANAGED_CAS_CA",
            CaMode::CustomerManagedCas => "CUSTOMER_MANAGED_CAS_CA",
        }
    }

    fn is_cas(self) -> bool {
        self != CaMode::GoogleManagedInternal
    }
}

/// Where a proxy sends the bytes after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A PostgreSQL Unix socket file (`<socket_dir>/.s.PGSQL.<port>`).
    Postgres { socket: PathBuf },
    /// A MySQL/MariaDB Unix socket file.
    Mysql { socket: PathBuf },
    /// Every byte comes back.
    Echo,
    /// The proxy closes the TLS connection right after the handshake.
    None,
}

impl Backend {
    pub fn postgres(cluster: &PgCluster) -> Backend {
        Backend::Postgres {
            socket: cluster
                .socket_dir
                .join(format!(".s.PGSQL.{}", cluster.port)),
        }
    }

    pub fn mysql(server: &MariaDb) -> Backend {
        Backend::Mysql {
            socket: server.socket_path().to_path_buf(),
        }
    }
}

/// What an instance looks like (see the module docs).
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// As in the connection name; may be domain-scoped (`example.com:proj`).
    pub project: String,
    pub region: String,
    pub name: String,
    /// `POSTGRES_15`, `MYSQL_8_0`, `SQLSERVER_2019_STANDARD`...
    pub database_version: String,
    pub ca_mode: CaMode,
    /// The instance's DNS name; `None` in a CAS mode picks one.
    pub dns_name: Option<String>,
    /// The server certificate's SAN ends with a dot.
    pub san_trailing_dot: bool,
    /// `dnsName` and the names in `dnsNames` end with a dot.
    pub api_trailing_dot: bool,
    /// A `PRIMARY` address.
    pub public_ip: bool,
    /// A `PRIVATE` address.
    pub private_ip: bool,
    /// Private Service Connect (a `dnsNames` entry, see the module docs).
    pub psc: bool,
    /// The server certificate names another instance.
    pub wrong_name: bool,
    pub backend: Backend,
}

impl InstanceSpec {
    /// Project [`DEFAULT_PROJECT`], region [`DEFAULT_REGION`], internal CA,
    /// public IP only; `databaseVersion` by the backend (`POSTGRES_15` unless
    /// it is MySQL, `MYSQL_8_0`).
    pub fn new(name: &str, backend: Backend) -> InstanceSpec {
        let database_version = match backend {
            Backend::Mysql { .. } => "MYSQL_8_0",
            _ => "POSTGRES_15",
        };
        InstanceSpec {
            project: DEFAULT_PROJECT.to_owned(),
            region: DEFAULT_REGION.to_owned(),
            name: name.to_owned(),
            database_version: database_version.to_owned(),
            ca_mode: CaMode::GoogleManagedInternal,
            dns_name: None,
            san_trailing_dot: false,
            api_trailing_dot: false,
            public_ip: true,
            private_ip: false,
            psc: false,
            wrong_name: false,
            backend,
        }
    }

    pub fn postgres(name: &str, cluster: &PgCluster) -> InstanceSpec {
        InstanceSpec::new(name, Backend::postgres(cluster))
    }

    pub fn mysql(name: &str, server: &MariaDb) -> InstanceSpec {
        InstanceSpec::new(name, Backend::mysql(server))
    }

    pub fn connection_name(&self) -> String {
        format!("{}:{}:{}", self.project, self.region, self.name)
    }
}

/// Which address of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpType {
    /// `PRIMARY` in `ipAddresses`.
    Public,
    /// `PRIVATE` in `ipAddresses`.
    Private,
    /// Private Service Connect.
    Psc,
}

/// What a client must find in the server certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIdentity {
    /// A SAN that must match, if the instance has a DNS name.
    pub dns_name: Option<String>,
    /// The CN fallback, `{project}:{instance}`.
    pub instance_cn: String,
}

/// One connection to a proxy.
#[derive(Debug, Clone)]
pub struct ProxyConnection {
    pub instance: String,
    pub ip_type: IpType,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub started: SystemTime,
    /// Ok, or why the handshake failed (rustls's error text, or a timeout).
    pub handshake: Result<(), String>,
    /// The client certificate's serial number, lower-case hex.
    pub client_cert_serial: Option<String>,
    pub client_cert_not_after: Option<SystemTime>,
    /// Whether this fake issued the client certificate.
    pub issued_by_fake: bool,
    /// The `access_token` the certificate was requested with (automatic
    /// IAM login), if any.
    pub access_token: Option<String>,
    /// `None` until the proxy has tried the backend; then Ok or why not.
    pub backend: Option<Result<(), String>>,
    /// Bytes client → backend and back, once the connection is over.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Set when the connection is over.
    pub closed: Option<SystemTime>,
}

/// A certificate `generateEphemeralCert` issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub instance: String,
    /// Lower-case hex.
    pub serial: String,
    pub not_after: SystemTime,
    pub access_token: Option<String>,
}

/// A CA: its certificate and key.
struct Ca {
    cert: Certificate,
    key: KeyPair,
}

/// The server side of an instance's TLS: what the proxy presents and what the
/// API publishes.
struct ServerPki {
    chain: Vec<CertificateDer<'static>>,
    /// The server certificate alone.
    leaf_pem: String,
    key_der: Vec<u8>,
    /// `serverCaCert.cert`.
    ca_pem: String,
    ca_common_name: String,
    ca_der: Vec<u8>,
    created: SystemTime,
    expires: SystemTime,
}

struct Instance {
    spec: InstanceSpec,
    /// Without a trailing dot.
    dns_name: Option<String>,
    psc_dns_name: Option<String>,
    addrs: Vec<(IpType, SocketAddr)>,
    server: ServerPki,
    client_ca: Ca,
    client_ca_pem: String,
    failures: Mutex<[Option<Failure>; 2]>,
    cert_validity: Mutex<Duration>,
    connections: Mutex<Vec<ProxyConnection>>,
}

impl Instance {
    fn addr(&self, kind: IpType) -> Option<SocketAddr> {
        self.addrs.iter().find(|(k, _)| *k == kind).map(|(_, a)| *a)
    }

    fn instance_cn(&self) -> String {
        format!("{}:{}", self.spec.project, self.spec.name)
    }

    /// A name as the API writes it.
    fn api_name(&self, name: &str) -> String {
        if self.spec.api_trailing_dot {
            format!("{name}.")
        } else {
            name.to_owned()
        }
    }
}

/// An instance the fake serves; cheap to clone.
#[derive(Clone)]
pub struct InstanceHandle {
    inner: Arc<Instance>,
}

impl fmt::Debug for InstanceHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "InstanceHandle({}, {:?})",
            self.connection_name(),
            self.inner.addrs
        )
    }
}

impl InstanceHandle {
    pub fn name(&self) -> &str {
        &self.inner.spec.name
    }

    pub fn project(&self) -> &str {
        &self.inner.spec.project
    }

    pub fn region(&self) -> &str {
        &self.inner.spec.region
    }

    pub fn spec(&self) -> &InstanceSpec {
        &self.inner.spec
    }

    /// `project:region:name`.
    pub fn connection_name(&self) -> String {
        self.inner.spec.connection_name()
    }

    /// `{project}:{name}`, the CN of a good internal-CA server certificate.
    pub fn instance_cn(&self) -> String {
        self.inner.instance_cn()
    }

    /// The proxy's address (port 3307) for that IP type, if the instance has it.
    pub fn addr(&self, kind: IpType) -> Option<SocketAddr> {
        self.inner.addr(kind)
    }

    pub fn public_ip(&self) -> Option<IpAddr> {
        self.addr(IpType::Public).map(|a| a.ip())
    }

    pub fn private_ip(&self) -> Option<IpAddr> {
        self.addr(IpType::Private).map(|a| a.ip())
    }

    pub fn psc_ip(&self) -> Option<IpAddr> {
        self.addr(IpType::Psc).map(|a| a.ip())
    }

    /// The PSC entry's name in `dnsNames` (the PSC address as text).
    pub fn psc_dns_name(&self) -> Option<&str> {
        self.inner.psc_dns_name.as_deref()
    }

    /// The instance's DNS name, without a trailing dot.
    pub fn dns_name(&self) -> Option<&str> {
        self.inner.dns_name.as_deref()
    }

    /// `serverCaCert.cert` (one PEM, or intermediate + root).
    pub fn server_ca_pem(&self) -> &str {
        &self.inner.server.ca_pem
    }

    /// The certificate the proxies present (without the intermediate).
    pub fn server_cert_pem(&self) -> &str {
        &self.inner.server.leaf_pem
    }

    /// The CA that signs the ephemeral certificates (the proxy trusts it).
    pub fn client_ca_pem(&self) -> &str {
        &self.inner.client_ca_pem
    }

    /// What a correct client checks the server certificate against.
    pub fn identity(&self) -> ServerIdentity {
        ServerIdentity {
            dns_name: self.inner.dns_name.clone(),
            instance_cn: self.instance_cn(),
        }
    }
}

// --- the fake ---------------------------------------------------------------------

struct State {
    tokens: Mutex<HashSet<String>>,
    instances: Mutex<HashMap<String, Arc<Instance>>>,
    /// Serial number → what was issued.
    issued: Mutex<HashMap<u128, IssuedCert>>,
    calls: Mutex<Vec<ApiCall>>,
    login_tokens: Mutex<Vec<String>>,
    token_expiry: Mutex<HashMap<String, SystemTime>>,
}

/// The SQL Admin API and the instances' proxies (see the module docs).
pub struct FakeSqlAdmin {
    http: HttpFake,
    state: Arc<State>,
    admin_token: String,
    /// Runs the proxies.
    runtime: Option<Runtime>,
}

impl Deref for FakeSqlAdmin {
    type Target = HttpFake;
    fn deref(&self) -> &HttpFake {
        &self.http
    }
}

impl Drop for FakeSqlAdmin {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl FakeSqlAdmin {
    /// An API with no instances that accepts one fresh random token.
    pub fn start() -> FakeSqlAdmin {
        let admin_token = format!("ya29.{}", random_string(120, TOKEN_ALPHABET));
        let state = Arc::new(State {
            tokens: Mutex::new(HashSet::from([admin_token.clone()])),
            instances: Mutex::new(HashMap::new()),
            issued: Mutex::new(HashMap::new()),
            calls: Mutex::new(Vec::new()),
            login_tokens: Mutex::new(Vec::new()),
            token_expiry: Mutex::new(HashMap::new()),
        });
        let handler_state = state.clone();
        let http = HttpFake::start("fake SQL Admin API", "application/json", &[], move |_| {
            Arc::new(move |req: &Request| answer(req, &handler_state))
        });
        FakeSqlAdmin {
            http,
            state,
            admin_token,
            runtime: Some(super::runtime()),
        }
    }

    /// The token [`FakeSqlAdmin::start`] accepts.
    pub fn admin_token(&self) -> String {
        self.admin_token.clone()
    }

    /// Accepts `token` as a bearer token from now on.
    pub fn accept_token(&self, token: &str) {
        lock(&self.state.tokens).insert(token.to_owned());
    }

    /// Stops accepting `token` (the next request with it gets 401).
    pub fn revoke_token(&self, token: &str) {
        lock(&self.state.tokens).remove(token);
    }

    /// Certificates requested with `access_token` = `token` expire no later
    /// than `at`.
    pub fn set_login_token_expiry(&self, token: &str, at: SystemTime) {
        lock(&self.state.token_expiry).insert(token.to_owned(), at);
    }

    /// Adds an instance and starts its proxies (one per IP type it has).
    /// Panics if an instance of that name exists.
    pub fn add_instance(&self, spec: InstanceSpec) -> InstanceHandle {
        assert!(
            !lock(&self.state.instances).contains_key(&spec.name),
            "the fake already has an instance called {}",
            spec.name
        );
        assert!(
            !spec.name.is_empty() && !spec.name.contains([':', '/']),
            "not an instance name: {:?}",
            spec.name
        );
        let runtime = self.runtime.as_ref().expect("the fake's runtime");
        let kinds = [
            (IpType::Public, spec.public_ip),
            (IpType::Private, spec.private_ip),
            (IpType::Psc, spec.psc),
        ];
        let mut listeners = Vec::new();
        for (kind, wanted) in kinds {
            if wanted {
                let listener = bind_instance_address(&spec.name);
                let addr = listener.local_addr().expect("the proxy's address");
                listeners.push((kind, addr, listener));
            }
        }
        let dns_name = match (&spec.dns_name, spec.ca_mode.is_cas()) {
            (Some(name), _) => Some(name.trim_end_matches('.').to_owned()),
            (None, true) => Some(format!(
                "{}.{}.{}.sql.goog",
                spec.name,
                random_string(12, b"0123456789abcdef"),
                spec.region
            )),
            (None, false) => None,
        };
        let psc_dns_name = listeners
            .iter()
            .find(|(kind, _, _)| *kind == IpType::Psc)
            .map(|(_, addr, _)| addr.ip().to_string());
        let server = server_pki(&spec, dns_name.as_deref());
        let client_ca = make_ca(
            &format!("Google Cloud SQL Client CA {}:{}", spec.project, spec.name),
            None,
        );
        let client_ca_pem = client_ca.cert.pem();
        let instance = Arc::new(Instance {
            dns_name,
            psc_dns_name,
            addrs: listeners.iter().map(|(k, a, _)| (*k, *a)).collect(),
            server,
            client_ca,
            client_ca_pem,
            failures: Mutex::new([None, None]),
            cert_validity: Mutex::new(DEFAULT_CERT_VALIDITY),
            connections: Mutex::new(Vec::new()),
            spec,
        });
        let acceptor = tls_acceptor(&instance);
        for (kind, _, listener) in listeners {
            listener
                .set_nonblocking(true)
                .expect("make the proxy's socket non-blocking");
            let _guard = runtime.enter();
            let listener = TcpListener::from_std(listener).expect("register the proxy's socket");
            runtime.spawn(proxy_accept_loop(
                listener,
                kind,
                instance.clone(),
                self.state.clone(),
                acceptor.clone(),
            ));
        }
        lock(&self.state.instances).insert(instance.spec.name.clone(), instance.clone());
        InstanceHandle { inner: instance }
    }

    /// The instance called `name`; panics if there is none.
    pub fn instance(&self, name: &str) -> InstanceHandle {
        InstanceHandle {
            inner: self.instance_arc(name),
        }
    }

    fn instance_arc(&self, name: &str) -> Arc<Instance> {
        lock(&self.state.instances)
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("the fake has no instance called {name}"))
    }

    /// Makes both methods fail for `instance` (`None`: answer again).
    pub fn set_failure(&self, instance: &str, failure: Option<Failure>) {
        *lock(&self.instance_arc(instance).failures) = [failure, failure];
    }

    /// Makes one method fail for `instance` (`None`: that method answers again).
    pub fn set_method_failure(&self, instance: &str, method: ApiMethod, failure: Option<Failure>) {
        lock(&self.instance_arc(instance).failures)[method.index()] = failure;
    }

    /// How long the next ephemeral certificates for `instance` are valid.
    pub fn set_cert_validity(&self, instance: &str, validity: Duration) {
        *lock(&self.instance_arc(instance).cert_validity) = validity;
    }

    /// Requests that named `method`, whatever the answer.
    pub fn calls(&self, method: ApiMethod) -> usize {
        lock(&self.state.calls)
            .iter()
            .filter(|c| c.method == method)
            .count()
    }

    /// Requests that named `method` for `instance`, whatever the answer.
    pub fn calls_for(&self, instance: &str, method: ApiMethod) -> usize {
        lock(&self.state.calls)
            .iter()
            .filter(|c| c.method == method && c.instance == instance)
            .count()
    }

    /// Every request that named a method, oldest first.
    pub fn api_calls(&self) -> Vec<ApiCall> {
        lock(&self.state.calls).clone()
    }

    /// The non-empty `access_token`s of `generateEphemeralCert` bodies, in order.
    pub fn login_tokens(&self) -> Vec<String> {
        lock(&self.state.login_tokens).clone()
    }

    /// Every certificate issued, in no particular order.
    pub fn issued_certs(&self) -> Vec<IssuedCert> {
        lock(&self.state.issued).values().cloned().collect()
    }

    /// The connections `instance`'s proxies have seen, oldest first.
    pub fn connections(&self, instance: &str) -> Vec<ProxyConnection> {
        lock(&self.instance_arc(instance).connections).clone()
    }

    /// Why each failed handshake with `instance`'s proxies failed.
    pub fn handshake_errors(&self, instance: &str) -> Vec<String> {
        self.connections(instance)
            .into_iter()
            .filter_map(|c| c.handshake.err())
            .collect()
    }

    /// Waits until `instance`'s proxies have recorded `n` connections; panics
    /// after `timeout`.
    pub fn wait_for_connections(
        &self,
        instance: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<ProxyConnection> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.connections(instance);
            if seen.len() >= n {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "{instance}: {} of {n} proxy connections within {timeout:?}: {seen:#?}",
                seen.len()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

// --- the API ----------------------------------------------------------------------

/// (method, project, instance) of a request, if its path and verb name one.
fn parse_call(req: &Request) -> Option<(ApiMethod, String, String)> {
    let path = sigv4::percent_decode(&req.path).unwrap_or_else(|_| req.path.clone());
    let rest = path.strip_prefix(API_PREFIX)?;
    let (project, rest) = rest.split_once("/instances/")?;
    let (method, instance) = if let Some(i) = rest.strip_suffix("/connectSettings") {
        (ApiMethod::ConnectSettings, i)
    } else if let Some(i) = rest.strip_suffix(":generateEphemeralCert") {
        (ApiMethod::GenerateEphemeralCert, i)
    } else {
        return None;
    };
    let verb = match method {
        ApiMethod::ConnectSettings => "GET",
        ApiMethod::GenerateEphemeralCert => "POST",
    };
    let plain = |s: &str| !s.is_empty() && !s.contains('/');
    (req.method == verb && plain(project) && plain(instance) && !instance.contains(':'))
        .then(|| (method, project.to_owned(), instance.to_owned()))
}

fn answer(req: &Request, state: &State) -> Response {
    let Some((method, project, instance)) = parse_call(req) else {
        return error_response(404, "NOT_FOUND", "notFound", "Method not found.");
    };
    let response = answer_call(req, state, method, &project, &instance);
    lock(&state.calls).push(ApiCall {
        method,
        project,
        instance,
        status: response.status,
        at: SystemTime::now(),
    });
    response
}

fn unauthenticated(reason: &str, message: &str) -> Response {
    let mut body = google_error(401, "UNAUTHENTICATED", reason, message);
    body["error"]["errors"][0]["location"] = json!("Authorization");
    body["error"]["errors"][0]["locationType"] = json!("header");
    Response::json(401, &body).with_header(
        "WWW-Authenticate",
        "Bearer realm=\"https://accounts.google.com/\"",
    )
}

/// The `Authorization` check: Ok, or the 401 to send.
fn authorize(req: &Request, state: &State) -> Result<(), Response> {
    const SEE: &str = "Expected OAuth 2 access token, login cookie or other valid authentication \
                       credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";
    let token = req.header("authorization").and_then(|v| {
        let (scheme, token) = v.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned())
    });
    match token {
        None => Err(unauthenticated(
            "required",
            &format!("Request is missing required authentication credential. {SEE}"),
        )),
        Some(t) if lock(&state.tokens).contains(&t) => Ok(()),
        Some(_) => Err(unauthenticated(
            "authError",
            &format!("Request had invalid authentication credentials. {SEE}"),
        )),
    }
}

fn answer_call(
    req: &Request,
    state: &State,
    method: ApiMethod,
    project: &str,
    instance_name: &str,
) -> Response {
    if let Err(denied) = authorize(req, state) {
        return denied;
    }
    let body = match method {
        ApiMethod::ConnectSettings => Value::Null,
        ApiMethod::GenerateEphemeralCert => match serde_json::from_slice::<Value>(&req.body) {
            Ok(body) if body.is_object() => body,
            _ => {
                return error_response(
                    400,
                    "INVALID_ARGUMENT",
                    "badRequest",
                    "Invalid JSON payload received. Expected a JSON object.",
                )
            }
        },
    };
    let field = |snake: &str, camel: &str| {
        body.get(snake)
            .or_else(|| body.get(camel))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let access_token = field("access_token", "accessToken").filter(|t| !t.is_empty());
    if let Some(token) = &access_token {
        lock(&state.login_tokens).push(token.clone());
    }
    let instance = lock(&state.instances).get(instance_name).cloned();
    let Some(instance) = instance.filter(|i| i.spec.project == project) else {
        return Failure::NotFound.response();
    };
    if let Some(failure) = lock(&instance.failures)[method.index()] {
        return failure.response();
    }
    match method {
        ApiMethod::ConnectSettings => Response::json(200, &connect_settings(&instance)),
        ApiMethod::GenerateEphemeralCert => {
            let Some(pem) = field("public_key", "publicKey") else {
                return error_response(
                    400,
                    "INVALID_ARGUMENT",
                    "invalid",
                    "Invalid request: public_key is required.",
                );
            };
            match issue_cert(state, &instance, &pem, access_token) {
                Ok(cert) => Response::json(200, &json!({ "ephemeralCert": cert })),
                Err(why) => error_response(
                    400,
                    "INVALID_ARGUMENT",
                    "invalid",
                    &format!("Invalid request: invalid public key ({why})."),
                ),
            }
        }
    }
}

fn connect_settings(instance: &Instance) -> Value {
    let spec = &instance.spec;
    let server = &instance.server;
    let mut ip_addresses = Vec::new();
    for (kind, label) in [(IpType::Public, "PRIMARY"), (IpType::Private, "PRIVATE")] {
        if let Some(addr) = instance.addr(kind) {
            ip_addresses.push(json!({"type": label, "ipAddress": addr.ip().to_string()}));
        }
    }
    let mut settings = json!({
        "kind": "sql#connectSettings",
        "serverCaCert": {
            "kind": "sql#sslCert",
            "certSerialNumber": "0",
            "cert": server.ca_pem,
            "commonName": server.ca_common_name,
            "sha1Fingerprint": sha1_hex(&server.ca_der),
            "instance": spec.name,
            "createTime": rfc3339(server.created),
            "expirationTime": rfc3339(server.expires),
        },
        "ipAddresses": ip_addresses,
        "region": spec.region,
        "databaseVersion": spec.database_version,
        "backendType": "SECOND_GEN",
        "pscEnabled": spec.psc,
        "serverCaMode": spec.ca_mode.as_api_str(),
    });
    let mut dns_names = Vec::new();
    if let Some(name) = &instance.dns_name {
        let name = instance.api_name(name);
        if spec.public_ip {
            dns_names
                .push(json!({"name": name, "connectionType": "PUBLIC", "dnsScope": "INSTANCE"}));
        }
        if spec.private_ip {
            dns_names.push(json!({
                "name": name,
                "connectionType": "PRIVATE_SERVICES_ACCESS",
                "dnsScope": "INSTANCE",
            }));
        }
    }
    if let Some(psc) = &instance.psc_dns_name {
        dns_names.push(json!({
            "name": psc,
            "connectionType": "PRIVATE_SERVICE_CONNECT",
            "dnsScope": "INSTANCE",
        }));
    }
    let legacy = match (&instance.dns_name, &instance.psc_dns_name) {
        (Some(name), _) => Some(instance.api_name(name)),
        (None, psc) => psc.clone(),
    };
    if let Some(name) = legacy {
        settings["dnsName"] = json!(name);
    }
    if !dns_names.is_empty() {
        settings["dnsNames"] = json!(dns_names);
    }
    settings
}

/// Decodes a PEM block: (label, DER). Only the first block counts.
fn pem_decode(pem: &str) -> Result<(String, Vec<u8>), String> {
    let start = pem.find("-----BEGIN ").ok_or("no PEM header")?;
    let rest = &pem[start + "-----BEGIN ".len()..];
    let (label, rest) = rest.split_once("-----").ok_or("a broken PEM header")?;
    let footer = format!("-----END {label}-----");
    let body = rest
        .split(&footer)
        .next()
        .filter(|_| rest.contains(&footer));
    let body = body.ok_or("no PEM footer")?;
    let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    let der = STANDARD
        .decode(b64)
        .map_err(|e| format!("bad base64: {e}"))?;
    Ok((label.to_owned(), der))
}

/// A PEM block.
fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

fn sha1_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// 16 random bytes as a positive serial number (first byte 0x01..=0x7f, so
/// no leading zero byte is lost on the way back).
fn random_serial() -> Option<u128> {
    let mut bytes = [0u8; 16];
    SystemRandom::new().fill(&mut bytes).ok()?;
    bytes[0] = (bytes[0] & 0x7f).max(1);
    Some(u128::from_be_bytes(bytes))
}

/// Signs an ephemeral certificate for the public key in `pem`: the JSON of
/// `ephemeralCert`, or why the key is not acceptable.
fn issue_cert(
    state: &State,
    instance: &Instance,
    pem: &str,
    access_token: Option<String>,
) -> Result<Value, String> {
    let (label, der) = pem_decode(pem)?;
    if label != "RSA PUBLIC KEY" && label != "PUBLIC KEY" {
        return Err(format!("unexpected PEM label {label}"));
    }
    let spki = SubjectPublicKeyInfo::from_der(&der)
        .map_err(|e| format!("not a SubjectPublicKeyInfo: {e}"))?;
    if spki.algorithm() != &rcgen::PKCS_RSA_SHA256 {
        return Err("not an RSA key".to_owned());
    }
    let serial = random_serial().ok_or("no randomness")?;
    let now = SystemTime::now();
    let mut not_after = now + *lock(&instance.cert_validity);
    if let Some(token) = &access_token {
        if let Some(limit) = lock(&state.token_expiry).get(token) {
            not_after = not_after.min(*limit);
        }
    }
    let common_name = format!("cloudsql-ephemeral-{serial:032x}");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name.as_str());
    params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
    set_validity(&mut params, now - BACKDATE, not_after);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&spki, &instance.client_ca.cert, &instance.client_ca.key)
        .map_err(|e| format!("signing failed: {e}"))?;
    // The recorded notAfter is what the certificate says (whole seconds).
    let not_after = UNIX_EPOCH + Duration::from_secs(unix_secs(not_after));
    lock(&state.issued).insert(
        serial,
        IssuedCert {
            instance: instance.spec.name.clone(),
            serial: format!("{serial:x}"),
            not_after,
            access_token,
        },
    );
    Ok(json!({
        "kind": "sql#sslCert",
        "certSerialNumber": serial.to_string(),
        "cert": cert.pem(),
        "commonName": common_name,
        "sha1Fingerprint": sha1_hex(cert.der()),
        "instance": instance.spec.name,
        "createTime": rfc3339(now),
        "expirationTime": rfc3339(not_after),
    }))
}

// --- certificates -----------------------------------------------------------------

/// A fresh CA called `cn`: self-signed, or signed by `parent`.
fn make_ca(cn: &str, parent: Option<&Ca>) -> Ca {
    let key = KeyPair::generate().expect("generate a CA key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CountryName, "US");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Google, Inc");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = random_serial().map(|s| SerialNumber::from_slice(&s.to_be_bytes()));
    let now = SystemTime::now();
    set_validity(&mut params, now - BACKDATE, now + SERVER_CERT_LIFETIME);
    let cert = match parent {
        None => params.self_signed(&key),
        Some(parent) => {
            params.use_authority_key_identifier_extension = true;
            params.signed_by(&key, &parent.cert, &parent.key)
        }
    }
    .expect("sign a CA certificate");
    Ca { cert, key }
}

/// The server certificate, its chain and `serverCaCert` for `spec`.
fn server_pki(spec: &InstanceSpec, dns_name: Option<&str>) -> ServerPki {
    let (issuer, sent_chain, published, ca_common_name) = if spec.ca_mode.is_cas() {
        let (root_cn, intermediate_cn) = match spec.ca_mode {
            CaMode::CustomerManagedCas => (
                format!("{} Customer Root CA", spec.project),
                format!("{} Customer Intermediate CA", spec.project),
            ),
            _ => (
                "Google Cloud SQL Root CA".to_owned(),
                format!("Google Cloud SQL Server CA {}", spec.region),
            ),
        };
        let root = make_ca(&root_cn, None);
        let intermediate = make_ca(&intermediate_cn, Some(&root));
        let published = format!("{}{}", intermediate.cert.pem(), root.cert.pem());
        let chain = vec![intermediate.cert.der().clone()];
        (intermediate, chain, published, intermediate_cn)
    } else {
        let ca = make_ca("Google Cloud SQL Server CA", None);
        let published = ca.cert.pem();
        (
            ca,
            Vec::new(),
            published,
            "Google Cloud SQL Server CA".to_owned(),
        )
    };

    let key = KeyPair::generate().expect("generate the server key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CountryName, "US");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Google, Inc");
    let (cn, san) = if spec.wrong_name {
        (
            format!("{}:some-other-instance", spec.project),
            Some("other.example.invalid".to_owned()),
        )
    } else if spec.ca_mode.is_cas() {
        let name = dns_name.expect("a CAS instance has a DNS name");
        let san = if spec.san_trailing_dot {
            format!("{name}.")
        } else {
            name.to_owned()
        };
        (name.to_owned(), Some(san))
    } else {
        (format!("{}:{}", spec.project, spec.name), None)
    };
    params.distinguished_name.push(DnType::CommonName, cn);
    if let Some(san) = san {
        params.subject_alt_names = vec![SanType::DnsName(
            san.try_into().expect("a SAN rcgen accepts"),
        )];
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = random_serial().map(|s| SerialNumber::from_slice(&s.to_be_bytes()));
    let now = SystemTime::now();
    set_validity(&mut params, now - BACKDATE, now + SERVER_CERT_LIFETIME);
    let leaf = params
        .signed_by(&key, &issuer.cert, &issuer.key)
        .expect("sign the server certificate");
    let mut chain = vec![leaf.der().clone()];
    chain.extend(sent_chain);
    ServerPki {
        leaf_pem: leaf.pem(),
        chain,
        key_der: key.serialize_der(),
        ca_pem: published,
        ca_common_name,
        ca_der: issuer.cert.der().to_vec(),
        created: now - BACKDATE,
        expires: UNIX_EPOCH + Duration::from_secs(unix_secs(now + SERVER_CERT_LIFETIME)),
    }
}

/// TLS 1.3 only, a client certificate from the instance's client CA required.
fn tls_acceptor(instance: &Instance) -> TlsAcceptor {
    let mut roots = RootCertStore::empty();
    roots
        .add(instance.client_ca.cert.der().clone())
        .expect("trust the client CA");
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .expect("the client certificate verifier");
    let key = PrivateKeyDer::try_from(instance.server.key_der.clone()).expect("the server key");
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_single_cert(instance.server.chain.clone(), key)
        .expect("the proxy's TLS configuration");
    TlsAcceptor::from(Arc::new(config))
}

// --- the proxies ------------------------------------------------------------------

/// A listener on port 3307 of an unused 127.77.x.y.
fn bind_instance_address(instance: &str) -> std::net::TcpListener {
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let mut start = [0u8; 4];
        let _ = SystemRandom::new().fill(&mut start);
        AtomicU32::new(u32::from_be_bytes(start))
    });
    let mut last = None;
    for _ in 0..500 {
        let n = next.fetch_add(1, Ordering::Relaxed) % (254 * 254);
        // Neither .0 nor .255 in the last two octets.
        let ip = Ipv4Addr::new(127, 77, (n / 254 + 1) as u8, (n % 254 + 1) as u8);
        match std::net::TcpListener::bind((ip, SERVER_PROXY_PORT)) {
            Ok(listener) => return listener,
            Err(e) => last = Some(format!("{ip}:{SERVER_PROXY_PORT}: {e}")),
        }
    }
    panic!(
        "{instance}: no free 127.77.x.y:{SERVER_PROXY_PORT} (is something listening on \
         0.0.0.0:{SERVER_PROXY_PORT}?); last error {last:?}"
    )
}

async fn proxy_accept_loop(
    listener: TcpListener,
    kind: IpType,
    instance: Arc<Instance>,
    state: Arc<State>,
    acceptor: TlsAcceptor,
) {
    loop {
        match listener.accept().await {
            Ok((socket, peer)) => {
                tokio::spawn(proxy_connection(
                    socket,
                    peer,
                    kind,
                    instance.clone(),
                    state.clone(),
                    acceptor.clone(),
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// The client certificate's serial and notAfter, and what the fake issued
/// under that serial.
fn client_cert_info(
    state: &State,
    der: Option<&CertificateDer<'_>>,
) -> (Option<CertInfo>, Option<IssuedCert>) {
    let Some(info) = der.and_then(|der| cert_info(der).ok()) else {
        return (None, None);
    };
    let issued = u128::from_str_radix(&info.serial, 16)
        .ok()
        .and_then(|serial| lock(&state.issued).get(&serial).cloned());
    (Some(info), issued)
}

async fn proxy_connection(
    socket: TcpStream,
    peer: SocketAddr,
    kind: IpType,
    instance: Arc<Instance>,
    state: Arc<State>,
    acceptor: TlsAcceptor,
) {
    let local = socket
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let started = SystemTime::now();
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await;
    let mut record = ProxyConnection {
        instance: instance.spec.name.clone(),
        ip_type: kind,
        local,
        peer,
        started,
        handshake: Ok(()),
        client_cert_serial: None,
        client_cert_not_after: None,
        issued_by_fake: false,
        access_token: None,
        backend: None,
        bytes_up: 0,
        bytes_down: 0,
        closed: None,
    };
    let mut tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            record.handshake = Err(e.to_string());
            record.closed = Some(SystemTime::now());
            lock(&instance.connections).push(record);
            return;
        }
        Err(_) => {
            record.handshake = Err(format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"));
            record.closed = Some(SystemTime::now());
            lock(&instance.connections).push(record);
            return;
        }
    };
    let (info, issued) = client_cert_info(
        &state,
        tls.get_ref().1.peer_certificates().and_then(|c| c.first()),
    );
    record.client_cert_serial = info.as_ref().map(|i| i.serial.clone());
    record.client_cert_not_after = info.map(|i| i.not_after);
    record.issued_by_fake = issued.is_some();
    record.access_token = issued.and_then(|i| i.access_token);
    let index = {
        let mut connections = lock(&instance.connections);
        connections.push(record);
        connections.len() - 1
    };
    let update = |f: &dyn Fn(&mut ProxyConnection)| {
        if let Some(c) = lock(&instance.connections).get_mut(index) {
            f(c);
        }
    };

    let socket_path = match &instance.spec.backend {
        Backend::Postgres { socket } | Backend::Mysql { socket } => socket.clone(),
        Backend::Echo => {
            update(&|c| c.backend = Some(Ok(())));
            let (mut reader, mut writer) = tokio::io::split(tls);
            let copied = tokio::io::copy(&mut reader, &mut writer).await;
            let _ = writer.shutdown().await;
            let n = copied.unwrap_or(0);
            update(&|c| {
                c.bytes_up = n;
                c.bytes_down = n;
                c.closed = Some(SystemTime::now());
            });
            return;
        }
        Backend::None => {
            let _ = tls.shutdown().await;
            update(&|c| c.closed = Some(SystemTime::now()));
            return;
        }
    };
    let mut backend = match UnixStream::connect(&socket_path).await {
        Ok(stream) => stream,
        Err(e) => {
            let why = format!("connect to {}: {e}", socket_path.display());
            update(&|c| {
                c.backend = Some(Err(why.clone()));
                c.closed = Some(SystemTime::now());
            });
            let _ = tls.shutdown().await;
            return;
        }
    };
    update(&|c| c.backend = Some(Ok(())));
    // Errors at the end of a connection (resets, a missing close_notify) are
    // the client's business.
    let (up, down) = tokio::io::copy_bidirectional(&mut tls, &mut backend)
        .await
        .unwrap_or((0, 0));
    update(&|c| {
        c.bytes_up = up;
        c.bytes_down = down;
        c.closed = Some(SystemTime::now());
    });
}

// --- database setup ---------------------------------------------------------------

/// Quotes a role name for SQL and `pg_hba.conf`.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A TLS cluster (as `PgOptions::default()`) whose Unix socket lets the test
/// users in as over TCP ([`PG_HBA`]), each of `iam_users` by `trust` first
/// (the fake proxy is Cloud SQL's only door; Cloud SQL itself checks the
/// token). Create the IAM roles with [`create_pg_iam_user`].
pub fn pg_options(iam_users: &[&str]) -> PgOptions {
    let mut extra_hba: Vec<String> = iam_users
        .iter()
        .map(|user| format!("local all {} trust", quote_ident(user)))
        .collect();
    extra_hba.extend(PG_HBA.iter().map(|line| (*line).to_owned()));
    PgOptions {
        extra_hba,
        ..PgOptions::default()
    }
}

/// `CREATE ROLE "<user>" LOGIN` (e.g. `sa@project.iam`), with the test
/// users' grants.
pub fn create_pg_iam_user(cluster: &PgCluster, user: &str) {
    let role = quote_ident(user);
    cluster.admin_sql(&format!(
        "CREATE ROLE {role} LOGIN; GRANT pg_read_all_stats TO {role};"
    ));
}

/// `<user>@'%'` without a password, ALL on `keyhole_test` (idempotent): the
/// MySQL side of automatic IAM login, where the client sends the IAM user's
/// name and no password.
pub fn create_mysql_iam_user(server: &MariaDb, user: &str) {
    let user = user.replace('\'', "''");
    server.admin_sql(&format!(
        "CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED VIA mysql_native_password USING ''; \
         GRANT ALL ON {DATABASE}.* TO '{user}'@'%';"
    ));
}

// --- a reference client -----------------------------------------------------------

/// An RSA-2048 client key, as a connector makes one.
#[derive(Clone)]
pub struct ClientKey {
    /// PKCS#8 (`-----BEGIN PRIVATE KEY-----`).
    pub private_key_pem: String,
    /// The PKIX SubjectPublicKeyInfo under the label `RSA PUBLIC KEY`, as
    /// Google's Go connector sends it.
    pub public_key_pem: String,
    /// The same under `PUBLIC KEY`.
    pub spki_pem: String,
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientKey(RSA-2048, private key redacted)")
    }
}

impl ClientKey {
    /// A fresh key made by `openssl genpkey`.
    pub fn generate() -> ClientKey {
        let dir = super::scratch_dir("keyhole-cloudsql-key-");
        let (key, public) = (dir.path().join("key.pem"), dir.path().join("public.pem"));
        let run = |args: &[&str]| {
            let mut cmd = Command::new("openssl");
            cmd.args(args);
            let out = output_with_timeout(&mut cmd, Duration::from_secs(60));
            assert!(
                out.status.success(),
                "openssl {args:?} failed:\n{}",
                describe_output(&out)
            );
        };
        let (key_arg, public_arg) = (
            key.to_str().expect("UTF-8 path"),
            public.to_str().expect("UTF-8 path"),
        );
        run(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            key_arg,
        ]);
        run(&["pkey", "-in", key_arg, "-pubout", "-out", public_arg]);
        let spki_pem = std::fs::read_to_string(&public).expect("read the public key");
        let (label, der) = pem_decode(&spki_pem).expect("openssl's public key PEM");
        assert_eq!(label, "PUBLIC KEY", "openssl -pubout writes an SPKI");
        ClientKey {
            private_key_pem: std::fs::read_to_string(&key).expect("read the private key"),
            public_key_pem: pem_encode("RSA PUBLIC KEY", &der),
            spki_pem,
        }
    }
}

/// `/sql/v1beta4/projects/{project}/instances/{instance}/connectSettings`,
/// the project's `:` written `%3A` as Google's client libraries do.
pub fn connect_settings_path(project: &str, instance: &str) -> String {
    format!(
        "{API_PREFIX}{}/instances/{instance}/connectSettings",
        project.replace(':', "%3A")
    )
}

/// `/sql/v1beta4/projects/{project}/instances/{instance}:generateEphemeralCert`.
pub fn generate_ephemeral_cert_path(project: &str, instance: &str) -> String {
    format!(
        "{API_PREFIX}{}/instances/{instance}:generateEphemeralCert",
        project.replace(':', "%3A")
    )
}

/// One blocking request to `base_url` (`http://127.0.0.1:PORT`):
/// `Authorization: Bearer <bearer>` if given, `body` as JSON if given. Returns
/// the status and the body (JSON, or a JSON string if it is not JSON).
pub fn api_request(
    base_url: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let authority = base_url
        .strip_prefix("http://")
        .ok_or_else(|| format!("not an http:// URL: {base_url}"))?
        .trim_end_matches('/');
    let addr: SocketAddr = authority
        .parse()
        .map_err(|e| format!("not IP:PORT: {authority}: {e}"))?;
    let mut stream = StdTcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| format!("set a timeout: {e}"))?;
    let body_text = body.map(Value::to_string).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: keyhole-tests\r\n\
         Accept: application/json\r\nConnection: close\r\nContent-Length: {}\r\n",
        body_text.len()
    );
    if body.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    if let Some(token) = bearer {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body_text.as_bytes()))
        .map_err(|e| format!("send the request: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read the answer: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    let value = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()));
    Ok((status, value))
}

/// Checks a Cloud SQL server certificate as the Go connector does: the chain
/// must end at one of `serverCaCert`'s certificates; then a DNS SAN equal to
/// the instance's DNS name (case and a trailing dot ignored, on either side)
/// passes, else the CN must be `{project}:{instance}`.
#[derive(Debug)]
pub struct CloudSqlVerifier {
    roots: RootCertStore,
    identity: ServerIdentity,
}

impl CloudSqlVerifier {
    pub fn new(server_ca_pem: &str, identity: ServerIdentity) -> CloudSqlVerifier {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(server_ca_pem.as_bytes()) {
            roots
                .add(cert.expect("a serverCaCert PEM"))
                .expect("trust serverCaCert");
        }
        CloudSqlVerifier { roots, identity }
    }

    /// The name check alone.
    pub fn check_name(&self, der: &CertificateDer<'_>) -> Result<(), String> {
        let info = cert_info(der)?;
        let norm = |s: &str| s.trim_end_matches('.').to_ascii_lowercase();
        if let Some(dns) = &self.identity.dns_name {
            if info.dns_names.iter().any(|san| norm(san) == norm(dns)) {
                return Ok(());
            }
        }
        if info.common_name.as_deref() == Some(self.identity.instance_cn.as_str()) {
            return Ok(());
        }
        Err(format!(
            "the server certificate (CN {:?}, SANs {:?}) is not for {:?}",
            info.common_name, info.dns_names, self.identity
        ))
    }
}

impl ServerCertVerifier for CloudSqlVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            provider().signature_verification_algorithms.all,
        )?;
        self.check_name(end_entity)
            .map_err(rustls::Error::General)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not Cloud SQL's".to_owned(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS 1.3 client configuration: `client` = (certificate PEM, PKCS#8 key
/// PEM), or none; the server checked by [`CloudSqlVerifier`].
pub fn client_tls_config(
    client: Option<(&str, &str)>,
    server_ca_pem: &str,
    identity: ServerIdentity,
) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CloudSqlVerifier::new(server_ca_pem, identity)));
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .expect("the client certificate PEM");
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("the client key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("the client certificate and key")
        }
    };
    Arc::new(config)
}

/// TCP to `addr`, then TLS with `config` (no SNI: the name is an address).
pub async fn dial(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<client::TlsStream<TcpStream>> {
    let socket = TcpStream::connect(addr).await?;
    TlsConnector::from(config)
        .connect(ServerName::IpAddress(addr.ip().into()), socket)
        .await
}
