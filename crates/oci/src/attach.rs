//! `kubectl attach`: a container's live output and its stdin, shared by whoever owns the
//! container's stdio (the runc shim for `oci` containers, the kubelet for `process` ones) with
//! the kubelet's attach handler through a unix socket beside the container.
//!
//! The owner runs a [`Hub`]: its output copiers pass every chunk they read to the hub (through
//! [`Tee`]) before it goes to the CRI log, and the hub sends it to every attached client, so a
//! client sees the output from the moment it attached, as it is written (a prompt without a
//! newline included). A client that asked for stdin may write to the container's stdin, and
//! resize its terminal. When the container's output ends (it exited), the hub ends every
//! session and removes its socket.
//!
//! Wire format, client → hub: one byte, `i` (this session passes stdin) or `o` (output only),
//! then frames `[kind u8][len u16 BE][data]` — kind 0 stdin, kind 4 a terminal size (width and
//! height, u16 BE each). The client shutting down its writing half ends its stdin; with
//! `stdinOnce` the container's stdin closes after the first stdin session ends, as upstream's.
//! Hub → client: frames `[stream u8][len u32 BE][data]`, stream 1 stdout, 2 stderr.
//!
//! Why a socket rather than in-process channels: the shim outlives the kubelet and is a separate
//! process; one mechanism serves both runtimes.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Frame kinds from the client.
pub const STDIN: u8 = 0;
pub const RESIZE: u8 = 4;
/// Streams to the client.
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;

/// A slow client may hold the container's output back this long before it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the container's stdin goes.
pub enum Input {
    /// No stdin (`stdin: false`): what clients send is dropped.
    None,
    /// A pipe or FIFO: closing it is the container's end of input.
    Pipe(std::fs::File),
    /// A terminal's master: input is typed on it, and it has a window size.
    Terminal(std::fs::File),
}

struct Shared {
    subs: Mutex<Vec<UnixStream>>,
    input: Mutex<Input>,
    stdin_once: bool,
    /// Output copiers still running; the hub ends with the last one.
    readers: AtomicUsize,
    closed: AtomicBool,
    socket: PathBuf,
    /// The socket file's identity (device, inode): a restarted container's hub may have
    /// replaced it at the same path, and that one must stay.
    inode: Option<(u64, u64)>,
    /// A handle on the listening socket, to wake its accept loop when the hub closes.
    listener: Option<UnixListener>,
}

fn inode_of(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The owner's side. Cheap to clone: every copier holds one.
#[derive(Clone)]
pub struct Hub(Arc<Shared>);

/// Runs `f` on a path that reaches `path` even when it is longer than a unix socket address
/// allows (108 bytes): through the parent directory's descriptor in /proc/self/fd.
fn via_short_path<T>(
    path: &Path,
    f: impl FnOnce(&Path) -> std::io::Result<T>,
) -> std::io::Result<T> {
    if path.as_os_str().len() < 100 {
        return f(path);
    }
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return f(path);
    };
    let dir = std::fs::File::open(parent)?;
    use std::os::fd::AsRawFd;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    let out = f(&short);
    drop(dir);
    out
}

impl Hub {
    /// Listens on `socket` (replacing a stale one) for `readers` output copiers.
    pub fn listen(
        socket: &Path,
        input: Input,
        stdin_once: bool,
        readers: usize,
    ) -> std::io::Result<Hub> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(socket);
        let listener = via_short_path(socket, |p| UnixListener::bind(p))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600));
        }
        let hub = Hub(Arc::new(Shared {
            subs: Mutex::new(Vec::new()),
            input: Mutex::new(input),
            stdin_once,
            readers: AtomicUsize::new(readers.max(1)),
            closed: AtomicBool::new(false),
            socket: socket.to_path_buf(),
            inode: inode_of(socket),
            listener: listener.try_clone().ok(),
        }));
        let h = hub.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if h.0.closed.load(Ordering::SeqCst) {
                    break;
                }
                match conn {
                    Ok(conn) => h.accept(conn),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        });
        Ok(hub)
    }

    fn accept(&self, mut conn: UnixStream) {
        let mut mode = [0u8; 1];
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        if conn.read_exact(&mut mode).is_err() {
            return;
        }
        let _ = conn.set_read_timeout(None);
        let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
        let Ok(writer) = conn.try_clone() else { return };
        self.0.subs.lock().unwrap_or_else(|p| p.into_inner()).push(writer);
        let with_stdin = mode[0] == b'i';
        let h = self.clone();
        std::thread::spawn(move || h.serve_input(conn, with_stdin));
    }

    /// Reads one client's frames until it ends its input.
    fn serve_input(&self, conn: UnixStream, with_stdin: bool) {
        let mut r = std::io::BufReader::new(conn);
        let mut head = [0u8; 3];
        let mut data = vec![0u8; u16::MAX as usize];
        while r.read_exact(&mut head).is_ok() {
            let len = u16::from_be_bytes([head[1], head[2]]) as usize;
            if r.read_exact(&mut data[..len]).is_err() {
                break;
            }
            let mut input = self.0.input.lock().unwrap_or_else(|p| p.into_inner());
            let failed = match (head[0], &mut *input) {
                (STDIN, Input::Pipe(f) | Input::Terminal(f)) if with_stdin => {
                    f.write_all(&data[..len]).is_err()
                }
                (RESIZE, Input::Terminal(f)) if len == 4 => {
                    let w = u16::from_be_bytes([data[0], data[1]]);
                    let h = u16::from_be_bytes([data[2], data[3]]);
                    set_window_size(f, w, h);
                    false
                }
                _ => false,
            };
            if failed {
                // The reader is gone (the container ended): nothing more can be written.
                *input = Input::None;
            }
        }
        if with_stdin && self.0.stdin_once {
            // The container sees the end of its input (a terminal stays: output goes through it).
            let mut input = self.0.input.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(*input, Input::Pipe(_)) {
                *input = Input::None;
            }
        }
    }

    /// Sends a chunk of output to every attached client; a client that cannot take it goes.
    pub fn publish(&self, stream: u8, data: &[u8]) {
        let mut subs = self.0.subs.lock().unwrap_or_else(|p| p.into_inner());
        if subs.is_empty() {
            return;
        }
        let mut frame = Vec::with_capacity(data.len() + 5);
        frame.push(stream);
        frame.extend_from_slice(&(data.len() as u32).to_be_bytes());
        frame.extend_from_slice(data);
        subs.retain_mut(|s| s.write_all(&frame).is_ok());
    }

    /// One output copier is done; after the last, every session ends and the socket goes.
    pub fn reader_done(&self) {
        if self.0.readers.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.close();
        }
    }

    /// Ends every session and stops listening.
    pub fn close(&self) {
        if self.0.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        for s in self.0.subs.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        *self.0.input.lock().unwrap_or_else(|p| p.into_inner()) = Input::None;
        // Wake the accept loop (shutting a listening socket down ends a blocked accept on
        // Linux), then remove the socket unless a new hub owns that path now.
        if let Some(l) = &self.0.listener {
            use std::os::fd::AsRawFd;
            let _ = nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        if self.0.inode.is_some() && inode_of(&self.0.socket) == self.0.inode {
            let _ = std::fs::remove_file(&self.0.socket);
        }
    }
}

/// A reader that hands every chunk it reads to the hub too.
pub struct Tee<R> {
    inner: R,
    stream: u8,
    hub: Hub,
}

impl<R> Tee<R> {
    pub fn new(inner: R, stream: u8, hub: Hub) -> Tee<R> {
        Tee { inner, stream, hub }
    }
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.hub.publish(self.stream, &buf[..n]);
        }
        Ok(n)
    }
}

impl<R> Drop for Tee<R> {
    fn drop(&mut self) {
        self.hub.reader_done();
    }
}

/// Sets a terminal's window size (TIOCSWINSZ on its master).
#[allow(unsafe_code)]
fn set_window_size(master: &std::fs::File, cols: u16, rows: u16) {
    use std::os::fd::AsRawFd;
    let ws = nix::libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize struct that lives on this stack frame.
    unsafe {
        nix::libc::ioctl(master.as_raw_fd(), nix::libc::TIOCSWINSZ as _, &ws);
    }
}

/// The client's side (the kubelet's attach handler): connects to the hub at `socket`.
pub async fn connect(socket: &Path, with_stdin: bool) -> std::io::Result<tokio::net::UnixStream> {
    let std = via_short_path(socket, |p| UnixStream::connect(p))?;
    std.set_nonblocking(true)?;
    let mut s = tokio::net::UnixStream::from_std(std)?;
    use tokio::io::AsyncWriteExt;
    s.write_all(if with_stdin { b"i" } else { b"o" }).await?;
    Ok(s)
}

/// A client frame (stdin data or a terminal size).
pub fn client_frame(kind: u8, data: &[u8]) -> Vec<u8> {
    let data = &data[..data.len().min(u16::MAX as usize)];
    let mut f = Vec::with_capacity(data.len() + 3);
    f.push(kind);
    f.extend_from_slice(&(data.len() as u16).to_be_bytes());
    f.extend_from_slice(data);
    f
}

/// A resize frame.
pub fn resize_frame(cols: u16, rows: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(4);
    d.extend_from_slice(&cols.to_be_bytes());
    d.extend_from_slice(&rows.to_be_bytes());
    client_frame(RESIZE, &d)
}

/// Reads the next output frame: `(stream, data)`, or `None` at the end.
pub async fn read_output<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Option<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > 16 << 20 {
        return None;
    }
    let mut data = vec![0u8; len];
    r.read_exact(&mut data).await.ok()?;
    Some((head[0], data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn clients_see_output_from_attach_on_and_stdin_once_closes_the_pipe() {
        let dir = tempfile::tempdir().unwrap();
        // A deep directory: the socket path is longer than a socket address allows.
        let deep = dir.path().join("a".repeat(60)).join("b".repeat(60));
        let sock = deep.join("c.sock");
        let (r, w) = nix::unistd::pipe().unwrap();
        let hub = Hub::listen(&sock, Input::Pipe(std::fs::File::from(w)), true, 1).unwrap();
        hub.publish(STDOUT, b"before\n"); // nobody attached: not seen by anyone
        let mut c = connect(&sock, true).await.unwrap();
        // The hub registers the client on its own thread.
        for _ in 0..50 {
            if !hub.0.subs.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        hub.publish(STDOUT, b"after");
        assert_eq!(read_output(&mut c).await, Some((STDOUT, b"after".to_vec())));
        use tokio::io::AsyncWriteExt;
        c.write_all(&client_frame(STDIN, b"typed\n")).await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = String::new();
        std::fs::File::from(r).read_to_string(&mut got).unwrap(); // EOF: stdinOnce closed it
        assert_eq!(got, "typed\n");
        // The last reader ends the sessions and removes the socket.
        let tee = Tee::new(&b""[..], STDOUT, hub.clone());
        drop(tee);
        assert_eq!(read_output(&mut c).await, None);
        assert!(!sock.exists());
    }

    #[tokio::test]
    async fn a_restarted_containers_socket_survives_the_old_hub_closing() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("c.sock");
        let old = Hub::listen(&sock, Input::None, false, 1).unwrap();
        let new = Hub::listen(&sock, Input::None, false, 1).unwrap();
        old.close();
        assert!(sock.exists());
        let mut c = connect(&sock, false).await.unwrap();
        for _ in 0..50 {
            if !new.0.subs.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        new.publish(STDERR, b"x");
        assert_eq!(read_output(&mut c).await, Some((STDERR, b"x".to_vec())));
        new.close();
        assert!(!sock.exists());
    }
}
