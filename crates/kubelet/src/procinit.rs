//! The process runtime's container init, run as rkube's hidden `process-init` subcommand before
//! any thread exists (it forks, changes namespaces and waits on signals).
//!
//! `process-init run` (spec as JSON on stdin) is what the kubelet starts for each container when
//! it runs as root. It joins the container's cgroup, unshares PID, mount, UTS and IPC namespaces
//! and forks the namespace's pid 1: a tiny init that makes mounts slaves of the host's (host
//! changes still reach the container, its own never leave it), mounts a fresh /proc (so `ps` sees
//! only the container), sets the hostname, then forks and execs the container's command. The init
//! reaps orphans, forwards polite signals to the command and ends with it, which makes the kernel
//! kill whatever is left in the namespace. The outer process, the one the kubelet waits on,
//! forwards signals to the init and ends as the command ended: with its exit code, or killed by
//! the same signal. Environment and working directory are the outer process's own (the kubelet
//! sets them), so `enter` can copy them.
//!
//! `process-init enter <pid> <cgroup|-> -- <argv>` runs a command inside the container whose
//! outer process is `<pid>` (exec, exec probes, hooks): same namespaces, cgroup, environment and
//! working directory; it ends as the command ended.
//!
//! `unsafe` here: `fork` (sound, as the subcommand runs before any other thread exists),
//! installing a do-nothing signal handler / restoring a default disposition, and closing
//! inherited descriptors.
#![allow(unsafe_code)]

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;

use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};
use serde::{Deserialize, Serialize};

/// The hidden subcommand's name.
pub const SUBCOMMAND: &str = "process-init";

/// What `run` reads on stdin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InitSpec {
    pub argv: Vec<String>,
    pub hostname: String,
    /// The container's cgroup (relative to the hierarchies' roots), already made with its limits.
    pub cgroup: Option<String>,
    /// A FIFO to read stdin from (`stdin: true`, for `kubectl attach -i`); /dev/null without.
    #[serde(default)]
    pub stdin: Option<std::path::PathBuf>,
    /// A terminal (a pty slave) to make the command's controlling terminal and stdio.
    #[serde(default)]
    pub tty: Option<std::path::PathBuf>,
}

/// Signals passed on to the container's command; SIGKILL needs no passing (the kubelet kills
/// the whole process group, and the namespace dies with its init).
const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// The subcommand's entry point; returns the exit code (when it does not die by a signal).
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let args: Vec<String> = args.into_iter().map(|a| a.to_string_lossy().into_owned()).collect();
    match args.first().map(String::as_str) {
        Some("run") => match run() {
            Ok(code) => code,
            Err(e) => {
                eprintln!("rkube process-init: {e}");
                127
            }
        },
        Some("enter") => match enter(&args[1..]) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("rkube process-init: {e}");
                127
            }
        },
        _ => {
            eprintln!("usage: rkube process-init run | enter <pid> <cgroup|-> -- <command>…");
            2
        }
    }
}

fn err(what: &str) -> impl FnOnce(nix::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn watched() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set
}

/// How the waited-for process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    Code(i32),
    Signal(i32),
}

impl Ended {
    fn line(self) -> String {
        match self {
            Ended::Code(c) => format!("exit {c}"),
            Ended::Signal(s) => format!("signal {s}"),
        }
    }

    fn parse(s: &str) -> Option<Ended> {
        let (kind, n) = s.trim().split_once(' ')?;
        let n: i32 = n.parse().ok()?;
        match kind {
            "exit" => Some(Ended::Code(n)),
            "signal" => Some(Ended::Signal(n)),
            _ => None,
        }
    }

    /// Ends this process the same way: the same code, or killed by the same signal.
    fn mirror(self) -> i32 {
        match self {
            Ended::Code(c) => c,
            Ended::Signal(s) => {
                if let Ok(sig) = Signal::try_from(s) {
                    let _ = unsafe {
                        nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl)
                    };
                    let mut one = SigSet::empty();
                    one.add(sig);
                    let _ = one.thread_unblock();
                    let _ = nix::sys::signal::raise(sig);
                }
                // A signal whose default is to be ignored: say it the shell's way.
                128 + s
            }
        }
    }
}

/// Waits for `child`, passing the forwarded signals to it (all of `watched()` must be blocked).
/// With `reap_all`, other children (orphans of a pid namespace) are reaped on the way.
fn wait_forwarding(child: Pid, reap_all: bool) -> Ended {
    let set = watched();
    loop {
        // Reap first: the child may have ended before we started waiting.
        loop {
            let target = if reap_all { None } else { Some(child) };
            match waitpid(target, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, c)) if p == child => return Ended::Code(c),
                Ok(WaitStatus::Signaled(p, s, _)) if p == child => return Ended::Signal(s as i32),
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return Ended::Code(255),
            }
        }
        match set.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = nix::sys::signal::kill(child, sig);
            }
        }
    }
}

extern "C" fn ignore(_: libc::c_int) {}

/// Closes every descriptor above stderr: whatever the kubelet inherited (a lock held by its own
/// parent, say) must not stay open for the container's lifetime.
fn close_inherited_fds() {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // The directory's own descriptor is among them and already closed: EBADF is fine.
        let _ = unsafe { libc::close(fd) };
    }
}

fn run() -> Result<i32, String> {
    close_inherited_fds();
    // stdin is a socket to the kubelet: the spec comes in, `ready` goes back once the
    // container's namespaces are set up (so exec and hooks never find them half made).
    let kubelet = std::io::stdin().as_fd().try_clone_to_owned().map_err(|e| format!("dup: {e}"))?;
    let mut kubelet = std::fs::File::from(kubelet);
    let mut input = String::new();
    kubelet.read_to_string(&mut input).map_err(|e| format!("read the spec: {e}"))?;
    let spec: InitSpec =
        serde_json::from_str(&input).map_err(|e| format!("parse the spec: {e}"))?;
    let stdin = spec.stdin.as_deref().unwrap_or(std::path::Path::new("/dev/null"));
    let stdin = std::fs::File::open(stdin).map_err(|e| format!("open {}: {e}", stdin.display()))?;
    nix::unistd::dup2_stdin(&stdin).map_err(err("stdin"))?;
    drop(stdin);
    if spec.argv.is_empty() {
        return Err("no command".into());
    }
    if let Some(cg) = &spec.cgroup {
        let files = rkube_oci::cgroup::procs_files(cg);
        if files.is_empty() {
            return Err(format!("cgroup {cg}: no cgroup hierarchy is mounted"));
        }
        rkube_oci::cgroup::join_self(&files).map_err(|e| e.to_string())?;
    }
    // Under memory pressure the container's command, not its inits, is the one to go.
    let own_adj = std::fs::read_to_string("/proc/self/oom_score_adj").unwrap_or_default();
    let _ = std::fs::write("/proc/self/oom_score_adj", "-999");
    nix::sched::unshare(
        CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC,
    )
    .map_err(err("unshare namespaces"))?;
    let (status_r, status_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(err("pipe"))?;
    watched().thread_block().map_err(err("block signals"))?;
    match unsafe { nix::unistd::fork() }.map_err(err("fork"))? {
        ForkResult::Child => {
            drop(status_r);
            drop(kubelet);
            let code = match namespace_init(&spec, status_w, own_adj.trim()) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("rkube process-init: {e}");
                    127
                }
            };
            std::process::exit(code);
        }
        ForkResult::Parent { child } => {
            drop(status_w);
            let mut status = std::io::BufReader::new(std::fs::File::from(status_r));
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut status, &mut line);
            if line == "ready\n" {
                let _ = kubelet.write_all(b"ready\n");
            }
            drop(kubelet);
            let ended = wait_forwarding(child, false);
            let mut told = String::new();
            let _ = status.read_to_string(&mut told);
            Ok(Ended::parse(&told).unwrap_or(ended).mirror())
        }
    }
}

/// Pid 1 of the container's namespace.
fn namespace_init(spec: &InitSpec, status: OwnedFd, own_adj: &str) -> Result<i32, String> {
    use nix::mount::{MsFlags, mount};
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(err("set the parent-death signal"))?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .map_err(err("make mounts slaves"))?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(err("mount /proc"))?;
    nix::unistd::sethostname(&spec.hostname).map_err(err("set the hostname"))?;
    let mut status = std::fs::File::from(status);
    status.write_all(b"ready\n").map_err(|e| format!("tell the outer init: {e}"))?;
    // A namespace's init gets only the signals it handles: give the forwarded ones a handler
    // (they stay blocked and are taken with sigwait).
    for s in FORWARDED {
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(ignore),
            nix::sys::signal::SaFlags::empty(),
            SigSet::empty(),
        );
        let _ = unsafe { nix::sys::signal::sigaction(s, &action) };
    }
    match unsafe { nix::unistd::fork() }.map_err(err("fork"))? {
        ForkResult::Child => {
            drop(status);
            if !own_adj.is_empty() {
                let _ = std::fs::write("/proc/self/oom_score_adj", own_adj);
            }
            if let Some(tty) = &spec.tty
                && let Err(e) = take_terminal(tty)
            {
                eprintln!("rkube process-init: {e}");
                std::process::exit(127);
            }
            std::process::exit(exec(&spec.argv, None));
        }
        ForkResult::Parent { child } => {
            let ended = wait_forwarding(child, true);
            let _ = status.write_all(ended.line().as_bytes());
            Ok(match ended {
                Ended::Code(c) => c,
                Ended::Signal(s) => 128 + s,
            })
        }
    }
}

/// Makes the terminal at `path` this process's controlling terminal (in a session of its own)
/// and its stdin, stdout and stderr.
fn take_terminal(path: &std::path::Path) -> Result<(), String> {
    nix::unistd::setsid().map_err(err("setsid"))?;
    // Opened by a session leader without a terminal, it becomes the controlling terminal.
    let t = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    nix::unistd::dup2_stdin(&t).map_err(err("stdin"))?;
    nix::unistd::dup2_stdout(&t).map_err(err("stdout"))?;
    nix::unistd::dup2_stderr(&t).map_err(err("stderr"))?;
    Ok(())
}

/// Execs `argv` with every signal unblocked and at its default (and `env` when given); returns
/// the shell's code for a command that cannot run.
fn exec(argv: &[String], env: Option<&[(OsString, OsString)]>) -> i32 {
    let _ = SigSet::all().thread_unblock();
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    if let Some(env) = env {
        cmd.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    }
    let e = cmd.exec();
    eprintln!("exec {:?}: {e}", argv[0]);
    if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 }
}

fn enter(args: &[String]) -> Result<i32, String> {
    let (pid, cgroup, argv) = match args {
        [pid, cgroup, dashes, argv @ ..] if dashes == "--" && !argv.is_empty() => {
            (pid.parse::<i32>().map_err(|_| format!("bad pid {pid}"))?, cgroup, argv)
        }
        _ => return Err("usage: enter <pid> <cgroup|-> -- <command>…".into()),
    };
    close_inherited_fds();
    let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
    let environ = std::fs::read(proc_dir.join("environ"))
        .map_err(|e| format!("container process {pid}: {e}"))?;
    let mut env: Vec<(OsString, OsString)> = environ
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let s = String::from_utf8_lossy(kv);
            let (k, v) = s.split_once('=')?;
            Some((k.into(), v.into()))
        })
        .collect();
    if let Some(term) = std::env::var_os("TERM") {
        env.retain(|(k, _)| k != "TERM");
        env.push(("TERM".into(), term));
    }
    let cwd = std::fs::read_link(proc_dir.join("cwd")).map_err(|e| format!("cwd: {e}"))?;
    let cgroup_files =
        if cgroup == "-" { Vec::new() } else { rkube_oci::cgroup::procs_files(cgroup) };
    let open = |name: &str| {
        std::fs::File::open(proc_dir.join("ns").join(name))
            .map_err(|e| format!("namespace {name} of {pid}: {e}"))
    };
    let same = |a: &str, b: &str| {
        let ino = |p: std::path::PathBuf| {
            std::fs::metadata(p).map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.dev(), m.ino())
            })
        };
        matches!((ino(proc_dir.join("ns").join(a)), ino(format!("/proc/self/ns/{b}").into())), (Ok(x), Ok(y)) if x == y)
    };
    if same("pid_for_children", "pid") {
        return Err(format!("process {pid} has no pid namespace of its own (yet)"));
    }
    let namespaces = [
        (open("ipc")?, CloneFlags::CLONE_NEWIPC),
        (open("uts")?, CloneFlags::CLONE_NEWUTS),
        (open("pid_for_children")?, CloneFlags::CLONE_NEWPID),
        (open("mnt")?, CloneFlags::CLONE_NEWNS),
    ];
    for (f, kind) in &namespaces {
        nix::sched::setns(f.as_fd(), *kind).map_err(err("enter a namespace"))?;
    }
    watched().thread_block().map_err(err("block signals"))?;
    match unsafe { nix::unistd::fork() }.map_err(err("fork"))? {
        ForkResult::Child => {
            if let Err(e) = rkube_oci::cgroup::join_self(&cgroup_files) {
                eprintln!("rkube process-init: {e}");
                std::process::exit(127);
            }
            if let Err(e) = std::env::set_current_dir(&cwd) {
                eprintln!("rkube process-init: chdir {}: {e}", cwd.display());
                std::process::exit(127);
            }
            std::process::exit(exec(argv, Some(&env)));
        }
        ForkResult::Parent { child } => Ok(wait_forwarding(child, false).mirror()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_tells_how_the_command_ended_in_one_line() {
        for e in [Ended::Code(0), Ended::Code(3), Ended::Signal(15), Ended::Signal(9)] {
            assert_eq!(Ended::parse(&e.line()), Some(e));
        }
        assert_eq!(Ended::parse(""), None);
        assert_eq!(Ended::parse("exit x"), None);
    }
}
