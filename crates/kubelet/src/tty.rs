//! Terminals for `kubectl exec -it`: a pseudo-terminal whose slave becomes the command's
//! controlling terminal, and window resizes from the client.
//!
//! This module needs `unsafe` (as does `procinit`, which forks): making a terminal the controlling
//! terminal of a new session (setsid + TIOCSCTTY) must happen between fork and exec, and setting
//! the window size is an ioctl. Both are single libc calls with no memory handed across.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, OwnedFd};

/// A new pseudo-terminal: (master, slave).
pub fn open() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let pty = nix::pty::openpty(None, None).map_err(std::io::Error::from)?;
    Ok((pty.master, pty.slave))
}

/// Makes the child a session leader with the slave (its stdin) as controlling terminal.
pub fn make_controlling(cmd: &mut tokio::process::Command) {
    // SAFETY: runs in the forked child before exec; setsid and ioctl are async-signal-safe and
    // touch no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sets the terminal's size (from the client's resize channel).
pub fn resize(master: &impl AsRawFd, cols: u16, rows: u16) {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize struct that lives on this stack frame.
    unsafe {
        libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ as _, &ws);
    }
}
