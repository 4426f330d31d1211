//! Instance connection names: `PROJECT:REGION:INSTANCE`, the form
//! cloud-sql-proxy takes (a domain-scoped project `example.com:proj` has one
//! colon more), bare or as `cloudsql://PROJECT:REGION:INSTANCE`, each with
//! optional `?name=value` parameters.
//!
//! Pure parsing: no API call, so `keyhole check-config` can validate names
//! offline.

use std::fmt;

/// `project:region:instance`, checked for shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InstanceName {
    /// As written, domain scope included (`example.com:proj`).
    pub project: String,
    pub region: String,
    pub instance: String,
}

impl InstanceName {
    /// Parses `project:region:instance` (no scheme, no parameters).
    pub fn parse(text: &str) -> Result<InstanceName, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let (project, region, instance) = match parts.as_slice() {
            [p, r, i] => ((*p).to_owned(), *r, *i),
            // A domain-scoped project: `example.com:proj:region:instance`.
            [domain, p, r, i] if domain.contains('.') => (format!("{domain}:{p}"), *r, *i),
            _ => {
                return Err(format!(
                    "'{text}' is not an instance connection name like my-project:us-central1:my-instance"
                ))
            }
        };
        let (domain, bare_project) = match project.split_once(':') {
            Some((d, p)) => (Some(d), p),
            None => (None, project.as_str()),
        };
        let name_like = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if let Some(domain) = domain {
            let ok = domain.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
            if !ok {
                return Err(format!("'{text}': '{domain}' is not a domain"));
            }
        }
        if !name_like(bare_project) {
            return Err(format!(
                "'{text}': the project '{bare_project}' is not a project ID (lower-case letters, digits and '-')"
            ));
        }
        if !name_like(region) {
            return Err(format!(
                "'{text}': the region '{region}' is not a region like us-central1"
            ));
        }
        if !name_like(instance) {
            return Err(format!(
                "'{text}': the instance '{instance}' is not an instance name (lower-case letters, digits and '-')"
            ));
        }
        Ok(InstanceName {
            project,
            region: region.to_owned(),
            instance: instance.to_owned(),
        })
    }

    /// The subject CN a `GOOGLE_MANAGED_INTERNAL_CA` server certificate
    /// carries: `project:instance`.
    pub fn certificate_cn(&self) -> String {
        format!("{}:{}", self.project, self.instance)
    }
}

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.project, self.region, self.instance)
    }
}

/// Whether a target as written names a Cloud SQL instance rather than a
/// `postgres://` or `mysql://` URL.
pub fn is_instance_target(text: &str) -> bool {
    // Parameters may hold URLs of their own (`via=ssh://...`): only the
    // part before `?` says what the target is.
    let name = text.split_once('?').map_or(text, |(n, _)| n);
    if let Some((scheme, _)) = name.split_once("://") {
        return scheme.eq_ignore_ascii_case("cloudsql");
    }
    name.contains(':')
}

/// How a target names its instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Named {
    Instance(InstanceName),
    /// A DNS name whose TXT record holds the instance connection name.
    Dns(String),
}

impl fmt::Display for Named {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Named::Instance(name) => name.fmt(f),
            Named::Dns(name) => f.write_str(name),
        }
    }
}

impl Named {
    /// The name a server certificate's CN fallback (or a token's endpoint)
    /// is checked against before the instance is known.
    pub fn certificate_cn(&self) -> String {
        match self {
            Named::Instance(name) => name.certificate_cn(),
            Named::Dns(name) => name.clone(),
        }
    }
}

/// A target that names an instance, before defaults are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceTarget {
    pub name: Named,
    /// `name=value` pairs after `?`, in order (a bare `name` is `name=true`).
    pub params: Vec<(String, String)>,
}

/// Splits `[cloudsql://]PROJECT:REGION:INSTANCE[?PARAMS]`; the parameters'
/// names are checked by the caller, which knows which ones it takes.
pub fn parse_target(
    text: &str,
    decode: impl Fn(&str) -> Result<String, String>,
) -> Result<InstanceTarget, String> {
    let (head, query) = match text.split_once('?') {
        Some((n, q)) => (n, Some(q)),
        None => (text, None),
    };
    let name = match head.split_once("://") {
        Some((_, rest)) => rest,
        None => head,
    };
    // `cloudsql://me:PASSWORD@...`: no instance name holds an '@', and an
    // error that quoted the target would show the password.
    if let Some(at) = name.rfind('@') {
        let scheme = &head[..head.len() - name.len()];
        return Err(format!(
            "target '{scheme}***{}': a target carries no user or password; clients send their own",
            &name[at..]
        ));
    }
    // Parameters may hold URLs with a user of their own (a mistyped `via=`).
    let shown = crate::config::via::redact(text);
    let text = shown.as_str();
    let name = name.strip_suffix('/').unwrap_or(name);
    let name = if name.contains(':') {
        Named::Instance(InstanceName::parse(name).map_err(|e| format!("target {e}"))?)
    } else {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let labels: Vec<&str> = name.split('.').collect();
        let label_ok = |l: &&str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if labels.len() < 2 || !labels.iter().all(label_ok) {
            return Err(format!(
                "target '{text}': '{name}' is neither an instance connection name \
                 (PROJECT:REGION:INSTANCE) nor a DNS name whose TXT record holds one"
            ));
        }
        Named::Dns(name)
    };
    let mut params = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
        let key = decode(key).map_err(|e| format!("target '{text}': {e}"))?;
        let value = decode(value).map_err(|e| format!("target '{text}': {e}"))?;
        params.push((key, value));
    }
    Ok(InstanceTarget { name, params })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(s: &str) -> Result<String, String> {
        Ok(s.to_owned())
    }

    #[test]
    fn names_with_and_without_a_domain() {
        let n = InstanceName::parse("my-proj:us-central1:pg-1").expect("valid");
        assert_eq!(
            (n.project.as_str(), n.region.as_str(), n.instance.as_str()),
            ("my-proj", "us-central1", "pg-1")
        );
        assert_eq!(n.certificate_cn(), "my-proj:pg-1");
        assert_eq!(n.to_string(), "my-proj:us-central1:pg-1");
        let n = InstanceName::parse("example.com:my-proj:europe-west1:db").expect("valid");
        assert_eq!(n.project, "example.com:my-proj");
        assert_eq!(n.certificate_cn(), "example.com:my-proj:db");
        assert_eq!(n.to_string(), "example.com:my-proj:europe-west1:db");
    }

    #[test]
    fn clear_errors_for_malformed_names() {
        let err = |s: &str| InstanceName::parse(s).expect_err(s);
        assert!(err("proj:inst").contains("not an instance connection name"));
        assert!(err("a:b:c:d").contains("not an instance connection name"));
        assert!(err("Proj:us-central1:i").contains("project 'Proj'"));
        assert!(err("proj::i").contains("region ''"));
        assert!(err("proj:us-central1:in_st").contains("instance 'in_st'"));
        assert!(err("exa..com:p:r:i").contains("not a domain"));
    }

    #[test]
    fn targets_bare_and_with_scheme_and_params() {
        assert!(is_instance_target("p:r:i"));
        assert!(is_instance_target("cloudsql://p:r:i"));
        assert!(is_instance_target("CloudSQL://db.example.com"));
        assert!(!is_instance_target("postgres://db:5432"));
        assert!(!is_instance_target("db.internal"));
        // A hop's URL in the parameters says nothing about the target.
        assert!(is_instance_target("p:r:i?via=socks5h://10.0.0.2:1080"));
        assert!(!is_instance_target("postgres://db?via=ssh://bastion"));
        let t = parse_target("p:r:i?port=6000&via=ssh://me@bastion", plain).expect("valid");
        assert_eq!(t.name.to_string(), "p:r:i");
        assert_eq!(t.params[1], ("via".into(), "ssh://me@bastion".into()));
        let t = parse_target("proj:us-central1:db?port=6000&private-ip", plain).expect("valid");
        assert_eq!(t.name.to_string(), "proj:us-central1:db");
        assert_eq!(
            t.params,
            vec![
                ("port".into(), "6000".into()),
                ("private-ip".into(), "true".into())
            ]
        );
        let t = parse_target("cloudsql://example.com:proj:us-central1:db", plain).expect("valid");
        assert!(matches!(t.name, Named::Instance(n) if n.project == "example.com:proj"));
        let t = parse_target("cloudsql://Prod-DB.example.com.?port=5000", plain).expect("dns");
        assert_eq!(t.name, Named::Dns("prod-db.example.com".into()));
        let e = parse_target("cloudsql://localhost", plain).expect_err("one label");
        assert!(e.contains("neither an instance connection name"), "{e}");
    }

    #[test]
    fn errors_never_show_a_password() {
        for (target, shown) in [
            (
                "cloudsql://me:hunter2@p:us-central1:i",
                "target 'cloudsql://***@p:us-central1:i'",
            ),
            ("me:hunter2@p:us-central1:i", "target '***@p:us-central1:i'"),
            (
                "cloudsql://me:hunter2@db.example.com",
                "target 'cloudsql://***@db.example.com'",
            ),
            (
                "p:r:i?via=ssh://me:hunter2@bastion%zz",
                "bad percent-encoding",
            ),
        ] {
            let decode = crate::config::target::percent_decode_text;
            let e = parse_target(target, decode).expect_err(target);
            assert!(e.contains(shown), "{target}: {e}");
            assert!(!e.contains("hunter2"), "{target}: {e}");
        }
    }
}
