//! `via=URL`: the hop between keyhole and a database it cannot reach
//! directly (a laptop outside the VPC). The hop only carries bytes: TLS to
//! the database still starts here and is verified against the database's
//! own name, and IAM tokens are still signed here for the real endpoint.
//!
//! - `ssh://[USER@]HOST[:PORT]`: an SSH bastion, reached the way the
//!   user's OpenSSH client reaches it (`~/.ssh/config` or `--ssh-config`).
//! - `socks5://[USER:PASS@]HOST:PORT` (also `socks5h://`): a SOCKS5 proxy
//!   that resolves the database's name itself.
//! - `http://[USER:PASS@]HOST:PORT`, `https://...`: an HTTP CONNECT proxy
//!   (`https://`: TLS to the proxy, verified with the system roots).
//! - `iap://PROJECT/ZONE/INSTANCE[?port=N&interface=nic0]`: Google IAP TCP
//!   forwarding to a VM's port (a relay on the VM, or an SSH hop after it).
//! - `ssm://INSTANCE-ID[?region=R&document=NAME]`: AWS Session Manager port
//!   forwarding through an instance's SSM agent to the database.
//! - `iap://...,ssh://USER@VM` and `ssm://i-...,ssh://USER@i-...`: an SSH
//!   bastion reached through the cloud tunnel instead of a TCP connection.
//! - `direct`: no hop (overrides a global `--via` for one target).
//!
//! A hop is shown by its scheme, host and port: never its password.

use std::fmt;

use super::cloudsql::Secret;
use super::target::{percent_decode_text, split_host_port};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Via {
    #[default]
    Direct,
    Ssh(SshHop),
    Socks5(ProxyHop),
    /// HTTP CONNECT; `ProxyHop::tls` for an `https://` proxy.
    Http(ProxyHop),
    /// Google IAP TCP forwarding.
    Iap(IapHop),
    /// AWS Systems Manager Session Manager port forwarding.
    Ssm(SsmHop),
}

/// A cloud tunnel an SSH hop can run over (`iap://...,ssh://...`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Tunnel {
    Iap(IapHop),
    Ssm(SsmHop),
}

/// `iap://PROJECT/ZONE/INSTANCE[?port=N&interface=NIC]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IapHop {
    pub project: String,
    pub zone: String,
    pub instance: String,
    /// The VM's port IAP connects to; `None`: 22 under an SSH hop, else the
    /// database's port (a relay on the VM listening where the database does).
    pub port: Option<u16>,
    pub interface: String,
}

/// `ssm://INSTANCE-ID[?region=R&document=NAME]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SsmHop {
    /// `i-0123456789abcdef0`, or a managed node's `mi-...`.
    pub target: String,
    /// `None`: the AWS configuration's region, else the database's RDS name.
    pub region: Option<String>,
    /// `None`: `AWS-StartPortForwardingSessionToRemoteHost`.
    pub document: Option<String>,
}

/// The Session Manager document for port forwarding to another host.
pub const SSM_DEFAULT_DOCUMENT: &str = "AWS-StartPortForwardingSessionToRemoteHost";
/// What a hop's own parameters may be called, by scheme.
const IAP_PARAMS: &[&str] = &["port", "interface"];
const SSM_PARAMS: &[&str] = &["region", "document"];

/// The parameters the hop URL at the start of `via` takes (the last hop of
/// a chain), for a target's parser: `via=ssm://i-1?region=R&document=D`
/// keeps `document=D` with the hop.
pub fn hop_params(via: &str) -> &'static [&'static str] {
    let last = via.rsplit(',').next().unwrap_or(via).trim_start();
    let scheme = last.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("iap") if last.contains('?') => IAP_PARAMS,
        Some("ssm") if last.contains('?') => SSM_PARAMS,
        _ => &[],
    }
}

/// `ssh://[USER@]HOST[:PORT]`: whatever is not given here comes from the
/// OpenSSH client configuration (`HostName`, `User`, `Port`, ...), so HOST
/// may be an alias from `~/.ssh/config`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SshHop {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    /// The cloud tunnel the SSH connection runs over, if any.
    pub over: Option<Tunnel>,
}

/// A SOCKS5 or HTTP proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHop {
    /// `https://`: TLS to the proxy itself.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// User and password, percent-decoded.
    pub credentials: Option<(String, Secret)>,
}

impl Via {
    /// Parses `direct` or a hop URL. Errors never show a password.
    pub fn parse(text: &str) -> Result<Via, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("direct") {
            return Ok(Via::Direct);
        }
        if let Some((first, second)) = text.split_once(',') {
            return Via::parse_chain(text, first, second);
        }
        let shown = redact(text);
        if let Some(hop) = Via::parse_cloud(text)? {
            return Ok(match hop {
                Tunnel::Iap(iap) => Via::Iap(iap),
                Tunnel::Ssm(ssm) => Via::Ssm(ssm),
            });
        }
        let (scheme, rest) = text.split_once("://").ok_or_else(|| {
            format!("'{shown}' is not a hop (ssh://HOST, socks5://HOST:PORT, http://HOST:PORT or direct)")
        })?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err(format!(
                "'{shown}': a hop is a host and port, with no path or parameters"
            ));
        }
        let (userinfo, authority) = match rest.rsplit_once('@') {
            Some((userinfo, authority)) => (Some(userinfo), authority),
            None => (None, rest),
        };
        let (host, port) = split_host_port(authority).map_err(|e| format!("'{shown}': {e}"))?;
        if host.is_empty() {
            return Err(format!("'{shown}': no host"));
        }
        let decode = |part: &str| {
            percent_decode_text(part)
                .map_err(|_| format!("'{shown}': bad percent-encoding in the user or password"))
        };
        match scheme.to_ascii_lowercase().as_str() {
            "ssh" => {
                let user = match userinfo {
                    None => None,
                    Some(u) if u.contains(':') => {
                        return Err(format!(
                            "'{shown}': an ssh:// hop takes no password; keyhole logs in with your keys and agent, as ssh does"
                        ))
                    }
                    Some("") => return Err(format!("'{shown}': empty user")),
                    Some(u) => Some(decode(u)?),
                };
                Ok(Via::Ssh(SshHop {
                    user,
                    host,
                    port,
                    over: None,
                }))
            }
            scheme @ ("socks5" | "socks5h" | "http" | "https") => {
                let port = port.ok_or_else(|| {
                    format!("'{shown}': a proxy needs a port ({scheme}://HOST:PORT)")
                })?;
                let credentials = match userinfo {
                    None => None,
                    Some(info) => {
                        let (user, password) = info.split_once(':').ok_or_else(|| {
                            format!(
                                "'{shown}': give the proxy's user and password as USER:PASSWORD@"
                            )
                        })?;
                        Some((decode(user)?, Secret::new(decode(password)?)))
                    }
                };
                let hop = ProxyHop {
                    tls: scheme == "https",
                    host,
                    port,
                    credentials,
                };
                if scheme.starts_with("socks5") {
                    let too_long = hop.credentials.as_ref().is_some_and(|(u, p)| {
                        u.is_empty() || u.len() > 255 || p.expose().len() > 255
                    });
                    if too_long {
                        return Err(format!(
                            "'{shown}': a SOCKS5 user and password are 1 to 255 bytes each (RFC 1929)"
                        ));
                    }
                    Ok(Via::Socks5(hop))
                } else {
                    Ok(Via::Http(hop))
                }
            }
            "socks4" | "socks4a" => {
                Err(format!("'{shown}': SOCKS4 is not supported; use socks5://"))
            }
            other => Err(format!(
                "'{shown}': unknown hop scheme '{other}' (ssh, socks5, http, https, iap, ssm or direct)"
            )),
        }
    }

    /// `iap://...,ssh://...` or `ssm://...,ssh://...`: SSH over a cloud
    /// tunnel, the one chain there is.
    fn parse_chain(text: &str, first: &str, second: &str) -> Result<Via, String> {
        let shown = redact(text);
        let wrong = || {
            format!(
                "'{shown}': a chain is a cloud tunnel then an SSH bastion \
                 (iap://PROJECT/ZONE/VM,ssh://USER@VM or ssm://INSTANCE,ssh://USER@INSTANCE)"
            )
        };
        let Some(tunnel) = Via::parse_cloud(first.trim())? else {
            return Err(wrong());
        };
        match Via::parse(second)? {
            Via::Ssh(ssh) if ssh.over.is_none() => Ok(Via::Ssh(SshHop {
                over: Some(tunnel),
                ..ssh
            })),
            _ => Err(wrong()),
        }
    }

    /// An `iap://` or `ssm://` URL; `None` for other schemes.
    fn parse_cloud(text: &str) -> Result<Option<Tunnel>, String> {
        let Some((scheme, rest)) = text.split_once("://") else {
            return Ok(None);
        };
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "iap" && scheme != "ssm" {
            return Ok(None);
        }
        let shown = redact(text);
        if rest.contains(['@', '#']) {
            return Err(format!(
                "'{shown}': an {scheme}:// hop takes no user or password: it signs in with your cloud credentials"
            ));
        }
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let path = path.strip_suffix('/').unwrap_or(path);
        let mut params = Vec::new();
        let known = if scheme == "iap" {
            IAP_PARAMS
        } else {
            SSM_PARAMS
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("'{shown}': parameter '{pair}' has no value"))?;
            let value = percent_decode_text(value)
                .map_err(|e| format!("'{shown}': parameter '{name}': {e}"))?;
            if !known.contains(&name) {
                return Err(format!(
                    "'{shown}': unknown parameter '{name}' (an {scheme}:// hop takes {})",
                    known.join(", ")
                ));
            }
            if value.is_empty() {
                return Err(format!("'{shown}': parameter '{name}' is empty"));
            }
            if params.iter().any(|(n, _)| *n == name) {
                return Err(format!("'{shown}': parameter '{name}' is given twice"));
            }
            params.push((name, value));
        }
        let param = |name: &str| {
            params
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        };
        let name_ok = |part: &str| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        };
        if scheme == "iap" {
            let parts: Vec<&str> = path.split('/').collect();
            let [project, zone, instance] = parts[..] else {
                return Err(format!(
                    "'{shown}': an iap:// hop is iap://PROJECT/ZONE/INSTANCE (the VM's project, zone and name)"
                ));
            };
            if let Some(bad) = [project, zone, instance].into_iter().find(|p| !name_ok(p)) {
                return Err(format!(
                    "'{shown}': '{bad}' is not a project, zone or instance name"
                ));
            }
            let port = match param("port") {
                None => None,
                Some(p) => Some(
                    p.parse::<u16>()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| format!("'{shown}': port '{p}' is not a TCP port"))?,
                ),
            };
            let interface = param("interface").unwrap_or_else(|| "nic0".to_owned());
            if !name_ok(&interface) {
                return Err(format!(
                    "'{shown}': '{interface}' is not a network interface name"
                ));
            }
            return Ok(Some(Tunnel::Iap(IapHop {
                project: project.to_owned(),
                zone: zone.to_owned(),
                instance: instance.to_owned(),
                port,
                interface,
            })));
        }
        let target = path;
        let is_instance = |t: &str| {
            let id = t.strip_prefix("i-").or_else(|| t.strip_prefix("mi-"));
            id.is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()))
        };
        if !is_instance(target) {
            return Err(format!(
                "'{shown}': an ssm:// hop names a managed instance: ssm://i-0123456789abcdef0 (or mi-...)"
            ));
        }
        let region = param("region");
        if let Some(r) = &region {
            if !name_ok(r) || r.contains(['.', ':']) {
                return Err(format!("'{shown}': '{r}' is not an AWS region"));
            }
        }
        Ok(Some(Tunnel::Ssm(SsmHop {
            target: target.to_owned(),
            region,
            document: param("document"),
        })))
    }

    pub fn is_direct(&self) -> bool {
        matches!(self, Via::Direct)
    }

    /// `direct`, `ssh`, `socks5`, `http`: the metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Ssh(_) => "ssh",
            Via::Socks5(_) => "socks5",
            Via::Http(_) => "http",
            Via::Iap(_) => "iap",
            Via::Ssm(_) => "ssm",
        }
    }
}

impl fmt::Display for Tunnel {
    /// `iap://p/z/vm?port=22`, `ssm://i-0abc?region=eu-west-1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tunnel::Iap(hop) => {
                write!(f, "iap://{}/{}/{}", hop.project, hop.zone, hop.instance)?;
                let mut sep = '?';
                if let Some(port) = hop.port {
                    write!(f, "{sep}port={port}")?;
                    sep = '&';
                }
                if hop.interface != "nic0" {
                    write!(f, "{sep}interface={}", hop.interface)?;
                }
                Ok(())
            }
            Tunnel::Ssm(hop) => {
                write!(f, "ssm://{}", hop.target)?;
                let mut sep = '?';
                if let Some(region) = &hop.region {
                    write!(f, "{sep}region={region}")?;
                    sep = '&';
                }
                if let Some(document) = &hop.document {
                    write!(f, "{sep}document={document}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for Via {
    /// The hop as a URL without credentials: `ssh://alice@bastion:2222`,
    /// `socks5://proxy:1080`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Via::Direct => f.write_str("direct"),
            Via::Iap(hop) => Tunnel::Iap(hop.clone()).fmt(f),
            Via::Ssm(hop) => Tunnel::Ssm(hop.clone()).fmt(f),
            Via::Ssh(hop) => {
                if let Some(over) = &hop.over {
                    write!(f, "{over},")?;
                }
                f.write_str("ssh://")?;
                if let Some(user) = &hop.user {
                    write!(f, "{user}@")?;
                }
                match hop.port {
                    Some(port) => f.write_str(&super::host_port(&hop.host, port)),
                    None if hop.host.contains(':') => write!(f, "[{}]", hop.host),
                    None => f.write_str(&hop.host),
                }
            }
            Via::Socks5(hop) => write!(f, "socks5://{}", super::host_port(&hop.host, hop.port)),
            Via::Http(hop) => write!(
                f,
                "{}://{}",
                if hop.tls { "https" } else { "http" },
                super::host_port(&hop.host, hop.port)
            ),
        }
    }
}

/// `scheme://user:pass@host` → `scheme://***@host`, wherever a URL with
/// userinfo appears in `text` (a target can carry a hop in its parameters).
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("://") {
        let (head, tail) = rest.split_at(start + 3);
        out.push_str(head);
        // The authority ends at '/', '?' or '#' (RFC 3986); not at '&',
        // which a password may hold. Inside a target's query a hop URL is
        // followed by '&': masking past it, up to the last '@', is the safe
        // side of the mistake.
        let end = tail.find(['/', '?', '#']).unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// The environment variables the hops read (upper case wins).
pub const PROXY_VARIABLES: &[&str] = &["ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"];

/// The hop for targets that set no `via=`: `--via` if given, else a SOCKS5
/// proxy from `ALL_PROXY`/`all_proxy` for hosts `NO_PROXY` does not name
/// (what curl and cloud-sql-proxy users already set). An `ALL_PROXY` that
/// is not SOCKS5 is left for the tools that speak it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DefaultVia {
    /// `--via`, `KEYHOLE_VIA` or `via` in the file.
    pub configured: Option<Via>,
    /// `ALL_PROXY`, when it names a SOCKS5 proxy.
    pub all_proxy: Option<Via>,
    /// `NO_PROXY`, as written.
    pub no_proxy: Option<String>,
    /// Why `ALL_PROXY` was not used, for `check-config`.
    pub ignored: Option<String>,
}

impl DefaultVia {
    /// Reads `ALL_PROXY`/`NO_PROXY` (upper case wins) from `env`.
    pub fn from_env(
        configured: Option<Via>,
        env: &std::collections::HashMap<String, String>,
    ) -> DefaultVia {
        let var = |upper: &str, lower: &str| {
            env.get(upper)
                .or_else(|| env.get(lower))
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut found = DefaultVia {
            configured,
            no_proxy: var("NO_PROXY", "no_proxy"),
            ..DefaultVia::default()
        };
        if let Some(all) = var("ALL_PROXY", "all_proxy") {
            match Via::parse(&all) {
                Ok(via @ Via::Socks5(_)) => found.all_proxy = Some(via),
                Ok(_) => {
                    found.ignored = Some(format!(
                        "ALL_PROXY={} is not a socks5:// proxy; keyhole uses ALL_PROXY only for SOCKS5 (use --via for other hops)",
                        redact(&all)
                    ))
                }
                Err(e) => found.ignored = Some(format!("ALL_PROXY is not used: {e}")),
            }
        }
        found
    }

    /// The hop for a target at `host:port` that sets no `via=`.
    pub fn for_host(&self, host: &str, port: u16) -> Via {
        if let Some(via) = &self.configured {
            return via.clone();
        }
        match &self.all_proxy {
            Some(via) if !self.no_proxy_names(host, port) => via.clone(),
            _ => Via::Direct,
        }
    }

    fn no_proxy_names(&self, host: &str, port: u16) -> bool {
        self.no_proxy
            .as_deref()
            .is_some_and(|list| crate::http::client::no_proxy_excludes(list, host, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn each_scheme_parses_to_its_hop() {
        assert_eq!(Via::parse("direct"), Ok(Via::Direct));
        assert_eq!(
            Via::parse("ssh://alice@bastion.example.com:2222"),
            Ok(Via::Ssh(SshHop {
                user: Some("alice".into()),
                host: "bastion.example.com".into(),
                port: Some(2222),
                over: None,
            }))
        );
        assert_eq!(
            Via::parse("ssh://bastion"),
            Ok(Via::Ssh(SshHop {
                user: None,
                host: "bastion".into(),
                port: None,
                over: None,
            }))
        );
        let Ok(Via::Socks5(hop)) = Via::parse("socks5h://u%40x:p%3Ass@10.0.0.1:1080") else {
            panic!("socks5h")
        };
        assert_eq!((hop.host.as_str(), hop.port), ("10.0.0.1", 1080));
        let (user, pass) = hop.credentials.expect("credentials");
        assert_eq!((user.as_str(), pass.expose()), ("u@x", "p:ss"));
        let Ok(Via::Http(hop)) = Via::parse("https://proxy:3128") else {
            panic!("https")
        };
        assert!(hop.tls);
        assert_eq!(
            Via::parse("http://[fd00::1]:8080").map(|v| v.to_string()),
            Ok("http://[fd00::1]:8080".to_owned())
        );
    }

    #[test]
    fn cloud_tunnels_and_ssh_over_them_parse_and_show_as_written() {
        let Ok(Via::Iap(iap)) = Via::parse("iap://lab-proj/europe-west1-b/vm-1") else {
            panic!("iap")
        };
        assert_eq!(
            (
                iap.project.as_str(),
                iap.zone.as_str(),
                iap.instance.as_str()
            ),
            ("lab-proj", "europe-west1-b", "vm-1")
        );
        assert_eq!((iap.port, iap.interface.as_str()), (None, "nic0"));
        let Ok(Via::Ssm(ssm)) =
            Via::parse("ssm://i-0123456789abcdef0?region=eu-west-1&document=My-Doc")
        else {
            panic!("ssm")
        };
        assert_eq!(ssm.target, "i-0123456789abcdef0");
        assert_eq!(ssm.region.as_deref(), Some("eu-west-1"));
        assert_eq!(ssm.document.as_deref(), Some("My-Doc"));
        let Ok(Via::Ssh(ssh)) = Via::parse("iap://p/z/vm?port=2222,ssh://me@vm") else {
            panic!("chain")
        };
        assert_eq!(ssh.user.as_deref(), Some("me"));
        assert!(matches!(&ssh.over, Some(Tunnel::Iap(i)) if i.port == Some(2222)));
        for text in [
            "iap://p/z/vm",
            "iap://p/z/vm?port=5432&interface=nic1",
            "ssm://mi-0abc?region=us-east-1",
            "ssm://i-0abc,ssh://ec2-user@i-0abc",
            "iap://p/z/vm,ssh://vm:2222",
        ] {
            let via = Via::parse(text).expect(text);
            assert_eq!(via.to_string(), text);
            assert_eq!(Via::parse(&via.to_string()), Ok(via));
        }
        assert_eq!(Via::parse("ssm://i-0abc").map(|v| v.kind()), Ok("ssm"));
        assert_eq!(Via::parse("iap://p/z/vm").map(|v| v.kind()), Ok("iap"));
    }

    #[test]
    fn cloud_tunnel_mistakes_are_named() {
        let err = |s: &str| Via::parse(s).expect_err(s);
        assert!(err("iap://p/vm").contains("iap://PROJECT/ZONE/INSTANCE"));
        assert!(err("iap://p/z/vm?port=0").contains("not a TCP port"));
        assert!(err("iap://p/z/vm?zone=x").contains("unknown parameter 'zone'"));
        assert!(err("ssm://bastion").contains("names a managed instance"));
        assert!(err("ssm://i-0abc?region=eu west").contains("not an AWS region"));
        assert!(err("ssm://i-0abc?region=a&region=b").contains("given twice"));
        assert!(err("ssm://me@i-0abc").contains("takes no user or password"));
        assert!(err("ssh://vm,iap://p/z/vm").contains("a cloud tunnel then an SSH bastion"));
        assert!(err("iap://p/z/vm,socks5://proxy:1080").contains("a cloud tunnel then"));
        assert!(err("iap://p/z/a,iap://p/z/b").contains("a cloud tunnel then"));
    }

    #[test]
    fn a_targets_hop_keeps_its_own_parameters() {
        let target = crate::config::target::parse(
            "postgres://db:5432?via=ssm://i-0abc?region=eu-west-1&document=D&iam=aws&region=us-east-1",
        )
        .expect("valid");
        let param = |name: &str| {
            target
                .params
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(param("via"), ["ssm://i-0abc?region=eu-west-1&document=D"]);
        // After the first parameter that is not the hop's, `region` is the target's.
        assert_eq!(param("region"), ["us-east-1"]);
        assert_eq!(param("iam"), ["aws"]);
        let target =
            crate::config::target::parse("postgres://db?via=iap://p/z/vm?port=22&interface=nic1")
                .expect("valid");
        assert_eq!(
            target.params,
            [(
                "via".to_owned(),
                "iap://p/z/vm?port=22&interface=nic1".to_owned()
            )]
        );
        // Without a '?' on the hop, its names are the target's as ever.
        let err = crate::config::target::parse("postgres://db?via=iap://p/z/vm&port=22")
            .expect_err("port is no target parameter");
        assert!(err.contains("unknown parameter 'port'"), "{err}");
    }

    #[test]
    fn errors_say_what_is_wrong_and_never_show_the_password() {
        let err = |s: &str| Via::parse(s).expect_err(s);
        assert!(err("bastion").contains("not a hop"));
        assert!(err("socks5://proxy").contains("needs a port"));
        assert!(err("ftp://proxy:21").contains("unknown hop scheme 'ftp'"));
        assert!(err("socks4://proxy:1080").contains("SOCKS4"));
        assert!(err("ssh://bastion/path").contains("no path"));
        let e = err("ssh://me:hunter2@bastion");
        assert!(
            e.contains("takes no password") && !e.contains("hunter2"),
            "{e}"
        );
        let e = err("socks5://me:hunter2@proxy");
        assert!(!e.contains("hunter2"), "{e}");
        let e = err("http://justauser@proxy:3128");
        assert!(
            e.contains("USER:PASSWORD") && !e.contains("justauser"),
            "{e}"
        );
    }

    #[test]
    fn a_password_with_an_ampersand_is_masked_whole() {
        assert_eq!(
            redact("http://me:pa&ss@proxy:3128"),
            "http://***@proxy:3128"
        );
        let err = crate::config::target::parse("postgres://db?socks5://me:pa&ss@proxy:1080")
            .expect_err("a hop without via= is not a parameter");
        assert!(!err.contains("pa&ss") && !err.contains("ss@"), "{err}");
    }

    #[test]
    fn display_and_redact_drop_credentials() {
        let via = Via::parse("socks5://me:hunter2@proxy:1080").expect("valid");
        assert_eq!(via.to_string(), "socks5://proxy:1080");
        assert_eq!(
            redact("postgres://db:5432?via=http://me:hunter2@proxy:3128&tls-mode=verify-full"),
            "postgres://db:5432?via=http://***@proxy:3128&tls-mode=verify-full"
        );
        assert_eq!(redact("socks5://proxy:1080"), "socks5://proxy:1080");
    }

    #[test]
    fn all_proxy_applies_to_socks5_only_and_no_proxy_excludes_hosts() {
        let env: HashMap<String, String> = [
            ("ALL_PROXY", "socks5://127.0.0.1:1080"),
            ("no_proxy", "localhost,.corp.example,10.0.0.0/8"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let d = DefaultVia::from_env(None, &env);
        assert_eq!(d.for_host("db.internal", 5432).kind(), "socks5");
        assert_eq!(d.for_host("db.corp.example", 5432), Via::Direct);
        assert_eq!(d.for_host("10.1.2.3", 5432), Via::Direct);
        // --via wins over ALL_PROXY, NO_PROXY or not.
        let ssh = Via::parse("ssh://bastion").expect("valid");
        let d = DefaultVia::from_env(Some(ssh.clone()), &env);
        assert_eq!(d.for_host("db.corp.example", 5432), ssh);

        let env: HashMap<String, String> = [("all_proxy", "http://me:pw@proxy:3128")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let d = DefaultVia::from_env(None, &env);
        assert_eq!(d.for_host("db.internal", 5432), Via::Direct);
        let why = d.ignored.expect("ignored");
        assert!(
            why.contains("only for SOCKS5") && !why.contains(":pw@"),
            "{why}"
        );
    }
}
