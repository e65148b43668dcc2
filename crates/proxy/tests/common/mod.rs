//! A throwaway network namespace for tests that need real nftables: created with a random
//! name, torn down in Drop (processes killed first) even when the test panics.

#![allow(dead_code)] // each test binary uses a different part

use std::process::{Child, Command, Output, Stdio};

pub struct Netns {
    pub name: String,
    children: Vec<Child>,
}

pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

/// Prints why the test cannot run here and returns None, or panics under CI=true, where
/// every prerequisite must be present.
pub fn skip(test: &str, why: &str) -> Option<Netns> {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {why} (CI=true, so this is a failure)");
    }
    eprintln!("SKIPPED: {test}: {why}");
    None
}

impl Netns {
    /// A new namespace `rkube-pt-<random>` with only loopback (up), or None when this machine
    /// cannot make one (not root, no `ip`/`nft`).
    pub fn create(test: &str) -> Option<Netns> {
        if !is_root() {
            return skip(test, "needs root");
        }
        for p in ["ip", "nft"] {
            if !have(p) {
                return skip(test, &format!("`{p}` is not installed"));
            }
        }
        let name = format!("rkube-pt-{:08x}", rand::random::<u32>());
        let added = Command::new("ip").args(["netns", "add", &name]).status();
        if !added.is_ok_and(|s| s.success()) {
            return skip(test, "`ip netns add` failed");
        }
        let ns = Netns { name, children: Vec::new() };
        ns.ip(&["link", "set", "lo", "up"]);
        Some(ns)
    }

    /// `ip -n NS args…`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let out = Command::new("ip").args(["-n", &self.name]).args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `args` inside the namespace and returns its output.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ip netns exec")
    }

    /// Starts `args` inside the namespace; killed when the namespace is dropped.
    pub fn spawn(&mut self, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn in netns");
        self.children.push(child);
    }

    /// The nft command prefix the proxy should use to act inside this namespace.
    pub fn nft_command(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name, "nft"].map(String::from).to_vec()
    }

    /// The proxy's netlink target for this namespace (where `nft_command` acts).
    pub fn netlink(&self) -> rkube_proxy::Netlink {
        rkube_proxy::Netlink::Netns(format!("/run/netns/{}", self.name).into())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting the namespace takes its interfaces, addresses and nftables with it.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// The Python the tests' tiny servers and clients run on (Debian's, not a user's shim).
pub fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" }
}
