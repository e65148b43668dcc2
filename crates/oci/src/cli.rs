//! `rkube image ls|pull|import|rm`: the node's image store from the command line, shaped like
//! `crictl images|pull|rmi`.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::image::{Auth, Credential, Error, Image, ImageRef, ImageStore, Result, StoreConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The data directory; images are kept in its `images/` directory
    /// (default: $XDG_DATA_HOME/rkube, else ~/.local/share/rkube).
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// A registry (`host[:port]`) spoken to over plain HTTP; repeatable.
    #[arg(long = "insecure-registry", global = true, value_name = "HOST")]
    pub insecure_registries: Vec<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// List stored images (IMAGE TAG IMAGE ID SIZE).
    #[command(alias = "list", alias = "images")]
    Ls {
        /// Print image IDs only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Pull an image from its registry.
    Pull {
        image: String,
        /// `user:password` for the image's registry.
        #[arg(long)]
        creds: Option<String>,
        /// A `.dockerconfigjson` file (as in an image pull secret).
        #[arg(long, value_name = "FILE")]
        auth_file: Option<PathBuf>,
    },
    /// Import an OCI archive (`skopeo copy … oci-archive:FILE`) or a `docker save` tarball.
    Import { archive: PathBuf },
    /// Remove images by reference or image ID.
    #[command(alias = "rmi")]
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
}

/// Where the image store of a data directory lives (the kubelet should use the same).
pub fn images_root(data_dir: &Path) -> PathBuf {
    data_dir.join("images")
}

fn default_data_dir() -> Result<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("rkube"));
    }
    let home = std::env::var_os("HOME").filter(|v| !v.is_empty()).ok_or_else(|| {
        Error::io(
            "finding the data directory",
            std::io::Error::other("neither --data-dir, XDG_DATA_HOME nor HOME is set"),
        )
    })?;
    Ok(PathBuf::from(home).join(".local/share/rkube"))
}

/// Runs the command, printing to stdout.
pub async fn run(args: Args) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    run_to(args, &mut stdout).await
}

/// Runs the command, printing to `out`.
pub async fn run_to(args: Args, out: &mut impl Write) -> Result<()> {
    let data_dir = match args.data_dir {
        Some(dir) => dir,
        None => default_data_dir()?,
    };
    let config =
        StoreConfig { insecure_registries: args.insecure_registries, ..StoreConfig::default() };
    let store = ImageStore::open_with(images_root(&data_dir), config)?;
    let w = |e| Error::io("writing output", e);
    match args.command {
        Command::Ls { quiet } => {
            let images = store.list().await?;
            if quiet {
                for image in &images {
                    writeln!(out, "{}", image.id).map_err(w)?;
                }
            } else {
                out.write_all(table(&images).as_bytes()).map_err(w)?;
            }
        }
        Command::Pull { image, creds, auth_file } => {
            let mut auth = Auth::anonymous();
            if let Some(file) = auth_file {
                let bytes = std::fs::read(&file)
                    .map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
                auth.merge(&Auth::from_docker_config_json(&bytes)?);
            }
            if let Some(creds) = creds {
                let (username, password) = creds.split_once(':').ok_or_else(|| {
                    Error::InvalidCredentials("--creds must be user:password".into())
                })?;
                let registry = ImageRef::parse(&image)?.registry().to_string();
                auth.insert(
                    &registry,
                    Credential::Basic { username: username.into(), password: password.into() },
                );
            }
            let pulled = store.pull(&image, &auth).await?;
            writeln!(out, "Image is up to date for {}", pulled.id).map_err(w)?;
        }
        Command::Import { archive } => {
            for image in store.import(&archive).await? {
                writeln!(out, "Imported {} ({})", image.reference, short_id(&image.id))
                    .map_err(w)?;
            }
        }
        Command::Rm { images } => {
            for image in images {
                for removed in store.remove(&image).await? {
                    writeln!(out, "Deleted: {removed}").map_err(w)?;
                }
            }
        }
    }
    Ok(())
}

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex.get(..13).unwrap_or(hex)
}

/// `crictl images`' table: columns padded like its tabwriter (minimum 20, padding 3).
fn table(images: &[Image]) -> String {
    let mut rows =
        vec![["IMAGE".to_string(), "TAG".to_string(), "IMAGE ID".to_string(), "SIZE".to_string()]];
    for image in images {
        let (name, tag) = match ImageRef::parse(&image.reference) {
            Ok(r) => (r.name(), r.tag().unwrap_or("<none>").to_string()),
            Err(_) => (image.reference.clone(), "<none>".to_string()),
        };
        rows.push([name, tag, short_id(&image.id).to_string(), human_size(image.size)]);
    }
    let widths: Vec<usize> =
        (0..3).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0).max(17) + 3).collect();
    let mut out = String::new();
    for row in rows {
        for (c, width) in widths.iter().enumerate() {
            out.push_str(&format!("{:<width$}", row[c]));
        }
        out.push_str(&row[3]);
        out.push('\n');
    }
    out
}

/// Decimal units with three significant digits, as crictl (go-units) prints sizes: `2.16MB`.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    let decimals = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    let mut text = format!("{value:.decimals$}");
    if text.contains('.') {
        text = text.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{text}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn sizes_print_like_crictl() {
        assert_eq!(human_size(12), "12B");
        assert_eq!(human_size(2_160_000), "2.16MB");
        assert_eq!(human_size(772_000), "772kB");
        assert_eq!(human_size(1_500_000_000), "1.5GB");
    }

    #[test]
    fn the_table_has_crictls_columns() {
        let images = vec![Image {
            id: format!("sha256:{}", "ab".repeat(32)),
            reference: "docker.io/library/busybox:1.36".into(),
            digest: String::new(),
            rootfs: PathBuf::new(),
            config: Default::default(),
            size: 2_160_000,
        }];
        let t = table(&images);
        let mut lines = t.lines();
        let header: Vec<&str> =
            lines.next().unwrap().split("   ").filter(|s| !s.is_empty()).collect();
        assert_eq!(
            header.iter().map(|s| s.trim()).collect::<Vec<_>>(),
            ["IMAGE", "TAG", "IMAGE ID", "SIZE"]
        );
        let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(row, ["docker.io/library/busybox", "1.36", "ababababababa", "2.16MB"]);
    }

    #[test]
    fn flags_parse_after_the_subcommand_too() {
        let cli = Cli::try_parse_from([
            "image",
            "pull",
            "127.0.0.1:5000/a:1",
            "--insecure-registry",
            "127.0.0.1:5000",
            "--data-dir",
            "/tmp/x",
        ])
        .unwrap();
        assert_eq!(cli.args.insecure_registries, ["127.0.0.1:5000"]);
        assert_eq!(cli.args.data_dir, Some(PathBuf::from("/tmp/x")));
        assert!(matches!(cli.args.command, Command::Pull { .. }));
    }

    #[tokio::test]
    async fn ls_on_an_empty_store_prints_only_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let cli = Cli::try_parse_from(["image", "--data-dir", dir.path().to_str().unwrap(), "ls"])
            .unwrap();
        let mut out = Vec::new();
        run_to(cli.args, &mut out).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(text.starts_with("IMAGE"));
        assert!(dir.path().join("images/blobs/sha256").is_dir());
    }
}
