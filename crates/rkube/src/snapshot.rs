//! `rkube snapshot save|restore`: a consistent copy of the embedded store at one revision,
//! taken online through a running `rkube up` (or directly from a stopped cluster's data), and
//! restored into an empty data directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rkube_store::Store;
use rkube_store::embedded::{Config, EmbeddedStore};

use crate::up::Paths;
use crate::up::control::{self, Request};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Save a snapshot of the cluster's store to FILE.
    Save {
        file: PathBuf,
        /// The cluster's data directory (as given to `rkube up`; default: its default).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Restore a snapshot into a data directory, for `rkube up --data-dir DIR`.
    Restore {
        file: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Replace an existing store in the data directory.
        #[arg(long)]
        force: bool,
    },
}

fn store_file(paths: &Paths) -> PathBuf {
    paths.server_dir().join("store.redb")
}

pub async fn run(cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Save { file, data_dir } => {
            let paths = Paths::new(data_dir.as_deref())?;
            let file = if file.is_absolute() { file } else { std::env::current_dir()?.join(file) };
            if file.exists() {
                bail!("{} already exists", file.display());
            }
            // Online: a running cluster copies its own store at one revision.
            if let Ok(a) = control::call(
                &paths.socket(),
                &Request::Snapshot { path: file.display().to_string() },
            )
            .await
            {
                if !a.ok {
                    bail!("{}", a.message);
                }
                println!("{}", a.message);
                return Ok(());
            }
            let src = store_file(&paths);
            if !src.exists() {
                bail!(
                    "no cluster data at {} (no store file {})",
                    paths.root.display(),
                    src.display()
                );
            }
            let store = EmbeddedStore::open(Config::new(&src))
                .with_context(|| format!("opening {}", src.display()))?;
            let rev = store.snapshot(&file).await?;
            println!("Snapshot saved at {} (revision {rev})", file.display());
            Ok(())
        }
        SnapshotCommand::Restore { file, data_dir, force } => {
            let paths = Paths::new(data_dir.as_deref())?;
            if control::call(&paths.socket(), &Request::Status).await.is_ok() {
                bail!(
                    "a cluster is running from {}; stop it first (rkube down)",
                    paths.root.display()
                );
            }
            let dest = store_file(&paths);
            if dest.exists() && !force {
                bail!("{} already holds a store; pass --force to replace it", dest.display());
            }
            // Check the snapshot opens as a store before touching the data directory.
            let check_dir =
                std::env::temp_dir().join(format!("rkube-restore-{}", std::process::id()));
            std::fs::create_dir_all(&check_dir)?;
            let probe = check_dir.join("probe.redb");
            std::fs::copy(&file, &probe).with_context(|| format!("reading {}", file.display()))?;
            let rev = {
                let s = EmbeddedStore::open(Config::new(&probe))
                    .with_context(|| format!("{} is not an rkube snapshot", file.display()))?;
                s.current_revision().await?
            };
            let _ = std::fs::remove_dir_all(&check_dir);
            restore_into(&file, &dest)?;
            println!(
                "Snapshot {} (revision {rev}) restored into {}",
                file.display(),
                paths.root.display()
            );
            Ok(())
        }
    }
}

fn restore_into(file: &Path, dest: &Path) -> anyhow::Result<()> {
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = dest.with_extension("restoring");
    std::fs::copy(file, &tmp)?;
    std::fs::rename(&tmp, dest)?;
    Ok(())
}
