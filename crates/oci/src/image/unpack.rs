//! Layer unpacking into one flattened rootfs, treating every archive as hostile.
//!
//! # Guarantees
//! - Nothing is created, changed or removed outside `rootfs`: entry paths with `..` are
//!   rejected, absolute paths are taken relative to the rootfs, and every parent directory is
//!   resolved component by component with symlinks interpreted *inside* the rootfs (as if
//!   chrooted), so a symlink planted by one entry cannot redirect a later write, whiteout or
//!   hardlink elsewhere. The final component of an entry is never followed: an existing entry
//!   there is replaced, not written through.
//! - Hardlink targets are resolved the same way, so a link can only share an inode that is
//!   already inside the rootfs.
//! - Device nodes are skipped (with a warning) unless the caller allows them.
//! - Whiteouts (`.wh.<name>`) remove the lower layer's `<name>`; an opaque marker
//!   (`.wh..wh..opq`) empties its directory of everything lower layers put there while keeping
//!   what the same layer wrote.
//! - The digest of the uncompressed stream (the layer's diff ID) is returned so the caller can
//!   check it against the image config.
//!
//! # Caveats
//! Unpacking assumes nothing else writes into the rootfs at the same time (it is a fresh
//! staging directory), so checking a path and then using it cannot race.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{Error, Result};

/// The most symlinks followed while resolving one path (the kernel's limit).
const MAX_SYMLINKS: usize = 40;
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// What an unpack may do beyond plain files.
#[derive(Debug, Clone, Default)]
pub struct UnpackOptions {
    /// Create character and block device nodes (only sensible for privileged runtimes).
    pub allow_devices: bool,
    /// Apply the archive's owners (needs root; otherwise files belong to the caller).
    pub preserve_owners: bool,
}

/// What one layer produced.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// `sha256:<hex>` of the uncompressed tar stream.
    pub diff_id: String,
    /// Bytes of regular file content written.
    pub bytes: u64,
}

/// Unpacks one layer (gzip, zstd or plain tar, told apart by their magic bytes) onto `rootfs`.
pub fn unpack_layer(rootfs: &Path, reader: impl Read, options: &UnpackOptions) -> Result<Unpacked> {
    let mut buffered = BufReader::with_capacity(64 * 1024, reader);
    let head = buffered.fill_buf().map_err(|e| io_err("reading layer", e))?;
    let decoded: Box<dyn Read + '_> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(
            zstd::stream::read::Decoder::with_buffer(buffered)
                .map_err(|e| io_err("starting zstd decoder", e))?,
        )
    } else {
        Box::new(buffered)
    };
    let mut hashing = HashingReader::new(decoded);
    let bytes = {
        let mut archive = tar::Archive::new(&mut hashing);
        let mut layer = Layer { rootfs, options, written: HashSet::new(), bytes: 0 };
        let entries = archive.entries().map_err(|e| io_err("reading layer archive", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_err("reading layer archive", e))?;
            layer.apply(entry)?;
        }
        layer.bytes
    };
    // The diff ID covers the whole stream, including padding after the end-of-archive blocks.
    io::copy(&mut hashing, &mut io::sink()).map_err(|e| io_err("reading layer", e))?;
    Ok(Unpacked { diff_id: hashing.digest(), bytes })
}

/// A reader that hashes (sha256) and counts what passes through it.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    pub(crate) count: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        HashingReader { inner, hasher: Sha256::new(), count: 0 }
    }

    pub(crate) fn digest(&self) -> String {
        format!("sha256:{}", hex(&self.hasher.clone().finalize()))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn io_err(context: &str, source: io::Error) -> Error {
    Error::Io { context: context.to_string(), source }
}

fn unsafe_entry(path: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::UnsafeLayer { path: path.into(), reason: reason.into() }
}

struct Layer<'a> {
    rootfs: &'a Path,
    options: &'a UnpackOptions,
    /// Host paths this layer created or replaced: an opaque marker keeps them.
    written: HashSet<PathBuf>,
    bytes: u64,
}

impl Layer<'_> {
    fn apply<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<()> {
        let raw_path = entry.path().map_err(|e| io_err("reading entry path", e))?.into_owned();
        let shown = raw_path.display().to_string();
        let components = clean_components(&raw_path)
            .ok_or_else(|| unsafe_entry(&shown, "path has a '..' component"))?;
        let Some((name, parents)) = components.split_last() else {
            // The archive's root ("./"): the rootfs itself, which keeps its own metadata.
            return Ok(());
        };
        let entry_type = entry.header().entry_type();
        let xattrs = wanted_xattrs(&mut entry)?;

        let name_str = name.to_string_lossy();
        if let Some(hidden) = name_str.strip_prefix(WHITEOUT_PREFIX) {
            return self.whiteout(&shown, parents, &name_str, hidden);
        }

        let parent = self
            .resolve_dir(parents, true, &shown)?
            .ok_or_else(|| unsafe_entry(&shown, "parent directory could not be created"))?;
        let target = parent.join(name);
        let header = entry.header();
        let mode = header.mode().map_err(|e| io_err("reading entry mode", e))? & 0o7777;
        let owner = (
            header.uid().map_err(|e| io_err("reading entry uid", e))?,
            header.gid().map_err(|e| io_err("reading entry gid", e))?,
        );

        use tar::EntryType as T;
        match entry_type {
            T::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_any(&target)?;
                        create_dir(&target)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => create_dir(&target)?,
                    Err(e) => return Err(io_err(&format!("inspecting {shown}"), e)),
                }
                self.set_owner_and_mode(&target, owner, Some(mode))?;
                apply_xattrs(&target, &xattrs);
            }
            T::Regular | T::Continuous => {
                replace(&target)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&target)
                    .map_err(|e| io_err(&format!("creating {shown}"), e))?;
                let n = io::copy(&mut entry, &mut file)
                    .map_err(|e| io_err(&format!("writing {shown}"), e))?;
                if n != entry.size() {
                    let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "archive is truncated");
                    return Err(io_err(&format!("writing {shown}"), eof));
                }
                self.bytes += n;
                if let Ok(mtime) = entry.header().mtime() {
                    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
                    // A timestamp that cannot be set is cosmetic, not a failed unpack.
                    let _ = file.set_modified(when);
                }
                drop(file);
                self.set_owner_and_mode(&target, owner, Some(mode))?;
                // After chown, which drops file capabilities.
                apply_xattrs(&target, &xattrs);
            }
            T::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| io_err("reading symlink target", e))?
                    .ok_or_else(|| unsafe_entry(&shown, "symlink without a target"))?
                    .into_owned();
                replace(&target)?;
                // The target is stored verbatim: it is only ever followed by our own resolver
                // (inside the rootfs) or by the container, which is chrooted into it.
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(|e| io_err(&format!("creating symlink {shown}"), e))?;
                self.set_owner_and_mode(&target, owner, None)?;
            }
            T::Link => {
                let link = entry
                    .link_name()
                    .map_err(|e| io_err("reading hardlink target", e))?
                    .ok_or_else(|| unsafe_entry(&shown, "hardlink without a target"))?
                    .into_owned();
                let link_components = clean_components(&link).ok_or_else(|| {
                    unsafe_entry(&shown, format!("hardlink target {link:?} has '..'"))
                })?;
                let Some((link_name, link_parents)) = link_components.split_last() else {
                    return Err(unsafe_entry(&shown, "hardlink to the rootfs itself"));
                };
                let source = self
                    .resolve_dir(link_parents, false, &shown)?
                    .map(|dir| dir.join(link_name))
                    .ok_or_else(|| {
                        unsafe_entry(&shown, format!("hardlink target {link:?} does not exist"))
                    })?;
                match fs::symlink_metadata(&source) {
                    Ok(m) if m.is_dir() => {
                        return Err(unsafe_entry(&shown, "hardlink to a directory"));
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(unsafe_entry(
                            &shown,
                            format!("hardlink target {link:?} does not exist"),
                        ));
                    }
                }
                if source == target {
                    return Ok(());
                }
                replace(&target)?;
                // linkat without AT_SYMLINK_FOLLOW: a symlink source is linked, not followed.
                fs::hard_link(&source, &target)
                    .map_err(|e| io_err(&format!("creating hardlink {shown}"), e))?;
            }
            T::Fifo => {
                replace(&target)?;
                nix::unistd::mkfifo(&target, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(|e| io_err(&format!("creating fifo {shown}"), e.into()))?;
                self.set_owner_and_mode(&target, owner, Some(mode))?;
            }
            T::Char | T::Block => {
                if !self.options.allow_devices {
                    tracing::warn!(path = %shown, "skipping device node in image layer");
                    return Ok(());
                }
                let major = header
                    .device_major()
                    .map_err(|e| io_err("reading device number", e))?
                    .unwrap_or(0);
                let minor = header
                    .device_minor()
                    .map_err(|e| io_err("reading device number", e))?
                    .unwrap_or(0);
                let kind = if entry_type == T::Char {
                    nix::sys::stat::SFlag::S_IFCHR
                } else {
                    nix::sys::stat::SFlag::S_IFBLK
                };
                replace(&target)?;
                nix::sys::stat::mknod(
                    &target,
                    kind,
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                    nix::sys::stat::makedev(major.into(), minor.into()),
                )
                .map_err(|e| io_err(&format!("creating device {shown}"), e.into()))?;
                self.set_owner_and_mode(&target, owner, Some(mode))?;
            }
            T::GNUSparse => {
                return Err(unsafe_entry(&shown, "sparse files are not supported"));
            }
            // PAX and GNU long-name headers are consumed by the tar reader; anything else
            // (e.g. a vendor extension) carries nothing to write.
            other => {
                tracing::debug!(path = %shown, ?other, "ignoring tar entry type");
                return Ok(());
            }
        }
        self.written.insert(target);
        Ok(())
    }

    fn whiteout(
        &mut self,
        shown: &str,
        parents: &[OsString],
        name: &str,
        hidden: &str,
    ) -> Result<()> {
        if name == OPAQUE_MARKER {
            let dir = self
                .resolve_dir(parents, true, shown)?
                .ok_or_else(|| unsafe_entry(shown, "opaque directory could not be created"))?;
            return self.make_opaque(&dir);
        }
        if hidden.starts_with(WHITEOUT_PREFIX) {
            // Other `.wh..wh.` names are aufs bookkeeping, not whiteouts of user files.
            return Ok(());
        }
        if matches!(hidden, "" | "." | "..") {
            // `.wh..` and `.wh...` would name the directory itself or its parent.
            return Err(unsafe_entry(shown, "whiteout of '.' or '..'"));
        }
        let Some(dir) = self.resolve_dir(parents, false, shown)? else {
            return Ok(()); // Nothing below to hide.
        };
        let victim = dir.join(hidden);
        match fs::symlink_metadata(&victim) {
            Ok(_) => remove_any(&victim),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&format!("inspecting {shown}"), e)),
        }
    }

    fn make_opaque(&self, dir: &Path) -> Result<()> {
        let entries = fs::read_dir(dir).map_err(|e| io_err("reading opaque directory", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_err("reading opaque directory", e))?;
            let path = entry.path();
            let file_type = entry.file_type().map_err(|e| io_err("reading opaque directory", e))?;
            if self.written.contains(&path) {
                if file_type.is_dir() {
                    self.make_opaque(&path)?;
                }
            } else {
                remove_any(&path)?;
            }
        }
        Ok(())
    }

    /// The host path of the directory `components` name inside the rootfs, following symlinks
    /// as a chroot would (absolute targets from the rootfs, `..` stopping at its top).
    /// Missing directories are created when `create`, else `None` is returned.
    fn resolve_dir(
        &self,
        components: &[OsString],
        create: bool,
        shown: &str,
    ) -> Result<Option<PathBuf>> {
        let mut resolved: Vec<OsString> = Vec::new();
        let mut pending: VecDeque<OsString> = components.iter().cloned().collect();
        let mut links = 0;
        while let Some(component) = pending.pop_front() {
            if component == OsStr::new("..") {
                resolved.pop();
                continue;
            }
            let mut path = self.rootfs.to_path_buf();
            path.extend(&resolved);
            path.push(&component);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(unsafe_entry(shown, "too many levels of symbolic links"));
                    }
                    let target = fs::read_link(&path).map_err(|e| io_err("reading symlink", e))?;
                    if target.is_absolute() {
                        resolved.clear();
                    }
                    let mut expanded: VecDeque<OsString> = target
                        .components()
                        .filter_map(|c| match c {
                            Component::Normal(n) => Some(n.to_os_string()),
                            Component::ParentDir => Some(OsString::from("..")),
                            _ => None,
                        })
                        .collect();
                    expanded.extend(pending.drain(..));
                    pending = expanded;
                }
                Ok(m) if m.is_dir() => resolved.push(component),
                Ok(_) => {
                    return Err(unsafe_entry(
                        shown,
                        format!("{} is not a directory", Path::new(&component).display()),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    create_dir(&path)?;
                    resolved.push(component);
                }
                Err(e) => return Err(io_err(&format!("resolving {shown}"), e)),
            }
        }
        let mut dir = self.rootfs.to_path_buf();
        dir.extend(&resolved);
        Ok(Some(dir))
    }

    fn set_owner_and_mode(
        &self,
        path: &Path,
        (uid, gid): (u64, u64),
        mode: Option<u32>,
    ) -> Result<()> {
        if self.options.preserve_owners {
            let uid = u32::try_from(uid)
                .map_err(|_| unsafe_entry(path.display().to_string(), "uid out of range"))?;
            let gid = u32::try_from(gid)
                .map_err(|_| unsafe_entry(path.display().to_string(), "gid out of range"))?;
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))
                .map_err(|e| io_err(&format!("chown {}", path.display()), e))?;
        }
        // After chown, which clears set-id bits. `path` was created by us and is not a symlink.
        if let Some(mode) = mode {
            fs::set_permissions(path, Permissions::from_mode(mode))
                .map_err(|e| io_err(&format!("chmod {}", path.display()), e))?;
        }
        Ok(())
    }
}

/// Extended attributes worth keeping from an entry's PAX records: file capabilities (so
/// `ping` and friends work unprivileged) and `user.*`. Others, `trusted.overlay.*` above all,
/// would let an image steer an overlay mount built on this rootfs, so they are dropped.
fn wanted_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Vec<(String, Vec<u8>)>> {
    let mut wanted = Vec::new();
    let Some(extensions) = entry.pax_extensions().map_err(|e| io_err("reading PAX records", e))?
    else {
        return Ok(wanted);
    };
    for extension in extensions {
        let extension = extension.map_err(|e| io_err("reading PAX records", e))?;
        let Ok(key) = extension.key() else { continue };
        let Some(name) = key.strip_prefix("SCHILY.xattr.") else { continue };
        if name == "security.capability" || name.starts_with("user.") {
            wanted.push((name.to_string(), extension.value_bytes().to_vec()));
        }
    }
    Ok(wanted)
}

fn apply_xattrs(path: &Path, xattrs: &[(String, Vec<u8>)]) {
    for (name, value) in xattrs {
        // lsetxattr: never through a symlink. A filesystem without xattr support loses them,
        // as with `tar --xattrs` there; that is not worth failing the image for.
        if let Err(e) = xattr::set(path, name, value) {
            tracing::warn!(path = %path.display(), name, error = %e, "cannot set xattr");
        }
    }
}

/// The entry path as normal components: `/` and `.` dropped, `None` if any `..` appears.
fn clean_components(path: &Path) -> Option<Vec<OsString>> {
    let mut out = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => return None,
        }
    }
    Some(out)
}

fn create_dir(path: &Path) -> Result<()> {
    fs::create_dir(path).map_err(|e| io_err(&format!("creating {}", path.display()), e))?;
    fs::set_permissions(path, Permissions::from_mode(0o755))
        .map_err(|e| io_err(&format!("chmod {}", path.display()), e))
}

/// Clears the way for a new non-directory entry at `path` (tar replaces what is there).
fn replace(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(_) => remove_any(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(&format!("inspecting {}", path.display()), e)),
    }
}

/// Removes a file, symlink (not its target) or directory tree (std does not follow symlinks).
pub(crate) fn remove_any(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path).map_err(|e| io_err("inspecting", e))?;
    let result = if meta.is_dir() { fs::remove_dir_all(path) } else { fs::remove_file(path) };
    result.map_err(|e| io_err(&format!("removing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    /// A tar built entry by entry, with raw names so hostile paths can be written.
    struct TarBuilder(tar::Builder<Vec<u8>>);

    impl TarBuilder {
        fn new() -> Self {
            TarBuilder(tar::Builder::new(Vec::new()))
        }

        fn header(name: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(size);
            h.set_mode(mode);
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            // Written raw: the tar crate's setters refuse `..`, which these tests need.
            let raw = &mut h.as_old_mut().name;
            raw.fill(0);
            raw[..name.len()].copy_from_slice(name.as_bytes());
            h
        }

        fn file(mut self, name: &str, data: &[u8]) -> Self {
            let mut h = Self::header(name, tar::EntryType::Regular, data.len() as u64, 0o644);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }

        fn dir(mut self, name: &str) -> Self {
            let mut h = Self::header(name, tar::EntryType::Directory, 0, 0o755);
            h.set_cksum();
            self.0.append(&h, io::empty()).unwrap();
            self
        }

        fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> Self {
            let mut h = Self::header(name, kind, 0, 0o777);
            let raw = &mut h.as_old_mut().linkname;
            raw.fill(0);
            raw[..target.len()].copy_from_slice(target.as_bytes());
            h.set_cksum();
            self.0.append(&h, io::empty()).unwrap();
            self
        }

        fn symlink(self, name: &str, target: &str) -> Self {
            self.link(tar::EntryType::Symlink, name, target)
        }

        fn hardlink(self, name: &str, target: &str) -> Self {
            self.link(tar::EntryType::Link, name, target)
        }

        fn device(mut self, name: &str) -> Self {
            let mut h = Self::header(name, tar::EntryType::Char, 0, 0o666);
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
            h.set_cksum();
            self.0.append(&h, io::empty()).unwrap();
            self
        }

        fn build(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    /// A rootfs with a sibling `outside` directory holding a file that must survive.
    struct Sandbox {
        _tmp: tempfile::TempDir,
        rootfs: PathBuf,
        outside: PathBuf,
    }

    impl Sandbox {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let rootfs = tmp.path().join("snap/rootfs");
            let outside = tmp.path().join("outside");
            fs::create_dir_all(&rootfs).unwrap();
            fs::create_dir_all(&outside).unwrap();
            fs::write(outside.join("victim"), b"original").unwrap();
            Sandbox { _tmp: tmp, rootfs, outside }
        }

        fn unpack(&self, tar: &[u8]) -> Result<Unpacked> {
            unpack_layer(&self.rootfs, tar, &UnpackOptions::default())
        }

        fn outside(&self) -> String {
            self.outside.display().to_string()
        }

        /// The outside directory holds exactly the untouched victim, and nothing was written
        /// next to the rootfs either.
        fn assert_untouched(&self) {
            let names: Vec<_> =
                fs::read_dir(&self.outside).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(names, vec![OsString::from("victim")], "outside dir changed");
            assert_eq!(fs::read(self.outside.join("victim")).unwrap(), b"original");
            assert_eq!(fs::metadata(self.outside.join("victim")).unwrap().nlink(), 1);
            let snap: Vec<_> = fs::read_dir(self.rootfs.parent().unwrap())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(snap, vec![OsString::from("rootfs")], "wrote beside the rootfs");
        }
    }

    #[test]
    fn entries_with_dotdot_are_rejected_and_nothing_lands_outside() {
        let sb = Sandbox::new();
        let tar = TarBuilder::new().file("../escape", b"x").build();
        assert!(matches!(sb.unpack(&tar), Err(Error::UnsafeLayer { .. })));
        let tar = TarBuilder::new().file("a/../../../outside/victim", b"pwned").build();
        assert!(matches!(sb.unpack(&tar), Err(Error::UnsafeLayer { .. })));
        sb.assert_untouched();
    }

    #[test]
    fn absolute_entry_paths_are_taken_relative_to_the_rootfs() {
        let sb = Sandbox::new();
        let victim = format!("{}/victim", sb.outside());
        let tar = TarBuilder::new().file(&victim, b"pwned").build();
        sb.unpack(&tar).unwrap();
        assert_eq!(fs::read(sb.rootfs.join(victim.trim_start_matches('/'))).unwrap(), b"pwned");
        sb.assert_untouched();
    }

    #[test]
    fn writes_through_an_absolute_symlink_stay_inside_the_rootfs() {
        let sb = Sandbox::new();
        let tar = TarBuilder::new()
            .symlink("evil", &sb.outside())
            .file("evil/victim", b"pwned")
            .file("evil/new", b"pwned")
            .build();
        sb.unpack(&tar).unwrap();
        sb.assert_untouched();
        // The symlink is kept as written; the writes went to its in-rootfs meaning.
        assert_eq!(fs::read_link(sb.rootfs.join("evil")).unwrap(), sb.outside);
        let inside = sb.rootfs.join(sb.outside().trim_start_matches('/'));
        assert_eq!(fs::read(inside.join("victim")).unwrap(), b"pwned");
    }

    #[test]
    fn writes_through_a_relative_symlink_climbing_out_stay_inside() {
        let sb = Sandbox::new();
        let tar = TarBuilder::new()
            .dir("d")
            .symlink("d/up", "../../../../../../../../outside")
            .file("d/up/victim", b"pwned")
            .symlink("chain1", "chain2")
            .symlink("chain2", "d/up")
            .file("chain1/other", b"pwned")
            .build();
        sb.unpack(&tar).unwrap();
        sb.assert_untouched();
        assert_eq!(fs::read(sb.rootfs.join("outside/victim")).unwrap(), b"pwned");
        assert_eq!(fs::read(sb.rootfs.join("outside/other")).unwrap(), b"pwned");
    }

    #[test]
    fn a_file_entry_replaces_a_symlink_instead_of_writing_through_it() {
        let sb = Sandbox::new();
        let victim = format!("{}/victim", sb.outside());
        let tar = TarBuilder::new().symlink("f", &victim).file("f", b"pwned").build();
        sb.unpack(&tar).unwrap();
        sb.assert_untouched();
        let meta = fs::symlink_metadata(sb.rootfs.join("f")).unwrap();
        assert!(meta.is_file());
        assert_eq!(fs::read(sb.rootfs.join("f")).unwrap(), b"pwned");
    }

    #[test]
    fn hardlinks_to_outside_files_are_rejected() {
        let sb = Sandbox::new();
        let victim = format!("{}/victim", sb.outside());
        for tar in [
            TarBuilder::new().hardlink("hl", "../../outside/victim").build(),
            TarBuilder::new().hardlink("hl", &victim).build(),
            TarBuilder::new().symlink("s", &sb.outside()).hardlink("hl", "s/victim").build(),
        ] {
            assert!(matches!(sb.unpack(&tar), Err(Error::UnsafeLayer { .. })));
            assert!(fs::symlink_metadata(sb.rootfs.join("hl")).is_err());
        }
        sb.assert_untouched();
    }

    #[test]
    fn a_hardlink_to_a_symlink_links_the_symlink_itself() {
        let sb = Sandbox::new();
        let victim = format!("{}/victim", sb.outside());
        let tar = TarBuilder::new()
            .symlink("s", &victim)
            .hardlink("hl", "s")
            .file("hl", b"pwned")
            .build();
        sb.unpack(&tar).unwrap();
        sb.assert_untouched();
    }

    #[test]
    fn whiteouts_and_opaque_markers_through_symlinks_do_not_delete_outside() {
        let sb = Sandbox::new();
        let tar = TarBuilder::new()
            .symlink("w", &sb.outside())
            .file("w/.wh.victim", b"")
            .symlink("o", "../../outside")
            .file("o/.wh..wh..opq", b"")
            .build();
        sb.unpack(&tar).unwrap();
        sb.assert_untouched();
    }

    #[test]
    fn whiteouts_naming_dot_or_dotdot_are_rejected_and_remove_nothing() {
        let sb = Sandbox::new();
        sb.unpack(&TarBuilder::new().file("keep", b"1").build()).unwrap();
        for name in [".wh...", ".wh..", "d/.wh..."] {
            let tar = TarBuilder::new().dir("d").file(name, b"").build();
            assert!(matches!(sb.unpack(&tar), Err(Error::UnsafeLayer { .. })), "{name}");
            assert!(sb.rootfs.join("keep").exists(), "{name} removed the rootfs");
        }
        sb.assert_untouched();
    }

    #[test]
    fn user_and_capability_xattrs_are_applied_and_overlay_ones_dropped() {
        let sb = Sandbox::new();
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([
            ("SCHILY.xattr.user.rkube", &b"yes"[..]),
            ("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..]),
        ])
        .unwrap();
        let mut h = TarBuilder::header("f", tar::EntryType::Regular, 1, 0o644);
        h.set_cksum();
        b.append(&h, &b"1"[..]).unwrap();
        sb.unpack(&b.into_inner().unwrap()).unwrap();
        let f = sb.rootfs.join("f");
        match xattr::get(&f, "user.rkube") {
            Ok(value) => assert_eq!(value.as_deref(), Some(&b"yes"[..])),
            Err(e) => eprintln!("SKIPPED: user xattrs unsupported here: {e}"),
        }
        assert_eq!(xattr::get(&f, "trusted.overlay.opaque").ok().flatten(), None);
    }

    #[test]
    fn device_nodes_are_skipped_unless_allowed() {
        let sb = Sandbox::new();
        let tar = TarBuilder::new().device("dev/null2").file("ok", b"1").build();
        sb.unpack(&tar).unwrap();
        assert!(fs::symlink_metadata(sb.rootfs.join("dev/null2")).is_err());
        assert!(sb.rootfs.join("ok").exists());
    }

    #[test]
    fn a_whiteout_removes_a_lower_layer_file_and_directory() {
        let sb = Sandbox::new();
        let lower = TarBuilder::new()
            .dir("etc")
            .file("etc/a", b"a")
            .file("etc/b", b"b")
            .dir("var/cache")
            .file("var/cache/x", b"x")
            .build();
        let upper = TarBuilder::new().file("etc/.wh.a", b"").file("var/.wh.cache", b"").build();
        sb.unpack(&lower).unwrap();
        sb.unpack(&upper).unwrap();
        assert!(!sb.rootfs.join("etc/a").exists());
        assert!(sb.rootfs.join("etc/b").exists());
        assert!(!sb.rootfs.join("var/cache").exists());
        assert!(!sb.rootfs.join("etc/.wh.a").exists());
    }

    #[test]
    fn an_opaque_directory_hides_lower_content_but_keeps_its_own_layers_files() {
        let sb = Sandbox::new();
        let lower = TarBuilder::new()
            .dir("app")
            .file("app/old", b"old")
            .dir("app/sub")
            .file("app/sub/old", b"old")
            .build();
        // The new file comes before the marker: order inside a layer must not matter.
        let upper = TarBuilder::new()
            .dir("app")
            .dir("app/sub")
            .file("app/new", b"new")
            .file("app/.wh..wh..opq", b"")
            .file("app/later", b"later")
            .build();
        sb.unpack(&lower).unwrap();
        sb.unpack(&upper).unwrap();
        assert!(!sb.rootfs.join("app/old").exists());
        assert!(!sb.rootfs.join("app/sub/old").exists());
        assert!(sb.rootfs.join("app/sub").is_dir());
        assert_eq!(fs::read(sb.rootfs.join("app/new")).unwrap(), b"new");
        assert_eq!(fs::read(sb.rootfs.join("app/later")).unwrap(), b"later");
        assert!(!sb.rootfs.join("app/.wh..wh..opq").exists());
    }

    #[test]
    fn hardlinks_and_symlinks_inside_the_rootfs_are_created() {
        let sb = Sandbox::new();
        let tar = TarBuilder::new()
            .dir("bin")
            .file("bin/busybox", b"elf")
            .hardlink("bin/sh", "bin/busybox")
            .symlink("bin/ls", "/bin/busybox")
            .build();
        sb.unpack(&tar).unwrap();
        let a = fs::metadata(sb.rootfs.join("bin/busybox")).unwrap();
        let b = fs::metadata(sb.rootfs.join("bin/sh")).unwrap();
        assert_eq!(a.ino(), b.ino());
        assert_eq!(fs::read_link(sb.rootfs.join("bin/ls")).unwrap(), Path::new("/bin/busybox"));
    }

    #[test]
    fn gzip_zstd_and_plain_layers_unpack_and_report_the_uncompressed_digest() {
        let tar = TarBuilder::new().dir("d").file("d/f", b"hello").build();
        let expected = format!("sha256:{}", hex(&Sha256::digest(&tar)));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&tar[..], 1).unwrap();
        for layer in [tar.clone(), gz, zst] {
            let sb = Sandbox::new();
            let unpacked = sb.unpack(&layer).unwrap();
            assert_eq!(unpacked.diff_id, expected);
            assert_eq!(unpacked.bytes, 5);
            assert_eq!(fs::read(sb.rootfs.join("d/f")).unwrap(), b"hello");
        }
    }

    #[test]
    fn file_modes_from_the_archive_are_applied() {
        let sb = Sandbox::new();
        let mut h = TarBuilder::header("run.sh", tar::EntryType::Regular, 2, 0o4755);
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, &b"#!"[..]).unwrap();
        sb.unpack(&b.into_inner().unwrap()).unwrap();
        let mode = fs::metadata(sb.rootfs.join("run.sh")).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o4755);
    }

    #[test]
    fn a_truncated_archive_is_an_error() {
        let sb = Sandbox::new();
        let tar = TarBuilder::new().file("big", &[7u8; 4096]).build();
        assert!(sb.unpack(&tar[..1024]).is_err());
    }
}
