//! The README is the lab: this test reads the README's "The lab, for real" section, runs every
//! `$ command` it shows, in order, as an ordinary user with a fresh home directory and the real
//! kubectl, and checks that each prints what the README says it prints.
//!
//! What may differ between the README and a run is what differs between two real runs: ages,
//! process ids, start-up seconds, generated name suffixes, which worker a pod lands on, the
//! machine's OS image and kernel, and the home directory (shown as `/home/you`). A line `…` in
//! the README stands for any lines, a `…` inside a line for any words. `cat <file>` steps give
//! the file's content, so the test writes them before running `cat`. Read-only commands are
//! retried until they match (a reader would run them again too); `--watch` runs until every
//! shown line has appeared, in order.
//!
//! As root the lab runs as `nobody` inside a network namespace of its own (so port 6443 is free
//! and the cluster picks the `process` runtime that an ordinary user gets, as the README shows).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The README's home directory, standing for the test's.
const README_HOME: &str = "/home/you";
/// The uid/gid the lab runs as when the test runs as root.
const NOBODY: u32 = 65534;

#[derive(Debug)]
struct Step {
    command: String,
    expected: Vec<String>,
}

/// The `$ command` blocks of the README's lab section, each with the lines shown under it.
fn lab_steps(readme: &str) -> Vec<Step> {
    let start = readme.find("\n## The lab, for real").expect("README has the lab section");
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map(|i| i + 3).unwrap_or(rest.len());
    let mut steps: Vec<Step> = Vec::new();
    let mut open = false;
    for line in rest[..end].lines() {
        if let Some(cmd) = line.strip_prefix("    $ ") {
            steps.push(Step { command: cmd.trim().to_string(), expected: Vec::new() });
            open = true;
        } else if open && (line.starts_with("    ") || line.trim().is_empty()) {
            let step = steps.last_mut().unwrap();
            step.expected.push(line.strip_prefix("    ").unwrap_or("").trim_end().to_string());
        } else {
            open = false;
        }
    }
    for s in &mut steps {
        while s.expected.last().is_some_and(|l| l.is_empty()) {
            s.expected.pop();
        }
    }
    steps
}

// ---- matching -------------------------------------------------------------------------------

/// `3s`, `2m30s`, `50s`, `4d`.
fn is_age(t: &str) -> bool {
    let mut digits = false;
    let mut units = false;
    for c in t.chars() {
        if c.is_ascii_digit() {
            digits = true;
        } else if "smhdy".contains(c) && digits {
            units = true;
            digits = false;
        } else {
            return false;
        }
    }
    units && !digits
}

fn is_decimal(t: &str) -> bool {
    t.split_once('.').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.chars().all(|c| c.is_ascii_digit())
            && b.chars().all(|c| c.is_ascii_digit())
    })
}

/// A process id or similar: four or more digits, maybe followed by punctuation.
fn long_number_match(e: &str, a: &str) -> bool {
    let split = |t: &str| {
        let n = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        (t[..n].to_string(), t[n..].to_string())
    };
    let (ed, ep) = split(e);
    let (ad, ap) = split(a);
    ed.len() >= 4 && !ad.is_empty() && ep == ap
}

/// A suffix the API server or a controller generated (pod-template-hash, generateName): the
/// alphabet upstream uses for them, which has no vowels.
fn is_generated(seg: &str) -> bool {
    (5..=10).contains(&seg.len()) && seg.chars().all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c))
}

/// Equal once generated segments (between `-`, `/` and `:`) are allowed to differ.
fn generated_match(e: &str, a: &str) -> bool {
    let split = |t: &str| -> Vec<String> {
        let mut out = vec![String::new()];
        for c in t.chars() {
            if "-/:".contains(c) {
                out.push(c.to_string());
                out.push(String::new());
            } else {
                out.last_mut().unwrap().push(c);
            }
        }
        out
    };
    let (es, as_) = (split(e), split(a));
    es.len() == as_.len()
        && es.iter().zip(&as_).all(|(x, y)| x == y || (is_generated(x) && is_generated(y)))
}

fn token_match(e: &str, a: &str) -> bool {
    e == a
        || (is_age(e) && is_age(a))
        || (is_decimal(e) && is_decimal(a))
        || long_number_match(e, a)
        || generated_match(e, a)
}

/// Words of an output line; describe's `12s (x3 over 45s)` counts as one age.
fn words(line: &str) -> Vec<&str> {
    let mut w: Vec<&str> = line.split_whitespace().collect();
    let mut i = 0;
    while i + 3 < w.len() {
        if is_age(w[i])
            && w[i + 1].starts_with("(x")
            && w[i + 2] == "over"
            && w[i + 3].ends_with(')')
        {
            w.drain(i + 1..i + 4);
        }
        i += 1;
    }
    w
}

fn words_match(e: &[&str], a: &[&str]) -> bool {
    match e.first() {
        None => a.is_empty(),
        Some(&"…") => (0..=a.len()).any(|k| words_match(&e[1..], &a[k..])),
        Some(t) => !a.is_empty() && token_match(t, a[0]) && words_match(&e[1..], &a[1..]),
    }
}

fn line_match(e: &str, a: &str) -> bool {
    words_match(&e.split_whitespace().collect::<Vec<_>>(), &words(a))
}

/// A table header as kubectl and `rkube status` print them: upper-case words only.
fn is_header(line: &str) -> bool {
    let w: Vec<&str> = line.split_whitespace().collect();
    w.len() >= 2 && w.iter().all(|t| t.chars().all(|c| c.is_ascii_uppercase() || c == '-'))
}

/// Column names and their start offsets (in chars) in an aligned header.
fn columns(header: &str) -> Vec<(String, usize)> {
    let chars: Vec<char> = header.chars().collect();
    let mut cols = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == ' ' {
            i += 1;
            continue;
        }
        let start = i;
        // A name ends at two spaces (`NOMINATED NODE` is one column).
        while i < chars.len() && !(chars[i] == ' ' && chars.get(i + 1).is_none_or(|c| *c == ' ')) {
            i += 1;
        }
        cols.push((chars[start..i].iter().collect(), start));
    }
    cols
}

/// The cells of an aligned row under `cols`.
fn cells(row: &str, cols: &[(String, usize)]) -> Vec<String> {
    let chars: Vec<char> = row.chars().collect();
    (0..cols.len())
        .map(|i| {
            let from = cols[i].1.min(chars.len());
            let to = cols.get(i + 1).map_or(chars.len(), |c| c.1.min(chars.len()));
            chars[from..to].iter().collect::<String>().trim().to_string()
        })
        .collect()
}

/// Columns whose value depends on the moment or the machine, not on rkube.
const FREE_COLUMNS: [&str; 4] = ["AGE", "OS-IMAGE", "KERNEL-VERSION", "LAST SEEN"];

fn cell_match(column: &str, e: &str, a: &str) -> bool {
    if FREE_COLUMNS.contains(&column) {
        return true;
    }
    // Which worker a pod lands on is the scheduler's choice among equals.
    if column == "NODE" && e.starts_with("rkube-worker-") && a.starts_with("rkube-worker-") {
        return true;
    }
    line_match(e, a)
}

/// Checks `actual` against the README's lines; `Err` says what is missing.
fn output_matches(expected: &[String], actual: &str) -> Result<(), String> {
    let actual: Vec<&str> = actual.lines().map(str::trim_end).collect();
    let split = expected.iter().position(|l| is_header(l)).unwrap_or(expected.len());
    let mut at = 0;
    for e in &expected[..split] {
        if e.is_empty() || e == "…" {
            continue;
        }
        match actual[at..].iter().position(|a| line_match(e, a)) {
            Some(i) => at += i + 1,
            None => return Err(format!("no line like {e:?}")),
        }
    }
    if split == expected.len() {
        return Ok(());
    }
    let mut e_cols = columns(&expected[split]);
    if e_cols.last().is_some_and(|(n, _)| n == "…") {
        e_cols.pop();
    }
    let Some(h) = actual[at..].iter().position(|a| is_header(a)) else {
        return Err("no table header".into());
    };
    let a_cols = columns(actual[at + h]);
    let names = |c: &[(String, usize)]| c.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    if a_cols.len() < e_cols.len() || names(&a_cols[..e_cols.len()]) != names(&e_cols) {
        return Err(format!("header {:?}, README {:?}", names(&a_cols), names(&e_cols)));
    }
    let mut rows: Vec<Vec<String>> =
        actual[at + h + 1..].iter().map(|r| cells(r, &a_cols[..e_cols.len()])).collect();
    for e in expected[split + 1..].iter().filter(|l| !l.is_empty()) {
        let want = cells(e, &e_cols);
        let found = rows.iter().position(|got| {
            e_cols
                .iter()
                .zip(want.iter().zip(got))
                .all(|((col, _), (w, g))| w == "…" || cell_match(col, w, g))
        });
        match found {
            Some(i) => drop(rows.remove(i)),
            None => return Err(format!("no row like {e:?}")),
        }
    }
    Ok(())
}

// ---- running --------------------------------------------------------------------------------

struct Lab {
    home: PathBuf,
    bin: PathBuf,
    netns: Option<String>,
    as_nobody: bool,
}

impl Lab {
    /// `sh -c script` in the lab's home, as the lab's user, in the lab's namespace.
    fn sh(&self, script: &str) -> Command {
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = &self.netns {
            argv.extend(["nsenter".into(), format!("--net=/run/netns/{ns}")]);
        }
        if self.as_nobody {
            argv.extend(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"].map(String::from),
            );
        }
        argv.extend(["sh".into(), "-c".into(), format!("exec {script} 2>&1")]);
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]);
        let path = std::env::var("PATH").unwrap_or_default();
        c.current_dir(&self.home)
            .env("HOME", &self.home)
            .env("PATH", format!("{}:{path}", self.bin.display()))
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, script: &str) -> String {
        let out = self.sh(script).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.replace(self.home.to_str().unwrap(), README_HOME)
    }

    fn log_tail(&self) -> String {
        let log = self.home.join(".local/share/rkube/rkube.log");
        let log = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Runs a `--watch` command until every expected line has appeared in order.
    fn watch(&self, step: &Step, limit: Duration) -> Result<(), String> {
        let mut child = self.sh(&step.command).stdout(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let want: Vec<&String> = step.expected.iter().filter(|l| !l.is_empty()).collect();
        let mut seen = Vec::new();
        let mut next = 0;
        let deadline = Instant::now() + limit;
        while next < want.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if line_match(want[next], &line) {
                        next += 1;
                    }
                    seen.push(line);
                }
                Err(_) => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        if next == want.len() {
            Ok(())
        } else {
            Err(format!("no line like {:?} in:\n{}", want[next], seen.join("\n")))
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Stops the cluster if a step failed before the README's own `rkube down`.
        let _ = self.sh("rkube down").output();
        if let Some(ns) = &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

fn chown_nobody(path: &Path) {
    let id = Some(nix::unistd::Uid::from_raw(NOBODY));
    let gid = Some(nix::unistd::Gid::from_raw(NOBODY));
    nix::unistd::chown(path, id, gid).unwrap();
}

/// Whether a step only reads, so running it again until it matches changes nothing.
fn read_only(command: &str) -> bool {
    ["kubectl get", "kubectl describe", "kubectl cluster-info", "kubectl logs", "rkube status"]
        .iter()
        .any(|p| command.starts_with(p))
}

#[test]
fn the_readme_lab_prints_what_the_readme_shows() {
    let found = Command::new("kubectl").arg("version").arg("--client").output().is_ok();
    let ci = std::env::var("CI").as_deref() == Ok("true");
    if !found {
        assert!(!ci, "kubectl is required when CI=true");
        eprintln!("SKIPPED: kubectl not found on PATH");
        return;
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let steps = lab_steps(&readme);
    assert!(steps.len() >= 15, "the lab section lost its commands: {steps:#?}");
    assert_eq!(steps[0].command, "rkube up --detach", "the lab starts the cluster first");
    assert_eq!(steps.last().unwrap().command, "rkube down", "the lab stops the cluster last");

    let root = nix::unistd::Uid::effective().is_root();
    if !root && std::net::TcpListener::bind("127.0.0.1:6443").is_err() {
        assert!(!ci, "port 6443 is taken");
        eprintln!("SKIPPED: port 6443 is taken (the README's cluster uses it)");
        return;
    }
    let home = std::env::temp_dir().join(format!("rkube-readme-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let bin = home.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    // `rkube` on PATH, reachable by `nobody` wherever the build put it.
    let exe = Path::new(env!("CARGO_BIN_EXE_rkube"));
    if std::fs::hard_link(exe, bin.join("rkube")).is_err() {
        std::fs::copy(exe, bin.join("rkube")).unwrap();
    }
    let netns = root.then(|| {
        let name = format!("rkube-readme-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        assert!(Command::new("ip").args(["netns", "add", &name]).status().unwrap().success());
        name
    });
    let lab = Lab { home: home.clone(), bin, netns, as_nobody: root };
    if let Some(ns) = &lab.netns {
        let lo = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["ip", "link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(lo.success());
    }
    if root {
        for entry in [home.clone(), home.join("bin")] {
            chown_nobody(&entry);
        }
    }

    let mut rkube_pid = None;
    for step in &steps {
        let started = Instant::now();
        if let Some(file) = step.command.strip_prefix("cat ") {
            let path = home.join(file);
            std::fs::write(&path, step.expected.join("\n") + "\n").unwrap();
            if root {
                chown_nobody(&path);
            }
        }
        let result = if step.command.contains("--watch") {
            lab.watch(step, Duration::from_secs(90))
        } else {
            let limit = Duration::from_secs(if read_only(&step.command) { 90 } else { 0 });
            loop {
                let out = lab.run(&step.command);
                match output_matches(&step.expected, &out) {
                    Ok(()) => break Ok(()),
                    Err(why) if started.elapsed() >= limit => {
                        break Err(format!("{why} in:\n{out}"));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(500)),
                }
            }
        };
        if let Err(why) = result {
            panic!(
                "`$ {}` does not print what the README shows: {why}\n{}",
                step.command,
                lab.log_tail()
            );
        }
        eprintln!("ok ({:.1} s): $ {}", started.elapsed().as_secs_f64(), step.command);
        if step.command == "rkube up --detach" {
            let pid = home.join(".local/share/rkube/rkube.pid");
            rkube_pid = std::fs::read_to_string(pid).ok().map(|p| p.trim().to_string());
        }
    }

    // The README's `rkube down` left nothing running.
    let pid = rkube_pid.expect("rkube up wrote its pid file");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "rkube {pid} survived `rkube down`");
    if root {
        let left =
            Command::new("pgrep").args(["-u", "65534", "-f", "sleep 3600"]).output().unwrap();
        let left = String::from_utf8_lossy(&left.stdout);
        assert!(left.trim().is_empty(), "the lab's pods survived `rkube down`: {left}");
    }
}

#[test]
fn the_matcher_tells_real_differences_from_run_to_run_ones() {
    let e = |s: &str| s.lines().map(String::from).collect::<Vec<_>>();
    // Ages, generated names and workers may differ; status may not.
    let table = e(
        "NAME                   READY   STATUS    RESTARTS   AGE   IP          NODE\nweb-7vdnv7zw7n-5fv7s   1/1     Running   0          4s    127.0.0.1   rkube-worker-2",
    );
    let ok = "NAME                   READY   STATUS    RESTARTS   AGE   IP          NODE\nweb-5c8bd9x2km-q7wzt   1/1     Running   0          12s   127.0.0.1   rkube-worker-1\n";
    assert_eq!(output_matches(&table, ok), Ok(()));
    let pending = ok.replace("Running", "Pending");
    assert!(output_matches(&table, &pending).is_err());
    let other_header = ok.replace("READY", "READX");
    assert!(output_matches(&table, &other_header).is_err());
    // Plain lines: in order, with `…` standing for any words.
    let plain = e(
        "…  Normal    NodeNotReady   node/rkube-worker-1   Node rkube-worker-1 status is now: NodeNotReady",
    );
    assert!(line_match(
        &plain[0],
        "0s   Normal   NodeNotReady   node/rkube-worker-1   Node rkube-worker-1 status is now: NodeNotReady"
    ));
    assert!(!line_match(
        &plain[0],
        "0s   Normal   NodeNotReady   node/rkube-worker-2   Node rkube-worker-2 status is now: NodeNotReady"
    ));
    assert!(line_match("cluster ready in 0.3 s", "cluster ready in 1.25 s"));
    assert!(line_match("(pid 29644, runtime process)", "(pid 81234, runtime process)"));
    assert!(!line_match("(pid 29644, runtime process)", "(pid 81234, runtime oci)"));
    assert!(line_match(
        "Warning  FailedScheduling  3s  default-scheduler  0/3 nodes",
        "Warning  FailedScheduling  12s (x3 over 45s)  default-scheduler  0/3 nodes"
    ));
    // Words with vowels are never taken for generated suffixes.
    assert!(!token_match("rkube-worker-1", "rkube-master-1"));
    // The README's steps are found, with their expected lines.
    let steps = lab_steps(
        "intro\n\n## The lab, for real\n\n    $ a b\n    out 1\n\n    out 2\n\ntext\n\n    $ c\n\n## Next\n    $ d\n",
    );
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0].expected, ["out 1", "", "out 2"]);
    assert!(steps[1].expected.is_empty());
}
