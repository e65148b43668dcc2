//! Shared test scaffolding: a real `rkube server` (+ optional `rkube agent`) on free loopback
//! ports in a temp dir, the real kubectl pointed at it, and cleanup on drop even on failure.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `true` when `program` runs; when it does not, skip visibly — or fail when CI=true.
pub fn available(program: &str, args: &[&str]) -> bool {
    let ok = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{program} is required when CI=true");
        eprintln!("SKIPPED: {program} is not available");
    }
    ok
}

/// The header of `kubectl get nodes -o wide`.
pub const NODES_WIDE_HEADER: [&str; 10] = [
    "NAME",
    "STATUS",
    "ROLES",
    "AGE",
    "VERSION",
    "INTERNAL-IP",
    "EXTERNAL-IP",
    "OS-IMAGE",
    "KERNEL-VERSION",
    "CONTAINER-RUNTIME",
];

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Server {
    pub dir: PathBuf,
    pub port: u16,
    pub kubeconfig: PathBuf,
    server: Option<Child>,
    agents: Vec<Child>,
    /// Runs every process of this cluster through it (`nsenter --net=…`: a simulated machine).
    prefix: Vec<String>,
    /// Extra flags of `rkube server`.
    server_args: Vec<String>,
}

impl Server {
    pub fn start() -> Server {
        Self::start_with(&[])
    }

    /// A cluster whose `rkube server` gets these flags too.
    pub fn start_with(server_args: &[&str]) -> Server {
        // The cluster DNS on loopback and a free port: tests never bind the host's addresses.
        let mut args = vec![
            "--cluster-dns-address".to_string(),
            "127.0.0.1".to_string(),
            "--cluster-dns-port".to_string(),
            free_port().to_string(),
        ];
        args.extend(server_args.iter().map(|a| a.to_string()));
        Self::start_with_prefix(Vec::new(), args)
    }

    /// A cluster whose server, agents and kubectl all run inside the network namespace pinned
    /// at `netns` (entered with nsenter, which keeps the host's mounts such as cgroups).
    pub fn start_in_netns(netns: &Path, server_args: &[&str]) -> Server {
        Self::start_with_prefix(
            vec!["nsenter".into(), format!("--net={}", netns.display())],
            server_args.iter().map(|a| a.to_string()).collect(),
        )
    }

    fn command(&self, program: &str) -> Command {
        match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn start_with_prefix(prefix: Vec<String>, server_args: Vec<String>) -> Server {
        let dir =
            std::env::temp_dir().join(format!("rkube-it-{}-{}", std::process::id(), uuid_like()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let mut s = Server {
            kubeconfig: dir.join("server").join("admin.kubeconfig"),
            dir,
            port,
            server: None,
            agents: Vec::new(),
            prefix,
            server_args,
        };
        s.spawn_server();
        s
    }

    pub fn spawn_server(&mut self) {
        let log = std::fs::File::create(self.dir.join("server.log")).unwrap();
        let child = self
            .command(env!("CARGO_BIN_EXE_rkube"))
            .args(["server", "--secure-port", &self.port.to_string(), "--data-dir"])
            .arg(self.dir.join("server"))
            .args(&self.server_args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.server = Some(child);
        let start = Instant::now();
        loop {
            let answers = if self.prefix.is_empty() {
                std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            } else {
                self.kubeconfig.exists()
                    && self.kubectl(&["get", "--raw", "/healthz"]).status.success()
            };
            if self.kubeconfig.exists() && answers {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "server did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server process (SIGKILL: nothing gets a chance to flush).
    pub fn kill_server(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// An agent on another simulated machine: inside the network namespace pinned at `netns`.
    pub fn agent_in(&mut self, netns: &Path, node: &str, extra: &[&str]) {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns.display())).arg(env!("CARGO_BIN_EXE_rkube"));
        self.spawn_agent(cmd, node, extra);
    }

    /// SIGKILLs every agent (a crashed kubelet: nothing it runs is told).
    pub fn kill_agents(&mut self) {
        for mut a in self.agents.drain(..) {
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    /// Stops every agent as a service manager would (SIGTERM) and waits for them to exit.
    pub fn stop_agents(&mut self) {
        for mut a in self.agents.drain(..) {
            let _ = Command::new("kill").arg("-TERM").arg(a.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline && a.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    pub fn agent(&mut self, node: &str, extra: &[&str]) {
        let cmd = self.command(env!("CARGO_BIN_EXE_rkube"));
        self.spawn_agent(cmd, node, extra);
    }

    fn spawn_agent(&mut self, mut cmd: Command, node: &str, extra: &[&str]) {
        let log = std::fs::File::create(self.dir.join(format!("{node}.log"))).unwrap();
        let child = cmd
            .args(["agent", "--kubeconfig"])
            .arg(&self.kubeconfig)
            .args(["--node-name", node, "--data-dir"])
            .arg(self.dir.join(node))
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.push(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub fn kubectl_with(&self, binary: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = self.command(binary);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join(format!("kcache-{}", binary.replace('/', "_"))))
            .args(args);
        cmd.env("HOME", &self.dir).stdout(Stdio::piped()).stderr(Stdio::piped());
        match stdin {
            Some(input) => {
                cmd.stdin(Stdio::piped());
                let mut child = cmd.spawn().unwrap();
                use std::io::Write;
                child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
                child.wait_with_output().unwrap()
            }
            None => cmd.stdin(Stdio::null()).output().unwrap(),
        }
    }

    /// Runs kubectl (`binary`) with `args` until it has printed `n` lines or `limit` passed,
    /// then kills it: for commands that stream until stopped (`attach`, `logs -f`). Returns the
    /// lines read and how the process ended.
    pub fn kubectl_first_lines(
        &self,
        binary: &str,
        args: &[&str],
        n: usize,
        limit: Duration,
    ) -> (Vec<String>, std::process::ExitStatus) {
        use std::io::{BufRead, BufReader};
        let mut child = self
            .command(binary)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join(format!("kcache-{}", binary.replace('/', "_"))))
            .args(args)
            .env("HOME", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        let deadline = Instant::now() + limit;
        while seen.len() < n && Instant::now() < deadline {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
                seen.push(l);
            }
        }
        let _ = child.kill();
        let status = child.wait().unwrap();
        (seen, status)
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with("kubectl", args, None)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn ok_stdin(&self, args: &[&str], input: &str) -> String {
        let out = self.kubectl_with("kubectl", args, Some(input));
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn wait<T>(&self, what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            if start.elapsed() >= limit {
                // The agents' logs too: what a node did is usually the story.
                let mut agents = String::new();
                for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.ends_with(".log") && name != "server.log" {
                        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(30).collect();
                        agents.push_str(&format!("\n--- {name} (last lines)\n"));
                        agents.extend(tail.into_iter().rev().map(|l| format!("{l}\n")));
                    }
                }
                panic!("timed out after {limit:?} waiting for {what}\n{}{agents}", self.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = Command::new("kill").arg("-TERM").arg(a.id().to_string()).status();
        }
        for a in &mut self.agents {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if a.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = a.kill();
            let _ = a.wait();
        }
        self.kill_server();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    format!("{:x}", SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos())
}

/// The versioned kubectl binaries beside the dispatcher (kubectl.1.27 …).
pub fn versioned_kubectl(minor: u32) -> Option<PathBuf> {
    let real = std::fs::canonicalize(which("kubectl")?).ok()?;
    let p = real.parent()?.join(format!("kubectl.1.{minor}"));
    p.exists().then_some(p)
}

fn which(p: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(p)).find(|f| f.exists()))
}
