//! A container's root filesystem: an overlay of the read-only unpacked image (lower) with a
//! writable layer in the container's directory, or a private copy where overlayfs is unavailable.

use std::path::Path;

use nix::mount::{MsFlags, mount};

use super::{Error, Result, io_err, unmount_if_mounted};

/// How the rootfs was made, recorded so `remove` undoes the right thing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootfsKind {
    Overlay,
    Copy,
}

/// Mounts `<cdir>/rootfs` as overlay(lower, `<cdir>/upper`, `<cdir>/work`); copies `lower` there
/// when the kernel or the filesystem refuses the overlay.
pub fn prepare(lower: &Path, cdir: &Path) -> Result<RootfsKind> {
    if !lower.is_dir() {
        return Err(Error::Config(format!("image rootfs {} is not a directory", lower.display())));
    }
    let rootfs = cdir.join("rootfs");
    let (upper, work) = (cdir.join("upper"), cdir.join("work"));
    for d in [&rootfs, &upper, &work] {
        std::fs::create_dir_all(d).map_err(io_err(format!("create {}", d.display())))?;
    }
    unmount_if_mounted(&rootfs)?;
    // Commas and colons separate overlay options: such a path cannot be given, copy instead.
    let plain = |p: &Path| !p.to_string_lossy().contains([',', ':']);
    if plain(lower) && plain(&upper) && plain(&work) {
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        match mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        ) {
            Ok(()) => return Ok(RootfsKind::Overlay),
            Err(e) => {
                tracing::warn!(error = %e, lower = %lower.display(), "overlay mount refused; copying the image instead")
            }
        }
    }
    copy_tree(lower, &rootfs)?;
    Ok(RootfsKind::Copy)
}

/// Undoes `prepare`: unmounts the overlay (a copy has nothing mounted). The files go with the
/// container directory.
pub fn release(cdir: &Path) -> Result<()> {
    unmount_if_mounted(&cdir.join("rootfs"))
}

/// Copies a directory tree keeping modes, owners and symlinks; device nodes and sockets are
/// skipped (runc creates the standard devices itself).
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt, lchown};
    let meta =
        std::fs::symlink_metadata(from).map_err(io_err(format!("stat {}", from.display())))?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target =
            std::fs::read_link(from).map_err(io_err(format!("read link {}", from.display())))?;
        let _ = std::fs::remove_file(to);
        std::os::unix::fs::symlink(&target, to)
            .map_err(io_err(format!("create link {}", to.display())))?;
    } else if ft.is_dir() {
        std::fs::create_dir_all(to).map_err(io_err(format!("create {}", to.display())))?;
        let rd = std::fs::read_dir(from).map_err(io_err(format!("read {}", from.display())))?;
        for entry in rd {
            let entry = entry.map_err(io_err(format!("read {}", from.display())))?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else if ft.is_file() {
        std::fs::copy(from, to).map_err(io_err(format!("copy {}", from.display())))?;
    } else {
        return Ok(());
    }
    lchown(to, Some(meta.uid()), Some(meta.gid()))
        .map_err(io_err(format!("chown {}", to.display())))?;
    if !ft.is_symlink() {
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(io_err(format!("chmod {}", to.display())))?;
    }
    Ok(())
}
