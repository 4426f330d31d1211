//! The deployment examples under `deploy/` must keep working as keyhole changes.
//!
//! For each example (the ECS task definition, the Cloud Run service, the
//! Kubernetes Deployment, and every `keyhole ...` command line in the Markdown
//! guides) this test takes keyhole's arguments and environment exactly as the
//! file writes them and runs the real binary as `keyhole check-config <args>`
//! with exactly that environment: the variables are cleared first, so no
//! `KEYHOLE_*` of the machine running the tests leaks in. It must exit 0 and
//! name every target of the example.
//!
//! The one liberty taken: the examples name CA files inside the container
//! (`/certs/...`), which do not exist here. Each example also says where those
//! files come from (the derived image's `COPY`, a Secret Manager or ConfigMap
//! volume); the test requires every file keyhole is given to be one of those,
//! creates them in a temporary directory holding a real CA certificate (made
//! by `certs/generate.sh`), and rewrites exactly those path values to point
//! there. Everything else is passed as written.
//!
//! Beside that, structural checks keep the pieces of each example in agreement:
//! the health check runs the image's entrypoint, probe ports are keyhole's
//! HTTP port, probe paths are keyhole's endpoints, the shutdown delays fit the
//! platform's grace period, the app waits for keyhole.

// Tests the examples, which use both clouds: they need the default build (both cloud features).
#![cfg(all(feature = "aws", feature = "gcp"))]

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Map, Value};
use yaml_rust2::{Yaml, YamlLoader};

use support::certs::TestPki;
use support::process::{describe_output, output_with_timeout};

/// The image every example runs (a placeholder for the operator's registry).
const IMAGE: &str = "REGISTRY/keyhole:0.1.0";
/// The ECS example's image: [`IMAGE`] plus the RDS CA bundle (deploy/ecs/Dockerfile).
const ECS_IMAGE: &str = "REGISTRY/keyhole:0.1.0-rds";

/// keyhole's boolean flags: given alone they mean true, and take no value.
const BOOL_FLAGS: &[&str] = &[
    "lazy-refresh",
    "auto-iam-authn",
    "private-ip",
    "psc",
    "auto-ip",
    "structured-logs",
    "health-check",
    "prometheus",
    "readiness-checks-upstream",
    "quitquitquit",
    "exit-zero-on-sigterm",
    "run-connection-test",
    "skip-failed-targets",
];
/// Options whose value is a file keyhole reads.
const FILE_OPTIONS: &[&str] = &[
    "ca-file",
    "client-cert",
    "client-key",
    "listen-cert",
    "listen-key",
];
/// Target parameters whose value is a file keyhole reads.
const FILE_PARAMS: &[&str] = &["ca-file", "client-cert", "client-key"];
/// Subcommands that do not configure the proxy: such command lines are not checked.
const OTHER_COMMANDS: &[&str] = &[
    "token",
    "wait",
    "shutdown",
    "help",
    "completions",
    "man",
    "tunnel-fd",
];

const DEFAULT_HTTP_PORT: u16 = 9090;
const DEFAULT_ADMIN_PORT: u16 = 9091;

// ---------------------------------------------------------------------------
// Reading the repository's files

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn json(relative: &str) -> Value {
    serde_json::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// A one-document YAML file as JSON values. Scalars keep their YAML type
/// (`"8090"` is a string, `8090` a number), which matters for Kubernetes.
fn yaml(relative: &str) -> Value {
    let docs =
        YamlLoader::load_from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"));
    assert_eq!(docs.len(), 1, "{relative}: expected one YAML document");
    yaml_to_json(&docs[0], relative)
}

fn yaml_to_json(y: &Yaml, file: &str) -> Value {
    match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(r) => {
            let f: f64 = r
                .parse()
                .unwrap_or_else(|_| panic!("{file}: bad number {r}"));
            Value::from(f)
        }
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(items) => Value::Array(items.iter().map(|i| yaml_to_json(i, file)).collect()),
        Yaml::Hash(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let Yaml::String(key) = k else {
                    panic!("{file}: mapping key {k:?} is not a string")
                };
                out.insert(key.clone(), yaml_to_json(v, file));
            }
            Value::Object(out)
        }
        Yaml::Alias(_) | Yaml::BadValue => panic!("{file}: unsupported YAML node {y:?}"),
    }
}

fn string(v: &Value, what: &str) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v}"))
        .to_owned()
}

fn strings(v: &Value, what: &str) -> Vec<String> {
    match v {
        Value::Null => Vec::new(),
        Value::Array(items) => items.iter().map(|i| string(i, what)).collect(),
        _ => panic!("{what}: expected a list of strings, got {v}"),
    }
}

fn array<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what}: expected a list, got {v}"))
}

/// The element of a list of objects whose `key` is `name`.
fn named<'a>(list: &'a Value, key: &str, name: &str, what: &str) -> &'a Value {
    let found: Vec<&Value> = array(list, what)
        .iter()
        .filter(|c| c[key] == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{what}: expected exactly one entry with {key} {name}"
    );
    found[0]
}

/// The image's entrypoint, from the repository's Dockerfile.
fn entrypoint() -> Vec<String> {
    let dockerfile = read("Dockerfile");
    let lines: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("ENTRYPOINT "))
        .collect();
    assert_eq!(lines.len(), 1, "Dockerfile: expected one ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(lines[0])
        .unwrap_or_else(|e| panic!("Dockerfile: ENTRYPOINT is not exec form ({e})"));
    assert_eq!(
        entry.len(),
        1,
        "Dockerfile: ENTRYPOINT should be the binary alone"
    );
    entry
}

fn entrypoint_binary() -> String {
    entrypoint().remove(0)
}

// ---------------------------------------------------------------------------
// Durations and targets, as keyhole writes them

/// `500ms`, `30s`, `2m`, `1h30m`, or bare seconds.
fn duration(text: &str) -> Duration {
    if let Ok(secs) = text.parse::<u64>() {
        return Duration::from_secs(secs);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        assert!(digits > 0, "bad duration {text:?}");
        let n: u64 = rest[..digits].parse().expect("digits");
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        total += match &rest[..unit] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            other => panic!("bad duration {text:?}: unit {other:?}"),
        };
        rest = &rest[unit..];
    }
    total
}

/// The host of `postgres://HOST[:PORT][?PARAMS]`.
fn target_host(target: &str) -> &str {
    let rest = target.split_once("://").map_or(target, |(_, r)| r);
    let authority = rest.split(['?', '/']).next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority.split(':').next().unwrap_or(authority)
}

fn target_port(target: &str) -> Option<&str> {
    let rest = target.split_once("://").map_or(target, |(_, r)| r);
    let authority = rest.split(['?', '/']).next().unwrap_or(rest);
    let after_host = authority.rsplit_once(']').map_or(authority, |(_, p)| p);
    after_host.rsplit_once(':').map(|(_, p)| p)
}

fn target_param<'a>(target: &'a str, key: &str) -> Option<&'a str> {
    let (_, query) = target.split_once('?')?;
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn is_target(word: &str) -> bool {
    word.starts_with("postgres://") || word.starts_with("mysql://") || is_instance(word)
}

/// A Cloud SQL instance connection name (`project:region:instance`).
fn is_instance(word: &str) -> bool {
    let name = word.strip_prefix("cloudsql://").unwrap_or(word);
    !word.contains("://") && name.split('?').next().unwrap_or(name).split(':').count() >= 3
        || word.starts_with("cloudsql://")
}

// ---------------------------------------------------------------------------
// One keyhole invocation taken from an example

/// Where the files keyhole is given come from.
#[derive(Clone)]
enum Files {
    /// The platform provides exactly these absolute paths (a volume, the image).
    Provided(Vec<String>),
    /// A command line on a laptop: relative names, in the working directory.
    WorkingDirectory,
}

#[derive(Clone)]
struct Invocation {
    /// Which example, for messages.
    what: String,
    args: Vec<String>,
    /// The container's or command line's environment, as written.
    env: Vec<(String, String)>,
    /// What the platform itself adds to the container's environment.
    platform_env: Vec<(String, String)>,
    files: Files,
}

impl Invocation {
    fn new(what: &str, args: Vec<String>, env: Vec<(String, String)>, files: Files) -> Invocation {
        let inv = Invocation {
            what: what.to_owned(),
            args,
            env,
            platform_env: Vec::new(),
            files,
        };
        assert!(
            inv.option("config").is_none(),
            "{what}: the test reads flags and variables only, not a --config file"
        );
        let names: BTreeSet<&str> = inv.env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names.len(),
            inv.env.len(),
            "{what}: a variable is set twice"
        );
        inv
    }

    /// `(flag, value)` for every option in the arguments (the value is `None`
    /// for a boolean flag given alone), and the positional arguments.
    fn scan(&self) -> (Vec<(String, Option<String>)>, Vec<String>) {
        let mut options = Vec::new();
        let mut positional = Vec::new();
        let mut i = 0;
        while i < self.args.len() {
            let arg = &self.args[i];
            let long = match arg.as_str() {
                "-p" => Some("port".to_owned()),
                "-a" => Some("address".to_owned()),
                a if a.starts_with("--") => Some(a[2..].to_owned()),
                a if a.starts_with('-') => panic!("{}: unknown short option {a}", self.what),
                _ => None,
            };
            match long {
                None => positional.push(arg.clone()),
                Some(long) => {
                    if let Some((name, value)) = long.split_once('=') {
                        options.push((name.to_owned(), Some(value.to_owned())));
                    } else if BOOL_FLAGS.contains(&long.as_str()) {
                        options.push((long, None));
                    } else {
                        let value = self
                            .args
                            .get(i + 1)
                            .unwrap_or_else(|| panic!("{}: {arg} without a value", self.what));
                        options.push((long, Some(value.clone())));
                        i += 1;
                    }
                }
            }
            i += 1;
        }
        (options, positional)
    }

    fn env_var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// An option's value as keyhole resolves it: the flag, else `KEYHOLE_<NAME>`.
    /// A boolean flag given alone reads as "true".
    fn option(&self, name: &str) -> Option<String> {
        let (options, _) = self.scan();
        let given: Vec<Option<String>> = options
            .into_iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v)
            .collect();
        assert!(given.len() <= 1, "{}: --{name} is given twice", self.what);
        if let Some(value) = given.into_iter().next() {
            return Some(value.unwrap_or_else(|| "true".to_owned()));
        }
        let var = format!("KEYHOLE_{}", name.to_uppercase().replace('-', "_"));
        self.env_var(&var).map(str::to_owned)
    }

    fn flag(&self, name: &str) -> bool {
        match self.option(name).as_deref() {
            None => false,
            Some("true" | "1" | "yes" | "on") => true,
            Some("false" | "0" | "no" | "off") => false,
            Some(other) => panic!("{}: --{name}={other} is not a boolean", self.what),
        }
    }

    fn port(&self, name: &str, default: u16) -> u16 {
        self.option(name).map_or(default, |p| {
            p.parse()
                .unwrap_or_else(|_| panic!("{}: --{name} {p} is not a port", self.what))
        })
    }

    fn http_port(&self) -> u16 {
        self.port("http-port", DEFAULT_HTTP_PORT)
    }

    fn delay(&self, name: &str) -> Duration {
        self.option(name).map_or(Duration::ZERO, |d| duration(&d))
    }

    /// `--min-sigterm-delay` plus `--max-sigterm-delay`: the longest keyhole
    /// takes to stop after SIGTERM.
    fn shutdown_budget(&self) -> Duration {
        self.delay("min-sigterm-delay") + self.delay("max-sigterm-delay")
    }

    /// The targets, from the arguments and `KEYHOLE_TARGETS`.
    fn targets(&self) -> Vec<String> {
        let (_, mut targets) = self.scan();
        if let Some(list) = self.env_var("KEYHOLE_TARGETS") {
            targets.extend(list.split_whitespace().map(str::to_owned));
        }
        for t in &targets {
            assert!(is_target(t), "{}: {t:?} is not a target", self.what);
        }
        assert!(!targets.is_empty(), "{}: no targets", self.what);
        targets
    }

    /// Applies `f` to every file value: file options (flags and variables) and
    /// the file parameters of every target.
    fn map_files(&mut self, f: &mut dyn FnMut(&str) -> String) {
        let rewrite_target = |t: &str, f: &mut dyn FnMut(&str) -> String| -> String {
            let Some((base, query)) = t.split_once('?') else {
                return t.to_owned();
            };
            let params: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) if FILE_PARAMS.contains(&k) => format!("{k}={}", f(v)),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{base}?{}", params.join("&"))
        };
        let mut i = 0;
        while i < self.args.len() {
            let arg = self.args[i].clone();
            if let Some(long) = arg.strip_prefix("--") {
                if let Some((name, value)) = long.split_once('=') {
                    if FILE_OPTIONS.contains(&name) {
                        self.args[i] = format!("--{name}={}", f(value));
                    }
                } else if FILE_OPTIONS.contains(&long) {
                    self.args[i + 1] = f(&self.args[i + 1]);
                    i += 1;
                } else if !BOOL_FLAGS.contains(&long) {
                    i += 1;
                }
            } else if arg == "-p" || arg == "-a" {
                i += 1;
            } else if is_target(&arg) {
                self.args[i] = rewrite_target(&arg, f);
            }
            i += 1;
        }
        for (name, value) in &mut self.env {
            let option = name
                .strip_prefix("KEYHOLE_")
                .map(|o| o.to_lowercase().replace('_', "-"));
            match option.as_deref() {
                Some(o) if FILE_OPTIONS.contains(&o) => *value = f(value),
                Some("targets") => {
                    let targets: Vec<String> = value
                        .split_whitespace()
                        .map(|t| rewrite_target(t, f))
                        .collect();
                    *value = targets.join(" ");
                }
                _ => {}
            }
        }
    }

    /// Every file value keyhole is given.
    fn file_values(&self) -> Vec<String> {
        let mut copy = self.clone();
        let mut seen = Vec::new();
        copy.map_files(&mut |v| {
            seen.push(v.to_owned());
            v.to_owned()
        });
        seen
    }

    /// Checks that every file keyhole is given is one the example provides.
    fn check_files_are_provided(&self) {
        let values = self.file_values();
        match &self.files {
            Files::Provided(provided) => {
                // A Cloud SQL instance's CA comes from the Admin API.
                let instances_only = self.targets().iter().all(|t| is_instance(t));
                assert!(
                    !values.is_empty() || instances_only,
                    "{}: names no CA file, and the image has none for the database",
                    self.what
                );
                for v in values {
                    assert!(
                        provided.contains(&v),
                        "{}: keyhole is given {v}, but the example provides only {provided:?}",
                        self.what
                    );
                }
            }
            Files::WorkingDirectory => {
                for v in values {
                    assert!(
                        Path::new(&v).is_relative(),
                        "{}: {v} is a path on somebody's machine",
                        self.what
                    );
                }
            }
        }
    }

    /// Runs `keyhole check-config` with the example's arguments and environment
    /// (plus what the platform adds), after placing a real CA certificate
    /// wherever the example's files would be; returns its stdout.
    fn check_config(mut self) -> String {
        self.check_files_are_provided();
        let targets = self.targets();
        let pki = TestPki::generate(&[]);
        let root = support::scratch_dir("keyhole-deploy-");
        // Files named inside the container (/certs/...) go to the same path under
        // the scratch directory, and only those values are rewritten; relative
        // names on a command line are created in its working directory, which
        // is the scratch directory.
        let inside_container = matches!(self.files, Files::Provided(_));
        self.map_files(&mut |value: &str| -> String {
            let local = root.path().join(value.trim_start_matches('/'));
            std::fs::create_dir_all(local.parent().expect("a parent")).expect("mkdir");
            std::fs::copy(&pki.ca, &local).expect("copy the CA certificate");
            if inside_container {
                local.to_str().expect("UTF-8 path").to_owned()
            } else {
                value.to_owned()
            }
        });
        let (args, env) = (&self.args, &self.env);

        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyhole"));
        cmd.arg("check-config")
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .envs(self.platform_env.iter().map(|(k, v)| (k, v)))
            .current_dir(root.path());
        eprintln!(
            "{}: keyhole check-config {args:?}\n  environment {env:?}\n  platform {:?}",
            self.what, self.platform_env
        );
        let out = output_with_timeout(&mut cmd, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "{}: keyhole check-config failed\n{}",
            self.what,
            describe_output(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        for t in &targets {
            let mut names = vec![target_host(t)];
            names.extend(target_port(t));
            names.extend(target_param(t, "server-name"));
            for name in names {
                assert!(
                    stdout.contains(name),
                    "{}: check-config does not name {name} (target {t}):\n{stdout}",
                    self.what
                );
            }
        }
        stdout
    }
}

/// Every `KEYHOLE_*` variable must be one of keyhole's options: a misspelt
/// variable is not an error to keyhole, it is silently not read.
fn check_variables_are_options(inv: &Invocation) {
    let out = Command::new(env!("CARGO_BIN_EXE_keyhole"))
        .arg("--help")
        .env_clear()
        .output()
        .expect("run keyhole --help");
    let help = String::from_utf8_lossy(&out.stdout);
    for (name, _) in &inv.env {
        let Some(option) = name.strip_prefix("KEYHOLE_") else {
            continue;
        };
        if option == "TARGETS" {
            continue;
        }
        let flag = format!("--{}", option.to_lowercase().replace('_', "-"));
        let known = help
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .any(|w| w == flag);
        assert!(
            known,
            "{}: {name} is not a keyhole option ({flag} is not in --help)",
            inv.what
        );
    }
}

/// `[{name, value}]`, as ECS, Cloud Run and Kubernetes write environments.
/// Every value must be a literal string (Kubernetes rejects numbers).
fn env_list(v: &Value, what: &str) -> Vec<(String, String)> {
    match v {
        Value::Null => Vec::new(),
        _ => array(v, what)
            .iter()
            .map(|e| {
                let name = string(&e["name"], what);
                assert!(
                    e.get("valueFrom").is_none(),
                    "{what}: {name} comes from valueFrom, which the test cannot resolve"
                );
                (
                    name.clone(),
                    string(&e["value"], &format!("{what}: {name}")),
                )
            })
            .collect(),
    }
}

// ---------------------------------------------------------------------------
// ECS / Fargate

const ECS_FILE: &str = "deploy/ecs/task-definition.json";
const ECS_DOCKERFILE: &str = "deploy/ecs/Dockerfile";

/// The files the derived image copies in (`COPY ... SOURCE DEST`), and its base.
fn ecs_image() -> (String, Vec<String>) {
    let dockerfile = read(ECS_DOCKERFILE);
    let mut base = None;
    let mut copied = Vec::new();
    let mut args: Vec<(String, String)> = Vec::new();
    for line in dockerfile.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("ARG") => {
                let (k, v) = words
                    .next()
                    .and_then(|a| a.split_once('='))
                    .unwrap_or_else(|| panic!("{ECS_DOCKERFILE}: ARG without a default: {line}"));
                args.push((k.to_owned(), v.to_owned()));
            }
            Some("FROM") => {
                let image = words.next().expect("FROM image");
                let image = args
                    .iter()
                    .find(|(k, _)| image == format!("${{{k}}}"))
                    .map_or(image.to_owned(), |(_, v)| v.clone());
                base = Some(image);
            }
            Some("COPY") | Some("ADD") => {
                let rest: Vec<&str> = words.filter(|w| !w.starts_with("--")).collect();
                let dest = rest.last().expect("COPY destination");
                assert!(
                    dest.starts_with('/'),
                    "{ECS_DOCKERFILE}: relative COPY destination"
                );
                copied.push((*dest).to_owned());
            }
            Some("ENTRYPOINT" | "CMD" | "USER" | "STOPSIGNAL") => {
                panic!("{ECS_DOCKERFILE}: must not change the keyhole image's {line}")
            }
            _ => {}
        }
    }
    (base.expect("a FROM line"), copied)
}

fn ecs() -> (Value, Invocation) {
    let td = json(ECS_FILE);
    let keyhole = named(&td["containerDefinitions"], "name", "keyhole", ECS_FILE);
    let what = format!("{ECS_FILE} (container keyhole)");
    assert!(
        keyhole.get("entryPoint").is_none(),
        "{what}: entryPoint overrides the image's"
    );
    let args = strings(&keyhole["command"], &what);
    let env = env_list(&keyhole["environment"], &what);
    let (_, copied) = ecs_image();
    let mut inv = Invocation::new(&what, args, env, Files::Provided(copied));
    // What Fargate adds to every container of a task with a task role.
    inv.platform_env = vec![
        (
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI".to_owned(),
            "/v2/credentials/5f0f0e59-2c6a-4b6e-9a3e-6c1d2a7e8b90".to_owned(),
        ),
        ("AWS_REGION".to_owned(), "eu-west-1".to_owned()),
        ("AWS_DEFAULT_REGION".to_owned(), "eu-west-1".to_owned()),
    ];
    (td, inv)
}

#[test]
fn ecs_task_definition_is_consistent() {
    let (td, inv) = ecs();
    let what = ECS_FILE;
    assert_eq!(
        td["networkMode"], "awsvpc",
        "{what}: sidecars share localhost in awsvpc mode"
    );
    assert!(
        strings(&td["requiresCompatibilities"], what).contains(&"FARGATE".to_owned()),
        "{what}: not a Fargate task definition"
    );
    assert!(
        td["taskRoleArn"].is_string(),
        "{what}: iam=aws needs a task role"
    );

    let containers = &td["containerDefinitions"];
    let keyhole = named(containers, "name", "keyhole", what);
    assert_eq!(keyhole["image"], ECS_IMAGE, "{what}: keyhole's image");
    let (base, _) = ecs_image();
    assert_eq!(base, IMAGE, "{ECS_DOCKERFILE}: the derived image's base");
    assert_eq!(
        keyhole["essential"], true,
        "{what}: keyhole is essential (deploy/README.md)"
    );
    inv.check_files_are_provided();
    assert!(
        inv.flag("health-check"),
        "{what}: the health check needs --health-check"
    );
    for t in inv.targets() {
        assert_eq!(
            target_param(&t, "iam"),
            Some("aws"),
            "{what}: {t} logs in with the task role"
        );
    }

    // The health check: keyhole wait, exec form (the image has no shell), the
    // image's own binary, polling the port keyhole serves, within its timeout.
    let check = &keyhole["healthCheck"];
    let command = strings(&check["command"], what);
    assert_eq!(
        command[0], "CMD",
        "{what}: exec form; there is no shell for CMD-SHELL"
    );
    assert_eq!(
        command[1],
        entrypoint_binary(),
        "{what}: the health check's binary"
    );
    assert_eq!(
        command[2], "wait",
        "{what}: the health check runs keyhole wait"
    );
    let wait = Invocation::new(
        &format!("{what} (healthCheck)"),
        command[3..].to_vec(),
        inv.env.clone(),
        Files::WorkingDirectory,
    );
    assert_eq!(
        wait.http_port(),
        inv.http_port(),
        "{what}: keyhole wait polls another port"
    );
    let max = wait
        .option("max")
        .map_or(Duration::from_secs(30), |m| duration(&m));
    let timeout = Duration::from_secs(check["timeout"].as_u64().unwrap_or(5));
    assert!(
        max < timeout,
        "{what}: keyhole wait --max {max:?} outlasts the check's timeout"
    );

    // The app starts once keyhole is healthy.
    for c in array(containers, what) {
        if c["name"] == "keyhole" {
            continue;
        }
        let needs_keyhole = array(&c["dependsOn"], &format!("{what}: {}", c["name"]))
            .iter()
            .any(|d| d["containerName"] == "keyhole" && d["condition"] == "HEALTHY");
        assert!(
            needs_keyhole,
            "{what}: {} does not wait for keyhole HEALTHY",
            c["name"]
        );
    }

    // Both delays fit before ECS sends SIGKILL (Fargate: stopTimeout, at most 120 s).
    let stop = Duration::from_secs(keyhole["stopTimeout"].as_u64().unwrap_or(30));
    assert!(
        stop <= Duration::from_secs(120),
        "{what}: Fargate allows stopTimeout up to 120"
    );
    assert!(
        inv.shutdown_budget() < stop,
        "{what}: the sigterm delays ({:?}) do not fit in stopTimeout {stop:?}",
        inv.shutdown_budget()
    );

    assert_eq!(
        keyhole["logConfiguration"]["logDriver"], "awslogs",
        "{what}: log driver"
    );
    assert_eq!(
        inv.option("log-format").as_deref(),
        Some("cloudwatch"),
        "{what}: JSON logs with CloudWatch's names"
    );
}

#[test]
fn ecs_task_definition_passes_check_config() {
    let (_, inv) = ecs();
    check_variables_are_options(&inv);
    inv.check_config();
}

// ---------------------------------------------------------------------------
// Kubernetes-style pod specs (Cloud Run's services use the same container schema)

/// The files a container sees through its volume mounts. A volume must list its
/// `items`, so that the file names are in the example.
fn mounted_files(pod: &Value, container: &Value, what: &str) -> Vec<String> {
    let mut files = Vec::new();
    if container["volumeMounts"].is_null() {
        return files;
    }
    for mount in array(&container["volumeMounts"], what) {
        let name = string(&mount["name"], what);
        let dir = string(&mount["mountPath"], what);
        let volume = named(&pod["volumes"], "name", &name, what);
        let source = ["secret", "configMap"]
            .iter()
            .find_map(|k| volume.get(*k))
            .unwrap_or_else(|| panic!("{what}: volume {name} is neither a secret nor a ConfigMap"));
        for item in array(&source["items"], &format!("{what}: volume {name} items")) {
            files.push(format!("{dir}/{}", string(&item["path"], what)));
        }
    }
    files
}

/// The port a probe dials, resolving a named port.
fn probe_port(container: &Value, probe: &Value, what: &str) -> u16 {
    let port = &probe["httpGet"]["port"];
    if let Some(n) = port.as_u64() {
        return u16::try_from(n).expect("a port number");
    }
    let name = string(port, what);
    let p = named(&container["ports"], "name", &name, what);
    u16::try_from(p["containerPort"].as_u64().expect("containerPort")).expect("a port number")
}

/// Checks each probe that is present (and those in `required`): an HTTP GET on
/// keyhole's endpoint for it, on keyhole's HTTP port.
fn check_probes(inv: &Invocation, container: &Value, required: &[&str], what: &str) {
    assert!(
        inv.flag("health-check"),
        "{what}: probes need --health-check"
    );
    for (probe, path) in [
        ("startupProbe", "/startup"),
        ("livenessProbe", "/liveness"),
        ("readinessProbe", "/readiness"),
    ] {
        let p = &container[probe];
        if p.is_null() {
            assert!(!required.contains(&probe), "{what}: no {probe}");
            continue;
        }
        assert_eq!(p["httpGet"]["path"], path, "{what}: {probe} path");
        assert_eq!(
            probe_port(container, p, what),
            inv.http_port(),
            "{what}: {probe} port"
        );
    }
    // The probes come from outside the container's loopback interface.
    let address = inv
        .option("http-address")
        .unwrap_or_else(|| "127.0.0.1".to_owned());
    assert!(
        address == "0.0.0.0" || address == "::",
        "{what}: probes cannot reach an HTTP server on {address}"
    );
}

fn container_invocation(pod: &Value, container: &Value, what: &str) -> Invocation {
    assert!(
        container.get("command").is_none(),
        "{what}: command replaces the image's entrypoint"
    );
    let args = strings(&container["args"], what);
    let env = env_list(&container["env"], what);
    let files = mounted_files(pod, container, what);
    Invocation::new(what, args, env, Files::Provided(files))
}

// ---------------------------------------------------------------------------
// Cloud Run

const CLOUD_RUN_FILE: &str = "deploy/cloud-run/service.yaml";

fn cloud_run() -> (Value, Invocation) {
    let svc = yaml(CLOUD_RUN_FILE);
    assert_eq!(
        svc["apiVersion"], "serving.knative.dev/v1",
        "{CLOUD_RUN_FILE}: apiVersion"
    );
    assert_eq!(svc["kind"], "Service", "{CLOUD_RUN_FILE}: kind");
    let pod = &svc["spec"]["template"]["spec"];
    let keyhole = named(&pod["containers"], "name", "keyhole", CLOUD_RUN_FILE);
    let inv = container_invocation(
        pod,
        keyhole,
        &format!("{CLOUD_RUN_FILE} (container keyhole)"),
    );
    (svc, inv)
}

#[test]
fn cloud_run_service_is_consistent() {
    let (svc, inv) = cloud_run();
    let what = CLOUD_RUN_FILE;
    let template = &svc["spec"]["template"];
    let pod = &template["spec"];
    let keyhole = named(&pod["containers"], "name", "keyhole", what);
    assert_eq!(keyhole["image"], IMAGE, "{what}: keyhole's image");
    assert!(
        keyhole.get("ports").is_none(),
        "{what}: only the ingress container has ports"
    );
    inv.check_files_are_provided();
    check_probes(&inv, keyhole, &["startupProbe", "livenessProbe"], what);

    // Every other container starts after keyhole's startup probe has passed.
    let annotations = &template["metadata"]["annotations"];
    let deps: Value = serde_json::from_str(&string(
        &annotations["run.googleapis.com/container-dependencies"],
        what,
    ))
    .unwrap_or_else(|e| panic!("{what}: container-dependencies is not JSON: {e}"));
    for c in array(&pod["containers"], what) {
        let name = string(&c["name"], what);
        if name != "keyhole" {
            assert!(
                strings(&deps[&name], what).contains(&"keyhole".to_owned()),
                "{what}: {name} does not depend on keyhole"
            );
        }
    }

    // A private IP is reached through the VPC.
    for t in inv.targets() {
        assert_eq!(
            target_param(&t, "iam"),
            Some("gcp"),
            "{what}: {t} logs in as the service"
        );
        assert!(
            target_host(&t).starts_with("10."),
            "{what}: {t} is not a private IP"
        );
    }
    assert!(
        annotations["run.googleapis.com/vpc-access-egress"].is_string(),
        "{what}: a private IP needs VPC egress"
    );

    // Cloud Run sends SIGKILL 10 s after SIGTERM.
    assert!(
        inv.shutdown_budget() < Duration::from_secs(10),
        "{what}: the sigterm delays ({:?}) do not fit in Cloud Run's 10 s",
        inv.shutdown_budget()
    );
}

#[test]
fn cloud_run_service_passes_check_config() {
    let (_, inv) = cloud_run();
    check_variables_are_options(&inv);
    inv.check_config();
}

const CLOUD_RUN_CONNECTOR_FILE: &str = "deploy/cloud-run/service-connector.yaml";

fn cloud_run_connector() -> (Value, Invocation) {
    let svc = yaml(CLOUD_RUN_CONNECTOR_FILE);
    let pod = &svc["spec"]["template"]["spec"];
    let keyhole = named(
        &pod["containers"],
        "name",
        "keyhole",
        CLOUD_RUN_CONNECTOR_FILE,
    );
    let inv = container_invocation(
        pod,
        keyhole,
        &format!("{CLOUD_RUN_CONNECTOR_FILE} (container keyhole)"),
    );
    (svc, inv)
}

#[test]
fn cloud_run_connector_service_is_consistent() {
    let (svc, inv) = cloud_run_connector();
    let what = CLOUD_RUN_CONNECTOR_FILE;
    let pod = &svc["spec"]["template"]["spec"];
    let keyhole = named(&pod["containers"], "name", "keyhole", what);
    assert_eq!(keyhole["image"], IMAGE, "{what}: keyhole's image");
    check_probes(&inv, keyhole, &["startupProbe", "livenessProbe"], what);
    // Instances by connection name, fetched lazily (Cloud Run throttles CPU
    // between requests), on a fixed port so nothing is fetched at start.
    let targets = inv.targets();
    assert!(
        targets.iter().all(|t| is_instance(t)),
        "{what}: {targets:?}"
    );
    let (options, _) = inv.scan();
    for flag in ["lazy-refresh", "port", "auto-iam-authn"] {
        assert!(
            options.iter().any(|(name, _)| name == flag),
            "{what}: keyhole runs without --{flag}"
        );
    }
    // The app logs in as the service's IAM user, with no password.
    let app = named(&pod["containers"], "name", "app", what);
    let env = array(&app["env"], what);
    assert!(
        env.iter().all(|e| e["name"] != "PGPASSWORD"),
        "{what}: a password"
    );
    assert!(
        inv.shutdown_budget() < Duration::from_secs(10),
        "{what}: the sigterm delays ({:?}) do not fit in Cloud Run's 10 s",
        inv.shutdown_budget()
    );
}

#[test]
fn cloud_run_connector_service_passes_check_config() {
    let (_, inv) = cloud_run_connector();
    check_variables_are_options(&inv);
    let report = inv.check_config();
    assert!(
        report.contains("[target my-project:europe-west1:orders]")
            && report.contains("automatic IAM database login"),
        "{report}"
    );
}

// ---------------------------------------------------------------------------
// Kubernetes

const K8S_FILE: &str = "deploy/kubernetes/deployment.yaml";

fn kubernetes() -> (Value, Invocation) {
    let d = yaml(K8S_FILE);
    assert_eq!(d["apiVersion"], "apps/v1", "{K8S_FILE}: apiVersion");
    assert_eq!(d["kind"], "Deployment", "{K8S_FILE}: kind");
    let pod = &d["spec"]["template"]["spec"];
    let keyhole = named(&pod["initContainers"], "name", "keyhole", K8S_FILE);
    let inv = container_invocation(
        pod,
        keyhole,
        &format!("{K8S_FILE} (init container keyhole)"),
    );
    (d, inv)
}

#[test]
fn kubernetes_deployment_is_consistent() {
    let (d, inv) = kubernetes();
    let what = K8S_FILE;
    let pod = &d["spec"]["template"]["spec"];
    let keyhole = named(&pod["initContainers"], "name", "keyhole", what);
    assert_eq!(keyhole["image"], IMAGE, "{what}: keyhole's image");
    // A native sidecar: a restartable init container, not a regular one.
    assert_eq!(
        keyhole["restartPolicy"], "Always",
        "{what}: keyhole is a native sidecar"
    );
    assert!(
        array(&pod["containers"], what)
            .iter()
            .all(|c| c["name"] != "keyhole"),
        "{what}: keyhole is also a regular container"
    );
    inv.check_files_are_provided();
    check_probes(
        &inv,
        keyhole,
        &["startupProbe", "readinessProbe", "livenessProbe"],
        what,
    );

    // preStop: keyhole shutdown, inside the container, on the admin port keyhole opens.
    let command = strings(&keyhole["lifecycle"]["preStop"]["exec"]["command"], what);
    assert_eq!(
        command[0],
        entrypoint_binary(),
        "{what}: the preStop hook's binary"
    );
    assert_eq!(
        command.get(1).map(String::as_str),
        Some("shutdown"),
        "{what}: preStop"
    );
    assert!(
        inv.flag("quitquitquit"),
        "{what}: keyhole shutdown needs --quitquitquit"
    );
    let shutdown = Invocation::new(
        &format!("{what} (preStop)"),
        command[2..].to_vec(),
        inv.env.clone(),
        Files::WorkingDirectory,
    );
    assert_eq!(
        shutdown.port("admin-port", DEFAULT_ADMIN_PORT),
        inv.port("admin-port", DEFAULT_ADMIN_PORT),
        "{what}: keyhole shutdown posts to another port"
    );

    // The whole pod has terminationGracePeriodSeconds; keyhole's delays fit in it.
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30));
    assert!(
        inv.shutdown_budget() < grace,
        "{what}: the sigterm delays ({:?}) do not fit in {grace:?}",
        inv.shutdown_budget()
    );

    let security = &keyhole["securityContext"];
    assert_eq!(security["runAsNonRoot"], true, "{what}: runAsNonRoot");
    assert_eq!(
        security["readOnlyRootFilesystem"], true,
        "{what}: readOnlyRootFilesystem"
    );
    assert_eq!(
        security["allowPrivilegeEscalation"], false,
        "{what}: allowPrivilegeEscalation"
    );
    assert!(
        strings(&security["capabilities"]["drop"], what).contains(&"ALL".to_owned()),
        "{what}: drop ALL capabilities"
    );
    let resources = &keyhole["resources"];
    assert!(
        resources["requests"].is_object(),
        "{what}: resource requests"
    );
    assert!(
        resources["limits"]["memory"].is_string(),
        "{what}: a memory limit"
    );
    assert_eq!(
        inv.option("log-format").as_deref(),
        Some("json"),
        "{what}: JSON logs"
    );
}

#[test]
fn kubernetes_deployment_passes_check_config() {
    let (_, inv) = kubernetes();
    check_variables_are_options(&inv);
    inv.check_config();
}

// ---------------------------------------------------------------------------
// Command lines in the Markdown guides

/// The guides whose ```sh blocks are checked: the deployment guides, the
/// README's recipes and the reference pages with proxy command lines.
const GUIDES: &[&str] = &[
    "deploy/README.md",
    "deploy/laptop/README.md",
    "README.md",
    "docs/configuration.md",
    "docs/commands.md",
    "docs/deployment.md",
    "docs/hops.md",
];

/// A shell word list, as sh would split it: single quotes, double quotes
/// (with `\"`, `\\`, `\$`, `` \` `` escapes), backslash escapes, `#` comments.
/// Anything sh would expand or treat as an operator is refused: these lines are
/// meant to be copied and pasted as they are.
fn shell_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                words.extend(word.take());
            }
            '#' if word.is_none() => break,
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err("unterminated '".to_owned()),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err("unterminated \"".to_owned()),
                        },
                        Some(c @ ('$' | '`')) => return Err(format!("{c} expands in \"...\"")),
                        Some(c) => w.push(c),
                        None => return Err("unterminated \"".to_owned()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err("a trailing backslash".to_owned()),
            },
            '$' | '`' => return Err(format!("{c} would be expanded by the shell")),
            '*' | '?' | '[' => return Err(format!("an unquoted {c} is a glob pattern")),
            '~' if word.is_none() => return Err("~ would be expanded by the shell".to_owned()),
            ';' | '&' | '|' | '<' | '>' | '(' | ')' => {
                return Err(format!("{c} is a shell operator"))
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

/// The logical lines of every ```sh block (backslash-newline joined), with the
/// line number each starts on.
fn sh_lines(markdown: &str) -> Vec<(usize, String)> {
    #[derive(PartialEq)]
    enum Block {
        Prose,
        Sh,
        Other,
    }
    let mut block = Block::Prose;
    let mut lines = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        if let Some(fence) = line.trim_start().strip_prefix("```") {
            assert!(
                pending.is_none(),
                "line {}: a block ends in a continuation",
                i + 1
            );
            block = match block {
                Block::Prose if fence.trim() == "sh" => Block::Sh,
                Block::Prose => Block::Other,
                Block::Sh | Block::Other => Block::Prose,
            };
            continue;
        }
        if block != Block::Sh {
            continue;
        }
        let (start, mut text) = pending.take().unwrap_or((i + 1, String::new()));
        match line.strip_suffix('\\') {
            Some(head) => {
                text.push_str(head);
                pending = Some((start, text));
            }
            None => {
                text.push_str(line);
                lines.push((start, text));
            }
        }
    }
    lines
}

/// Each `keyhole ...` command line of a guide that configures the proxy.
fn guide_invocations(file: &str) -> Vec<Invocation> {
    let markdown = read(file);
    let mut out = Vec::new();
    for (line_no, line) in sh_lines(&markdown) {
        let what = format!("{file}:{line_no}");
        let mentions_keyhole = line.split_whitespace().any(|w| {
            let w = w.trim_start_matches(['\'', '"']);
            w == "keyhole" || w.ends_with("/keyhole")
        });
        let words = match shell_words(&line) {
            Ok(words) => words,
            Err(e) if mentions_keyhole => panic!("{what}: {e}: {line}"),
            Err(_) => continue,
        };
        let mut env = Vec::new();
        let mut rest = words.as_slice();
        while let Some((first, tail)) = rest.split_first() {
            match first.split_once('=') {
                Some((k, v))
                    if !k.is_empty()
                        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
                {
                    env.push((k.to_owned(), v.to_owned()));
                    rest = tail;
                }
                _ => break,
            }
        }
        let Some((program, args)) = rest.split_first() else {
            continue;
        };
        if program != "keyhole" && !program.ends_with("/keyhole") {
            continue;
        }
        let args = match args.first().map(String::as_str) {
            Some("check-config") => args[1..].to_vec(),
            Some("connect") => connect_keyhole_args(&args[1..]),
            Some(sub) if OTHER_COMMANDS.contains(&sub) => continue,
            _ => args.to_vec(),
        };
        let mut inv = Invocation::new(&what, args, env, Files::WorkingDirectory);
        // A laptop is no EC2 instance: without this, the AWS SDK's region lookup
        // would try the instance metadata address, which a laptop's own
        // configuration (AWS_PROFILE, ~/.aws/config) makes it skip.
        inv.platform_env = vec![("AWS_EC2_METADATA_DISABLED".to_owned(), "true".to_owned())];
        out.push(inv);
    }
    out
}

/// The proxy's arguments in a `keyhole connect` command line: all but
/// connect's own options and what follows `--` (the client's).
fn connect_keyhole_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--" => break,
            "--client" | "--db-user" | "--database" => {
                rest.next();
            }
            a if ["--client=", "--db-user=", "--database="]
                .iter()
                .any(|p| a.starts_with(p)) => {}
            _ => out.push(arg.clone()),
        }
    }
    out
}

#[test]
fn shell_words_split_as_sh_does() {
    assert_eq!(
        shell_words(r#"keyhole -p 6432 'postgres://h?a=1&b=2' "x\"y" a\ b # note"#).unwrap(),
        [
            "keyhole",
            "-p",
            "6432",
            "postgres://h?a=1&b=2",
            "x\"y",
            "a b"
        ]
    );
    assert!(shell_words("keyhole $TARGET").is_err());
    assert!(shell_words("keyhole \"$TARGET\"").is_err());
    assert!(shell_words("keyhole x &").is_err());
    let connect = [
        "--db-user",
        "me",
        "--ca-file",
        "ca.pem",
        "--database=d",
        "postgres://db",
        "--",
        "-c",
        "x",
    ];
    assert_eq!(
        connect_keyhole_args(&connect.map(str::to_owned)),
        ["--ca-file", "ca.pem", "postgres://db"]
    );
    let joined = sh_lines("```sh\nkeyhole a \\\n  b\n```\n```toml\nkeyhole = 1\n```\n");
    assert_eq!(joined, [(2, "keyhole a   b".to_owned())]);
}

#[test]
fn guides_command_lines_are_consistent() {
    let laptop = guide_invocations("deploy/laptop/README.md");
    assert!(
        laptop.len() >= 3,
        "deploy/laptop/README.md: expected its three keyhole command lines, found {}",
        laptop.len()
    );
    for file in GUIDES {
        for inv in guide_invocations(file) {
            inv.check_files_are_provided();
            for t in inv.targets() {
                if target_host(&t) == "127.0.0.1"
                    && target_param(&t, "tls-mode") != Some("verify-ca")
                {
                    assert!(
                        target_param(&t, "server-name").is_some(),
                        "{}: {t} dials a tunnel without server-name=",
                        inv.what
                    );
                }
            }
        }
    }
}

#[test]
fn guides_command_lines_pass_check_config() {
    for file in GUIDES {
        for inv in guide_invocations(file) {
            check_variables_are_options(&inv);
            inv.check_config();
        }
    }
}

// ---------------------------------------------------------------------------

#[test]
fn the_helpers_read_keyhole_syntax() {
    assert_eq!(duration("1h30m"), Duration::from_secs(5400));
    assert_eq!(duration("500ms"), Duration::from_millis(500));
    assert_eq!(duration("20"), Duration::from_secs(20));
    let t = "postgres://127.0.0.1:15432?server-name=db.example&ca-file=ca.pem";
    assert_eq!(target_host(t), "127.0.0.1");
    assert_eq!(target_port(t), Some("15432"));
    assert_eq!(target_port("mysql://[::1]"), None);
    assert_eq!(target_host("mysql://[::1]:3306"), "::1");
    assert_eq!(target_param(t, "server-name"), Some("db.example"));
    let inv = Invocation::new(
        "helpers",
        ["--health-check", "--http-port=8080", "-p", "6432", t]
            .map(str::to_owned)
            .to_vec(),
        vec![("KEYHOLE_QUITQUITQUIT".to_owned(), "yes".to_owned())],
        Files::WorkingDirectory,
    );
    assert!(inv.flag("health-check") && inv.flag("quitquitquit") && !inv.flag("prometheus"));
    assert_eq!(inv.http_port(), 8080);
    assert_eq!(inv.option("port").as_deref(), Some("6432"));
    assert_eq!(inv.targets(), [t]);
    assert_eq!(inv.file_values(), ["ca.pem"]);
}

// ---------------------------------------------------------------------------
// The Debian package's files (packaging/deb/)

/// The service's example configuration, with every setting it shows
/// switched on, is one keyhole accepts (`check-config`); and the unit starts
/// keyhole with that file, as a notify service with a watchdog.
#[test]
fn the_packaged_configuration_and_unit_work_together() {
    let example = read("packaging/deb/keyhole.toml");
    let pki = TestPki::generate(&[]);
    let root = support::scratch_dir("keyhole-deb-");
    let ca = root.path().join("global-bundle.pem");
    std::fs::copy(&pki.ca, &ca).expect("copy the CA");
    // "# key = value", and the lines of the targets array, are settings;
    // the other comments are prose.
    let mut enabled = String::new();
    let mut settings = 0;
    for line in example.lines() {
        let setting = line.strip_prefix("# ").filter(|rest| {
            rest.starts_with("  \"")
                || *rest == "]"
                || rest
                    .split_once(" = ")
                    .is_some_and(|(key, _)| key.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
        });
        match setting {
            Some(rest) => {
                settings += 1;
                enabled.push_str(&rest.replace(
                    "/etc/keyhole/global-bundle.pem",
                    ca.to_str().expect("UTF-8"),
                ));
            }
            None => enabled.push_str(line),
        }
        enabled.push('\n');
    }
    assert!(settings >= 8, "the example shows its settings:\n{enabled}");
    let config = root.path().join("keyhole.toml");
    std::fs::write(&config, &enabled).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_keyhole"))
        .args(["check-config", "--config"])
        .arg(&config)
        .env_clear()
        .env("AWS_REGION", "eu-west-1")
        .output()
        .expect("run check-config");
    assert!(
        out.status.success(),
        "the packaged example, enabled:\n{enabled}\n{}",
        describe_output(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in [
        "mydb.abc123.eu-west-1.rds.amazonaws.com",
        "db.internal",
        "/run/keyhole",
    ] {
        assert!(
            stdout.contains(name),
            "check-config does not show {name}:\n{stdout}"
        );
    }

    let unit = read("packaging/deb/keyhole.service");
    let setting = |key: &str| -> Vec<&str> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .collect()
    };
    assert_eq!(setting("Type"), ["notify"]);
    assert_eq!(
        setting("ExecStart"),
        ["/usr/bin/keyhole --config /etc/keyhole/keyhole.toml"]
    );
    assert_eq!(setting("WatchdogSec").len(), 1, "a watchdog");
    // The unit's paths are the package's.
    let manifest = read("Cargo.toml");
    for path in [
        "etc/keyhole/keyhole.toml",
        "lib/systemd/system/keyhole.service",
        "usr/bin/",
    ] {
        assert!(
            manifest.contains(&format!("\"{path}\"")),
            "Cargo.toml's deb assets lack {path}"
        );
    }
}

// ---------------------------------------------------------------------------
// The Dockerfile against the build the README and docs/install.md give

/// The Dockerfile's instructions, continuation lines joined, comments left
/// out: (INSTRUCTION, arguments).
fn dockerfile_instructions() -> Vec<(String, String)> {
    let text = read("Dockerfile");
    let mut joined = String::new();
    let mut instructions = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && joined.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                joined.push_str(part);
                joined.push(' ');
            }
            None => {
                joined.push_str(line);
                let (op, rest) = joined.trim().split_once(' ').unwrap_or((joined.trim(), ""));
                instructions.push((op.to_ascii_uppercase(), rest.trim().to_owned()));
                joined.clear();
            }
        }
    }
    instructions
}

/// Shell commands of RUN instructions (split at `&&`), spaces normalized.
fn dockerfile_commands() -> Vec<String> {
    dockerfile_instructions()
        .into_iter()
        .filter(|(op, _)| op == "RUN")
        .flat_map(|(_, run)| {
            run.split("&&")
                .map(|c| c.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The lines of a document's ```sh blocks, comments after `#` cut off.
fn shell_lines(relative: &str) -> Vec<String> {
    let text = read(relative);
    let mut lines = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("```") {
            inside = !inside && line.trim() == "```sh";
            continue;
        }
        if inside {
            let command = line.split(" #").next().unwrap_or("").trim();
            if !command.is_empty() {
                lines.push(command.split_whitespace().collect::<Vec<_>>().join(" "));
            }
        }
    }
    lines
}

/// The image is built with the commands a person is told to run: the
/// `cargo build` of the README's Install section and of docs/install.md is
/// the Dockerfile's (dependencies layer and real build alike), the binary
/// it copies is the one those commands make, and what the docs say of the
/// image (user, entrypoint, base) is what the Dockerfile sets.
#[test]
fn the_dockerfile_builds_as_the_readme_says() {
    let readme: Vec<String> = shell_lines("README.md")
        .into_iter()
        .filter(|l| l.starts_with("cargo build"))
        .collect();
    let install: Vec<String> = shell_lines("docs/install.md")
        .into_iter()
        .filter(|l| l.starts_with("cargo build"))
        .collect();
    assert!(!readme.is_empty(), "README.md gives no cargo build command");
    assert_eq!(
        readme[0], install[0],
        "README.md and docs/install.md build differently"
    );
    let docker: Vec<String> = dockerfile_commands()
        .into_iter()
        .filter(|c| c.starts_with("cargo build"))
        .collect();
    assert_eq!(
        docker.len(),
        2,
        "the dependency layer and the real build: {docker:?}"
    );
    for command in &docker {
        assert_eq!(
            command, &readme[0],
            "the Dockerfile builds with `{command}`, the README says `{}`",
            readme[0]
        );
    }
    let commands = dockerfile_commands();
    assert!(
        commands
            .iter()
            .any(|c| c.starts_with("./target/release/keyhole --version")),
        "the Dockerfile checks the binary it built: {commands:?}"
    );
    assert!(
        commands
            .iter()
            .any(|c| c.starts_with("install") && c.contains("target/release/keyhole")),
        "the Dockerfile copies target/release/keyhole: {commands:?}"
    );
    let readme_text = read("README.md");
    assert!(
        readme_text.contains("the binary is target/release/keyhole"),
        "README.md names the binary cargo build makes"
    );
    let instructions = dockerfile_instructions();
    let user: Vec<&str> = instructions
        .iter()
        .filter(|(op, _)| op == "USER")
        .map(|(_, a)| a.as_str())
        .collect();
    assert_eq!(user, ["65532:65532"]);
    let entry = entrypoint_binary();
    for doc in ["README.md", "docs/install.md"] {
        let text = read(doc);
        assert!(
            text.contains("65532"),
            "{doc} does not name the image's user"
        );
        assert!(
            text.contains(&entry),
            "{doc} does not name the entrypoint {entry}"
        );
    }
    let runtime = instructions
        .iter()
        .find_map(|(op, a)| {
            (op == "ARG")
                .then(|| a.strip_prefix("RUNTIME_IMAGE="))
                .flatten()
        })
        .expect("ARG RUNTIME_IMAGE");
    assert!(
        read("docs/install.md").contains(runtime),
        "docs/install.md does not name the base image {runtime}"
    );
}
