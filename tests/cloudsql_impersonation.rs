//! `--impersonate-service-account` through the real `keyhole` binary: the
//! base credentials (`--token`) go only to the IAM Credentials API (a fake,
//! `support::cloud::FakeIamCredentials`), and the SQL Admin API (a fake that
//! accepts only the impersonated token) and the instance's server-side proxy
//! (in front of the REAL PostgreSQL the harness starts) see the impersonated
//! service account. The chain is read as cloud-sql-proxy reads it: the first
//! entry is the target, the last one the first hop.
//!
//! keyhole runs with `RUST_LOG=debug`, and no log may hold a token.

// Tests the Cloud SQL connector and Google credentials: only in builds with the "gcp" feature.
#![cfg(feature = "gcp")]

mod support;

use std::sync::OnceLock;

use support::clients;
use support::cloud::{FakeIamCredentials, IamFailure};
use support::cloudsql::{self as fake, ApiMethod, FakeSqlAdmin, InstanceSpec};
use support::keyhole::{Keyhole, Ready};
use support::postgres::{PgCluster, SCRAM_PASS, SCRAM_USER};

const TARGET: &str = "target@keyhole-test-project.iam.gserviceaccount.com";
const DELEGATE: &str = "delegate@keyhole-test-project.iam.gserviceaccount.com";
const FIRST_HOP: &str = "first-hop@keyhole-test-project.iam.gserviceaccount.com";
/// Cloud SQL's Postgres name for the target's IAM user.
const TARGET_PG_USER: &str = "target@keyhole-test-project.iam";
const ADMIN_SCOPE: &str = "https://www.googleapis.com/auth/sqlservice.admin";
const LOGIN_SCOPE: &str = "https://www.googleapis.com/auth/sqlservice.login";

fn cluster() -> &'static PgCluster {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let pg = PgCluster::start(fake::pg_options(&[TARGET_PG_USER]));
        fake::create_pg_iam_user(&pg, TARGET_PG_USER);
        pg
    })
}

/// An Admin API that no longer accepts its own token (keyhole's base token)
/// and an IAM API that accepts exactly that token for `chain`'s target
/// through `delegates` (first hop first); the Admin API accepts the token
/// the IAM fake mints for the admin scope.
fn fakes(delegates: &[&str]) -> (FakeSqlAdmin, FakeIamCredentials, String) {
    let api = FakeSqlAdmin::start();
    let base = api.admin_token();
    api.revoke_token(&base);
    let iam = FakeIamCredentials::start(&base, TARGET, delegates);
    api.accept_token(&iam.token_for(ADMIN_SCOPE));
    (api, iam, base)
}

/// keyhole on a free port with `--token base`, both fakes' endpoints,
/// `--impersonate-service-account chain`, then `args`.
fn start(
    api: &FakeSqlAdmin,
    iam: &FakeIamCredentials,
    base: &str,
    chain: &str,
    args: &[&str],
) -> Keyhole {
    let port = support::free_port();
    let port_text = port.to_string();
    let (api_url, iam_url) = (api.url(), iam.url());
    let mut all = vec![
        "--port",
        port_text.as_str(),
        "--token",
        base,
        "--impersonate-service-account",
        chain,
        "--iam-credentials-endpoint",
        iam_url.as_str(),
        "--sqladmin-api-endpoint",
        api_url.as_str(),
    ];
    all.extend_from_slice(args);
    Keyhole::spawn(&all, &[("RUST_LOG", "debug")], Ready::Tcp(port))
}

fn assert_no_token(keyhole: &Keyhole, base: &str, iam: &FakeIamCredentials) {
    let logs = keyhole.logs();
    let mut tokens = iam.minted();
    tokens.push(base.to_owned());
    for token in tokens {
        assert!(
            !logs.contains(token.as_str()),
            "a token reached keyhole's log:\n{logs}"
        );
    }
}

#[test]
fn the_admin_api_is_called_as_the_impersonated_service_account() {
    let pg = cluster();
    let (api, iam, base) = fakes(&[DELEGATE]);
    let instance = api.add_instance(InstanceSpec::postgres("impersonated", pg));
    let chain = format!("{TARGET},{DELEGATE}");
    let keyhole = start(&api, &iam, &base, &chain, &[&instance.connection_name()]);

    let out = clients::psql(
        keyhole.port(),
        SCRAM_USER,
        Some(SCRAM_PASS),
        "select 'as ' || current_user",
    );
    assert_eq!(
        clients::expect_success(
            &out,
            &format!(
                "psql through an impersonated connector; keyhole:\n{}",
                keyhole.logs()
            )
        ),
        "as scram_user"
    );
    // The IAM API was asked with the base token, for the target through the
    // delegate, for the Admin API's scope and an hour.
    let requests = iam.requests();
    assert!(!requests.is_empty());
    for request in &requests {
        assert_eq!(
            request.path,
            format!("/v1/projects/-/serviceAccounts/{TARGET}:generateAccessToken")
        );
        assert_eq!(
            request.header("authorization"),
            Some(format!("Bearer {base}").as_str())
        );
    }
    let body = &iam.bodies()[0];
    assert_eq!(
        body["delegates"],
        serde_json::json!([format!("projects/-/serviceAccounts/{DELEGATE}")])
    );
    assert_eq!(body["scope"], serde_json::json!([ADMIN_SCOPE]));
    assert_eq!(body["lifetime"], "3600s");
    // The Admin API saw only the impersonated token (it refuses the base one).
    let impersonated = format!("Bearer {}", iam.token_for(ADMIN_SCOPE));
    assert!(api.calls(ApiMethod::GenerateEphemeralCert) >= 1);
    for request in api.requests() {
        assert_eq!(request.header("authorization"), Some(impersonated.as_str()));
    }
    let logs = keyhole.logs();
    assert!(
        logs.contains(&format!(
            "service account {TARGET} impersonated by the token given with --token through {DELEGATE}"
        )),
        "{logs}"
    );
    assert_no_token(&keyhole, &base, &iam);
}

#[test]
fn automatic_iam_login_logs_in_as_the_target_through_a_longer_chain() {
    let pg = cluster();
    // Given as target, delegate, first hop: the base acts as the first hop,
    // which acts as the delegate, which acts as the target.
    let (api, iam, base) = fakes(&[FIRST_HOP, DELEGATE]);
    let instance = api.add_instance(InstanceSpec::postgres("impersonated-iam", pg));
    let chain = format!("{TARGET},{DELEGATE},{FIRST_HOP}");
    let keyhole = start(
        &api,
        &iam,
        &base,
        &chain,
        &["--auto-iam-authn", &instance.connection_name()],
    );
    let out = clients::psql(keyhole.port(), TARGET_PG_USER, None, "select current_user");
    assert_eq!(
        clients::expect_success(
            &out,
            &format!("IAM login as the target; keyhole:\n{}", keyhole.logs())
        ),
        TARGET_PG_USER
    );
    // The certificate carries the target's login token, minted by the IAM
    // API for the login scope; no --login-token was needed.
    assert_eq!(api.login_tokens(), [iam.token_for(LOGIN_SCOPE)]);
    let scopes: Vec<serde_json::Value> = iam.bodies().iter().map(|b| b["scope"].clone()).collect();
    assert!(
        scopes.contains(&serde_json::json!([ADMIN_SCOPE]))
            && scopes.contains(&serde_json::json!([LOGIN_SCOPE])),
        "{scopes:?}"
    );
    for body in iam.bodies() {
        assert_eq!(
            body["delegates"],
            serde_json::json!([
                format!("projects/-/serviceAccounts/{FIRST_HOP}"),
                format!("projects/-/serviceAccounts/{DELEGATE}"),
            ])
        );
    }
    assert_no_token(&keyhole, &base, &iam);
}

#[test]
fn a_refusal_by_the_iam_api_reaches_the_client_with_the_role_to_grant() {
    let pg = cluster();
    let (api, iam, base) = fakes(&[DELEGATE]);
    let instance = api.add_instance(InstanceSpec::postgres("impersonation-refused", pg));
    let chain = format!("{TARGET},{DELEGATE}");
    let failing = |failure: IamFailure| -> String {
        iam.set_failure(Some(failure));
        let keyhole = start(
            &api,
            &iam,
            &base,
            &chain,
            &["--lazy-refresh", &instance.connection_name()],
        );
        let out = clients::psql(keyhole.port(), SCRAM_USER, Some(SCRAM_PASS), "select 1");
        assert!(!out.status.success(), "{failure:?}: psql succeeded");
        assert_no_token(&keyhole, &base, &iam);
        clients::stderr(&out)
    };
    let err = failing(IamFailure::PermissionDenied);
    assert!(
        err.contains("HTTP 403")
            && err.contains("roles/iam.serviceAccountTokenCreator")
            && err.contains(&format!(
                "the token given with --token may not impersonate service account {TARGET} through {DELEGATE}"
            )),
        "{err}"
    );
    let err = failing(IamFailure::NotFound);
    assert!(
        err.contains("HTTP 404") && err.contains("service account not found"),
        "{err}"
    );
    // The Admin API was never reached: no token for it.
    assert_eq!(api.calls(ApiMethod::GenerateEphemeralCert), 0);
    assert_eq!(api.calls(ApiMethod::ConnectSettings), 0);
}
