//! `rkube bench <area>`: each area measures one part of the system against its goals and prints a
//! human table, or with `--json` one JSON object of its figures.

mod api;
mod heal;
mod heal_scale;
mod nodes;
mod pods;
mod proxy;
mod scheduler;
mod store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Area {
    Store,
    Api,
    Scheduler,
    Heal,
    Nodes,
    Pods,
    Proxy,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    pub area: Area,
    /// Print one JSON object of the figures instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Scale the workload down (for a quick look or a smoke test).
    #[arg(long)]
    pub quick: bool,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let figures = match args.area {
        Area::Store => store::run(&args).await?,
        Area::Api => api::run(&args).await?,
        Area::Scheduler => scheduler::run(&args).await?,
        Area::Heal => heal::run(&args).await?,
        Area::Nodes => nodes::run(&args).await?,
        Area::Pods => pods::run(&args).await?,
        Area::Proxy => proxy::run(&args).await?,
    };
    if args.json {
        println!("{figures}");
    } else {
        let table = match args.area {
            Area::Store => store::table(&figures),
            Area::Api => api::table(&figures),
            Area::Scheduler => scheduler::table(&figures),
            Area::Heal => heal::table(&figures),
            Area::Nodes => nodes::table(&figures),
            Area::Pods => pods::table(&figures),
            Area::Proxy => proxy::table(&figures),
        };
        println!("{table}");
    }
    Ok(())
}

/// A two-column table of a flat JSON object: figure, value.
pub fn render(title: &str, figures: &serde_json::Value) -> String {
    let mut out = format!("{title}\n");
    let width =
        figures.as_object().map(|m| m.keys().map(|k| k.len()).max().unwrap_or(0)).unwrap_or(0);
    for (k, v) in figures.as_object().into_iter().flatten() {
        let v = match v {
            serde_json::Value::Number(n) if n.is_f64() => {
                format!("{:.2}", n.as_f64().unwrap_or(0.0))
            }
            other => other.to_string().trim_matches('"').to_string(),
        };
        out.push_str(&format!("  {k:<width$}  {v}\n"));
    }
    out
}

/// Resident memory of a process in MiB, from /proc.
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// CPU seconds (user + system) a process has used, from /proc.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the command: state is 0, utime 11, stime 12 (clock ticks, 100 per second here).
    (ticks(11) + ticks(12)) / 100.0
}

/// p50 and p99 of latencies in milliseconds.
pub fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    (at(0.50), at(0.99))
}
