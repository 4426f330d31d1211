//! A Linux network namespace standing in for a VPC: a veth pair joins it to the
//! host (host side `10.213.N.1/24`, namespace side `10.213.N.2/24`), its own
//! loopback is up, and nothing else is there. In particular the namespace has no
//! route to the host's 127.0.0.1, so a database on the host's loopback is
//! reachable from inside only through a [`Relay`] (a listener on the
//! namespace's own 127.0.0.1 that forwards to the host's loopback): bytes that
//! reach the database through a relay went through whatever ran inside.
//!
//! Only loopback addresses and the veth pair carry test traffic. Everything
//! needs root (`ip netns add`); [`Namespace::create`] returns `None` after a
//! loud "SKIPPED" message where namespaces cannot be made, unless
//! `KEYHOLE_REQUIRE_NETNS=1` is set, which turns that into a panic (for CI).
//!
//! Names are unique per process and call (`kh-<pid>-<n>`), the /24 is unique
//! on the machine while the namespace lives (picked under a lock file after
//! looking at the host's addresses and routes), so tests in parallel threads
//! and parallel test binaries do not collide. A [`Watchdog`] kills whatever
//! runs inside, deletes the namespace, its veth pair and `/etc/netns/<name>`
//! however the test process ends.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fmt::Display;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::process::{clean_env, describe_output, output_with_timeout, Watchdog};

/// Longest any single `ip` command may take.
const IP_TIMEOUT: Duration = Duration::from_secs(30);

/// Serialises the choice of a /24 between test processes.
const LOCK_FILE: &str = "/run/keyhole-netns.lock";

/// The first two octets of every namespace's /24.
const NET_PREFIX: [u8; 2] = [10, 213];

/// A program from `PATH`, else from the usual system directories (root's
/// `sbin` directories are not always on a test runner's `PATH`). `None` if it
/// is nowhere.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for dir in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        dirs.push(PathBuf::from(dir));
    }
    dirs.into_iter()
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `find_program`, or a panic naming the Debian package that has it.
pub fn require_program(name: &str, package: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| {
        panic!(
            "{name} is not installed: apt-get install {package} \
             (scripts/test.sh installs it, see scripts/lib/packages.sh)"
        )
    })
}

fn ip_binary() -> Option<PathBuf> {
    find_program("ip")
}

/// A network namespace with a veth pair to the host. Dropping it kills every
/// process inside and deletes the namespace, the veth pair and
/// `/etc/netns/<name>`.
pub struct Namespace {
    /// `kh-<pid>-<n>`: `ip netns exec <name> ...`, `/var/run/netns/<name>`.
    pub name: String,
    /// The host's end of the veth pair (`10.213.N.1`).
    pub host_ip: Ipv4Addr,
    /// The namespace's end of the veth pair (`10.213.N.2`); servers inside
    /// listen here so the host can reach them.
    pub ns_ip: Ipv4Addr,
    /// Interface names: the host's end, the namespace's end.
    pub host_veth: String,
    pub ns_veth: String,
    ip: PathBuf,
    ports: Mutex<HashSet<u16>>,
    watchdog: Watchdog,
}

/// Prints the loud skip message and returns `None` (or panics when
/// `KEYHOLE_REQUIRE_NETNS=1`).
fn skip(why: &str) -> Option<Namespace> {
    let message = format!("SKIPPED: network namespaces cannot be created here: {why}");
    if std::env::var_os("KEYHOLE_REQUIRE_NETNS").is_some_and(|v| v == "1") {
        panic!("{message} (and KEYHOLE_REQUIRE_NETNS=1 requires them)");
    }
    let rule = "=".repeat(78);
    // Straight to the process's stderr, past the test harness's capture of
    // `eprintln!`, so that a passing run shows it too.
    let _ = std::io::stderr().lock().write_all(
        format!(
            "\n{rule}\n{message}\n(run the tests as root on Linux with iproute2 to run them)\n{rule}\n"
        )
        .as_bytes(),
    );
    None
}

/// Runs `ip args`; Err(its output) if it fails.
fn ip(ip: &Path, args: &[&str]) -> Result<String, String> {
    let out = output_with_timeout(Command::new(ip).args(args), IP_TIMEOUT);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            describe_output(&out)
        ))
    }
}

/// An exclusive `flock` on [`LOCK_FILE`] (or one under the temporary
/// directory if /run is not writable), released on drop.
struct SubnetLock(File);

impl SubnetLock {
    fn take() -> SubnetLock {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .or_else(|_| {
                File::options()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(std::env::temp_dir().join("keyhole-netns.lock"))
            })
            .expect("open the namespace lock file");
        // SAFETY: flock(2) on a descriptor we own; no memory is touched.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
        SubnetLock(file)
    }
}

impl Drop for SubnetLock {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl Namespace {
    /// Creates a fresh namespace `kh-<pid>-<n>` with a veth pair (host side
    /// `10.213.N.1/24`, namespace side `10.213.N.2/24`, both up), the
    /// namespace's loopback up, and `/etc/netns/<name>/hosts` holding just
    /// `localhost` (see [`Namespace::set_hosts`]). `None`, after a loud
    /// message on stderr, when namespaces cannot be made here (not root, no
    /// `ip`, `ip netns add` or `ip netns exec` refused).
    pub fn create() -> Option<Namespace> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        // SAFETY: geteuid(2) cannot fail and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            return skip("the tests do not run as root");
        }
        let Some(ip_path) = ip_binary() else {
            return skip("`ip` (iproute2) is not installed");
        };
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("kh-{pid}-{n}");
        // Interface names have at most 15 characters: base 36 keeps them short.
        let tag = format!("kh{}x{}", base36(pid), base36(n));
        let (host_veth, ns_veth) = (format!("{tag}h"), format!("{tag}n"));
        debug_assert!(host_veth.len() <= 15);

        if let Err(e) = ip(&ip_path, &["netns", "add", &name]) {
            return skip(&e);
        }
        // From here on the watchdog owns the cleanup.
        let me = pid.to_string();
        let watchdog = Watchdog::spawn(
            "a network namespace",
            r#"for p in $("$4" netns pids "$1" 2>/dev/null); do
                 [ "$p" = "$3" ] || kill -KILL "$p" 2>/dev/null
               done
               "$4" netns del "$1" 2>/dev/null
               "$4" link del "$2" 2>/dev/null
               rm -rf "/etc/netns/$1""#,
            &[
                OsStr::new(&name),
                OsStr::new(&host_veth),
                OsStr::new(&me),
                ip_path.as_os_str(),
            ],
            false,
        );
        let hosts_dir = Path::new("/etc/netns").join(&name);
        std::fs::create_dir_all(&hosts_dir)
            .unwrap_or_else(|e| panic!("create {}: {e}", hosts_dir.display()));
        let mut ns = Namespace {
            name,
            host_ip: Ipv4Addr::UNSPECIFIED,
            ns_ip: Ipv4Addr::UNSPECIFIED,
            host_veth,
            ns_veth,
            ip: ip_path,
            ports: Mutex::new(HashSet::new()),
            watchdog,
        };
        ns.set_hosts::<&str>(&[]);
        if let Err(e) = ns.wire_up(pid, n) {
            return skip(&e);
        }
        // `ip netns exec` needs a mount namespace of its own (it remounts /sys
        // and binds /etc/netns/<name>/*); some sandboxes allow `netns add` only.
        let out = output_with_timeout(&mut ns.command("true"), IP_TIMEOUT);
        if !out.status.success() {
            return skip(&format!(
                "`ip netns exec {} true` failed: {}",
                ns.name,
                describe_output(&out)
            ));
        }
        Some(ns)
    }

    /// Picks a free 10.213.N.0/24 and sets up the veth pair and loopback.
    fn wire_up(&mut self, pid: u32, n: u32) -> Result<(), String> {
        let ip_path = self.ip.clone();
        let run = |args: &[&str]| ip(&ip_path, args);
        let _lock = SubnetLock::take();
        let in_use = format!(
            "{}\n{}",
            run(&["-4", "-o", "addr", "show"])?,
            run(&["-4", "route", "show", "table", "all"])?
        );
        let start = (pid as usize * 31 + n as usize) % 254;
        let third = (0..254)
            .map(|i| ((start + i) % 254 + 1) as u8)
            .find(|third| {
                let net = format!("{}.{}.{third}.", NET_PREFIX[0], NET_PREFIX[1]);
                !in_use.contains(&net)
            })
            .ok_or("every 10.213.N.0/24 is in use on this machine")?;
        self.host_ip = Ipv4Addr::new(NET_PREFIX[0], NET_PREFIX[1], third, 1);
        self.ns_ip = Ipv4Addr::new(NET_PREFIX[0], NET_PREFIX[1], third, 2);
        let (host_cidr, ns_cidr) = (format!("{}/24", self.host_ip), format!("{}/24", self.ns_ip));
        let name = self.name.as_str();
        run(&[
            "link",
            "add",
            &self.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            &self.ns_veth,
            "netns",
            name,
        ])?;
        run(&["addr", "add", &host_cidr, "dev", &self.host_veth])?;
        run(&["link", "set", &self.host_veth, "up"])?;
        run(&["-n", name, "addr", "add", &ns_cidr, "dev", &self.ns_veth])?;
        run(&["-n", name, "link", "set", &self.ns_veth, "up"])?;
        run(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// `/var/run/netns/<name>`, the namespace's handle for `setns(2)`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// `/etc/netns/<name>/hosts`, which `ip netns exec` binds over /etc/hosts.
    pub fn hosts_path(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.name).join("hosts")
    }

    /// Writes `/etc/netns/<name>/hosts`: `127.0.0.1 localhost`, `::1
    /// localhost`, then one `ADDRESS NAME` line per entry (`(name, address)`;
    /// the address is anything that prints as one, `"127.0.0.1"` or an
    /// `IpAddr`). Processes started with `ip netns exec` (so
    /// [`Namespace::command`] and every server here) see these names; the host
    /// does not. The file is rewritten in place, so processes already running
    /// inside see the new entries too.
    pub fn set_hosts<A: Display>(&self, entries: &[(&str, A)]) {
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost\n");
        for (name, addr) in entries {
            text.push_str(&format!("{addr} {name}\n"));
        }
        let path = self.hosts_path();
        // Truncate and write the same inode: a bind mount of it stays valid.
        let mut file = File::options()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        file.write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// A command that runs `program` inside the namespace (`ip netns exec
    /// <name> program`; add its arguments), with the harness's clean
    /// environment. Programs that insist on an absolute path (sshd) need one.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.exec().command(program)
    }

    /// What [`Namespace::command`] needs, detached from the namespace's
    /// lifetime (for servers that restart themselves later).
    pub fn exec(&self) -> NsExec {
        NsExec {
            ip: self.ip.clone(),
            name: self.name.clone(),
        }
    }

    /// A port for a server inside listening on `ns_ip`: `preferred` if no
    /// other server of this namespace took it, else the next one up. The
    /// namespace is private, so nothing outside competes for its ports.
    pub fn claim_port(&self, preferred: u16) -> u16 {
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        let mut port = preferred;
        while !ports.insert(port) {
            port = port.checked_add(1).expect("a free port in the namespace");
        }
        port
    }

    /// A TCP relay listening on 127.0.0.1 *inside* the namespace (its own
    /// loopback) that forwards every connection to `to`, an address on the
    /// host's loopback (say a PostgreSQL server's `127.0.0.1:port`), connecting
    /// from the host's namespace. The only way from inside to the host's
    /// loopback. Stopped, with its open connections, on drop.
    pub fn relay_to(&self, to: SocketAddr) -> Relay {
        Relay::start(
            &self.netns_path(),
            SocketAddr::from(([127, 0, 0, 1], 0)),
            to,
        )
    }

    /// As [`Namespace::relay_to`], listening on `listen` inside the namespace
    /// (any 127.x.y.z address is the namespace's loopback): an address the
    /// VPC routes to, such as a Cloud SQL instance's `IP:3307`.
    pub fn relay_on(&self, listen: SocketAddr, to: SocketAddr) -> Relay {
        Relay::start(&self.netns_path(), listen, to)
    }

    /// The process IDs running inside (`ip netns pids`), never this one.
    pub fn pids(&self) -> Vec<u32> {
        let me = std::process::id();
        ip(&self.ip, &["netns", "pids", &self.name])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|&p| p != me)
            .collect()
    }

    /// Kills (SIGKILL) every process running inside the namespace.
    pub fn kill_all(&self) {
        for pid in self.pids() {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) takes plain integers. The PIDs were read from
                // /proc just now and belong to processes inside our namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        self.kill_all();
        self.watchdog.fire();
    }
}

/// Runs programs inside a namespace by name (see [`Namespace::exec`]).
#[derive(Debug, Clone)]
pub struct NsExec {
    ip: PathBuf,
    name: String,
}

impl NsExec {
    /// `ip netns exec <name> program` with the harness's clean environment.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(&self.ip);
        clean_env(&mut cmd)
            .args(["netns", "exec", &self.name])
            .arg(program);
        cmd
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ASCII digits")
}

/// Switches the calling thread into the network namespace `fd` refers to.
fn setns(fd: &File, what: &str) -> Result<(), String> {
    // SAFETY: setns(2) with a descriptor we own; it changes only the calling
    // thread's network namespace.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "setns into {what}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

struct RelayShared {
    stop: AtomicBool,
    connections: AtomicUsize,
    /// Both sockets of every relayed connection, to shut them down on drop.
    open: Mutex<Vec<TcpStream>>,
}

/// A TCP relay from 127.0.0.1:`port()` inside a namespace to an address on
/// the host's loopback. See [`Namespace::relay_to`].
pub struct Relay {
    port: u16,
    to: SocketAddr,
    shared: Arc<RelayShared>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    fn start(netns: &Path, listen: SocketAddr, to: SocketAddr) -> Relay {
        let shared = Arc::new(RelayShared {
            stop: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            open: Mutex::new(Vec::new()),
        });
        let (tx, rx) = mpsc::channel();
        let netns = netns.to_path_buf();
        let state = shared.clone();
        // One thread binds inside the namespace, comes back to the host's and
        // then accepts: its connections to `to` (and those of the threads it
        // starts, which inherit its namespace) leave from the host.
        let thread = std::thread::spawn(move || {
            let bound = (|| -> Result<TcpListener, String> {
                let host = File::open("/proc/thread-self/ns/net")
                    .map_err(|e| format!("open /proc/thread-self/ns/net: {e}"))?;
                let inside =
                    File::open(&netns).map_err(|e| format!("open {}: {e}", netns.display()))?;
                setns(&inside, &netns.display().to_string())?;
                let listener = TcpListener::bind(listen)
                    .map_err(|e| format!("bind {listen} in the namespace: {e}"));
                // Back to the host in any case; if that fails this thread ends
                // here, and its namespace with it.
                setns(&host, "the host's network namespace")?;
                listener
            })();
            let listener = match bound {
                Ok(listener) => listener,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let port = listener.local_addr().map(|a| a.port());
            let _ = tx.send(port.map_err(|e| e.to_string()));
            accept_loop(listener, to, state);
        });
        let port = rx
            .recv()
            .unwrap_or_else(|_| Err("the relay thread ended".to_string()))
            .unwrap_or_else(|e| panic!("starting a relay to {to}: {e}"));
        Relay {
            port,
            to,
            shared,
            thread: Some(thread),
        }
    }

    /// The port on the namespace's 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where connections go (on the host's loopback).
    pub fn target(&self) -> SocketAddr {
        self.to
    }

    /// How many connections the relay has accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Cuts every connection relayed so far (both sides); new ones still work.
    pub fn cut_all(&self) {
        let open = std::mem::take(&mut *self.shared.open.lock().unwrap_or_else(|p| p.into_inner()));
        for stream in open {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.cut_all();
    }
}

fn accept_loop(listener: TcpListener, to: SocketAddr, shared: Arc<RelayShared>) {
    let mut poll = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !shared.stop.load(Ordering::SeqCst) {
        poll.revents = 0;
        // SAFETY: one valid pollfd, for the listener this function owns.
        let ready = unsafe { libc::poll(&mut poll, 1, 50) };
        if ready <= 0 {
            continue;
        }
        let Ok((client, _)) = listener.accept() else {
            continue;
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let shared = shared.clone();
        std::thread::spawn(move || relay_one(client, to, shared));
    }
}

fn relay_one(client: TcpStream, to: SocketAddr, shared: Arc<RelayShared>) {
    let Ok(server) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
        return; // dropping the client closes it
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let clones = (
        client.try_clone(),
        server.try_clone(),
        client.try_clone(),
        server.try_clone(),
    );
    let (Ok(c1), Ok(s1), Ok(c2), Ok(s2)) = clones else {
        return;
    };
    {
        let mut open = shared.open.lock().unwrap_or_else(|p| p.into_inner());
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        open.push(c1);
        open.push(s1);
    }
    let upstream = std::thread::spawn(move || pump(client, server));
    pump(s2, c2);
    let _ = upstream.join();
}

/// Copies `from` to `to` until EOF or an error, then ends `to`'s writing side.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
