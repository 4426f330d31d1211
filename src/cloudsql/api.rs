//! The two SQL Admin API (v1beta4) calls the connector makes, from their
//! documented contract:
//!
//! - `GET {endpoint}/sql/v1beta4/projects/{project}/instances/{instance}/connectSettings`:
//!   the instance's region, engine, addresses, DNS names and server CA;
//! - `POST {endpoint}/sql/v1beta4/projects/{project}/instances/{instance}:generateEphemeralCert`
//!   with `{"public_key": PEM, "access_token": TOKEN?}`: a short-lived
//!   client certificate for keyhole's key (the token only for automatic
//!   IAM database login).
//!
//! Both carry `Authorization: Bearer` with a token of the admin scope and,
//! with `--quota-project`, `X-Goog-User-Project`. A failed call becomes an
//! [`ApiError`] that says what the user can do about it; response bodies are
//! read only for Google's error `status` and `reason` codes, never echoed.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};

use super::name::InstanceName;
use crate::credentials::{CredentialsError, Token, TokenCache, TokenRequest};
use crate::http::client::{self as http_client, HttpError, Request, Response, Url};
use crate::metrics::TargetMetrics;

/// The public endpoint, for the default universe `googleapis.com`.
pub const DEFAULT_ENDPOINT: &str = "https://sqladmin.googleapis.com";

/// How the connector reaches the Admin API.
pub struct AdminApi {
    /// Without a trailing slash.
    endpoint: String,
    /// Tokens of the admin scope (or `--token`).
    tokens: Arc<TokenCache>,
    /// `--quota-project`.
    quota_project: Option<String>,
    /// Bound on one call, token included.
    timeout: Duration,
}

/// One address of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpType {
    /// `PRIMARY`: the public address.
    Public,
    /// `PRIVATE`: the VPC address.
    Private,
}

/// What `connectSettings` says about an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectSettings {
    pub region: String,
    /// `POSTGRES_15`, `MYSQL_8_0`, `SQLSERVER_2019_STANDARD`, ...
    pub database_version: String,
    pub ip_addresses: Vec<(IpType, IpAddr)>,
    pub psc_enabled: bool,
    /// The PSC DNS name, if the instance has one.
    pub psc_dns_name: Option<String>,
    /// Every DNS name the server certificate may carry.
    pub dns_names: Vec<String>,
    /// PEM, possibly several certificates.
    pub server_ca_pem: String,
    /// `GOOGLE_MANAGED_INTERNAL_CA` (also when absent), `GOOGLE_MANAGED_CAS_CA`, ...
    pub server_ca_mode: String,
}

/// Why a call failed, in the words a user acts on. No variant holds a
/// secret or a response body.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("Cloud SQL instance {instance} was not found (HTTP 404): check the instance connection name and that the instance exists in that project")]
    NotFound { instance: String },
    #[error("not allowed to connect to Cloud SQL instance {instance} (HTTP 403{reason}): {principal} needs the role roles/cloudsql.client (Cloud SQL Client) on the project, and the Cloud SQL Admin API must be enabled")]
    Forbidden {
        instance: String,
        principal: String,
        reason: String,
    },
    #[error("the SQL Admin API refused keyhole's credentials (HTTP 401): {principal} has no valid token for it")]
    Unauthenticated { principal: String },
    #[error("the SQL Admin API's quota is exhausted (HTTP 429{reason}) for instance {instance}")]
    Quota { instance: String, reason: String },
    #[error("the SQL Admin API answered HTTP {status}{reason} for instance {instance}")]
    Status {
        instance: String,
        status: u16,
        reason: String,
    },
    #[error("the SQL Admin API is unreachable: {0}")]
    Unreachable(String),
    #[error("the SQL Admin API did not answer within {}", crate::upstream::humanize(*.0))]
    Timeout(Duration),
    #[error("the SQL Admin API's answer about {instance} is not usable: {reason}")]
    BadReply { instance: String, reason: String },
    #[error("no token for the SQL Admin API: {0}")]
    Credentials(CredentialsError),
}

impl ApiError {
    /// A short stable name for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } => "not_found",
            ApiError::Forbidden { .. } => "forbidden",
            ApiError::Unauthenticated { .. } => "unauthenticated",
            ApiError::Quota { .. } => "quota",
            ApiError::Status { .. } => "api_status",
            ApiError::Unreachable(_) | ApiError::Timeout(_) => "api_unreachable",
            ApiError::BadReply { .. } => "api_reply",
            ApiError::Credentials(_) => "credentials",
        }
    }
}

impl AdminApi {
    /// `endpoint`: `--sqladmin-api-endpoint`, or the default for the universe.
    pub fn new(
        endpoint: &str,
        tokens: Arc<TokenCache>,
        quota_project: Option<String>,
        timeout: Duration,
    ) -> Result<AdminApi, String> {
        let endpoint = endpoint.trim_end_matches('/').to_owned();
        // Checked once here; every call's URL is this plus a path.
        Url::parse(&format!("{endpoint}/")).map_err(|e| format!("--sqladmin-api-endpoint: {e}"))?;
        Ok(AdminApi {
            endpoint,
            tokens,
            quota_project,
            timeout,
        })
    }

    /// Who keyhole is toward the API, for messages (no secret).
    pub fn principal(&self) -> String {
        self.tokens.source().describe()
    }

    fn instance_url(&self, name: &InstanceName, suffix: &str) -> Result<Url, ApiError> {
        // A domain-scoped project keeps its ':' (a valid path character);
        // every other character of a checked name is unreserved.
        let text = format!(
            "{}/sql/v1beta4/projects/{}/instances/{}{suffix}",
            self.endpoint, name.project, name.instance
        );
        Url::parse(&text).map_err(|e| ApiError::BadReply {
            instance: name.to_string(),
            reason: e.to_string(),
        })
    }

    /// `connectSettings`, with the region checked against the name's.
    pub async fn connect_settings(
        &self,
        name: &InstanceName,
        metrics: &TargetMetrics,
    ) -> Result<ConnectSettings, ApiError> {
        let url = self.instance_url(name, "/connectSettings")?;
        let reply = self
            .call("connectSettings", name, Request::get(url), metrics)
            .await?;
        parse_connect_settings(name, &reply)
    }

    /// `generateEphemeralCert` for `public_key_pem`; with `login_token`
    /// (automatic IAM login) the certificate lives no longer than it.
    /// Returns the certificate's PEM.
    pub async fn generate_ephemeral_cert(
        &self,
        name: &InstanceName,
        public_key_pem: &str,
        login_token: Option<&Token>,
        metrics: &TargetMetrics,
    ) -> Result<String, ApiError> {
        let url = self.instance_url(name, ":generateEphemeralCert")?;
        let mut body = json!({ "public_key": public_key_pem });
        if let (Some(token), Some(map)) = (login_token, body.as_object_mut()) {
            map.insert(
                "access_token".into(),
                Value::String(token.expose().to_owned()),
            );
        }
        let request = Request::new(http::Method::POST, url)
            .body("application/json", body.to_string().into_bytes());
        let reply = self
            .call("generateEphemeralCert", name, request, metrics)
            .await?;
        let bad = |reason: &str| ApiError::BadReply {
            instance: name.to_string(),
            reason: reason.to_owned(),
        };
        let value: Value = serde_json::from_slice(&reply).map_err(|_| bad("not JSON"))?;
        value
            .pointer("/ephemeralCert/cert")
            .and_then(Value::as_str)
            .filter(|pem| !pem.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| bad("no ephemeralCert.cert"))
    }

    /// One authorized call, bounded by the timeout; the body of a 2xx reply.
    async fn call(
        &self,
        method: &'static str,
        name: &InstanceName,
        request: Request,
        metrics: &TargetMetrics,
    ) -> Result<bytes::Bytes, ApiError> {
        let exchange = async {
            let admin = TokenRequest {
                host: self.endpoint.clone(),
                port: 443,
                user: String::new(),
            };
            let token = self
                .tokens
                .get(&admin)
                .await
                .map_err(ApiError::Credentials)?;
            let mut request = request.header("Authorization", format!("Bearer {}", token.expose()));
            if let Some(project) = &self.quota_project {
                request = request.header("X-Goog-User-Project", project.clone());
            }
            http_client::send(request)
                .await
                .map_err(|e: HttpError| ApiError::Unreachable(e.to_string()))
        };
        let result = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(ApiError::Timeout(self.timeout)),
        };
        let response = match result {
            Ok(response) => response,
            Err(e) => {
                metrics.admin_api_call(method, "error");
                return Err(e);
            }
        };
        metrics.admin_api_call(method, response.status.as_str());
        if response.status.is_success() {
            return Ok(response.body);
        }
        Err(self.refused(name, &response))
    }

    fn refused(&self, name: &InstanceName, response: &Response) -> ApiError {
        let instance = name.to_string();
        // Google's status and reason codes; its prose is not shown.
        let codes = crate::http::client::google_error_codes(&response.body);
        let shown = if codes.is_empty() {
            String::new()
        } else {
            format!(", {}", codes.join("/"))
        };
        match response.status {
            StatusCode::NOT_FOUND => ApiError::NotFound { instance },
            StatusCode::FORBIDDEN => ApiError::Forbidden {
                instance,
                principal: self.principal(),
                reason: shown,
            },
            StatusCode::UNAUTHORIZED => ApiError::Unauthenticated {
                principal: self.principal(),
            },
            StatusCode::TOO_MANY_REQUESTS => ApiError::Quota {
                instance,
                reason: shown,
            },
            status => ApiError::Status {
                instance,
                status: status.as_u16(),
                reason: shown,
            },
        }
    }
}

fn parse_connect_settings(name: &InstanceName, body: &[u8]) -> Result<ConnectSettings, ApiError> {
    let bad = |reason: String| ApiError::BadReply {
        instance: name.to_string(),
        reason,
    };
    let value: Value = serde_json::from_slice(body).map_err(|_| bad("not JSON".into()))?;
    let text = |pointer: &str| value.pointer(pointer).and_then(Value::as_str);
    let region = text("/region")
        .ok_or_else(|| bad("no region".into()))?
        .to_owned();
    if region != name.region {
        return Err(bad(format!(
            "the instance is in region {region}, not {} as the connection name says: use {}:{region}:{}",
            name.region, name.project, name.instance
        )));
    }
    let database_version = text("/databaseVersion")
        .ok_or_else(|| bad("no databaseVersion".into()))?
        .to_owned();
    let server_ca_pem = text("/serverCaCert/cert")
        .filter(|pem| !pem.is_empty())
        .ok_or_else(|| bad("no serverCaCert.cert".into()))?
        .to_owned();
    let mut ip_addresses = Vec::new();
    for entry in value
        .get("ipAddresses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let kind = match entry.get("type").and_then(Value::as_str) {
            Some("PRIMARY") => IpType::Public,
            Some("PRIVATE") => IpType::Private,
            // OUTGOING is the instance's own egress address.
            _ => continue,
        };
        let Some(addr) = entry.get("ipAddress").and_then(Value::as_str) else {
            continue;
        };
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| bad(format!("'{addr}' is not an IP address")))?;
        ip_addresses.push((kind, ip));
    }
    let mut dns_names = Vec::new();
    let mut psc_dns_name = None;
    for entry in value
        .get("dnsNames")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(dns) = entry.get("name").and_then(Value::as_str) else {
            continue;
        };
        if entry.get("connectionType").and_then(Value::as_str) == Some("PRIVATE_SERVICE_CONNECT") {
            psc_dns_name.get_or_insert_with(|| dns.to_owned());
        }
        dns_names.push(dns.to_owned());
    }
    let psc_enabled = value
        .get("pscEnabled")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if let Some(dns) = text("/dnsName").filter(|d| !d.is_empty()) {
        if psc_enabled && psc_dns_name.is_none() {
            psc_dns_name = Some(dns.to_owned());
        }
        if !dns_names.iter().any(|d| d == dns) {
            dns_names.push(dns.to_owned());
        }
    }
    Ok(ConnectSettings {
        region,
        database_version,
        ip_addresses,
        psc_enabled,
        psc_dns_name,
        dns_names,
        server_ca_pem,
        server_ca_mode: text("/serverCaMode")
            .unwrap_or("GOOGLE_MANAGED_INTERNAL_CA")
            .to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> InstanceName {
        InstanceName::parse("proj:us-central1:db").expect("valid")
    }

    #[test]
    fn connect_settings_fields_as_the_api_sends_them() {
        let body = json!({
            "kind": "sql#connectSettings",
            "serverCaCert": {"kind": "sql#sslCert", "cert": "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"},
            "ipAddresses": [
                {"type": "PRIMARY", "ipAddress": "34.1.2.3"},
                {"type": "OUTGOING", "ipAddress": "34.9.9.9"},
                {"type": "PRIVATE", "ipAddress": "10.0.0.5"}
            ],
            "region": "us-central1",
            "databaseVersion": "POSTGRES_15",
            "backendType": "SECOND_GEN",
            "pscEnabled": true,
            "dnsName": "abc.us-central1.sql.goog.",
            "dnsNames": [
                {"name": "abc.us-central1.sql.goog.", "connectionType": "PRIVATE_SERVICE_CONNECT", "dnsScope": "INSTANCE"},
                {"name": "db.proj.us-central1.sql.goog", "connectionType": "PUBLIC", "dnsScope": "INSTANCE"}
            ],
            "serverCaMode": "GOOGLE_MANAGED_CAS_CA"
        });
        let s = parse_connect_settings(&name(), body.to_string().as_bytes()).expect("valid");
        assert_eq!(s.database_version, "POSTGRES_15");
        assert_eq!(
            s.ip_addresses,
            vec![
                (IpType::Public, "34.1.2.3".parse().expect("ip")),
                (IpType::Private, "10.0.0.5".parse().expect("ip"))
            ]
        );
        assert!(s.psc_enabled);
        assert_eq!(s.psc_dns_name.as_deref(), Some("abc.us-central1.sql.goog."));
        assert_eq!(s.dns_names.len(), 2);
        assert_eq!(s.server_ca_mode, "GOOGLE_MANAGED_CAS_CA");
    }

    #[test]
    fn a_wrong_region_says_which_name_to_use() {
        let body = json!({"region": "europe-west1", "databaseVersion": "MYSQL_8_0",
                          "serverCaCert": {"cert": "pem"}});
        let e = parse_connect_settings(&name(), body.to_string().as_bytes()).expect_err("region");
        let text = e.to_string();
        assert!(
            text.contains("region europe-west1, not us-central1"),
            "{text}"
        );
        assert!(text.contains("proj:europe-west1:db"), "{text}");
    }

    #[test]
    fn missing_fields_are_named() {
        for (body, missing) in [
            (
                json!({"databaseVersion": "X", "serverCaCert": {"cert": "p"}}),
                "no region",
            ),
            (
                json!({"region": "us-central1", "serverCaCert": {"cert": "p"}}),
                "no databaseVersion",
            ),
            (
                json!({"region": "us-central1", "databaseVersion": "X"}),
                "no serverCaCert.cert",
            ),
        ] {
            let e = parse_connect_settings(&name(), body.to_string().as_bytes()).expect_err("bad");
            assert!(e.to_string().contains(missing), "{e}");
        }
    }

    #[test]
    fn google_error_codes_are_read_and_prose_is_not() {
        let body = json!({"error": {"code": 403, "message": "secret-ish prose",
            "errors": [{"message": "m", "domain": "global", "reason": "notAuthorized"}],
            "status": "PERMISSION_DENIED"}});
        assert_eq!(
            crate::http::client::google_error_codes(body.to_string().as_bytes()),
            ["PERMISSION_DENIED", "notAuthorized"]
        );
        assert!(crate::http::client::google_error_codes(b"<html>").is_empty());
    }
}
