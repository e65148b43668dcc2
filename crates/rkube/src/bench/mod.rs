//! `rkube bench <area>`: each area measures one part of the system against its goals and prints a
//! human table, or with `--json` one JSON object of its figures.

mod api;
mod heal;
mod nodes;
mod scheduler;
mod store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Area {
    Store,
    Api,
    Scheduler,
    Heal,
    Nodes,
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
        };
        println!("{table}");
    }
    Ok(())
}
