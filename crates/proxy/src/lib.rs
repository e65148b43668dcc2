//! rkube-proxy: the node's Service proxy. It watches Services and EndpointSlices and keeps one
//! nftables table (`ip rkube`) that DNATs Service traffic to endpoints, as kube-proxy's nftables
//! mode does.
//!
//! The loop: two reflectors feed in-memory stores and bump a change counter; after a short
//! coalescing pause the whole rule set is rendered (`rules::render_model`, pure) and compared
//! with what was last applied. On start, after a failure and every `full_sync_period` the table
//! is replaced whole (`nft -f -`); otherwise only the difference (`rules::change`: changed
//! chains flushed and refilled, map elements added and deleted) is applied, each as one atomic
//! transaction, and nothing at all when nothing differs. A difference goes straight to
//! nf_tables over netlink when `Config::netlink` says where (`nl`: nft would first list the
//! whole table, half a second at 10,000 Services), else to `nft -f -` as text.

mod cache;
pub mod cidr;
pub mod cli;
pub mod nl;
pub mod rules;

use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use cidr::Ipv4Cidr;
pub use rules::{
    AffinityEntry, Change, Model, RulesConfig, Ruleset, ServiceObjects, UdpBackend, UdpFront,
    change, changes, render, render_model,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid IPv4 prefix {0:?}")]
    InvalidCidr(String),
    #[error("invalid duration {0:?} (expected e.g. 100ms, 1s, 5m)")]
    InvalidDuration(String),
    #[error("the nft command is empty")]
    NoCommand,
    #[error("start {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Nft { command: String, status: String, stderr: String },
    #[error("{command} did not finish within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error(transparent)]
    Netlink(nl::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How the proxy runs; `rules` says what it renders.
#[derive(Clone, Debug)]
pub struct Config {
    pub rules: RulesConfig,
    /// The program (and leading arguments) that runs nft; `-f -` or `list …` is appended. Tests
    /// use `["ip", "netns", "exec", NS, "nft"]`.
    pub nft: Vec<String>,
    /// How long to wait after a change for more changes, so a burst becomes one apply.
    pub coalesce: Duration,
    /// The least time between two applies (upstream `--min-sync-period`, default 1 s).
    pub min_sync_period: Duration,
    /// How often to check that the table is still there (someone may have flushed the
    /// ruleset), re-applying if not.
    pub check_period: Duration,
    /// Bound on a single nft run.
    pub nft_timeout: Duration,
    /// How often the table is replaced whole even though only changes were applied since
    /// (upstream's FullSyncPeriod, one hour): it clears anything else that altered it.
    pub full_sync_period: Duration,
    /// Longest wait between retries after a failed apply (doubling from `min_sync_period`).
    pub retry_period_max: Duration,
    /// The program (and leading arguments) that deletes conntrack entries of UDP flows whose
    /// endpoint went away; `-D …` is appended. Missing: a warning, and such flows stay stuck
    /// until their conntrack entries expire.
    pub conntrack: Vec<String>,
    /// Where in-place changes go over netlink instead of through `nft -f` (full replaces always
    /// use nft). None: nft only, as tests with a stand-in nft need. It must name the network
    /// namespace `nft` acts in.
    pub netlink: Option<Netlink>,
}

/// The network namespace whose nf_tables the proxy's netlink socket talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Netlink {
    /// The proxy's own.
    Current,
    /// The one at this path (e.g. `/run/netns/NAME`).
    Netns(std::path::PathBuf),
}

impl Default for Config {
    fn default() -> Self {
        Config {
            rules: RulesConfig::default(),
            nft: vec!["nft".into()],
            coalesce: Duration::from_millis(100),
            min_sync_period: Duration::from_secs(1),
            check_period: Duration::from_secs(30),
            nft_timeout: Duration::from_secs(30),
            full_sync_period: Duration::from_secs(3600),
            retry_period_max: Duration::from_secs(60),
            conntrack: vec!["conntrack".into()],
            netlink: None,
        }
    }
}

/// Watches Services and EndpointSlices through `client` and keeps the nftables table in step
/// until `shutdown`.
///
/// # Guarantees
/// - Nothing is applied before both watches have listed everything once, so a restart never
///   installs a rule set missing Services that exist.
/// - The first apply replaces whatever table a previous (perhaps crashed) proxy left, and so
///   does every apply after a failed one and one every `full_sync_period`.
/// - An unchanged rendering is never re-applied. A change is applied in place, so live ClientIP
///   affinity entries stay; a full replace carries them over (read back just before the
///   apply; an entry made in between is lost).
/// - Apply failures are logged and retried with backoff; they never end the loop.
///
/// # Caveats
/// - On shutdown the rules stay in place, as upstream's: Services keep working while the
///   proxy restarts. Call [`cleanup`] to remove them.
pub async fn run(client: Client, config: Config, shutdown: CancellationToken) -> Result<()> {
    run_reporting(client, config, shutdown, watch::Sender::new(Applied::default())).await
}

/// What the kernel holds, as of the proxy's last successful apply; published by
/// [`run_reporting`] so a caller (the benchmark, a readiness check) can tell when a change is
/// live without listing the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Successful applies so far.
    pub applies: u64,
    /// The highest `resourceVersion` among the watch events (Service and EndpointSlice
    /// changes, deletions too) the applied rules include. Versions are one global counter, but
    /// the two watches deliver independently: a write acknowledged with a version at or below
    /// it is in the kernel only if it was of the same kind as the newest, or both watches have
    /// caught up. The benchmark checks traffic instead.
    pub resource_version: u64,
    /// Whether the last apply replaced the whole table (rather than changing parts of it).
    pub full: bool,
    /// How long the last apply took (the `nft` run, or the netlink transaction).
    pub nft_time: Duration,
    /// Bytes of the last transaction.
    pub bytes: usize,
    /// Whether the last apply went over netlink rather than through nft.
    pub netlink: bool,
    /// How long rendering the rules and working out the change took before the last apply.
    pub render_time: Duration,
}

/// [`run`], publishing on `status` after every successful apply.
pub async fn run_reporting(
    client: Client,
    config: Config,
    shutdown: CancellationToken,
    status: watch::Sender<Applied>,
) -> Result<()> {
    let (tx, mut changed) = watch::channel(0u64);
    let objects = std::sync::Arc::new(cache::Cache::default());
    let services = Api::<Service>::all(client.clone());
    start_watch(services, &objects, cache::Cache::service_event, tx.clone(), &shutdown);
    let slices = Api::<EndpointSlice>::all(client);
    start_watch(slices, &objects, cache::Cache::slice_event, tx, &shutdown);
    // Nothing is applied before both watches have listed everything once.
    while !objects.listed() {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = changed.changed() => if r.is_err() { return Ok(()) },
        }
    }
    tracing::info!(table = %config.rules.table, node = %config.rules.node_name, "proxy: watches synced");

    // What the rules should be: kept up to date with the objects, Service by Service.
    let mut model = rules::Model::default();
    // Whether the kernel holds `model` (as of the last apply); false: replace the table whole.
    let mut in_kernel = false;
    let mut last_full: Option<Instant> = None;
    let mut reported_skips: Vec<String> = Vec::new();
    let mut last_apply: Option<Instant> = None;
    let mut failures: u32 = 0;
    // UDP front/endpoint pairs of the rules in the kernel (empty at start: flows from before a
    // restart are not cleared).
    let mut udp_backends = std::collections::BTreeSet::new();
    let mut conntrack_missing_reported = false;
    // The netlink socket for in-place changes, opened on first use.
    let mut socket = NetlinkSocket::default();
    loop {
        changed.borrow_and_update();
        let rendering = Instant::now();
        // Only Services whose objects changed are rendered again.
        let (taken, resource_version) = objects.take();
        let delta = match &taken {
            cache::Taken::All { services, slices } => model.update(
                services.iter().map(|s| s.as_ref()),
                slices.iter().map(|s| s.as_ref()),
                &config.rules,
            ),
            cache::Taken::Changed(changed) => model.update_services(
                changed.iter().map(|(key, svc, slices)| {
                    (key.clone(), svc.as_deref(), slices.iter().map(|s| s.as_ref()).collect())
                }),
                &config.rules,
            ),
        };
        drop(taken);
        let skipped = model.skipped();
        if skipped != reported_skips {
            for s in &skipped {
                tracing::warn!("proxy: left out of the rules: {s}");
            }
            reported_skips = skipped;
        }
        // A full replace now and then clears whatever else changed the table (upstream's
        // FullSyncPeriod); otherwise only the difference from what was applied is sent.
        let full_due = last_full.is_none_or(|t| t.elapsed() >= config.full_sync_period);
        let incremental = delta.filter(|_| in_kernel && !full_due);
        let render_time = rendering.elapsed();
        let mut wait = config.check_period;
        if !incremental.as_ref().is_some_and(Change::is_empty) {
            let started = Instant::now();
            last_apply = Some(started);
            let (result, bytes, via_netlink) = match &incremental {
                Some(change) => apply_change(&config, &mut socket, change).await,
                None => {
                    let set = model.ruleset(&config.rules);
                    (apply_keeping_affinity(&config, &set).await, set.text.len(), false)
                }
            };
            match result {
                Ok(()) => {
                    let full = incremental.is_none();
                    status.send_modify(|s| {
                        s.applies += 1;
                        s.resource_version = s.resource_version.max(resource_version);
                        s.full = full;
                        s.nft_time = started.elapsed();
                        s.bytes = bytes;
                        s.netlink = via_netlink;
                        s.render_time = render_time;
                    });
                    let stale: Vec<rules::UdpBackend> = match &incremental {
                        Some(change) => {
                            udp_backends.extend(change.udp_came.iter().copied());
                            change.udp_gone.clone()
                        }
                        None => {
                            let now = model.udp_backends();
                            let stale = udp_backends.difference(&now).copied().collect();
                            udp_backends = now;
                            stale
                        }
                    };
                    for b in &stale {
                        udp_backends.remove(b);
                    }
                    if full {
                        last_full = Some(started);
                        tracing::info!(
                            services = model.service_count(),
                            chains = model.chain_count(),
                            bytes,
                            "proxy: replaced the nftables table"
                        );
                    } else {
                        tracing::debug!(bytes, "proxy: updated the nftables table");
                    }
                    clear_udp_flows(&config, &stale, &mut conntrack_missing_reported).await;
                    in_kernel = true;
                    failures = 0;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    wait = retry_delay(&config, failures);
                    tracing::error!(
                        table = %config.rules.table,
                        attempt = failures,
                        retry_in = ?wait,
                        full = incremental.is_none(),
                        "proxy: apply nftables rules: {e}"
                    );
                    // The table's state is now uncertain: the retry replaces it whole.
                    in_kernel = false;
                }
            }
        } else {
            // Nothing to change; the versions seen are in the kernel all the same.
            status.send_if_modified(|s| {
                let newer = s.resource_version < resource_version && in_kernel;
                if newer {
                    s.resource_version = resource_version;
                }
                newer
            });
        }

        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = changed.changed() => {
                // Both watch tasks ended: only on shutdown.
                if r.is_err() { break; }
            }
            _ = tokio::time::sleep(wait) => {
                if in_kernel && !table_exists(&config, &mut socket).await {
                    tracing::warn!(table = %config.rules.table, "proxy: table vanished; re-applying");
                    in_kernel = false;
                }
            }
        }
        // Let a burst of events settle, and keep applies `min_sync_period` apart.
        // After failures, changes do not bring the retry forward: the backoff holds.
        let mut until = Instant::now() + config.coalesce;
        if let Some(t) = last_apply {
            let gap =
                if failures > 0 { retry_delay(&config, failures) } else { config.min_sync_period };
            until = until.max(t + gap);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(until) => {}
        }
    }
    tracing::info!("proxy: stopped; rules left in place");
    Ok(())
}

/// `min_sync_period` doubled per consecutive failure, capped at `retry_period_max`.
fn retry_delay(config: &Config, failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.saturating_sub(1).min(16)).unwrap_or(u32::MAX);
    config
        .min_sync_period
        .max(Duration::from_millis(100))
        .saturating_mul(factor)
        .min(config.retry_period_max)
}

/// A watch on `api` whose events go into `cache` through `take_in`; every event that may
/// change the rules bumps `tx`.
fn start_watch<K>(
    api: Api<K>,
    cache: &std::sync::Arc<cache::Cache>,
    take_in: fn(&cache::Cache, watcher::Event<K>) -> bool,
    tx: watch::Sender<u64>,
    shutdown: &CancellationToken,
) where
    K: rkube_client::watch::Watched + Sync,
{
    let (cache, shutdown) = (std::sync::Arc::clone(cache), shutdown.clone());
    tokio::spawn(rkube_client::watch::follow(
        api,
        watcher::Config::default(),
        shutdown,
        move |ev| {
            if take_in(&cache, ev) {
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        },
    ));
}

/// Runs the configured nft with `args`, feeding `stdin`, and returns its stdout; bounded by
/// `config.nft_timeout`.
async fn nft(config: &Config, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let (program, leading) = config.nft.split_first().ok_or(Error::NoCommand)?;
    let command = format!("{} {}", config.nft.join(" "), args.join(" "));
    let mut child = Command::new(program)
        .args(leading)
        .args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // On timeout the future is dropped; the child must not outlive it.
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::Spawn { command: command.clone(), source })?;
    let input = child.stdin.take();
    let feed = async move {
        if let (Some(mut pipe), Some(text)) = (input, stdin) {
            // A write error means nft exited early; its status and stderr say why.
            let _ = pipe.write_all(text.as_bytes()).await;
        }
    };
    let run = async { tokio::join!(feed, child.wait_with_output()).1 };
    let output = tokio::time::timeout(config.nft_timeout, run)
        .await
        .map_err(|_| Error::Timeout { command: command.clone(), timeout: config.nft_timeout })?
        .map_err(|source| Error::Spawn { command: command.clone(), source })?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    // nft quotes the offending input; bound what reaches the log.
    if stderr.len() > 4096 {
        let mut cut = 4096;
        while !stderr.is_char_boundary(cut) {
            cut -= 1;
        }
        stderr.truncate(cut);
        stderr.push_str(" …");
    }
    Err(Error::Nft { command, status: output.status.to_string(), stderr })
}

/// The proxy's netlink socket, opened on first use; after a failure to open it, nft is used
/// (and the failure logged once).
#[derive(Default)]
struct NetlinkSocket {
    socket: Option<nl::Socket>,
    open_failed: bool,
}

impl NetlinkSocket {
    /// The socket, opened on first use, taken out for one request (put it back after);
    /// `None` when netlink is not configured or cannot be opened.
    fn open(&mut self, config: &Config) -> Option<nl::Socket> {
        let target = config.netlink.as_ref()?;
        if self.socket.is_none() && !self.open_failed {
            let path = match target {
                Netlink::Current => None,
                Netlink::Netns(p) => Some(p.as_path()),
            };
            match nl::Socket::open(path) {
                Ok(s) => self.socket = Some(s),
                Err(e) => {
                    tracing::warn!("proxy: netlink unavailable, changes go through nft: {e}");
                    self.open_failed = true;
                }
            }
        }
        self.socket.take()
    }
}

/// Applies an in-place change: over netlink when configured and possible, else as text through
/// nft. Returns the outcome, the transaction's size and whether it went over netlink.
async fn apply_change(
    config: &Config,
    socket: &mut NetlinkSocket,
    change: &Change,
) -> (Result<()>, usize, bool) {
    if change.ops.len() <= nl::MAX_MESSAGES
        && let Some(mut sock) = socket.open(config)
    {
        let (table, timeout, change2) =
            (config.rules.table.clone(), config.nft_timeout, change.clone());
        let joined = tokio::task::spawn_blocking(move || {
            let r = sock.commit(&change2, &table, timeout);
            (sock, r)
        })
        .await;
        match joined {
            Ok((sock, Ok(bytes))) => {
                socket.socket = Some(sock);
                return (Ok(()), bytes, true);
            }
            Ok((sock, Err(nl::Error::Unsupported(what)))) => {
                socket.socket = Some(sock);
                tracing::debug!("proxy: change sent through nft: {what}");
            }
            // The socket may hold late answers: the next change opens a new one.
            Ok((_, Err(e))) => return (Err(Error::Netlink(e)), 0, true),
            Err(e) => return (Err(Error::Netlink(nl::Error::Join(e.to_string()))), 0, true),
        }
    }
    let text = change.text(&config.rules.table);
    (apply(config, &text).await, text.len(), false)
}

/// Applies one rendered transaction (`nft -f -`).
pub async fn apply(config: &Config, text: &str) -> Result<()> {
    nft(config, &["-f", "-"], Some(text)).await.map(drop)
}

/// Applies `set`, first reading the live ClientIP affinity entries back from the kernel so
/// the replaced table keeps them. Without a table (first start) there is nothing to keep.
async fn apply_keeping_affinity(config: &Config, set: &Ruleset) -> Result<()> {
    if set.affinity_sets.is_empty() {
        return apply(config, &set.text).await;
    }
    let t = &config.rules.table;
    let live = match nft(config, &["-j", "list", "table", "ip", t], None).await {
        Ok(json) => rules::affinity_from_json(&json),
        Err(e) => {
            tracing::debug!("proxy: no affinity entries to keep: {e}");
            Default::default()
        }
    };
    apply(config, &set.text_with_affinity(&live)).await
}

/// Deletes the conntrack entries of UDP flows DNATed through `stale` pairs, so their next
/// packets are load-balanced afresh instead of following the old entry to a gone endpoint.
/// Failures are logged, not returned: the rules are in place either way.
async fn clear_udp_flows(
    config: &Config,
    stale: &[rules::UdpBackend],
    missing_reported: &mut bool,
) {
    let Some((program, leading)) = config.conntrack.split_first() else { return };
    for b in stale {
        let (ep_ip, ep_port) = (b.endpoint.ip().to_string(), b.endpoint.port().to_string());
        let mut args = vec!["-D".to_string(), "-p".into(), "udp".into()];
        match b.front {
            rules::UdpFront::Address(a) => args.extend([
                "--orig-dst".into(),
                a.ip().to_string(),
                "--orig-port-dst".into(),
                a.port().to_string(),
            ]),
            rules::UdpFront::NodePort(p) => args.extend(["--orig-port-dst".into(), p.to_string()]),
        }
        args.extend(["--reply-src".into(), ep_ip, "--reply-port-src".into(), ep_port]);
        let run = Command::new(program)
            .args(leading)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(config.nft_timeout, run).await {
            Ok(Ok(out)) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                // conntrack exits 1 when nothing matched: that is the usual, happy case.
                if !out.status.success() && !stderr.contains("0 flow entries") {
                    tracing::warn!(front = ?b.front, endpoint = %b.endpoint, "proxy: clear stale UDP flows: {}", stderr.trim());
                } else {
                    tracing::debug!(front = ?b.front, endpoint = %b.endpoint, "proxy: cleared stale UDP flows");
                }
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                if !*missing_reported {
                    tracing::warn!(
                        "proxy: {program} not found; UDP flows to removed endpoints stay until they expire"
                    );
                    *missing_reported = true;
                }
                return;
            }
            Ok(Err(e)) => tracing::warn!("proxy: run {program}: {e}"),
            Err(_) => {
                tracing::warn!("proxy: {program} did not finish within {:?}", config.nft_timeout)
            }
        }
    }
}

/// Whether the proxy's table is present: its smallest chain is listed rather than the whole
/// table, which can be large.
async fn table_exists(config: &Config, socket: &mut NetlinkSocket) -> bool {
    let t = &config.rules.table;
    // Over netlink when it is configured: one chain looked up by name. `nft list chain` reads
    // the whole table first, which at 10,000 Services holds the loop (and every change
    // waiting on it) for seconds.
    if let Some(mut sock) = socket.open(config) {
        let (table, timeout) = (t.clone(), config.nft_timeout);
        let joined = tokio::task::spawn_blocking(move || {
            let r = sock.chain_exists(&table, "reject-chain", timeout);
            (sock, r)
        })
        .await;
        match joined {
            Ok((sock, Ok(exists))) => {
                socket.socket = Some(sock);
                return exists;
            }
            // The socket may hold a late answer: the next use opens a new one.
            Ok((_, Err(e))) => tracing::debug!("proxy: netlink table check: {e}"),
            Err(e) => tracing::debug!("proxy: netlink table check: {e}"),
        }
    }
    nft(config, &["list", "chain", "ip", t, "reject-chain"], None).await.is_ok()
}

/// Deletes the proxy's table (and so every rule it installed); succeeds when it is already
/// gone.
pub async fn cleanup(config: &Config) -> Result<()> {
    let t = &config.rules.table;
    apply(config, &format!("add table ip {t}\ndelete table ip {t}\n")).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_the_min_sync_period_up_to_the_cap() {
        let c = Config { min_sync_period: Duration::from_secs(1), ..Config::default() };
        assert_eq!(retry_delay(&c, 1), Duration::from_secs(1));
        assert_eq!(retry_delay(&c, 2), Duration::from_secs(2));
        assert_eq!(retry_delay(&c, 4), Duration::from_secs(8));
        assert_eq!(retry_delay(&c, 40), Duration::from_secs(60));
    }

    #[tokio::test]
    async fn an_empty_nft_command_is_an_error_not_a_panic() {
        let c = Config { nft: Vec::new(), ..Config::default() };
        assert!(matches!(apply(&c, "").await, Err(Error::NoCommand)));
    }

    #[tokio::test]
    async fn a_failing_nft_reports_its_stderr() {
        // `sh -c '…' sh` stands in for nft: it reads stdin and fails like nft would.
        let c = Config {
            nft: vec![
                "sh".into(),
                "-c".into(),
                "cat >/dev/null; echo bad rule >&2; exit 1".into(),
                "sh".into(),
            ],
            ..Config::default()
        };
        match apply(&c, "table ip x {}\n").await {
            Err(Error::Nft { stderr, .. }) => assert_eq!(stderr, "bad rule"),
            other => panic!("expected an nft error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_hanging_nft_times_out() {
        let c = Config {
            nft: vec!["sh".into(), "-c".into(), "exec sleep 5".into(), "sh".into()],
            nft_timeout: Duration::from_millis(200),
            ..Config::default()
        };
        assert!(matches!(apply(&c, "").await, Err(Error::Timeout { .. })));
    }
}
