//! The container's terminal: a pty made inside the container (from its own
//! devpts instance, after pivot_root), the slave made the controlling
//! terminal and stdio of the process, the master handed to the caller over
//! the sync socket.

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use rustix::fs::{Mode, OFlags};
use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
use rustix::termios::Winsize;

#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("create terminal: {what}: {errno}")]
    Create { what: &'static str, errno: Errno },
}

fn err(what: &'static str) -> impl Fn(rustix::io::Errno) -> TerminalError {
    move |e| TerminalError::Create {
        what,
        errno: Errno::from_raw(e.raw_os_error()),
    }
}

/// A new pty: (master, slave). Call inside the container.
pub fn open_pty(size: Option<(u16, u16)>) -> Result<(OwnedFd, OwnedFd), TerminalError> {
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
        .map_err(err("open /dev/ptmx"))?;
    grantpt(&master).map_err(err("grantpt"))?;
    unlockpt(&master).map_err(err("unlockpt"))?;
    let name = ptsname(&master, Vec::new()).map_err(err("ptsname"))?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(err("open pty slave"))?;
    if let Some((height, width)) = size {
        let ws = Winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(&slave, ws).map_err(err("set window size"))?;
    }
    Ok((master, slave))
}

/// Makes `slave` the controlling terminal (the caller must be a session
/// leader) and the process's stdin, stdout and stderr.
pub fn attach_slave(slave: &OwnedFd) -> Result<(), TerminalError> {
    rustix::process::ioctl_tiocsctty(slave).map_err(err("set controlling terminal"))?;
    let dup_err = |errno| TerminalError::Create {
        what: "dup pty slave onto stdio",
        errno,
    };
    nix::unistd::dup2_stdin(slave.as_fd()).map_err(dup_err)?;
    nix::unistd::dup2_stdout(slave.as_fd()).map_err(dup_err)?;
    nix::unistd::dup2_stderr(slave.as_fd()).map_err(dup_err)?;
    Ok(())
}
