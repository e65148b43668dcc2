//! `rkube snapshot save|restore`: a consistent copy of the embedded store (issue 2).

#[derive(Debug, Clone, clap::Subcommand)]
pub enum SnapshotCommand {}

pub async fn run(_cmd: SnapshotCommand) -> anyhow::Result<()> {
    anyhow::bail!("`rkube snapshot` is not built yet")
}
