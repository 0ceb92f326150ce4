//! An established TCP connection's state, read and rebuilt in repair mode (`TCP_REPAIR`),
//! as CRIU's soccr does it. Used by the inet kind when a checkpoint asks for it
//! (`crd checkpoint --tcp-established`).
//!
//! **Save** works on the target's very socket (a `pidfd_getfd` copy), while the target is
//! frozen: repair mode on, then the sequence numbers of both queues (`TCP_REPAIR_QUEUE` +
//! `TCP_QUEUE_SEQ`), the bytes in them (`MSG_PEEK`, which in repair mode reads the chosen
//! queue without consuming it; the send queue split into sent and unsent with
//! `SIOCOUTQNSD`), the options the handshake agreed on (`TCP_INFO`'s `tcpi_options` and
//! window scales, `TCP_MAXSEG`: `TCP_REPAIR_OPTIONS` cannot be read), the timestamp clock
//! (`TCP_TIMESTAMP`) and the window (`TCP_REPAIR_WINDOW`). Then repair mode off, without
//! the window probe a plain `TCP_REPAIR 0` sends (`TCP_REPAIR_OFF_NO_WP`), and
//! `SO_REUSEADDR` put back (leaving repair mode clears it): the original keeps running as
//! if nothing happened. The frozen target does not read or write, but the kernel still
//! moves packets (acknowledgements shrink the send queue), so the reads are repeated until
//! two agree.
//!
//! **Restore** ([`open`] then [`seal`]): a socket in repair mode gets its sequence numbers,
//! is bound and connected (no SYN is sent in repair mode: it is simply ESTABLISHED), gets
//! the handshake's options, its timestamp clock, the received bytes in its receive queue,
//! the sent-but-unacknowledged bytes in its send queue (as sent, so the peer's
//! acknowledgements apply to them), and its window. It stays in repair mode until every
//! object of the image exists ([`seal`]), so that what it sends on leaving (a window probe,
//! the unsent bytes, retransmissions) finds the peer restored too when both ends are in
//! the image; the unsent bytes are then written as a program writes them.
//!
//! The connection's 4-tuple must be free: connect fails while the original exists.
use std::os::fd::{AsRawFd, BorrowedFd};

use serde::{Deserialize, Serialize};

use super::{KindError, sockio};
use crate::sys::SyscallError;

/// `TCP_REPAIR` values (include/uapi/linux/tcp.h).
const REPAIR_ON: i32 = 1;
const REPAIR_OFF: i32 = 0;
/// Off, without sending a window probe (4.19+).
const REPAIR_OFF_NO_WP: i32 = -1;
/// `TCP_REPAIR_QUEUE` values.
const NO_QUEUE: i32 = 0;
const RECV_QUEUE: i32 = 1;
const SEND_QUEUE: i32 = 2;
/// `TCP_REPAIR_WINDOW` (4.8+), defined here: libc declares it for some targets only.
const TCP_REPAIR_WINDOW: i32 = 29;
/// Bytes written but not yet sent (`SIOCOUTQNSD`), also declared for some targets only.
const SIOCOUTQNSD: libc::Ioctl = 0x894B;
/// `tcpi_options` bits.
const OPT_TIMESTAMPS: u8 = 1;
const OPT_SACK: u8 = 2;
const OPT_WSCALE: u8 = 4;
/// TCP option kinds `TCP_REPAIR_OPTIONS` takes.
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
/// `sk_state` of an established connection.
const ESTABLISHED: u8 = 1;
/// How many times save reads the queues before giving up on them settling.
const ATTEMPTS: usize = 20;
/// The largest piece a queue is refilled with at once (the kernel allocates the receive
/// queue's pieces whole).
const CHUNK: usize = 64 << 10;

/// What an image holds of an established TCP connection, beyond its addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpRepair {
    /// The sequence number after the last byte received (`rcv_nxt`).
    pub recv_seq: u32,
    /// The sequence number after the last byte the program wrote (`write_seq`).
    pub send_seq: u32,
    /// Received bytes the program has not read.
    pub recv_queue: Vec<u8>,
    /// Written bytes the peer has not acknowledged, oldest first; the last `unsent` of
    /// them were never sent.
    pub send_queue: Vec<u8>,
    pub unsent: u32,
    /// `TCP_MAXSEG`: restored as the MSS clamp.
    pub mss: u32,
    /// `tcpi_options`: timestamps, SACK, window scaling (`OPT_*`).
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    /// `TCP_TIMESTAMP`: the connection's timestamp clock, when timestamps are on.
    pub timestamp: u32,
    /// `TCP_REPAIR_WINDOW`; None where the kernel lacks it (before 4.8).
    pub window: Option<Window>,
}

/// `struct tcp_repair_window`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[repr(C)]
pub struct Window {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

impl TcpRepair {
    /// The bytes of the send queue that were sent (and wait for their acknowledgement).
    fn sent(&self) -> &[u8] {
        let sent = self.send_queue.len().saturating_sub(self.unsent as usize);
        &self.send_queue[..sent]
    }

    fn unsent_bytes(&self) -> &[u8] {
        &self.send_queue[self.sent().len()..]
    }

    /// For `inspect`: how much each queue holds.
    pub fn detail(&self) -> String {
        format!(
            "repair: {} bytes received unread, {} written unacknowledged ({} unsent)",
            self.recv_queue.len(),
            self.send_queue.len(),
            self.unsent
        )
    }
}

/// Reads `fd`'s connection state in repair mode and leaves it running as it was.
/// `reuseaddr`: its SO_REUSEADDR, put back after repair mode (which clears it).
pub fn save(fd: BorrowedFd<'_>, reuseaddr: bool) -> Result<TcpRepair, KindError> {
    set(fd, libc::TCP_REPAIR, REPAIR_ON, "setsockopt(TCP_REPAIR)").map_err(|e| match e {
        KindError::Syscall(ref s) if s.errno() == Some(libc::EPERM) => KindError::Other(
            "TCP_REPAIR was refused: saving an established connection needs CAP_NET_ADMIN in its network namespace"
                .into(),
        ),
        e => e,
    })?;
    let read = read_settled(fd);
    // Back as it was, whatever the reads did: no queue chosen, repair off without a
    // window probe (a kernel before 4.19 only knows the plain off), SO_REUSEADDR back.
    let _ = set(fd, libc::TCP_REPAIR_QUEUE, NO_QUEUE, "setsockopt(TCP_REPAIR_QUEUE)");
    let off = set(fd, libc::TCP_REPAIR, REPAIR_OFF_NO_WP, "setsockopt(TCP_REPAIR, OFF_NO_WP)")
        .or_else(|_| set(fd, libc::TCP_REPAIR, REPAIR_OFF, "setsockopt(TCP_REPAIR, OFF)"));
    let reuse = sockio::set_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        reuseaddr as i32,
        "setsockopt(SO_REUSEADDR)",
    );
    let saved = read?;
    off?;
    reuse?;
    Ok(saved)
}

/// Reads everything until two reads of the queues' lengths and sequence numbers agree
/// around it (acknowledgements keep arriving while the target is frozen).
fn read_settled(fd: BorrowedFd<'_>) -> Result<TcpRepair, KindError> {
    // A TCP socket's peek offset (6.9+) would make the peeks start inside the queue.
    let peek_off =
        sockio::get_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, "getsockopt(SO_PEEK_OFF)").unwrap_or(-1);
    if peek_off > 0 {
        sockio::set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0, "setsockopt(SO_PEEK_OFF)")?;
    }
    let result = (|| {
        for _ in 0..ATTEMPTS {
            if let Some(state) = read_once(fd)? {
                return Ok(state);
            }
        }
        Err(KindError::Other(format!(
            "its queues kept changing over {ATTEMPTS} reads in repair mode (packets still in flight)"
        )))
    })();
    if peek_off > 0 {
        sockio::set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, peek_off, "setsockopt(SO_PEEK_OFF)")?;
    }
    result
}

/// One read of the whole state; None if it changed meanwhile.
fn read_once(fd: BorrowedFd<'_>) -> Result<Option<TcpRepair>, KindError> {
    let before = Lengths::read(fd)?;
    let info = tcp_info(fd)?;
    if info.state != ESTABLISHED {
        return Err(KindError::Other(format!(
            "it left ESTABLISHED (state {}) while being saved",
            info.state
        )));
    }
    let mss = get_u32(fd, libc::TCP_MAXSEG, "getsockopt(TCP_MAXSEG)")?;
    let timestamp = if info.options & OPT_TIMESTAMPS != 0 {
        get_u32(fd, libc::TCP_TIMESTAMP, "getsockopt(TCP_TIMESTAMP)")?
    } else {
        0
    };
    let Some((recv_seq, recv_queue)) = queue(fd, RECV_QUEUE, before.inq)? else { return Ok(None) };
    let Some((send_seq, send_queue)) = queue(fd, SEND_QUEUE, before.outq)? else { return Ok(None) };
    let window = window(fd)?;
    let after = Lengths::read(fd)?;
    let seqs = (seq(fd, RECV_QUEUE)?, seq(fd, SEND_QUEUE)?);
    set(fd, libc::TCP_REPAIR_QUEUE, NO_QUEUE, "setsockopt(TCP_REPAIR_QUEUE)")?;
    if after != before || seqs != (recv_seq, send_seq) {
        return Ok(None);
    }
    Ok(Some(TcpRepair {
        recv_seq,
        send_seq,
        recv_queue,
        send_queue,
        unsent: before.unsent.min(before.outq) as u32,
        mss,
        options: info.options,
        snd_wscale: if info.options & OPT_WSCALE != 0 { info.snd_wscale } else { 0 },
        rcv_wscale: if info.options & OPT_WSCALE != 0 { info.rcv_wscale } else { 0 },
        timestamp,
        window,
    }))
}

/// The queues' lengths: received unread (`SIOCINQ`), written unacknowledged (`SIOCOUTQ`),
/// written unsent (`SIOCOUTQNSD`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lengths {
    inq: usize,
    outq: usize,
    unsent: usize,
}

impl Lengths {
    fn read(fd: BorrowedFd<'_>) -> Result<Self, KindError> {
        Ok(Lengths {
            inq: ioctl_int(fd, libc::FIONREAD, "ioctl(SIOCINQ)")?,
            outq: ioctl_int(fd, libc::TIOCOUTQ, "ioctl(SIOCOUTQ)")?,
            unsent: ioctl_int(fd, SIOCOUTQNSD, "ioctl(SIOCOUTQNSD)")?,
        })
    }
}

fn ioctl_int(fd: BorrowedFd<'_>, request: libc::Ioctl, call: &'static str) -> Result<usize, KindError> {
    let mut n: libc::c_int = 0;
    // SAFETY: these socket ioctls write one int through the pointer we pass.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut n) } < 0 {
        return Err(SyscallError::last(call).into());
    }
    Ok(n.max(0) as usize)
}

/// What save needs of `struct tcp_info`: its first bytes, whose layout is fixed
/// (`tcpi_state`, ..., `tcpi_options` at 5, the window scales at 6: send in the low
/// nibble, receive in the high one).
struct Info {
    state: u8,
    options: u8,
    snd_wscale: u8,
    rcv_wscale: u8,
}

fn tcp_info(fd: BorrowedFd<'_>) -> Result<Info, KindError> {
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into our buffer and updates len.
    let ret = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, buf.as_mut_ptr().cast(), &mut len)
    };
    if ret < 0 {
        return Err(SyscallError::last("getsockopt(TCP_INFO)").into());
    }
    if len < 7 {
        return Err(KindError::Other(format!("TCP_INFO gave {len} bytes, too few to read its options")));
    }
    Ok(Info { state: buf[0], options: buf[5], snd_wscale: buf[6] & 0xf, rcv_wscale: buf[6] >> 4 })
}

/// Chooses `queue` and reads its sequence number and its `len` bytes (peeking one more
/// to be sure there are no more); None if the queue holds another count by now.
fn queue(fd: BorrowedFd<'_>, queue: i32, len: usize) -> Result<Option<(u32, Vec<u8>)>, KindError> {
    let seq = seq(fd, queue)?;
    if len == 0 {
        return Ok(Some((seq, Vec::new())));
    }
    let mut buf = vec![0u8; len + 1];
    // SAFETY: recv writes at most buf.len() bytes into our buffer.
    let n = unsafe {
        libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT)
    };
    if n < 0 {
        let e = SyscallError::last("recv(MSG_PEEK) in repair mode");
        if e.errno() == Some(libc::EAGAIN) {
            return Ok(None);
        }
        return Err(e.into());
    }
    if n as usize != len {
        return Ok(None);
    }
    buf.truncate(len);
    Ok(Some((seq, buf)))
}

/// The sequence number of `queue` (`TCP_QUEUE_SEQ`).
fn seq(fd: BorrowedFd<'_>, queue: i32) -> Result<u32, KindError> {
    set(fd, libc::TCP_REPAIR_QUEUE, queue, "setsockopt(TCP_REPAIR_QUEUE)")?;
    get_u32(fd, libc::TCP_QUEUE_SEQ, "getsockopt(TCP_QUEUE_SEQ)")
}

fn window(fd: BorrowedFd<'_>) -> Result<Option<Window>, KindError> {
    let mut window = Window::default();
    let mut len = std::mem::size_of::<Window>() as libc::socklen_t;
    // SAFETY: Window is repr(C), five u32 as `struct tcp_repair_window`; getsockopt writes
    // at most `len` bytes into it.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_REPAIR_WINDOW,
            (&raw mut window).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        let e = SyscallError::last("getsockopt(TCP_REPAIR_WINDOW)");
        // Before 4.8: restore lets the kernel pick the window.
        if e.errno() == Some(libc::ENOPROTOOPT) {
            return Ok(None);
        }
        return Err(e.into());
    }
    Ok(Some(window))
}

fn get_u32(fd: BorrowedFd<'_>, name: i32, call: &'static str) -> Result<u32, KindError> {
    sockio::get_int(fd, libc::IPPROTO_TCP, name, call).map(|v| v as u32)
}

/// An integer TCP option.
fn set(fd: BorrowedFd<'_>, name: i32, value: i32, call: &'static str) -> Result<(), KindError> {
    sockio::set_int(fd, libc::IPPROTO_TCP, name, value, call)
}

/// Puts `saved` into `fd`, a fresh socket, and connects it from `local` to `remote`,
/// leaving it in repair mode (see the module documentation; [`seal`] ends it).
/// `what` names the connection in errors.
pub fn open(
    fd: BorrowedFd<'_>,
    saved: &TcpRepair,
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
    what: &str,
) -> Result<(), KindError> {
    // Room for the queues while they are refilled; the saved sizes come back in `seal`.
    let room = |queued: usize| (queued * 2 + (1 << 20)).min(i32::MAX as usize / 2) as i32;
    sockio::set_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        room(saved.recv_queue.len()),
        "setsockopt(SO_RCVBUFFORCE)",
    )?;
    sockio::set_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        room(saved.send_queue.len()),
        "setsockopt(SO_SNDBUFFORCE)",
    )?;
    set(fd, libc::TCP_REPAIR, REPAIR_ON, "setsockopt(TCP_REPAIR)").map_err(|e| match e {
        KindError::Syscall(ref s) if s.errno() == Some(libc::EPERM) => KindError::Other(format!(
            "{what}: TCP_REPAIR was refused: restoring an established connection needs CAP_NET_ADMIN"
        )),
        e => e,
    })?;
    // The queues' first sequence numbers: refilling them moves each to where it was.
    set_seq(fd, RECV_QUEUE, saved.recv_seq.wrapping_sub(saved.recv_queue.len() as u32))?;
    set_seq(fd, SEND_QUEUE, saved.send_seq.wrapping_sub(saved.send_queue.len() as u32))?;
    let in_use = || {
        KindError::Other(format!(
            "{what}: its 4-tuple is still in use: the original connection must be gone (closed, or its process killed) before restore"
        ))
    };
    // Repair mode binds whatever holds the port; connect finds an original still there.
    let local_addr = nix::sys::socket::SockaddrStorage::from(local);
    nix::sys::socket::bind(fd.as_raw_fd(), &local_addr).map_err(|e| match e {
        nix::errno::Errno::EADDRINUSE => in_use(),
        e => KindError::errno("bind", e),
    })?;
    let remote_addr = nix::sys::socket::SockaddrStorage::from(remote);
    nix::sys::socket::connect(fd.as_raw_fd(), &remote_addr).map_err(|e| match e {
        nix::errno::Errno::EADDRNOTAVAIL | nix::errno::Errno::EADDRINUSE => in_use(),
        e => KindError::errno("connect (repair mode)", e),
    })?;
    set_options(fd, saved)?;
    if saved.options & OPT_TIMESTAMPS != 0 {
        set(fd, libc::TCP_TIMESTAMP, saved.timestamp as i32, "setsockopt(TCP_TIMESTAMP)")?;
    }
    refill(fd, RECV_QUEUE, &saved.recv_queue)?;
    refill(fd, SEND_QUEUE, saved.sent())?;
    if let Some(window) = &saved.window {
        // SAFETY: Window is repr(C), five u32 as `struct tcp_repair_window`; setsockopt
        // reads exactly its size.
        let ret = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                TCP_REPAIR_WINDOW,
                (&raw const *window).cast(),
                std::mem::size_of::<Window>() as libc::socklen_t,
            )
        };
        if ret < 0 {
            return Err(SyscallError::last("setsockopt(TCP_REPAIR_WINDOW)").into());
        }
    }
    set(fd, libc::TCP_REPAIR_QUEUE, NO_QUEUE, "setsockopt(TCP_REPAIR_QUEUE)")
}

/// Ends repair mode once every object exists: the kernel sends a window probe (the peer
/// learns this end's window), and the unsent bytes are written as the program wrote them.
/// Options and buffer sizes are the caller's to set afterwards.
pub fn seal(fd: BorrowedFd<'_>, saved: &TcpRepair) -> Result<(), KindError> {
    set(fd, libc::TCP_REPAIR, REPAIR_OFF, "setsockopt(TCP_REPAIR, OFF)")?;
    write_all(fd, saved.unsent_bytes(), "send (unsent bytes)")
}

fn set_seq(fd: BorrowedFd<'_>, queue: i32, seq: u32) -> Result<(), KindError> {
    set(fd, libc::TCP_REPAIR_QUEUE, queue, "setsockopt(TCP_REPAIR_QUEUE)")?;
    set(fd, libc::TCP_QUEUE_SEQ, seq as i32, "setsockopt(TCP_QUEUE_SEQ)")
}

/// `TCP_REPAIR_OPTIONS`: what the handshake agreed on. Must come before any byte is put in
/// the send queue (the kernel refuses it once bytes were sent).
fn set_options(fd: BorrowedFd<'_>, saved: &TcpRepair) -> Result<(), KindError> {
    let mut options: Vec<[u32; 2]> = Vec::with_capacity(4);
    if saved.options & OPT_SACK != 0 {
        options.push([TCPOPT_SACK_PERM, 0]);
    }
    if saved.options & OPT_WSCALE != 0 {
        options.push([TCPOPT_WINDOW, u32::from(saved.snd_wscale) | (u32::from(saved.rcv_wscale) << 16)]);
    }
    if saved.options & OPT_TIMESTAMPS != 0 {
        options.push([TCPOPT_TIMESTAMP, 0]);
    }
    options.push([TCPOPT_MAXSEG, saved.mss]);
    // SAFETY: `[u32; 2]` has the layout of `struct tcp_repair_opt { u32 opt_code; u32
    // opt_val; }`; setsockopt reads exactly the slice's bytes.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_OPTIONS,
            options.as_ptr().cast(),
            std::mem::size_of_val(options.as_slice()) as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(SyscallError::last("setsockopt(TCP_REPAIR_OPTIONS)").into());
    }
    Ok(())
}

/// Puts `bytes` into `queue` of a socket in repair mode.
fn refill(fd: BorrowedFd<'_>, queue: i32, bytes: &[u8]) -> Result<(), KindError> {
    if bytes.is_empty() {
        return Ok(());
    }
    set(fd, libc::TCP_REPAIR_QUEUE, queue, "setsockopt(TCP_REPAIR_QUEUE)")?;
    let call = if queue == RECV_QUEUE { "send (repair, receive queue)" } else { "send (repair, send queue)" };
    write_all(fd, bytes, call)
}

/// Writes all of `bytes` without blocking, in pieces of at most [`CHUNK`], halving a
/// piece the kernel cannot allocate (as soccr does).
fn write_all(fd: BorrowedFd<'_>, bytes: &[u8], call: &'static str) -> Result<(), KindError> {
    let mut chunk = CHUNK;
    let mut done = 0;
    while done < bytes.len() {
        let piece = &bytes[done..bytes.len().min(done + chunk)];
        // SAFETY: send reads at most piece.len() bytes from our slice.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                piece.as_ptr().cast(),
                piece.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n <= 0 {
            let e = SyscallError::last(call);
            if chunk > 1024 && matches!(e.errno(), Some(libc::ENOMEM | libc::EAGAIN)) {
                chunk /= 2;
                continue;
            }
            return Err(KindError::Other(format!(
                "only {done} of {} bytes went back into its queue: {e}",
                bytes.len()
            )));
        }
        done += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_send_queue_splits_into_sent_and_unsent() {
        let r = TcpRepair { send_queue: b"abcdef".to_vec(), unsent: 2, ..Default::default() };
        assert_eq!(r.sent(), b"abcd");
        assert_eq!(r.unsent_bytes(), b"ef");
        // An unsent count larger than the queue (never saved so) leaves nothing sent.
        let odd = TcpRepair { send_queue: b"ab".to_vec(), unsent: 5, ..Default::default() };
        assert_eq!(odd.sent(), b"");
        assert_eq!(odd.unsent_bytes(), b"ab");
    }
}
