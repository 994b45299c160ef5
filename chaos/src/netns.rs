//! One network namespace per fleet node, so that a node can reach its own
//! gateway (where its relays and simulated devices listen, in the root
//! namespace) and nothing of any other node.
//!
//! Why: iroh learns a peer's real addresses inside the QUIC connection
//! (address advertisement for NAT traversal and multipath) and migrates to
//! a direct path when it can, so a relay between two processes on one
//! loopback interface does not cut them (`chaos/notes/bypass-finding.md`).
//! In its own namespace, node `i` has one veth with `10.A.i.2/24`, `lo`,
//! and no default route; the root side of the veth is `10.A.i.1/24`. Each
//! node has its own /24, so a learned address of another node
//! (`10.A.j.2`) is `Network is unreachable` from inside, and the root
//! namespace does not forward between veths (no route inside points to it).
//!
//! [`NetnsSet`] is the RAII guard: [`NetnsSet::create`] removes stale
//! namespaces of dead runs (the owning pid is in the name), picks a
//! `10.A.0.0/16` that no address or route of the host uses, and creates
//! one namespace and veth pair per node; dropping it deletes them.
//! [`available`] says whether this process may create namespaces at all.
//! The probe functions ([`probe_udp`], [`probe_tcp`], ...) are what the
//! hidden `chaos netns-probe` subcommand runs inside a namespace
//! ([`probe_from`]) to measure which paths are open.
//!
//! Everything calls iproute2's `ip`; there is no netem, tc qdisc or
//! iptables involved.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Prefix of every namespace this module creates: `fsc-<pid>-<seq>-<i>`.
pub const PREFIX: &str = "fsc-";

/// The candidate second octets of the `10.A.0.0/16` subnets.
const SUBNETS: std::ops::RangeInclusive<u8> = 200..=254;

/// Most nodes in one set (`10.A.i.0/24`, `i` < 250).
pub const MAX_NODES: usize = 250;

/// A file lock held while a subnet is chosen and claimed, so that two runs
/// starting at once do not pick the same one.
const LOCK_FILE: &str = "/run/fieldsync-chaos-netns.lock";

/// Subnets (second octet) claimed by live sets of this process.
static ACTIVE: Mutex<BTreeSet<u8>> = Mutex::new(BTreeSet::new());
/// Per-process sequence, so several sets in one process get distinct names.
static SEQ: AtomicU32 = AtomicU32::new(0);

/// Errors of namespace management. Each names the command or file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetnsError {
    /// An `ip` command failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status and stderr (or why it could not start).
        detail: String,
    },
    /// Every candidate subnet is in use on this host.
    #[error(
        "no free subnet for the namespaces: every 10.{first}.0.0/16 to 10.{last}.0.0/16 is used by an address or route of this host"
    )]
    NoSubnet {
        /// First candidate.
        first: u8,
        /// Last candidate.
        last: u8,
    },
    /// More nodes than one subnet holds.
    #[error("{0} nodes: at most {MAX_NODES} fit one namespace subnet")]
    TooMany(usize),
    /// A file (the lock) could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A probe inside a namespace failed or answered nonsense.
    #[error("probe in {ns}: {detail}")]
    Probe {
        /// The namespace.
        ns: String,
        /// What happened.
        detail: String,
    },
}

/// Run `ip ARGS`; its stdout on success, else an error with the command
/// line and its stderr.
pub fn ip(args: &[&str]) -> Result<String, NetnsError> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetnsError::Command {
            command: command.clone(),
            detail: format!("cannot start: {e}"),
        })?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
    String::from_utf8_lossy(&out).into_owned()
}

/// The pid encoded in a namespace name of this module, if it is one.
pub fn owner_pid(ns: &str) -> Option<u32> {
    ns.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Every network namespace name (`ip netns list`).
pub fn list() -> Result<Vec<String>, NetnsError> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// Delete namespaces of this module whose owning process is gone (a run
/// that crashed or was killed before its guard ran). Returns their names.
pub fn remove_stale() -> Result<Vec<String>, NetnsError> {
    let mut removed = Vec::new();
    for ns in list()? {
        if let Some(pid) = owner_pid(&ns)
            && !pid_alive(pid)
        {
            ip(&["netns", "del", &ns])?;
            removed.push(ns);
        }
    }
    Ok(removed)
}

/// Whether this process can create network namespaces and veth pairs:
/// creates a probe namespace with a veth pair, then deletes both. The
/// error says which command failed and why (typically: not root, or no
/// CAP_NET_ADMIN + CAP_SYS_ADMIN).
pub fn available() -> Result<(), NetnsError> {
    let pid = std::process::id();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let ns = format!("{PREFIX}{pid}-p{seq}");
    let host_if = format!("fp{}-{}", base36(pid), base36(seq % 1296));
    ip(&["netns", "add", &ns])?;
    let veth = ip(&[
        "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ]);
    let _ = ip(&["link", "del", &host_if]);
    let del = ip(&["netns", "del", &ns]);
    veth?;
    del.map(|_| ())
}

/// Whether `ip` is on a subnet that a live [`NetnsSet`] of this process
/// created (the relay accepts these besides loopback).
pub fn is_own_address(ip: IpAddr) -> bool {
    let IpAddr::V4(v4) = ip else {
        return false;
    };
    let [a, b, _, _] = v4.octets();
    a == 10
        && ACTIVE
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .contains(&b)
}

/// The second octets of `10.x` addresses and routes the host uses.
fn used_subnets() -> Result<BTreeSet<u8>, NetnsError> {
    let mut used = BTreeSet::new();
    let text = ip(&["-o", "-4", "addr", "show"])? + &ip(&["-4", "route", "show", "table", "all"])?;
    for word in text.split_whitespace() {
        let addr = word.split('/').next().unwrap_or(word);
        if let Ok(v4) = addr.parse::<Ipv4Addr>() {
            let [a, b, _, _] = v4.octets();
            if a == 10 {
                used.insert(b);
            }
            // A route like 10.0.0.0/8 covers every candidate.
            if a == 10 && word.ends_with("/8") {
                used.extend(SUBNETS);
            }
        }
    }
    Ok(used)
}

/// One node's namespace and addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNet {
    /// Index in the set.
    pub index: usize,
    /// Namespace name (`fsc-<pid>-<seq>-<i>`).
    pub ns: String,
    /// The root side of the veth (`fs<pid36>-<seq36>-<i>`, <= 15 chars);
    /// inside, the other end is `eth0`.
    pub host_if: String,
    /// Root-side address `10.A.i.1`: relays and devices of this node bind here.
    pub gateway: Ipv4Addr,
    /// Inside address `10.A.i.2`: the node binds here.
    pub ip: Ipv4Addr,
}

/// Namespaces for a fleet, one per node; dropping it deletes them.
#[derive(Debug)]
pub struct NetnsSet {
    subnet: u8,
    nodes: Vec<NodeNet>,
    /// Namespaces created (possibly before their veth was).
    created: Vec<String>,
    removed: bool,
}

fn lock_file() -> Result<std::fs::File, NetnsError> {
    let io = |source| NetnsError::Io {
        path: PathBuf::from(LOCK_FILE),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .map_err(io)?;
    f.lock().map_err(io)?;
    Ok(f)
}

impl NetnsSet {
    /// Remove stale namespaces of dead runs, choose a free `10.A.0.0/16`,
    /// and create `n` namespaces with their veth pairs. On error, whatever
    /// was created is deleted again.
    pub fn create(n: usize) -> Result<NetnsSet, NetnsError> {
        if n > MAX_NODES {
            return Err(NetnsError::TooMany(n));
        }
        let stale = remove_stale()?;
        if !stale.is_empty() {
            tracing::info!(namespaces = ?stale, "removed namespaces of dead runs");
        }
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        // Held until every root-side address is on its interface, so the
        // next run sees them in `ip addr`.
        let _lock = lock_file()?;
        let used = used_subnets()?;
        let subnet = {
            let mut active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner());
            let count = SUBNETS.count() as u32;
            let start = pid.wrapping_add(seq) % count;
            let pick = (0..count)
                .map(|k| SUBNETS.start() + ((start + k) % count) as u8)
                .find(|b| !used.contains(b) && !active.contains(b))
                .ok_or(NetnsError::NoSubnet {
                    first: *SUBNETS.start(),
                    last: *SUBNETS.end(),
                })?;
            active.insert(pick);
            pick
        };
        let mut set = NetnsSet {
            subnet,
            nodes: Vec::new(),
            created: Vec::new(),
            removed: false,
        };
        for i in 0..n {
            let ns = format!("{PREFIX}{pid}-{seq}-{i}");
            let host_if = format!("fs{}-{}-{i}", base36(pid), base36(seq % 1296));
            let node = NodeNet {
                index: i,
                gateway: Ipv4Addr::new(10, subnet, i as u8, 1),
                ip: Ipv4Addr::new(10, subnet, i as u8, 2),
                ns,
                host_if,
            };
            ip(&["netns", "add", &node.ns])?;
            set.created.push(node.ns.clone());
            ip(&[
                "link",
                "add",
                &node.host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &node.ns,
            ])?;
            set.nodes.push(node.clone());
            let gw = format!("{}/24", node.gateway);
            let inside = format!("{}/24", node.ip);
            ip(&["addr", "add", &gw, "dev", &node.host_if])?;
            ip(&["link", "set", &node.host_if, "up"])?;
            ip(&["-n", &node.ns, "addr", "add", &inside, "dev", "eth0"])?;
            ip(&["-n", &node.ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &node.ns, "link", "set", "lo", "up"])?;
        }
        Ok(set)
    }

    /// The nodes, by index.
    pub fn nodes(&self) -> &[NodeNet] {
        &self.nodes
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> Option<&NodeNet> {
        self.nodes.get(i)
    }

    /// The second octet `A` of `10.A.0.0/16`.
    pub fn subnet(&self) -> u8 {
        self.subnet
    }

    /// Delete every veth and namespace now, reporting the first failure
    /// (the rest are still attempted). Processes inside should be stopped
    /// first; a namespace with processes left lives until they exit.
    pub fn remove(mut self) -> Result<(), NetnsError> {
        self.remove_all()
    }

    fn remove_all(&mut self) -> Result<(), NetnsError> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        let mut first = None;
        for node in &self.nodes {
            // Deleting one end deletes the pair at once (deleting the
            // namespace alone lets the kernel do it later).
            if let Err(e) = ip(&["link", "del", &node.host_if]) {
                first.get_or_insert(e);
            }
        }
        for ns in &self.created {
            if let Err(e) = ip(&["netns", "del", ns]) {
                first.get_or_insert(e);
            }
        }
        ACTIVE
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.subnet);
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for NetnsSet {
    fn drop(&mut self) {
        if let Err(e) = self.remove_all() {
            tracing::warn!(error = %e, "removing the run's network namespaces");
        }
    }
}

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeOutcome {
    /// `udp`, `tcp` or `udp-roundtrip`.
    pub proto: String,
    /// The address probed.
    pub target: SocketAddr,
    /// `unreachable` (no route: ENETUNREACH or EHOSTUNREACH), `sent` (the
    /// kernel took a UDP datagram), `connected`, `refused` (the host
    /// answered), `replied` (a round trip came back), `timeout`, `error`.
    pub outcome: String,
    /// The OS error or what came back.
    pub detail: String,
}

impl ProbeOutcome {
    fn new(proto: &str, target: SocketAddr, outcome: &str, detail: String) -> ProbeOutcome {
        ProbeOutcome {
            proto: proto.to_string(),
            target,
            outcome: outcome.to_string(),
            detail,
        }
    }

    fn from_error(proto: &str, target: SocketAddr, e: &std::io::Error) -> ProbeOutcome {
        use std::io::ErrorKind as K;
        let outcome = match e.kind() {
            K::NetworkUnreachable | K::HostUnreachable => "unreachable",
            K::ConnectionRefused => "refused",
            K::TimedOut => "timeout",
            _ => "error",
        };
        ProbeOutcome::new(proto, target, outcome, e.to_string())
    }

    /// Whether the probe shows no path at all to the target.
    pub fn unreachable(&self) -> bool {
        self.outcome == "unreachable"
    }
}

fn unspecified_for(target: SocketAddr) -> SocketAddr {
    match target {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    }
}

/// Send one UDP datagram to `target` from an ephemeral socket.
pub async fn probe_udp(target: SocketAddr) -> ProbeOutcome {
    let sock = match tokio::net::UdpSocket::bind(unspecified_for(target)).await {
        Ok(s) => s,
        Err(e) => return ProbeOutcome::from_error("udp", target, &e),
    };
    match sock.send_to(b"fieldsync-netns-probe", target).await {
        Ok(n) => ProbeOutcome::new("udp", target, "sent", format!("{n} bytes accepted")),
        Err(e) => ProbeOutcome::from_error("udp", target, &e),
    }
}

/// Send one UDP datagram to `target` and wait up to `within` for any
/// answer (an echo server, or a relay in front of one).
pub async fn probe_udp_roundtrip(target: SocketAddr, within: Duration) -> ProbeOutcome {
    const P: &str = "udp-roundtrip";
    let sock = match tokio::net::UdpSocket::bind(unspecified_for(target)).await {
        Ok(s) => s,
        Err(e) => return ProbeOutcome::from_error(P, target, &e),
    };
    if let Err(e) = sock.send_to(b"fieldsync-netns-probe", target).await {
        return ProbeOutcome::from_error(P, target, &e);
    }
    let mut buf = [0u8; 256];
    match tokio::time::timeout(within, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => ProbeOutcome::new(
            P,
            target,
            "replied",
            format!(
                "{n} bytes from {from}: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
        ),
        Ok(Err(e)) => ProbeOutcome::from_error(P, target, &e),
        Err(_) => ProbeOutcome::new(
            P,
            target,
            "timeout",
            format!("no answer within {} ms", within.as_millis()),
        ),
    }
}

/// Open a TCP connection to `target` (and close it), within `within`.
pub async fn probe_tcp(target: SocketAddr, within: Duration) -> ProbeOutcome {
    match tokio::time::timeout(within, tokio::net::TcpStream::connect(target)).await {
        Ok(Ok(_)) => ProbeOutcome::new("tcp", target, "connected", String::new()),
        Ok(Err(e)) => ProbeOutcome::from_error("tcp", target, &e),
        Err(_) => ProbeOutcome::new(
            "tcp",
            target,
            "timeout",
            format!("no answer within {} ms", within.as_millis()),
        ),
    }
}

/// Echo every UDP datagram received on `addr` back to its sender for
/// `serve_for`, after printing `ready <addr>` on stdout.
pub async fn serve_udp_echo(addr: SocketAddr, serve_for: Duration) -> std::io::Result<u64> {
    let sock = tokio::net::UdpSocket::bind(addr).await?;
    println!("ready {}", sock.local_addr()?);
    let deadline = tokio::time::Instant::now() + serve_for;
    let mut buf = vec![0u8; 65536];
    let mut echoed = 0;
    loop {
        match tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) => {
                sock.send_to(&buf[..n], from).await?;
                echoed += 1;
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(echoed),
        }
    }
}

/// Probe from inside namespace `ns`: runs `ip netns exec NS PROBE_BIN
/// netns-probe --udp .. --tcp .. --udp-roundtrip ..` (`probe_bin` is the
/// `chaos` binary) and parses its JSON answer.
pub async fn probe_from(
    ns: &str,
    probe_bin: &Path,
    udp: &[SocketAddr],
    tcp: &[SocketAddr],
    roundtrip: &[SocketAddr],
    within: Duration,
) -> Result<Vec<ProbeOutcome>, NetnsError> {
    let mut args: Vec<String> = vec![
        "netns".into(),
        "exec".into(),
        ns.into(),
        probe_bin.display().to_string(),
        "netns-probe".into(),
        "--timeout-ms".into(),
        within.as_millis().to_string(),
    ];
    for (flag, addrs) in [
        ("--udp", udp),
        ("--tcp", tcp),
        ("--udp-roundtrip", roundtrip),
    ] {
        for a in addrs {
            args.push(flag.into());
            args.push(a.to_string());
        }
    }
    let fail = |detail: String| NetnsError::Probe {
        ns: ns.to_string(),
        detail,
    };
    // Every probe is bounded by `within`; allow for process start-up.
    let out = tokio::process::Command::new("ip")
        .args(&args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(within * 3 + Duration::from_secs(10), out).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return Err(fail(format!("cannot start `ip {}`: {e}", args.join(" ")))),
        Err(_) => return Err(fail(format!("`ip {}` did not finish", args.join(" ")))),
    };
    if !out.status.success() {
        return Err(fail(format!(
            "`ip {}`: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        fail(format!(
            "answer is not a probe list ({e}): {}",
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_encode_the_owner() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        let worst = format!("fs{}-{}-{}", base36(4_194_304), base36(1295), 249);
        assert!(worst.len() <= 15, "{worst}");
        assert_eq!(owner_pid("fsc-1234-0-3"), Some(1234));
        assert_eq!(owner_pid("fsc-99-p1"), Some(99));
        assert_eq!(owner_pid("other-1"), None);
        assert_eq!(owner_pid("fsc-x-1"), None);
    }

    #[test]
    fn only_claimed_subnets_count_as_own() {
        assert!(!is_own_address("10.0.0.1".parse().unwrap()));
        assert!(!is_own_address("127.0.0.1".parse().unwrap()));
        ACTIVE.lock().unwrap().insert(201);
        assert!(is_own_address("10.201.3.2".parse().unwrap()));
        assert!(!is_own_address("11.201.3.2".parse().unwrap()));
        ACTIVE.lock().unwrap().remove(&201);
        assert!(!is_own_address("10.201.3.2".parse().unwrap()));
    }

    #[tokio::test]
    async fn an_error_kind_maps_to_an_outcome() {
        let t: SocketAddr = "10.1.2.3:4".parse().unwrap();
        let e = std::io::Error::from(std::io::ErrorKind::NetworkUnreachable);
        assert!(ProbeOutcome::from_error("udp", t, &e).unreachable());
        let e = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(ProbeOutcome::from_error("tcp", t, &e).outcome, "refused");
        // Loopback is reachable: a UDP send is taken.
        let o = probe_udp("127.0.0.1:9".parse().unwrap()).await;
        assert_eq!(o.outcome, "sent", "{o:?}");
    }
}
