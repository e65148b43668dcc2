//! The per-container shim: a small process that outlives the kubelet, owns the container's stdio
//! and reaps its init process, so the log and the real exit status survive a kubelet restart.
//!
//! Why a subreaper shim rather than `runc run` in the foreground: `runc create` hands the
//! container's init to its parent's subreaper (this shim), so `waitpid` gives the true wait status
//! (exit code or signal) and the container's cgroup still exists when it ends, which is when the
//! memory cgroup's `oom_kill` counter must be read; `runc run` would delete the cgroup first and
//! keep a Go process per container alive. This is how containerd's runc shim works too.
//!
//! Protocol: started as `<shim> <container dir>`, it reads `shim.json`, writes `shim.pid`, prints
//! one line on stdout (`ok <pid>` or `error <message>`) once the container runs or failed to
//! start (and `started` with its pid and time), then copies output to the CRI log and finally
//! writes `exit` (JSON of [`Exit`]) atomically.

use std::io::{BufRead, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::container::Exit;
use super::{Error, Result, io_err, sys_err, write_atomic};
use crate::attach;

/// What the shim needs to know, written by `start_container` into `<container dir>/shim.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShimConfig {
    pub runc: PathBuf,
    pub state_root: PathBuf,
    pub id: String,
    pub log_path: PathBuf,
    pub tty: bool,
    /// A stdin for `kubectl attach -i` (see [`crate::attach`]); closed after the first attach
    /// session with `stdin_once`.
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub stdin_once: bool,
    /// The container's cgroupsPath, to read its OOM kill counter when it ends.
    pub cgroups_path: String,
}

/// CRI splits longer lines into partial (`P`) records of this size, as containerd does.
const MAX_LINE: usize = 16 * 1024;

/// The shim's entry point for `main`/the hidden subcommand: `args` are the arguments after the
/// program name (one: the container directory). Returns the process exit code.
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    let Some(dir) = args.into_iter().next().map(PathBuf::from) else {
        eprintln!("usage: rkube-runc-shim <container dir>");
        return 2;
    };
    let mut status = std::io::stdout();
    match run(&dir, &mut status) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("shim: {e}");
            // Tell the starter if it is still listening; after `ok` this write goes nowhere.
            let _ = writeln!(status, "error {}", e.to_string().replace('\n', " "));
            1
        }
    }
}

fn run(dir: &Path, status: &mut std::io::Stdout) -> Result<()> {
    let cfg_path = dir.join("shim.json");
    let cfg: ShimConfig = serde_json::from_slice(
        &std::fs::read(&cfg_path).map_err(io_err(format!("read {}", cfg_path.display())))?,
    )
    .map_err(|source| Error::Json { what: format!("parse {}", cfg_path.display()), source })?;
    // Our own session: a signal to the kubelet's process group or terminal must not reach us.
    let _ = nix::unistd::setsid();
    // Nor a polite stop aimed at the kubelet's processes: only SIGKILL ends the shim early (that
    // loses the exit, see Error::ExitLost). Blocked before any thread starts, so all inherit it;
    // std resets the mask in the processes we spawn, so runc and the container get signals.
    let mut polite = nix::sys::signal::SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT] {
        polite.add(sig);
    }
    let _ = polite.thread_block();
    nix::sys::prctl::set_child_subreaper(true).map_err(sys_err("become a child subreaper"))?;
    write_atomic(&dir.join("shim.pid"), std::process::id().to_string().as_bytes())?;

    if let Some(parent) = cfg.log_path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(format!("create {}", parent.display())))?;
    }
    let log = crate::log::RotatingLog::open(
        &cfg.log_path,
        crate::log::DEFAULT_MAX_SIZE,
        crate::log::DEFAULT_MAX_FILES,
    )
    .map_err(io_err(format!("open log {}", cfg.log_path.display())))?;
    let log = Arc::new(Mutex::new(log));

    let pid_file = dir.join("init.pid");
    let _ = std::fs::remove_file(&pid_file);
    let mut create = Command::new(&cfg.runc);
    create
        .arg("--root")
        .arg(&cfg.state_root)
        .arg("--log")
        .arg(dir.join("runc.log"))
        .arg("--log-format")
        .arg("json")
        .arg("create")
        .arg("--bundle")
        .arg(dir)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(&cfg.id);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let mut readers = 0;
    let socket = dir.join("attach.sock");
    let mut child = if cfg.tty {
        // A pty whose slave is the container's stdio: programs see a terminal (line buffering,
        // colours) and the master gives one stream, as CRI's tty containers log to stdout.
        let pty = nix::pty::openpty(None, None).map_err(sys_err("open a pty"))?;
        let slave = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(io_err("dup pty"));
        create.stdin(slave(&pty.slave)?).stdout(slave(&pty.slave)?).stderr(slave(&pty.slave)?);
        let child = create.spawn().map_err(io_err("spawn runc create"))?;
        drop(pty.slave);
        let master = std::fs::File::from(pty.master);
        // Typing and resizes go to the master (typed input is dropped without `stdin`).
        let input = match master.try_clone() {
            Ok(m) if cfg.stdin => attach::Input::Terminal(m),
            _ => attach::Input::None,
        };
        let hub = attach::Hub::listen(&socket, input, cfg.stdin_once, 1)
            .map_err(io_err("listen for attach"))?;
        spawn_copy(
            attach::Tee::new(master, attach::STDOUT, hub),
            "stdout",
            log.clone(),
            done_tx.clone(),
        );
        readers += 1;
        child
    } else {
        let stdin = if cfg.stdin { Stdio::piped() } else { Stdio::null() };
        create.stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = create.spawn().map_err(io_err("spawn runc create"))?;
        let input = match child.stdin.take() {
            Some(w) => attach::Input::Pipe(std::fs::File::from(OwnedFd::from(w))),
            None => attach::Input::None,
        };
        let hub = attach::Hub::listen(&socket, input, cfg.stdin_once, 2)
            .map_err(io_err("listen for attach"))?;
        match child.stdout.take() {
            Some(out) => {
                spawn_copy(
                    attach::Tee::new(out, attach::STDOUT, hub.clone()),
                    "stdout",
                    log.clone(),
                    done_tx.clone(),
                );
                readers += 1;
            }
            None => hub.reader_done(),
        }
        match child.stderr.take() {
            Some(err) => {
                spawn_copy(
                    attach::Tee::new(err, attach::STDERR, hub),
                    "stderr",
                    log.clone(),
                    done_tx.clone(),
                );
                readers += 1;
            }
            None => hub.reader_done(),
        }
        child
    };
    drop(done_tx);
    let created = child.wait().map_err(io_err("wait for runc create"))?;
    if !created.success() {
        return Err(Error::Runc { args: "create".into(), message: runc_error(dir) });
    }
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .map_err(io_err("read the container's pid file"))?
        .trim()
        .parse()
        .map_err(|_| Error::Runc {
            args: "create".into(),
            message: "pid file holds no pid".into(),
        })?;
    let started = Command::new(&cfg.runc)
        .arg("--root")
        .arg(&cfg.state_root)
        .arg("--log")
        .arg(dir.join("runc.log"))
        .arg("--log-format")
        .arg("json")
        .args(["start", &cfg.id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(io_err("run runc start"))?;
    if !started.success() {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        return Err(Error::Runc { args: "start".into(), message: runc_error(dir) });
    }
    // Recorded for a kubelet that restarts: the container's startedAt.
    let started =
        serde_json::json!({ "pid": pid, "started_at": jiff::Timestamp::now().to_string() });
    write_atomic(&dir.join("started"), started.to_string().as_bytes())?;
    let _ = writeln!(status, "ok {pid}");
    let _ = status.flush();
    // The starter has its answer; our stdout must not keep its pipe (or terminal) open.
    if let Ok(null) = std::fs::File::options().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(&null);
    }

    let wait_status = reap_until(Pid::from_raw(pid))?;
    // The container's processes are gone with its pid namespace; the pipes close right after.
    // Bounded anyway: a process that escaped with our pipe must not hold the exit back.
    for _ in 0..readers {
        if done_rx.recv_timeout(Duration::from_secs(2)).is_err() {
            break;
        }
    }
    let (code, signal) = match wait_status {
        WaitStatus::Exited(_, code) => (code, None),
        WaitStatus::Signaled(_, sig, _) => (128 + sig as i32, Some(sig as i32)),
        _ => (255, None),
    };
    let exit = Exit {
        code,
        signal,
        oom_killed: crate::cgroup::oom_kills(&cfg.cgroups_path) > 0,
        finished_at: jiff::Timestamp::now().to_string(),
    };
    let json = serde_json::to_vec(&exit)
        .map_err(|source| Error::Json { what: "encode exit".into(), source })?;
    write_atomic(&dir.join("exit"), &json)
}

/// Reaps children (the container's init, which became ours, and any orphan handed to us) until
/// `init` ends; returns its wait status.
fn reap_until(init: Pid) -> Result<WaitStatus> {
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(ws @ (WaitStatus::Exited(p, _) | WaitStatus::Signaled(p, _, _))) if p == init => {
                return Ok(ws);
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(sys_err("wait for the container")(e)),
        }
    }
}

/// The last error runc logged (its JSON log's `msg` at level error), for the start failure.
fn runc_error(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("runc.log")).unwrap_or_default();
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["level"] == "error")
        .and_then(|v| v["msg"].as_str().map(str::to_string))
        .unwrap_or_else(|| "failed without a message (see runc.log)".into())
}

fn spawn_copy<R: Read + Send + 'static>(
    r: R,
    stream: &'static str,
    log: Arc<Mutex<crate::log::RotatingLog>>,
    done: std::sync::mpsc::Sender<()>,
) {
    std::thread::spawn(move || {
        copy_cri(r, stream, &log);
        let _ = done.send(());
    });
}

/// Copies a stream into the CRI log: `<RFC 3339 nano time> <stream> <F|P> <line>`, one write per
/// record so stdout and stderr records never interleave inside a line.
pub fn copy_cri<R: Read, W: Write>(r: R, stream: &str, log: &Mutex<W>) {
    let mut reader = std::io::BufReader::with_capacity(MAX_LINE, r);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        // Read up to a newline but never past MAX_LINE bytes.
        let mut partial = true;
        while line.len() < MAX_LINE {
            let buf = match reader.fill_buf() {
                Ok(b) => b,
                // A pty master reads EIO once the last slave closes: that is its end of file.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => &[][..],
            };
            if buf.is_empty() {
                partial = false;
                break;
            }
            let room = MAX_LINE - line.len();
            let take = buf.len().min(room);
            if let Some(nl) = buf[..take].iter().position(|&b| b == b'\n') {
                line.extend_from_slice(&buf[..nl]);
                reader.consume(nl + 1);
                partial = false;
                line.push(b'\n');
                break;
            }
            line.extend_from_slice(&buf[..take]);
            reader.consume(take);
        }
        let eof = line.last() != Some(&b'\n') && !partial;
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if line.last() == Some(&b'\r') {
            line.pop(); // a pty ends lines with \r\n
        }
        if !(eof && line.is_empty()) {
            let ts = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.%fZ").to_string();
            let tag = if partial { "P" } else { "F" };
            let mut record = Vec::with_capacity(line.len() + 48);
            record.extend_from_slice(format!("{ts} {stream} {tag} ").as_bytes());
            record.extend_from_slice(&line);
            record.push(b'\n');
            let mut f = log.lock().unwrap_or_else(|p| p.into_inner());
            let _ = f.write_all(&record);
        }
        if eof {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_to_string(input: &[u8]) -> Vec<String> {
        let path =
            std::env::temp_dir().join(format!("rkube-cri-{}-{}", std::process::id(), input.len()));
        let f = std::fs::File::create(&path).unwrap();
        copy_cri(input, "stdout", &Mutex::new(f));
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        // Drop the timestamps: they vary.
        text.lines().map(|l| l.split_once(' ').unwrap().1.to_string()).collect()
    }

    #[test]
    fn each_line_becomes_one_full_cri_record_and_a_last_unterminated_line_is_kept() {
        assert_eq!(
            copy_to_string(b"hello\nworld\r\nend"),
            vec!["stdout F hello", "stdout F world", "stdout F end"]
        );
    }

    #[test]
    fn lines_longer_than_16_kib_are_split_into_partial_records() {
        let mut input = vec![b'a'; MAX_LINE + 10];
        input.push(b'\n');
        let lines = copy_to_string(&input);
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("stdout P aaa"));
        assert_eq!(lines[1], format!("stdout F {}", "a".repeat(10)));
    }

    #[test]
    fn cri_timestamps_are_rfc3339_in_utc() {
        let path = std::env::temp_dir().join(format!("rkube-cri-ts-{}", std::process::id()));
        copy_cri(&b"x\n"[..], "stderr", &Mutex::new(std::fs::File::create(&path).unwrap()));
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let ts = text.split(' ').next().unwrap();
        assert!(ts.ends_with('Z'));
        assert!(ts.parse::<jiff::Timestamp>().is_ok(), "{ts}");
        assert!(text.ends_with(" stderr F x\n"));
    }
}
