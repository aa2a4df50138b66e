//! The sync socket between the caller and the container's setup processes: a
//! `SOCK_SEQPACKET` pair, one message per packet, a one-byte tag and a payload.
//! Both ends are close-on-exec, so the caller learns that `execve` succeeded
//! when its read returns end-of-file, and that it failed when an `Error`
//! message arrives instead.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, setsockopt, socketpair, sockopt,
};
use nix::sys::time::TimeVal;

/// Largest message: an error text is cut to fit.
const MAX_MESSAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("create sync socketpair: {0}")]
    Create(Errno),
    #[error("send {what} on sync socket: {errno}")]
    Send { what: &'static str, errno: Errno },
    #[error("receive on sync socket: {0}")]
    Receive(Errno),
    #[error(
        "receive on sync socket: timed out after {0:?} waiting for the container setup process"
    )]
    Timeout(Duration),
    #[error("malformed message on sync socket (tag {0:#x})")]
    Malformed(u8),
    #[error("unexpected message on sync socket: expected {expected}, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
}

/// One message. Child → parent: `Ready`, `Pid`, `Pty` (with the master fd),
/// `Created`, `Error`. Parent → child: `Go`, `Start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The intermediate process is in its user namespace (if any) and waits
    /// for its cgroup and id maps.
    Ready,
    /// Parent to intermediate: cgroup joined, id maps written; go on.
    Go,
    /// The container process's pid, as the caller's pid namespace sees it.
    Pid(i32),
    /// Carries the pty master as `SCM_RIGHTS`.
    Pty,
    /// The init process is set up and parked before `execve`.
    Created,
    /// Parent to init: go ahead and `execve`.
    Start,
    /// Setup failed; the text is the whole error.
    Error(String),
}

impl Message {
    pub fn name(&self) -> &'static str {
        match self {
            Message::Ready => "ready",
            Message::Go => "go",
            Message::Pid(_) => "pid",
            Message::Pty => "pty",
            Message::Created => "created",
            Message::Start => "start",
            Message::Error(_) => "error",
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Message::Ready => vec![b'R'],
            Message::Go => vec![b'G'],
            Message::Pid(pid) => {
                let mut v = vec![b'P'];
                v.extend_from_slice(&pid.to_le_bytes());
                v
            }
            Message::Pty => vec![b'T'],
            Message::Created => vec![b'C'],
            Message::Start => vec![b'S'],
            Message::Error(text) => {
                let mut v = vec![b'E'];
                let mut end = text.len().min(MAX_MESSAGE - 1);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                v.extend_from_slice(&text.as_bytes()[..end]);
                v
            }
        }
    }

    fn decode(buf: &[u8]) -> Result<Message, SyncError> {
        let (&tag, rest) = buf.split_first().ok_or(SyncError::Malformed(0))?;
        Ok(match tag {
            b'R' => Message::Ready,
            b'G' => Message::Go,
            b'P' => {
                let bytes: [u8; 4] = rest.try_into().map_err(|_| SyncError::Malformed(tag))?;
                Message::Pid(i32::from_le_bytes(bytes))
            }
            b'T' => Message::Pty,
            b'C' => Message::Created,
            b'S' => Message::Start,
            b'E' => Message::Error(String::from_utf8_lossy(rest).into_owned()),
            other => return Err(SyncError::Malformed(other)),
        })
    }
}

/// One end of the sync socketpair.
#[derive(Debug)]
pub struct SyncSocket(OwnedFd);

impl SyncSocket {
    /// A connected pair, both ends close-on-exec: (parent end, child end).
    pub fn pair() -> Result<(SyncSocket, SyncSocket), SyncError> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(SyncError::Create)?;
        Ok((SyncSocket(a), SyncSocket(b)))
    }

    /// Bounds every later receive (the parent's side: a setup process that
    /// hangs must not hang the monitor).
    pub fn set_timeout(&self, timeout: Duration) -> Result<(), SyncError> {
        let tv = TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
        setsockopt(&self.0, sockopt::ReceiveTimeout, &tv).map_err(SyncError::Create)
    }

    pub fn send(&self, msg: &Message) -> Result<(), SyncError> {
        self.send_with_fd(msg, None)
    }

    pub fn send_with_fd(&self, msg: &Message, fd: Option<BorrowedFd<'_>>) -> Result<(), SyncError> {
        let buf = msg.encode();
        let iov = [IoSlice::new(&buf)];
        let fds: [RawFd; 1] = [fd.map(|f| f.as_raw_fd()).unwrap_or(-1)];
        let cmsgs: &[ControlMessage] = if fd.is_some() {
            &[ControlMessage::ScmRights(&fds)]
        } else {
            &[]
        };
        loop {
            match sendmsg::<()>(
                self.0.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(errno) => {
                    return Err(SyncError::Send {
                        what: msg.name(),
                        errno,
                    });
                }
            }
        }
    }

    /// The next message and the fd it carried; `None` at end-of-file (every
    /// peer closed its end, e.g. because `execve` succeeded).
    pub fn recv(&self) -> Result<Option<(Message, Option<OwnedFd>)>, SyncError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                self.0.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let mut fd = None;
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmRights(fds) = c {
                                for raw in fds {
                                    // SAFETY: SCM_RIGHTS just installed `raw` in
                                    // this process; nothing else owns it.
                                    #[allow(unsafe_code)]
                                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                                    fd.get_or_insert(owned);
                                }
                            }
                        }
                    }
                    let n = msg.bytes;
                    if n == 0 {
                        return Ok(None);
                    }
                    return Ok(Some((Message::decode(&buf[..n])?, fd)));
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    let tv = nix::sys::socket::getsockopt(&self.0, sockopt::ReceiveTimeout)
                        .map(|tv| {
                            Duration::from_micros(
                                tv.tv_sec() as u64 * 1_000_000 + tv.tv_usec() as u64,
                            )
                        })
                        .unwrap_or_default();
                    return Err(SyncError::Timeout(tv));
                }
                Err(errno) => return Err(SyncError::Receive(errno)),
            }
        }
    }
}

impl AsFd for SyncSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
