//! Configuration and target parsing on arbitrary text: target URLs
//! (`postgres://HOST[:PORT]?k=v`), `via=` hop URLs, Cloud SQL instance
//! names and instance targets, durations, address ranges, the redaction of
//! URLs in messages, and the whole `Config::load` (flags, `KEYHOLE_*`
//! environment, and a TOML `--config` file).
//!
//! Input: lines of text. A line `[file]` starts the TOML file (the rest of
//! the input); a line `env NAME=VALUE` sets a variable; every other line
//! goes through each parser alone, and as an argument to `Config::load`.
//!
//! Invariants: a parsed target renders back (scheme, host and port, its
//! parameters percent-encoded) to a URL that parses to the same target; a
//! password in a hop or target URL never appears in any message, error or
//! `Display` keyhole makes of it; parsed instance names, address ranges and
//! durations render back to themselves; `redact` is idempotent; a loaded
//! configuration has at least one target and distinct listeners, and plain
//! upstreams only to this host.

use std::collections::HashMap;
use std::fmt::Write as _;

use keyhole::cidr::Cidr;
use keyhole::cloudsql::name::{self, InstanceName, Named};
use keyhole::config::target::{self, TargetUrl};
use keyhole::config::via::{redact, Via};
use keyhole::config::{duration, host_port, Config, ConfigError, TlsMode};

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for line in lines(&text).0.lines().take(16) {
        if !line.starts_with("env ") {
            parsers(line);
        }
    }
    // Every target names a host with ':' in it (`postgres://`, `P:R:I`);
    // without one, `Config::load` stops at "no target given".
    if !text.contains(':') {
        return;
    }
    let shown = load(&text, true);
    // Nothing keyhole says about the configuration shows a password in it.
    let mut start = 0;
    let mut flag_before = false;
    for line in text.split_inclusive('\n') {
        let at = start;
        start += line.len();
        // The argument after a `--flag` (no `=`) is that flag's value: its
        // text, which an error may quote. (Lines `load` does not pass on,
        // variables and unknown flags, are not arguments.)
        let trimmed = line.trim_end_matches('\n');
        let unknown_flag = trimmed.starts_with('-')
            && !known_flags()
                .iter()
                .any(|k| k == trimmed.split_once('=').map_or(trimmed, |(f, _)| f));
        let value_of_flag = flag_before;
        if !trimmed.starts_with("env ") && !unknown_flag {
            flag_before = trimmed.starts_with("--") && !trimmed.contains('=');
        }
        if value_of_flag {
            continue;
        }
        let Some(password) = password(line) else {
            continue;
        };
        if text.matches(password).count() > 1 {
            continue;
        }
        if shown.contains(password) {
            // The same input with this line's password masked: the
            // password must then be gone from what keyhole shows.
            let masked = format!(
                "{}{}{}",
                &text[..at],
                line.replacen(password, &"x".repeat(password.len()), 1),
                &text[start..]
            );
            assert!(
                load(&masked, false).contains(password),
                "the configuration shows the password {password:?} of {line:?}: {shown}"
            );
        }
    }
}

/// keyhole's long flags, as its `--help` lists them.
fn known_flags() -> &'static [String] {
    static FLAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    FLAGS.get_or_init(|| {
        let help = match Config::load(["keyhole", "--help"], &HashMap::new()) {
            Err(e) => e.to_string(),
            Ok(_) => String::new(),
        };
        let mut flags: Vec<String> = help
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(str::to_owned)
            .collect();
        flags.sort();
        flags.dedup();
        assert!(
            flags.iter().any(|f| f == "--port"),
            "no flags in --help: {help}"
        );
        flags
    })
}

/// The lines before `[file]`, and the file.
fn lines(text: &str) -> (&str, Option<&str>) {
    match text.split_once("\n[file]\n") {
        Some((lines, file)) => (lines, Some(file)),
        None => (text, None),
    }
}

/// A password where keyhole takes a URL with credentials: the line as a
/// target or hop URL, its `via=` parameters, `--via=`, or the variables
/// `ALL_PROXY` and `KEYHOLE_VIA`; if it is long enough to look for. (A
/// password pasted into some other value is that value's text, which an
/// error may quote.)
fn password(line: &str) -> Option<&str> {
    let mut urls: Vec<&str> = Vec::new();
    if let Some(var) = line.strip_prefix("env ") {
        if let Some((name, value)) = var.split_once('=') {
            if ["ALL_PROXY", "all_proxy", "KEYHOLE_VIA"].contains(&name) {
                urls.push(value);
            }
        }
    } else if let Some(value) = line.strip_prefix("--via=") {
        urls.push(value);
    } else if !line.starts_with('-') {
        let (head, query) = line.split_once('?').unwrap_or((line, ""));
        urls.push(head);
        for pair in query.split('&') {
            if let Some(value) = pair.strip_prefix("via=") {
                urls.push(value);
            }
        }
    }
    urls.into_iter().find_map(|url| {
        let (scheme, rest) = url.split_once("://")?;
        let scheme_ok = !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+.-".contains(&b));
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (userinfo, _) = rest[..end].rsplit_once('@')?;
        let (_, password) = userinfo.split_once(':')?;
        (scheme_ok && password.len() >= 6).then_some(password)
    })
}

/// `show(line)` must not contain the password in `line`. An occurrence
/// that stays when the password is masked in the input (a word of the
/// message itself, or the same text elsewhere) is not a leak.
fn no_leak(line: &str, what: &str, show: impl Fn(&str) -> String) {
    let Some(password) = password(line) else {
        return;
    };
    // The same text twice (once where no password belongs): ambiguous.
    if line.matches(password).count() > 1 {
        return;
    }
    let shown = show(line);
    if !shown.contains(password) {
        return;
    }
    let masked = line.replacen(password, &"x".repeat(password.len()), 1);
    assert!(
        show(&masked).contains(password),
        "{what} shows the password {password:?} of {line:?}: {shown}"
    );
}

fn parsers(line: &str) {
    let redacted = redact(line);
    assert_eq!(redact(&redacted), redacted, "redact is idempotent");
    no_leak(line, "redact", redact);

    no_leak(line, "a target error", |l| {
        target::parse(l).err().unwrap_or_default()
    });
    if let Ok(url) = target::parse(line) {
        check_target(&url);
    }
    no_leak(
        line,
        "a hop's Display (or its error)",
        |l| match Via::parse(l) {
            Ok(via) => via.to_string(),
            Err(e) => e,
        },
    );
    if let Ok(via) = Via::parse(line) {
        let shown = via.to_string();
        if matches!(via, Via::Socks5(_) | Via::Http(_)) {
            assert!(!shown.contains('@'), "a proxy hop shows its user: {shown}");
        }
        assert!(!via.kind().is_empty());
    }
    if let Ok(name) = InstanceName::parse(line) {
        assert_eq!(InstanceName::parse(&name.to_string()), Ok(name.clone()));
        assert_eq!(
            name.certificate_cn(),
            format!("{}:{}", name.project, name.instance)
        );
    }
    if let Ok(parsed) = name::parse_target(line, |s| Ok(s.to_owned())) {
        match &parsed.name {
            Named::Instance(n) => {
                assert_eq!(InstanceName::parse(&n.to_string()).as_ref(), Ok(n))
            }
            Named::Dns(dns) => {
                assert_eq!(dns, &dns.to_ascii_lowercase());
                assert!(!dns.ends_with('.') && dns.split('.').count() >= 2);
            }
        }
    }
    let _ = name::is_instance_target(line);
    if let Ok(d) = duration::parse(line) {
        if let Ok(ms) = u64::try_from(d.as_millis()) {
            assert_eq!(duration::parse(&format!("{ms}ms")), Ok(d), "{line:?}");
        }
    }
    if let Ok(cidr) = Cidr::parse(line) {
        assert_eq!(Cidr::parse(&cidr.to_string()), Ok(cidr), "{line:?}");
    }
    if let Ok(list) = Cidr::parse_list(line) {
        let joined: Vec<String> = list.iter().map(Cidr::to_string).collect();
        assert_eq!(Cidr::parse_list(&joined.join(",")), Ok(list));
    }
    let _ = target::parse_listen(line);
}

fn encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn check_target(url: &TargetUrl) {
    assert!(!url.host.is_empty() && url.port != 0);
    assert!(!url.host.contains(['/', '?', '@']), "host {:?}", url.host);
    // The same target, written out again.
    let mut again = format!(
        "{}://{}",
        url.protocol.scheme(),
        host_port(&url.host, url.port)
    );
    for (i, (name, value)) in url.params.iter().enumerate() {
        again.push(if i == 0 { '?' } else { '&' });
        // `via` is kept as written (its own parser decodes it), the rest decoded.
        let value = if name == "via" {
            value.clone()
        } else {
            encode(value)
        };
        let _ = write!(again, "{}={value}", encode(name));
    }
    assert_eq!(
        target::parse(&again).as_ref(),
        Ok(url),
        "the target written out again ({again:?}) parses differently"
    );
}

/// `Config::load` on the input; checks what it loaded (when `check`) and
/// returns everything it would show: the error, or the targets (names,
/// hops, `Debug`) and skipped targets.
fn load(text: &str, check: bool) -> String {
    let (lines, file) = lines(text);
    let mut args = vec!["keyhole".to_owned()];
    let mut env = HashMap::new();
    for line in lines.lines().take(16) {
        match line.strip_prefix("env ").map(|v| v.split_once('=')) {
            Some(Some((k, v))) => {
                env.insert(k.to_owned(), v.to_owned());
            }
            Some(None) => {}
            // Flags keyhole has, with or without a value (an unknown one is
            // clap's to refuse, and its spelling suggestions are slow).
            None if line.starts_with('-') => {
                let flag = line.split_once('=').map_or(line, |(f, _)| f);
                if known_flags().iter().any(|k| k == flag) {
                    args.push(line.to_owned());
                }
            }
            None => args.push(line.to_owned()),
        }
    }
    let path = file.map(|contents| {
        let path = std::env::temp_dir().join(format!(
            "keyhole-fuzz-config-{}-{:?}.toml",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, contents).expect("temporary config file");
        args.push("--config".to_owned());
        args.push(path.display().to_string());
        path
    });
    let loaded = Config::load(args, &env);
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
    }
    let config = match loaded {
        // clap's own messages (an unknown flag, a missing value) quote the
        // command line as typed: the user's own text, not keyhole's words.
        Err(ConfigError::Cli(_)) => return String::new(),
        Err(e) => return format!("{e}\n{}", e.one_line()),
        Ok(config) => config,
    };
    if check {
        assert!(!config.targets.is_empty());
        for (i, t) in config.targets.iter().enumerate() {
            for u in &config.targets[..i] {
                assert!(
                    t.listen.is_none() || t.listen != u.listen,
                    "shared listener"
                );
                assert!(t.unix_socket.is_none() || t.unix_socket != u.unix_socket);
            }
            if t.tls.mode == TlsMode::Disable {
                let host = t.host.trim_start_matches('[').trim_end_matches(']');
                let local = host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                assert!(local, "tls-mode=disable to {}", t.host);
            }
        }
    }
    let mut shown = String::new();
    for t in &config.targets {
        let _ = writeln!(shown, "{} via {}: {t:?}", t.name, t.via);
    }
    for s in &config.skipped {
        let _ = writeln!(shown, "skipped {}: {}", redact(&s.target), s.reason);
    }
    shown
}
