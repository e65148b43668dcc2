//! Container logs with size-based rotation, as the kubelet rotates CRI logs
//! (`containerLogMaxSize` 10 MiB, `containerLogMaxFiles` 5): once the current file would pass the
//! size, it is renamed `<name>.<YYYYmmdd-HHMMSS.mmm>` and a new one started; the oldest rotated
//! files beyond the count are deleted. `kubectl logs` reads the current file, as upstream's does.
//! (`<name>.1` is the previous container's log, kept for `--previous`; rotation never touches it.)

use std::io::Write;
use std::path::{Path, PathBuf};

pub const DEFAULT_MAX_SIZE: u64 = 10 * 1024 * 1024;
pub const DEFAULT_MAX_FILES: usize = 5;

pub struct RotatingLog {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    max_size: u64,
    max_files: usize,
}

impl RotatingLog {
    /// Appends to `path` (creating it), rotating past `max_size` bytes and keeping at most
    /// `max_files` files in all (the current one included).
    pub fn open(path: &Path, max_size: u64, max_files: usize) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            path: path.to_path_buf(),
            file,
            size,
            max_size: max_size.max(1),
            max_files: max_files.max(1),
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let ts = jiff::Timestamp::now().strftime("%Y%m%d-%H%M%S.%3f").to_string();
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{ts}"));
        std::fs::rename(&self.path, self.path.with_file_name(name))?;
        self.file = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        self.size = 0;
        let mut rotated = rotated_files(&self.path);
        while rotated.len() + 1 > self.max_files {
            let _ = std::fs::remove_file(rotated.remove(0));
        }
        Ok(())
    }
}

/// The rotated files of log `path`, oldest first.
pub fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let Some(dir) = path.parent() else { return Vec::new() };
    let prefix = format!("{}.", path.file_name().unwrap_or_default().to_string_lossy());
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix(&prefix)?;
            // `<date>-<time>.<ms>`: digits, one dash, one dot.
            let ok = rest.len() == 19
                && rest.chars().enumerate().all(|(i, c)| match i {
                    8 => c == '-',
                    15 => c == '.',
                    _ => c.is_ascii_digit(),
                });
            ok.then(|| e.path())
        })
        .collect();
    out.sort();
    out
}

impl Write for RotatingLog {
    /// Writes the whole record to one file: a record never straddles a rotation.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.size > 0 && self.size + buf.len() as u64 > self.max_size {
            self.rotate()?;
        }
        self.file.write_all(buf)?;
        self.size += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_past_its_size_is_rotated_and_only_the_newest_files_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        std::fs::write(dir.path().join("c.log.1"), "previous container\n").unwrap();
        let mut log = RotatingLog::open(&path, 100, 3).unwrap();
        for i in 0..20 {
            log.write_all(format!("record {i:02} {}\n", "x".repeat(30)).as_bytes()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let rotated = rotated_files(&path);
        assert_eq!(rotated.len(), 2, "{rotated:?}");
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(current.len() <= 100);
        assert!(current.ends_with(&format!("record 19 {}\n", "x".repeat(30))), "{current}");
        // Whole records only, the newest ones, in order across the files.
        let all: String =
            rotated.iter().map(|p| std::fs::read_to_string(p).unwrap()).chain([current]).collect();
        let numbers: Vec<u32> = all.lines().map(|l| l[7..9].parse().unwrap()).collect();
        assert_eq!(*numbers.last().unwrap(), 19);
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
        // The previous container's log is not a rotation.
        assert!(dir.path().join("c.log.1").exists());
    }
}
