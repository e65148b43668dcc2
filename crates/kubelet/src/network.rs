//! The pod network of one node (bridge, host-gw style): a Linux bridge holding the gateway of the
//! node's podCIDR, one veth pair per pod sandbox, host-local IP allocation kept in files so it
//! survives kubelet restarts, and masquerade for pod traffic leaving the cluster network.
//!
//! It drives iproute2 (`ip`), `nsenter` and `nft`, which every Debian machine has, rather than
//! netlink directly: each step is one readable command, and errors carry that command's message.
//! The small interface (`attach`, `detach`, `gc`) is what a CNI plugin would replace.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{command}: {message}")]
    Command { command: String, message: String },
    #[error("pod network state in {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("podCIDR {0} is not an IPv4 network this kubelet can use")]
    Cidr(String),
    #[error("no free address left in {0}")]
    Exhausted(String),
}

pub type Result<T, E = NetError> = std::result::Result<T, E>;

/// One `hostPort` of a pod: `protocol` is `tcp`, `udp` or `sctp`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub protocol: String,
    pub host_port: u16,
    pub container_port: u16,
}

#[derive(Clone, Debug)]
pub struct PodNetwork {
    /// The bridge's name (≤ 15 characters, as Linux wants).
    pub bridge: String,
    network: Ipv4Addr,
    prefix: u8,
    /// The whole cluster's pod network; traffic to it is not masqueraded.
    pub cluster_cidr: String,
    state_dir: PathBuf,
    /// Prepended to every command: empty on a real node; `ip netns exec <ns>` in tests that
    /// simulate a machine inside a network namespace.
    pub prefix_cmd: Vec<String>,
}

/// A name derived from `seed` that fits Linux's 15-character interface names.
fn if_name(prefix: &str, seed: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    seed.hash(&mut h);
    format!("{prefix}{:08x}", h.finish() as u32)
}

impl PodNetwork {
    /// The network of a node with `pod_cidr` (e.g. `10.244.1.0/24`); allocations are kept in
    /// `state_dir`.
    pub fn new(
        node_name: &str,
        pod_cidr: &str,
        cluster_cidr: &str,
        state_dir: &Path,
    ) -> Result<Self> {
        let bad = || NetError::Cidr(pod_cidr.to_string());
        let (ip, len) = pod_cidr.split_once('/').ok_or_else(bad)?;
        let network: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = len.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(bad());
        }
        Ok(PodNetwork {
            bridge: if_name("rkb", node_name),
            network,
            prefix,
            cluster_cidr: cluster_cidr.to_string(),
            state_dir: state_dir.to_path_buf(),
            prefix_cmd: Vec::new(),
        })
    }

    pub fn cidr(&self) -> String {
        format!("{}/{}", self.network, self.prefix)
    }

    /// The first address of the podCIDR, held by the bridge and used as the pods' default route.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    fn host_count(&self) -> u32 {
        (1u32 << (32 - self.prefix)) - 2
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let mut argv: Vec<&str> = self.prefix_cmd.iter().map(String::as_str).collect();
        argv.extend_from_slice(args);
        run_argv(&argv, None)
    }

    fn run_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        let mut argv: Vec<&str> = self.prefix_cmd.iter().map(String::as_str).collect();
        argv.extend_from_slice(args);
        run_argv(&argv, Some(input))
    }

    /// Creates (or finds) the bridge with the gateway address, turns on forwarding and bridged
    /// traffic through netfilter (Service DNAT must see pod-to-pod replies on the same bridge),
    /// and installs the masquerade table. Idempotent.
    pub fn ensure_bridge(&self) -> Result<()> {
        if self.run(&["ip", "link", "show", "dev", &self.bridge]).is_err() {
            self.run(&["ip", "link", "add", "name", &self.bridge, "type", "bridge"])?;
        }
        let gw = format!("{}/{}", self.gateway(), self.prefix);
        let addrs = self.run(&["ip", "-4", "-o", "addr", "show", "dev", &self.bridge])?;
        if !addrs.split_whitespace().any(|w| w == gw) {
            self.run(&["ip", "addr", "add", &gw, "dev", &self.bridge])?;
        }
        self.run(&["ip", "link", "set", "dev", &self.bridge, "up"])?;
        self.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        // Absent when br_netfilter is not in the kernel; the network still works without
        // Service hairpin between pods of one bridge then.
        let _ = self.run(&["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"]);
        let table = format!("rkube-pods-{}", self.bridge);
        let rules = format!(
            "add table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {cidr} ip daddr != {cluster} masquerade\n  }}\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    ip saddr {cidr} accept\n    ip daddr {cidr} accept\n  }}\n}}\n",
            cidr = self.cidr(),
            cluster = self.cluster_cidr,
        );
        self.run_stdin(&["nft", "-f", "-"], &rules)?;
        Ok(())
    }

    fn lease_path(&self, ip: Ipv4Addr) -> PathBuf {
        self.state_dir.join(ip.to_string())
    }

    /// The address leased to `pod_uid`, if any.
    pub fn leased(&self, pod_uid: &str) -> Option<Ipv4Addr> {
        let dir = std::fs::read_dir(&self.state_dir).ok()?;
        dir.flatten().find_map(|e| {
            let owner = std::fs::read_to_string(e.path()).ok()?;
            (owner.trim() == pod_uid).then(|| e.file_name().to_str()?.parse().ok())?
        })
    }

    /// Leases the lowest free address to `pod_uid` (the same one again if it has one). A lease
    /// is a file created exclusively, so two workers can never take one address.
    pub fn allocate(&self, pod_uid: &str) -> Result<Ipv4Addr> {
        if let Some(ip) = self.leased(pod_uid) {
            return Ok(ip);
        }
        std::fs::create_dir_all(&self.state_dir)
            .map_err(|source| NetError::State { path: self.state_dir.clone(), source })?;
        for i in 2..=self.host_count() {
            let ip = Ipv4Addr::from(u32::from(self.network) + i);
            let path = self.lease_path(ip);
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(pod_uid.as_bytes())
                        .map_err(|source| NetError::State { path: path.clone(), source })?;
                    return Ok(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(NetError::State { path, source }),
            }
        }
        Err(NetError::Exhausted(self.cidr()))
    }

    /// Gives back the address of `pod_uid`.
    pub fn release(&self, pod_uid: &str) {
        while let Some(ip) = self.leased(pod_uid) {
            if std::fs::remove_file(self.lease_path(ip)).is_err() {
                return;
            }
        }
    }

    /// Releases every lease whose pod is not in `live` (pods deleted while the kubelet was down).
    pub fn gc(&self, live: &[String]) {
        let Ok(dir) = std::fs::read_dir(&self.state_dir) else { return };
        for e in dir.flatten() {
            let owner = std::fs::read_to_string(e.path()).unwrap_or_default();
            if !live.iter().any(|l| l == owner.trim()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Connects the network namespace `netns` (a pinned namespace file) of pod `pod_uid`: a
    /// veth pair with `eth0` inside, its address and default route, the host end on the bridge
    /// with hairpin on (a pod can reach itself through its Service). Returns the pod's IP.
    pub fn attach(&self, pod_uid: &str, netns: &Path) -> Result<Ipv4Addr> {
        self.ensure_bridge()?;
        let ip = self.allocate(pod_uid)?;
        let host_if = if_name("veth", pod_uid);
        let ns = netns.to_string_lossy().to_string();
        let in_pod = |args: &[&str]| -> Result<String> {
            let net = format!("--net={ns}");
            let mut argv = vec!["nsenter", net.as_str()];
            argv.extend_from_slice(args);
            self.run(&argv)
        };
        // Already wired (a kubelet restarted under a running pod): leave it as it is.
        if self.run(&["ip", "link", "show", "dev", &host_if]).is_ok()
            && in_pod(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
                .is_ok_and(|out| out.contains(&format!(" {ip}/")))
        {
            return Ok(ip);
        }
        let result = (|| {
            // A half-made pair from an interrupted attempt is replaced.
            let _ = self.run(&["ip", "link", "del", "dev", &host_if]);
            self.run(&[
                "ip", "link", "add", "name", &host_if, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            self.run(&["ip", "link", "set", "dev", &host_if, "master", &self.bridge])?;
            self.run(&[
                "ip",
                "link",
                "set",
                "dev",
                &host_if,
                "type",
                "bridge_slave",
                "hairpin",
                "on",
            ])?;
            self.run(&["ip", "link", "set", "dev", &host_if, "up"])?;
            in_pod(&["ip", "link", "set", "dev", "lo", "up"])?;
            in_pod(&["ip", "addr", "add", &format!("{ip}/{}", self.prefix), "dev", "eth0"])?;
            in_pod(&["ip", "link", "set", "dev", "eth0", "up"])?;
            in_pod(&["ip", "route", "replace", "default", "via", &self.gateway().to_string()])?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = self.run(&["ip", "link", "del", "dev", &host_if]);
            self.release(pod_uid);
            return Err(e);
        }
        Ok(ip)
    }

    /// Disconnects pod `pod_uid` and releases its address. Idempotent.
    pub fn detach(&self, pod_uid: &str) {
        if self.state_dir.with_file_name("hostports").join(pod_uid).exists() {
            let _ = self.set_host_ports(pod_uid, Ipv4Addr::UNSPECIFIED, &[]);
        }
        let _ = self.run(&["ip", "link", "del", "dev", &if_name("veth", pod_uid)]);
        self.release(pod_uid);
    }

    /// `hostPort`s: the pod's ports published on this node's addresses (not loopback), as
    /// the CNI portmap plugin does. Each pod's mappings are kept in a file and the node's
    /// hostport table is rewritten from all of them in one nft transaction; an empty list
    /// removes the pod's mappings.
    pub fn set_host_ports(&self, pod_uid: &str, ip: Ipv4Addr, ports: &[HostPort]) -> Result<()> {
        let dir = self.state_dir.with_file_name("hostports");
        std::fs::create_dir_all(&dir)
            .map_err(|source| NetError::State { path: dir.clone(), source })?;
        let file = dir.join(pod_uid);
        if ports.is_empty() {
            let _ = std::fs::remove_file(&file);
        } else {
            let text: String = ports
                .iter()
                .map(|p| format!("{} {} {ip} {}\n", p.protocol, p.host_port, p.container_port))
                .collect();
            std::fs::write(&file, text)
                .map_err(|source| NetError::State { path: file.clone(), source })?;
        }
        let mut rules = Vec::new();
        let mut entries: Vec<(PathBuf, String)> = std::fs::read_dir(&dir)
            .map_err(|source| NetError::State { path: dir.clone(), source })?
            .flatten()
            .map(|e| (e.path(), std::fs::read_to_string(e.path()).unwrap_or_default()))
            .collect();
        entries.sort();
        for (_, text) in entries {
            for line in text.lines() {
                let w: Vec<&str> = line.split_whitespace().collect();
                if let [proto, host, pod_ip, port] = w.as_slice() {
                    rules.push(format!(
                        "    fib daddr type local ip daddr != 127.0.0.0/8 {proto} dport {host} dnat ip to {pod_ip}:{port}"
                    ));
                }
            }
        }
        let table = format!("rkube-hostports-{}", self.bridge);
        let body = rules.join("\n");
        let text = format!(
            "add table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n  chain prerouting {{\n    type nat hook prerouting priority -101; policy accept;\n{body}\n  }}\n  chain output {{\n    type nat hook output priority -101; policy accept;\n{body}\n  }}\n}}\n"
        );
        self.run_stdin(&["nft", "-f", "-"], &text).map(|_| ())
    }

    /// Host-gw routing: the pods of another node are reached through that node's address.
    pub fn route_to(&self, pod_cidr: &str, node_ip: &str) -> Result<()> {
        self.run(&["ip", "route", "replace", pod_cidr, "via", node_ip]).map(|_| ())
    }

    /// Forgets the route to a node that left.
    pub fn remove_route(&self, pod_cidr: &str) -> Result<()> {
        self.run(&["ip", "route", "del", pod_cidr]).map(|_| ())
    }
}

fn run_argv(argv: &[&str], input: Option<&str>) -> Result<String> {
    use std::io::Write;
    use std::process::Stdio;
    let command = argv.join(" ");
    let fail = |message: String| NetError::Command { command: command.clone(), message };
    let (program, args) = argv.split_first().ok_or_else(|| fail("empty command".into()))?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("rkube-net-{}", uuid_like()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn uuid_like() -> String {
        format!(
            "{:x}{:x}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        )
    }

    #[test]
    fn addresses_are_leased_lowest_first_and_kept_per_pod() {
        let dir = temp_dir();
        let net = PodNetwork::new("n1", "10.244.3.0/24", "10.244.0.0/16", &dir).unwrap();
        assert_eq!(net.gateway().to_string(), "10.244.3.1");
        assert_eq!(net.allocate("a").unwrap().to_string(), "10.244.3.2");
        assert_eq!(net.allocate("b").unwrap().to_string(), "10.244.3.3");
        assert_eq!(net.allocate("a").unwrap().to_string(), "10.244.3.2", "same pod, same IP");
        net.release("a");
        assert_eq!(net.allocate("c").unwrap().to_string(), "10.244.3.2", "freed IP reused");
        // A new PodNetwork over the same directory (a restarted kubelet) sees the leases.
        let again = PodNetwork::new("n1", "10.244.3.0/24", "10.244.0.0/16", &dir).unwrap();
        assert_eq!(again.leased("b").map(|i| i.to_string()).as_deref(), Some("10.244.3.3"));
        again.gc(&["b".to_string()]);
        assert!(again.leased("c").is_none() && again.leased("b").is_some());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_full_pod_cidr_is_reported_and_bad_cidrs_refused() {
        let dir = temp_dir();
        let net = PodNetwork::new("n1", "10.1.0.0/30", "10.1.0.0/16", &dir).unwrap();
        net.allocate("a").unwrap();
        assert!(matches!(net.allocate("b"), Err(NetError::Exhausted(_))));
        assert!(PodNetwork::new("n1", "10.1.0.0", "10.1.0.0/16", &dir).is_err());
        assert!(PodNetwork::new("n1", "10.1.0.0/31", "10.1.0.0/16", &dir).is_err());
        assert!(PodNetwork::new("n1", "x/24", "10.1.0.0/16", &dir).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn interface_names_fit_linux_limits() {
        assert!(if_name("veth", "0b6c3f57-7c0e-4d8e-9b9e-2f9d7f0b1a11").len() <= 15);
        assert_eq!(if_name("rkb", "node-1"), if_name("rkb", "node-1"));
        assert_ne!(if_name("rkb", "node-1"), if_name("rkb", "node-2"));
    }

    /// Network namespaces made for one test and deleted when it ends, even on panic.
    struct Netns(Vec<String>);
    impl Drop for Netns {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = Command::new("ip").args(["netns", "del", n]).status();
            }
        }
    }

    fn can_run() -> bool {
        let ok = nix::unistd::Uid::effective().is_root()
            && ["ip", "nsenter", "nft", "python3"].iter().all(|p| {
                Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success())
                    || Command::new(p).arg("-V").output().is_ok_and(|o| o.status.success())
            });
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "root, ip, nsenter, nft and python3 are required when CI=true"
            );
            eprintln!("SKIPPED: needs root, ip, nsenter, nft, python3");
        }
        ok
    }

    /// Inside a namespace standing in for the node: two pods get addresses, reach each other
    /// and their gateway; detaching frees the address and removes the host interface.
    #[test]
    fn pods_on_one_bridge_reach_each_other_and_the_node() {
        if !can_run() {
            return;
        }
        let tag = &uuid_like()[..10];
        let node = format!("rkn-{tag}");
        let (a, b) = (format!("rkpa-{tag}"), format!("rkpb-{tag}"));
        let _guard = Netns(vec![node.clone(), a.clone(), b.clone()]);
        for n in [&node, &a, &b] {
            run_argv(&["ip", "netns", "add", n], None).unwrap();
        }
        let dir = temp_dir();
        let mut net = PodNetwork::new("test-node", "10.244.9.0/24", "10.244.0.0/16", &dir).unwrap();
        net.prefix_cmd = vec!["ip".into(), "netns".into(), "exec".into(), node.clone()];
        run_argv(&["ip", "netns", "exec", &node, "ip", "link", "set", "lo", "up"], None).unwrap();
        let ip_a = net.attach("pod-a", &Path::new("/run/netns").join(&a)).unwrap();
        let ip_b = net.attach("pod-b", &Path::new("/run/netns").join(&b)).unwrap();
        assert_eq!(
            (ip_a.to_string(), ip_b.to_string()),
            ("10.244.9.2".into(), "10.244.9.3".into())
        );
        // Attaching again is harmless and keeps the address.
        assert_eq!(net.attach("pod-a", &Path::new("/run/netns").join(&a)).unwrap(), ip_a);

        let serve = |ns: &str, ip: &str, reply: &str| {
            let script = format!(
                "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('{ip}',7070))\ns.listen(4)\ns.settimeout(10)\nc,_=s.accept()\nc.sendall(b'{reply}')\nc.close()\n"
            );
            Command::new("ip")
                .args(["netns", "exec", ns, "python3", "-c", &script])
                .spawn()
                .unwrap()
        };
        let fetch = |ns: &str, ip: &str| -> String {
            let script = format!(
                "import socket,time\nfor i in range(50):\n  try:\n    s=socket.create_connection(('{ip}',7070),timeout=2);print(s.recv(64).decode());break\n  except OSError:\n    time.sleep(0.1)\n"
            );
            let out = Command::new("timeout")
                .args(["15", "ip", "netns", "exec", ns, "python3", "-c", &script])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let mut server = serve(&b, &ip_b.to_string(), "from-b");
        assert_eq!(fetch(&a, &ip_b.to_string()), "from-b");
        let _ = server.wait();
        let gw = net.gateway().to_string();
        let mut server = serve(&node, &gw, "from-node");
        assert_eq!(fetch(&a, &gw), "from-node");
        let _ = server.wait();

        net.detach("pod-a");
        assert!(net.leased("pod-a").is_none());
        let links = net.run(&["ip", "-o", "link"]).unwrap();
        assert!(!links.contains(&if_name("veth", "pod-a")), "{links}");
        assert!(links.contains(&if_name("veth", "pod-b")), "{links}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
