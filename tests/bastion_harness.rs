//! Self-test of the "laptop through a bastion" harness (tests/support/netns.rs
//! and tests/support/bastion.rs), without keyhole: a network namespace stands
//! in for a VPC, the shared PostgreSQL cluster on the host's loopback is
//! reachable from inside only through the namespace's relay, and real OpenSSH,
//! dante, microsocks and tinyproxy servers inside carry connections from the
//! host to it. Every test skips (loudly) where namespaces cannot be made.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::bastion::{ssh_stdio_forward, HttpProxy, Socks5Proxy, SshBastion};
use support::netns::{Namespace, Relay};
use support::postgres::{pg_bin, PgCluster, TRUST_USER};
use support::process::{describe_output, finish_with_timeout, output_with_timeout, KillAfter};

const LIMIT: Duration = Duration::from_secs(20);
const USER: &str = "kh-user";
const PASS: &str = "kh-pass.word";

/// PostgreSQL's SSLRequest: length 8, code 80877103. A server answers one
/// byte, 'S' when it does TLS (the shared cluster does).
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A namespace whose "db.internal" is its own loopback, with a relay there to
/// the shared cluster: the VPC's database.
fn vpc() -> Option<(Namespace, Relay, &'static PgCluster)> {
    let ns = Namespace::create()?;
    let pg = PgCluster::shared();
    let relay = ns.relay_to(SocketAddr::from(([127, 0, 0, 1], pg.port)));
    ns.set_hosts(&[("db.internal", "127.0.0.1")]);
    Some((ns, relay, pg))
}

fn run(cmd: &mut Command) -> Output {
    output_with_timeout(cmd, LIMIT)
}

/// Sends an SSLRequest on `stream` and returns the server's one-byte answer.
fn ssl_request(stream: &mut TcpStream) -> Result<u8, String> {
    stream
        .write_all(&SSL_REQUEST)
        .map_err(|e| format!("send SSLRequest: {e}"))?;
    let mut answer = [0u8; 1];
    stream
        .read_exact(&mut answer)
        .map_err(|e| format!("read the SSLRequest answer: {e}"))?;
    Ok(answer[0])
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream.set_read_timeout(Some(LIMIT)).expect("read timeout");
    stream
}

/// Can bash inside `ns` open a TCP connection to 127.0.0.1:`port` (the
/// namespace's loopback)?
fn connects_inside(ns: &Namespace, port: u16) -> bool {
    let script = format!("exec 3<>/dev/tcp/127.0.0.1/{port}");
    run(ns.command("bash").args(["-c", &script]))
        .status
        .success()
}

// ---------------------------------------------------------------------------
// Namespace and relay

#[test]
fn the_relay_is_the_namespaces_only_way_to_the_host_database() {
    let Some((ns, relay, pg)) = vpc() else { return };
    assert!(ns.name.starts_with("kh-"), "{}", ns.name);
    assert_eq!(ns.host_ip.octets()[3], 1);
    assert_eq!(ns.ns_ip.octets()[..3], ns.host_ip.octets()[..3]);

    // db.internal is a name inside only.
    let inside = run(ns.command("getent").args(["hosts", "db.internal"]));
    assert!(inside.status.success(), "{}", describe_output(&inside));
    assert!(
        String::from_utf8_lossy(&inside.stdout).starts_with("127.0.0.1 "),
        "{}",
        describe_output(&inside)
    );
    let host = run(Command::new("getent").args(["hosts", "db.internal"]));
    assert!(!host.status.success(), "{}", describe_output(&host));

    // psql inside, by name, verify-full, through the relay.
    let conninfo = format!(
        "host=db.internal port={} dbname=postgres user={TRUST_USER} sslmode=verify-full \
         sslrootcert={}",
        relay.port(),
        pg.pki.ca.display()
    );
    let out = run(ns
        .command(pg_bin("psql"))
        .args(["-X", "-A", "-t", "-w", "-c", "select 'through the relay'"])
        .arg(&conninfo));
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "through the relay"
    );
    assert_eq!(relay.connections(), 1);
    assert!(connects_inside(&ns, relay.port()));
    assert_eq!(relay.connections(), 2);

    // Inside, the cluster's own port on 127.0.0.1 is nobody: the namespace's
    // loopback is not the host's.
    assert!(!connects_inside(&ns, pg.port));
    // From the host, the relay is not there: nothing on the veth address, and
    // whatever may listen on the host's 127.0.0.1:<port> is not the relay.
    let on_veth = TcpStream::connect_timeout(
        &SocketAddr::from((ns.ns_ip, relay.port())),
        Duration::from_secs(2),
    );
    assert!(on_veth.is_err(), "the relay answered on the veth address");
    let _ = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], relay.port())),
        Duration::from_secs(2),
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(relay.connections(), 2, "the host reached the relay");

    // A dropped relay is gone inside.
    let port = relay.port();
    drop(relay);
    assert!(!connects_inside(&ns, port));
}

#[test]
fn kill_all_and_drop_leave_nothing_behind() {
    let Some(ns) = Namespace::create() else {
        return;
    };
    let mut sleeper = ns
        .command("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .spawn()
        .expect("start sleep inside");
    let deadline = Instant::now() + LIMIT;
    while !ns.pids().contains(&sleeper.id()) {
        assert!(Instant::now() < deadline, "sleep never showed up inside");
        std::thread::sleep(Duration::from_millis(20));
    }
    ns.kill_all();
    let status = sleeper.wait().expect("wait for sleep");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    assert!(!ns.pids().contains(&std::process::id()));

    let (name, veth, hosts) = (ns.name.clone(), ns.host_veth.clone(), ns.hosts_path());
    assert!(hosts.is_file());
    let netns = ns.netns_path();
    assert!(netns.exists());
    drop(ns);
    assert!(!netns.exists(), "{} is still there", netns.display());
    assert!(!hosts.exists(), "{} is still there", hosts.display());
    let links =
        run(Command::new(support::netns::find_program("ip").expect("ip")).args(["-o", "link"]));
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains(&format!(" {veth}@")),
        "{veth} is still there"
    );
    assert!(!links.contains(&name));
}

// ---------------------------------------------------------------------------
// OpenSSH

/// `ssh -F config -W target alias` with an SSLRequest on stdin, then EOF.
fn ssh_forward(config: &Path, alias: &str, target: &str) -> Output {
    let mut child = ssh_stdio_forward(config, alias, target)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ssh");
    let mut stdin = child.stdin.take().expect("ssh's stdin");
    stdin.write_all(&SSL_REQUEST).expect("write to ssh");
    drop(stdin);
    finish_with_timeout(child, &format!("ssh -W {target} {alias}"), LIMIT)
}

/// A config that must fail: ssh exits with an error that says `expected`.
fn ssh_refused(bastion: &SshBastion, config: &Path, alias: &str, target: &str, expected: &str) {
    let out = run(ssh_stdio_forward(config, alias, target).stdin(Stdio::null()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(expected),
        "expected {expected:?} from ssh:\n{}\n--- sshd log ---\n{}",
        describe_output(&out),
        bastion.log()
    );
}

#[test]
fn openssh_through_the_bastion_reaches_the_relay_and_refuses_bad_configs() {
    let Some((ns, relay, pg)) = vpc() else { return };
    let bastion = SshBastion::start(&ns);
    assert_eq!(bastion.addr, SocketAddr::from((ns.ns_ip, 22)));
    let config = bastion.ssh_config("bastion");
    let text = std::fs::read_to_string(&config).expect("read the ssh config");
    assert!(text.starts_with("Host bastion\n"), "{text}");

    for target in [
        format!("127.0.0.1:{}", relay.port()),
        format!("db.internal:{}", relay.port()),
    ] {
        let out = ssh_forward(&config, "bastion", &target);
        assert_eq!(
            out.stdout,
            b"S",
            "through ssh -W {target}:\n{}\n--- sshd log ---\n{}",
            describe_output(&out),
            bastion.log()
        );
    }
    assert_eq!(relay.connections(), 2);
    assert_eq!(bastion.logins(), 2, "{}", bastion.log());

    // The bastion itself cannot reach the host's loopback either.
    let out = ssh_forward(&config, "bastion", &format!("127.0.0.1:{}", pg.port));
    assert!(out.stdout.is_empty(), "{}", describe_output(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Connection refused"),
        "{}",
        describe_output(&out)
    );

    let target = format!("127.0.0.1:{}", relay.port());
    ssh_refused(
        &bastion,
        &bastion.ssh_config_unknown_host("bastion"),
        "bastion",
        &target,
        "Host key verification failed",
    );
    ssh_refused(
        &bastion,
        &bastion.ssh_config_changed_host_key("bastion"),
        "bastion",
        &target,
        "REMOTE HOST IDENTIFICATION HAS CHANGED",
    );
    ssh_refused(
        &bastion,
        &bastion.ssh_config_wrong_key("bastion"),
        "bastion",
        &target,
        "Permission denied",
    );
    // One more login (the refused forward to the cluster's port), and none
    // of the refused configurations got in or anywhere near the relay.
    assert_eq!(bastion.logins(), 3, "{}", bastion.log());
    assert_eq!(relay.connections(), 2);

    // The bastion dies, and with it the tunnels through it; then it comes
    // back with the same host key.
    let mut tunnel = ssh_stdio_forward(&config, "bastion", &target)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ssh");
    let timer = KillAfter::arm(tunnel.id(), LIMIT);
    let mut stdin = tunnel.stdin.take().expect("ssh's stdin");
    stdin.write_all(&SSL_REQUEST).expect("write to ssh");
    let mut answer = [0u8; 1];
    let read = tunnel
        .stdout
        .as_mut()
        .expect("ssh's stdout")
        .read_exact(&mut answer);
    assert!(!timer.disarm(), "no answer through the tunnel");
    assert!(read.is_ok() && answer == *b"S", "{read:?} {answer:?}");
    bastion.kill();
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = tunnel.try_wait().expect("wait for ssh") {
            break status;
        }
        assert!(Instant::now() < deadline, "ssh outlived the bastion");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "{status}");
    drop(stdin);
    ssh_refused(&bastion, &config, "bastion", &target, "Connection refused");
    bastion.restart();
    let out = ssh_forward(&config, "bastion", &target);
    assert_eq!(out.stdout, b"S", "{}", describe_output(&out));
    assert_eq!(bastion.logins(), 5, "{}", bastion.log());
    assert_eq!(relay.connections(), 4);
}

// ---------------------------------------------------------------------------
// SOCKS5

/// A SOCKS5 CONNECT to `host:port` (a name: the proxy resolves it) through
/// `proxy`, offering only user/password when `auth` is given, else only "no
/// authentication".
fn socks5_connect(
    proxy: SocketAddr,
    host: &str,
    port: u16,
    auth: Option<(&str, &str)>,
) -> Result<TcpStream, String> {
    let mut s = connect(proxy);
    let io = |e: std::io::Error| format!("SOCKS5 exchange with {proxy}: {e}");
    let method = if auth.is_some() { 2 } else { 0 };
    s.write_all(&[5, 1, method]).map_err(io)?;
    let mut reply = [0u8; 2];
    s.read_exact(&mut reply).map_err(io)?;
    if reply != [5, method] {
        return Err(format!("method refused: {reply:?}"));
    }
    if let Some((user, pass)) = auth {
        let mut msg = vec![1, user.len() as u8];
        msg.extend_from_slice(user.as_bytes());
        msg.push(pass.len() as u8);
        msg.extend_from_slice(pass.as_bytes());
        s.write_all(&msg).map_err(io)?;
        match s.read_exact(&mut reply) {
            Ok(()) if reply == [1, 0] => {}
            Ok(()) => return Err(format!("authentication refused: {reply:?}")),
            Err(e) => return Err(format!("authentication refused: {e}")),
        }
    }
    let mut msg = vec![5, 1, 0, 3, host.len() as u8];
    msg.extend_from_slice(host.as_bytes());
    msg.extend_from_slice(&port.to_be_bytes());
    s.write_all(&msg).map_err(io)?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).map_err(io)?;
    if head[1] != 0 {
        return Err(format!("CONNECT refused: reply code {}", head[1]));
    }
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).map_err(io)?;
            len[0] as usize + 2
        }
        other => return Err(format!("bad address type {other}")),
    };
    let mut bound = vec![0u8; rest];
    s.read_exact(&mut bound).map_err(io)?;
    Ok(s)
}

#[test]
fn socks5_proxies_resolve_db_internal_and_reach_the_relay() {
    let Some((ns, relay, _pg)) = vpc() else {
        return;
    };
    let dante = Socks5Proxy::start_dante(&ns);
    let micro = Socks5Proxy::start_microsocks(&ns, USER, PASS);
    assert_ne!(dante.addr, micro.addr);
    assert_eq!(dante.url(), format!("socks5h://{}", dante.addr));
    assert_eq!(
        micro.url(),
        format!("socks5h://{USER}:{PASS}@{}", micro.addr)
    );

    let mut s = socks5_connect(dante.addr, "db.internal", relay.port(), None)
        .unwrap_or_else(|e| panic!("dante: {e}\n{}", dante.log()));
    assert_eq!(ssl_request(&mut s), Ok(b'S'), "{}", dante.log());
    drop(s);
    let mut s = socks5_connect(micro.addr, "db.internal", relay.port(), Some((USER, PASS)))
        .unwrap_or_else(|e| panic!("microsocks: {e}\n{}", micro.log()));
    assert_eq!(ssl_request(&mut s), Ok(b'S'), "{}", micro.log());
    drop(s);
    assert_eq!(relay.connections(), 2);

    // microsocks wants its password, and nothing less.
    let wrong = socks5_connect(
        micro.addr,
        "db.internal",
        relay.port(),
        Some((USER, "nope")),
    );
    assert!(
        wrong
            .as_ref()
            .is_err_and(|e| e.starts_with("authentication refused")),
        "{:?}",
        wrong.map(|_| ())
    );
    let none = socks5_connect(micro.addr, "db.internal", relay.port(), None);
    assert!(
        none.as_ref()
            .is_err_and(|e| e.starts_with("method refused")),
        "{:?}",
        none.map(|_| ())
    );
    assert_eq!(relay.connections(), 2);

    // Both logged the connections they made.
    let deadline = Instant::now() + Duration::from_secs(5);
    let dante_saw = format!("127.0.0.1.{}", relay.port());
    let micro_saw = format!("connected to db.internal:{}", relay.port());
    while !(dante.log().contains(&dante_saw) && micro.log().contains(&micro_saw)) {
        assert!(
            Instant::now() < deadline,
            "--- dante ---\n{}\n--- microsocks ---\n{}",
            dante.log(),
            micro.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A killed proxy refuses connections; restarted, it carries them again.
    dante.kill();
    assert!(TcpStream::connect_timeout(&dante.addr, Duration::from_secs(2)).is_err());
    dante.restart();
    let mut s = socks5_connect(dante.addr, "db.internal", relay.port(), None)
        .unwrap_or_else(|e| panic!("dante after restart: {e}\n{}", dante.log()));
    assert_eq!(ssl_request(&mut s), Ok(b'S'));
}

// ---------------------------------------------------------------------------
// HTTP CONNECT

/// `CONNECT host:port` through `proxy` with optional basic credentials: the
/// tunnel on 200, else the status code.
fn http_connect(
    proxy: SocketAddr,
    target: &str,
    auth: Option<(&str, &str)>,
) -> Result<TcpStream, u16> {
    use base64::Engine;
    let mut s = connect(proxy);
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((user, pass)) = auth {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    request.push_str("\r\n");
    s.write_all(request.as_bytes()).expect("send CONNECT");
    // Byte by byte, so nothing of the tunnel is read with the head.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("read the CONNECT reply");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {head}"));
    if status == 200 {
        Ok(s)
    } else {
        Err(status)
    }
}

#[test]
fn tinyproxy_tunnels_to_db_internal_and_demands_credentials_when_told() {
    let Some((ns, relay, _pg)) = vpc() else {
        return;
    };
    let open = HttpProxy::start(&ns, None);
    let guarded = HttpProxy::start(&ns, Some((USER, PASS)));
    assert_eq!(open.url(), format!("http://{}", open.addr));
    assert_eq!(
        guarded.url(),
        format!("http://{USER}:{PASS}@{}", guarded.addr)
    );
    let target = format!("db.internal:{}", relay.port());

    let mut s = http_connect(open.addr, &target, None)
        .unwrap_or_else(|status| panic!("{status}\n{}", open.log()));
    assert_eq!(ssl_request(&mut s), Ok(b'S'));
    drop(s);

    assert_eq!(http_connect(guarded.addr, &target, None).err(), Some(407));
    assert_eq!(
        http_connect(guarded.addr, &target, Some((USER, "nope"))).err(),
        Some(401)
    );
    assert_eq!(relay.connections(), 1);
    let mut s = http_connect(guarded.addr, &target, Some((USER, PASS)))
        .unwrap_or_else(|status| panic!("{status}\n{}", guarded.log()));
    assert_eq!(ssl_request(&mut s), Ok(b'S'));
    drop(s);
    assert_eq!(relay.connections(), 2);
    assert!(
        guarded
            .log()
            .contains(&format!("CONNECT {target} HTTP/1.1")),
        "{}",
        guarded.log()
    );
}
