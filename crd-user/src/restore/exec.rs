//! `--exec`: how the root stub hands its fds to a new program.
//!
//! A program opens nearly every fd close-on-exec (Python, Go and Rust do by default), so
//! an exec that kept the originals' bits would hand the new program almost nothing: by
//! default the root stub clears FD_CLOEXEC on every fd it holds for the program
//! (`--keep-cloexec` keeps the recorded bits). With `--listen-fds` it also follows
//! systemd's socket-activation convention (sd_listen_fds(3)), which libraries in every
//! language read: the listening sockets among those fds move to fds 3, 4, ... in their
//! original order, and the program's environment says how many there are
//! (`LISTEN_FDS`), for whom (`LISTEN_PID`, the program's own PID: exec keeps it) and
//! what each is (`LISTEN_FDNAMES`, `fdN` for the socket that was fd N). Another fd in
//! the way moves above them, and crd says so.
//!
//! The root stub does this after crd's commit, just before it execs, on the fds it has
//! placed; [`layout`] is the pure part (which fd goes where), the rest is syscalls.
use std::{
    collections::HashSet,
    ffi::CString,
    os::{fd::RawFd, unix::ffi::OsStrExt},
};

use super::{RestoreError, plan::FdPlan};
use crate::types::Fd;

/// What `--exec` asks for (the CLI's view).
#[derive(Clone, Copy, Debug)]
pub struct ExecRequest<'a> {
    /// The program and its arguments.
    pub command: &'a [String],
    /// Keep every fd's recorded close-on-exec bit (`--keep-cloexec`) instead of clearing
    /// it: the program then receives only what the original would have passed on exec.
    pub keep_cloexec: bool,
    /// Hand the listening sockets over as systemd socket activation does
    /// (`--listen-fds`).
    pub listen_fds: bool,
}

/// [`ExecRequest`] checked by crd before any stub exists (an empty command or a NUL
/// byte is refused up front, not found by the root stub after the commit).
#[derive(Clone, Debug)]
pub(crate) struct Exec {
    pub argv: Vec<CString>,
    pub keep_cloexec: bool,
    pub listen_fds: bool,
}

impl Exec {
    pub(crate) fn new(request: Option<ExecRequest<'_>>) -> Result<Option<Self>, RestoreError> {
        let Some(request) = request else { return Ok(None) };
        if request.command.is_empty() {
            return Err(RestoreError::NoCommand);
        }
        let argv = request
            .command
            .iter()
            .map(|a| CString::new(a.as_str()).map_err(|_| RestoreError::BadCommand))
            .collect::<Result<_, _>>()?;
        Ok(Some(Self { argv, keep_cloexec: request.keep_cloexec, listen_fds: request.listen_fds }))
    }
}

/// An fd the root stub renumbered before the exec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdMove {
    pub from: Fd,
    pub to: Fd,
    /// A listening socket handed over with `--listen-fds` (at 3, 4, ...; listed even
    /// where it already was at its place); otherwise an fd that was in their way.
    pub listener: bool,
}

impl FdMove {
    /// The report line the stub sends crd (see `parse`).
    pub(super) fn line(&self) -> String {
        format!("{} {} {}", if self.listener { "listen" } else { "moved" }, self.from, self.to)
    }

    /// Reads a line made by [`FdMove::line`].
    pub(super) fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        let listener = match words.next()? {
            "listen" => true,
            "moved" => false,
            _ => return None,
        };
        let from = Fd(words.next()?.parse().ok()?);
        let to = Fd(words.next()?.parse().ok()?);
        words.next().is_none().then_some(Self { from, to, listener })
    }
}

/// Where each fd goes for `--listen-fds`: `fds` are the handed fds in ascending order,
/// each with whether it is a listening socket; `reserved` are numbers no fd may take
/// (the stub's report pipe). The listeners go to 3, 4, ... in order; a non-listener on
/// one of those numbers goes to the lowest number above them that no fd keeps and no
/// other move takes (a listener's old number is free again). Every listener is listed,
/// then every other move.
pub(super) fn layout(fds: &[(Fd, bool)], reserved: &[Fd]) -> Vec<FdMove> {
    let listeners: Vec<Fd> = fds.iter().filter(|(_, l)| *l).map(|(fd, _)| *fd).collect();
    let end = 3 + listeners.len() as u32;
    let in_the_way = |fd: Fd| (3..end).contains(&fd.0);
    let mut taken: HashSet<Fd> =
        fds.iter().filter(|(fd, l)| !l && !in_the_way(*fd)).map(|(fd, _)| *fd).collect();
    taken.extend(reserved);
    let mut moves: Vec<FdMove> =
        listeners.iter().zip(3..).map(|(&from, to)| FdMove { from, to: Fd(to), listener: true }).collect();
    let mut next = Fd(end);
    for &(from, _) in fds.iter().filter(|(fd, l)| !l && in_the_way(*fd)) {
        while taken.contains(&next) {
            next.0 += 1;
        }
        taken.insert(next);
        moves.push(FdMove { from, to: next, listener: false });
    }
    moves
}

/// What the root stub execs with.
pub(super) struct Prepared {
    pub moves: Vec<FdMove>,
    /// The environment, when it differs from the stub's own (`--listen-fds`).
    pub env: Option<Vec<CString>>,
}

/// In the root stub, after the commit: lays its fds out for `exec` and sets their
/// close-on-exec bits. `fds` are the fds it holds for the program, `status` its report
/// pipe (which stays where it is and close-on-exec). Errors are one line for crd.
pub(super) fn prepare(exec: &Exec, fds: &[FdPlan], status: RawFd) -> Result<Prepared, String> {
    // The table is the root stub's own by now (see `stub::setup`): the changes below
    // never reach a CLONE_FILES child stub's.
    let mut sorted: Vec<&FdPlan> = fds.iter().collect();
    sorted.sort_by_key(|f| f.fd);
    let moves = if exec.listen_fds {
        let classified: Vec<(Fd, bool)> = sorted.iter().map(|f| (f.fd, is_listening(f.fd))).collect();
        let moves = layout(&classified, &[Fd(status as u32)]);
        renumber(&moves)?;
        moves
    } else {
        Vec::new()
    };
    // Every fd at its final number, with the bit the program must see.
    for f in &sorted {
        let moved = moves.iter().find(|m| m.from == f.fd);
        let (fd, close_on_exec) = match moved {
            Some(m) if m.listener => (m.to, false),
            Some(m) => (m.to, exec.keep_cloexec && f.close_on_exec),
            None => (f.fd, exec.keep_cloexec && f.close_on_exec),
        };
        let flags = if close_on_exec { libc::FD_CLOEXEC } else { 0 };
        // SAFETY: F_SETFD on an fd this stub holds for the program.
        if unsafe { libc::fcntl(fd.0 as RawFd, libc::F_SETFD, flags) } < 0 {
            return Err(format!("fd {fd}: fcntl(F_SETFD): {}", std::io::Error::last_os_error()));
        }
    }
    let env = exec.listen_fds.then(|| listen_env(&moves));
    Ok(Prepared { moves, env })
}

/// Whether `fd` is a listening socket (SO_ACCEPTCONN); anything that is not a socket
/// is not.
fn is_listening(fd: Fd) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, a live c_int.
    let ret = unsafe {
        libc::getsockopt(
            fd.0 as RawFd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    ret == 0 && value != 0
}

/// Applies `moves` (from [`layout`]): each moving fd first goes above every number
/// involved, then to its place, so moves that swap numbers cannot overwrite each other.
fn renumber(moves: &[FdMove]) -> Result<(), String> {
    let moving: Vec<(RawFd, RawFd)> =
        moves.iter().filter(|m| m.from != m.to).map(|m| (m.from.0 as RawFd, m.to.0 as RawFd)).collect();
    let Some(above) = moving.iter().map(|&(from, to)| from.max(to)).max() else { return Ok(()) };
    let mut parked = Vec::with_capacity(moving.len());
    for &(from, to) in &moving {
        // SAFETY: F_DUPFD_CLOEXEC duplicates an fd this stub holds to a free number
        // above every number of the layout; close drops the old number, which the
        // layout gives to another fd (or to none).
        let temp = unsafe { libc::fcntl(from, libc::F_DUPFD_CLOEXEC, above + 1) };
        if temp < 0 {
            return Err(format!("fd {from}: fcntl(F_DUPFD): {}", std::io::Error::last_os_error()));
        }
        // SAFETY: see above.
        unsafe { libc::close(from) };
        parked.push((temp, to));
    }
    for (temp, to) in parked {
        // SAFETY: `to` is free (its holder, if any, moved away above, and the layout
        // never gives a kept fd's number); the parked copy then goes.
        let ret = unsafe { libc::dup3(temp, to, 0) };
        let err = std::io::Error::last_os_error();
        // SAFETY: `temp` is the stub's own copy made above.
        unsafe { libc::close(temp) };
        if ret < 0 {
            return Err(format!("fd {to}: dup3: {err}"));
        }
    }
    Ok(())
}

/// The stub's environment with systemd's three variables set for the listeners in
/// `moves` (and any it inherited from crd's own environment replaced).
fn listen_env(moves: &[FdMove]) -> Vec<CString> {
    let listeners: Vec<&FdMove> = moves.iter().filter(|m| m.listener).collect();
    let names: Vec<String> = listeners.iter().map(|m| format!("fd{}", m.from)).collect();
    let ours = [
        format!("LISTEN_PID={}", std::process::id()),
        format!("LISTEN_FDS={}", listeners.len()),
        format!("LISTEN_FDNAMES={}", names.join(":")),
    ];
    let theirs = std::env::vars_os().filter(|(k, _)| !LISTEN_VARS.contains(&k.as_bytes())).map(|(k, v)| {
        let mut pair = k.as_bytes().to_vec();
        pair.push(b'=');
        pair.extend_from_slice(v.as_bytes());
        pair
    });
    theirs
        .chain(ours.into_iter().map(String::into_bytes))
        // A variable from the environment holds no NUL; ours neither.
        .filter_map(|pair| CString::new(pair).ok())
        .collect()
}

const LISTEN_VARS: [&[u8]; 3] = [b"LISTEN_PID", b"LISTEN_FDS", b"LISTEN_FDNAMES"];

#[cfg(test)]
mod tests {
    use super::*;

    fn mv(from: u32, to: u32, listener: bool) -> FdMove {
        FdMove { from: Fd(from), to: Fd(to), listener }
    }

    fn fds(list: &[(u32, bool)]) -> Vec<(Fd, bool)> {
        list.iter().map(|&(fd, l)| (Fd(fd), l)).collect()
    }

    #[test]
    fn listeners_go_to_3_in_order_and_what_is_in_their_way_goes_above() {
        // 0-2 stdio, a pipe at 3 and 4, listeners at 5 and 9, a file at 6.
        let fds = fds(&[
            (0, false),
            (1, false),
            (2, false),
            (3, false),
            (4, false),
            (5, true),
            (6, false),
            (9, true),
        ]);
        // Listeners take 3 and 4; 5 (a listener's old number) is free for the pipe's
        // read end, 6 is kept, so the write end goes to 7.
        assert_eq!(layout(&fds, &[]), [mv(5, 3, true), mv(9, 4, true), mv(3, 5, false), mv(4, 7, false)]);
        // The report pipe's number is never given away.
        assert_eq!(
            layout(&fds, &[Fd(5)]),
            [mv(5, 3, true), mv(9, 4, true), mv(3, 7, false), mv(4, 8, false)]
        );
    }

    #[test]
    fn listeners_already_in_place_are_listed_and_nothing_else_moves() {
        assert_eq!(
            layout(&fds(&[(0, false), (3, true), (4, true), (7, false)]), &[]),
            [mv(3, 3, true), mv(4, 4, true)]
        );
        assert_eq!(layout(&fds(&[(0, false), (3, false)]), &[]), []);
    }

    #[test]
    fn report_lines_read_back() {
        for m in [mv(9, 3, true), mv(3, 10, false)] {
            assert_eq!(FdMove::parse(&m.line()), Some(m));
        }
        assert_eq!(FdMove::parse("execfail sh: ENOENT"), None);
        assert_eq!(FdMove::parse("moved 3 4 5"), None);
    }
}
