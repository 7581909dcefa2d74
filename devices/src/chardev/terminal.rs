//! The host terminal: [`StdinRaw`] puts stdin in raw mode while a console is attached to it and
//! restores it afterwards (also through [`restore_terminal`], callable from exit paths and signal
//! handlers), and [`read_fd`] reads any input fd (tty, pipe, file, `/dev/null`) without blocking
//! and with a clear end-of-input answer, so EOF never turns into a busy loop.
//!
//! Raw mode is `cfmakeraw` minus one thing: output post-processing (`OPOST`, with the
//! terminal's `ONLCR`) stays on, so the VMM's own "\n"-terminated messages still render
//! correctly. `ISIG` is off: Ctrl-C goes to the guest, and the VMM offers its own escape.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{ChardevError, ReadOutcome};

/// Stdin's attributes from before this process first switched it to raw mode.
static STDIN_ORIGINAL: OnceLock<libc::termios> = OnceLock::new();
/// Whether stdin is currently in raw mode (and so needs restoring).
static STDIN_RAW: AtomicBool = AtomicBool::new(false);

fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the fd number; an invalid fd yields 0 (EBADF).
    unsafe { libc::isatty(fd) == 1 }
}

/// Whether the process's stdin is a terminal.
pub fn stdin_is_tty() -> bool {
    is_tty(libc::STDIN_FILENO)
}

fn get_termios(fd: RawFd) -> Result<libc::termios, ChardevError> {
    // SAFETY: termios is plain old data; an all-zero value is valid and fully overwritten below.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid, writable termios for the duration of the call.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(ChardevError::Terminal {
            op: "tcgetattr",
            source: io::Error::last_os_error(),
        });
    }
    Ok(t)
}

fn set_termios(fd: RawFd, t: &libc::termios) -> Result<(), ChardevError> {
    // SAFETY: `t` points to a valid termios that tcsetattr only reads.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, t) } != 0 {
        return Err(ChardevError::Terminal {
            op: "tcsetattr",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// `cfmakeraw(orig)` but with output post-processing left on.
fn raw_termios(orig: &libc::termios) -> libc::termios {
    let mut t = *orig;
    t.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    t.c_oflag |= libc::OPOST;
    t.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
    t.c_cflag &= !(libc::CSIZE | libc::PARENB);
    t.c_cflag |= libc::CS8;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    t
}

/// Keeps the process's stdin in raw mode while alive (when stdin is a terminal); restores the
/// original attributes when dropped.
#[derive(Debug)]
pub struct StdinRaw {
    _private: (),
}

impl StdinRaw {
    /// Switches stdin to raw mode if it is a terminal and returns the guard; returns `None`
    /// (and changes nothing) when stdin is a pipe, a file, `/dev/null` or closed.
    ///
    /// Fails with [`ChardevError::TerminalInUse`] while another guard is alive.
    pub fn enter() -> Result<Option<StdinRaw>, ChardevError> {
        let fd = libc::STDIN_FILENO;
        if !is_tty(fd) {
            return Ok(None);
        }
        if STDIN_RAW.load(Ordering::SeqCst) {
            return Err(ChardevError::TerminalInUse);
        }
        let current = get_termios(fd)?;
        // The first state seen is the user's real one; keep it for every later restore.
        let original = *STDIN_ORIGINAL.get_or_init(|| current);
        set_termios(fd, &raw_termios(&original))?;
        STDIN_RAW.store(true, Ordering::SeqCst);
        Ok(Some(StdinRaw { _private: () }))
    }
}

impl Drop for StdinRaw {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Restores stdin's original terminal attributes if this process put it in raw mode.
///
/// Idempotent, and async-signal-safe (an atomic swap, a lock-free read and `tcsetattr`), so it
/// may be called from a panic hook, an exit path or a signal handler while a [`StdinRaw`] is
/// still alive.
pub fn restore_terminal() {
    if STDIN_RAW.swap(false, Ordering::SeqCst) {
        if let Some(original) = STDIN_ORIGINAL.get() {
            // Nothing useful can be done about a failure on the way out.
            let _ = set_termios(libc::STDIN_FILENO, original);
        }
    }
}

/// Whether `fd` can be watched with epoll. Regular files and `/dev/null` cannot (epoll returns
/// EPERM for them); such input is always "ready" and should be read until EOF instead.
pub fn is_pollable(fd: BorrowedFd<'_>) -> bool {
    let Ok(epoll) = Epoll::new() else {
        return false;
    };
    epoll
        .ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .is_ok()
}

/// Reads what `fd` has available without blocking, even if `fd` is in blocking mode (it is
/// polled first, so the file status flags of a shared stdin are never changed).
///
/// End of file, a hung-up terminal (EIO) or a reset connection give [`ReadOutcome::Closed`]:
/// the caller must stop polling the fd, since it will stay readable forever.
pub fn read_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<ReadOutcome> {
    if buf.is_empty() {
        return Ok(ReadOutcome::Data(0));
    }
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd; a zero timeout never blocks.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    if ready < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EINTR) | Some(libc::EAGAIN) => Ok(ReadOutcome::WouldBlock),
            _ => Err(err),
        };
    }
    if ready == 0 {
        return Ok(ReadOutcome::WouldBlock);
    }
    if pfd.revents & libc::POLLNVAL != 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n > 0 {
        // `n` is positive and at most `buf.len()`.
        return Ok(ReadOutcome::Data(n as usize));
    }
    if n == 0 {
        return Ok(ReadOutcome::Closed);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINTR) | Some(libc::EAGAIN) => Ok(ReadOutcome::WouldBlock),
        Some(libc::EIO) | Some(libc::ECONNRESET) => Ok(ReadOutcome::Closed),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Write;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    use super::*;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two fds pipe2 returns.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    /// Opens a pseudo-terminal pair: (master, slave).
    fn pty() -> (OwnedFd, OwnedFd) {
        // SAFETY: plain syscall wrappers; every return value is checked.
        unsafe {
            let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(master >= 0);
            let master = OwnedFd::from_raw_fd(master);
            assert_eq!(libc::grantpt(master.as_raw_fd()), 0);
            assert_eq!(libc::unlockpt(master.as_raw_fd()), 0);
            let mut name = [0 as libc::c_char; 128];
            assert_eq!(
                libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()),
                0
            );
            let slave = libc::open(
                name.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            );
            assert!(slave >= 0);
            (master, OwnedFd::from_raw_fd(slave))
        }
    }

    #[test]
    fn raw_mode_keeps_output_processing() {
        let (_master, slave) = pty();
        let fd = slave.as_raw_fd();
        assert!(is_tty(fd));
        let orig = get_termios(fd).unwrap();
        assert_ne!(orig.c_lflag & libc::ICANON, 0);

        set_termios(fd, &raw_termios(&orig)).unwrap();
        let raw = get_termios(fd).unwrap();
        assert_eq!(raw.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
        assert_eq!(raw.c_iflag & (libc::ICRNL | libc::IXON), 0);
        assert_ne!(raw.c_oflag & libc::OPOST, 0);
        assert_eq!(raw.c_oflag & libc::ONLCR, orig.c_oflag & libc::ONLCR);
        assert_eq!(raw.c_cc[libc::VMIN], 1);

        set_termios(fd, &orig).unwrap();
        assert_ne!(get_termios(fd).unwrap().c_lflag & libc::ICANON, 0);
    }

    /// Runs `f` with fd 0 temporarily replaced by `fd`.
    fn with_stdin<R>(fd: RawFd, f: impl FnOnce() -> R) -> R {
        // SAFETY: dup/dup2 on fds this test owns; fd 0 is put back before returning.
        let saved = unsafe { libc::dup(0) };
        assert!(saved >= 0);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::dup2(fd, 0) }, 0);
        let r = f();
        // SAFETY: as above; `saved` is closed once restored.
        unsafe {
            assert_eq!(libc::dup2(saved, 0), 0);
            libc::close(saved);
        }
        r
    }

    /// One test for everything that swaps the process's stdin, so nothing races on fd 0.
    #[test]
    fn stdin_guard_on_non_tty_and_tty() {
        // Non-tty stdin: a pipe and /dev/null. Entering is a no-op, restoring is harmless.
        let (r, _w) = pipe();
        assert!(!is_tty(r.as_raw_fd()));
        assert!(matches!(
            get_termios(r.as_raw_fd()),
            Err(ChardevError::Terminal { .. })
        ));
        with_stdin(r.as_raw_fd(), || {
            assert!(!stdin_is_tty());
            assert!(StdinRaw::enter().unwrap().is_none());
            restore_terminal();
        });
        let null = File::open("/dev/null").unwrap();
        with_stdin(null.as_raw_fd(), || {
            assert!(StdinRaw::enter().unwrap().is_none());
        });

        // A terminal on stdin: raw while guarded, restored by restore_terminal() or drop.
        let (_master, slave) = pty();
        let orig = get_termios(slave.as_raw_fd()).unwrap();
        let lflag = |fd: &OwnedFd| get_termios(fd.as_raw_fd()).unwrap().c_lflag;
        with_stdin(slave.as_raw_fd(), || {
            let guard = StdinRaw::enter().unwrap().expect("a tty gets a guard");
            assert_eq!(lflag(&slave) & libc::ICANON, 0);
            assert!(matches!(
                StdinRaw::enter(),
                Err(ChardevError::TerminalInUse)
            ));
            // The exit path restores while the guard is alive; the drop is then a no-op.
            restore_terminal();
            assert_eq!(lflag(&slave), orig.c_lflag);
            drop(guard);
            assert_eq!(lflag(&slave), orig.c_lflag);

            // And a plain drop restores too.
            let guard = StdinRaw::enter().unwrap().expect("a tty gets a guard");
            assert_eq!(lflag(&slave) & libc::ECHO, 0);
            drop(guard);
            assert_eq!(lflag(&slave), orig.c_lflag);
        });
    }

    #[test]
    fn pipe_reads_data_then_closed_without_blocking() {
        let (r, mut w) = pipe();
        let mut buf = [0u8; 8];
        assert!(is_pollable(r.as_fd()));
        assert_eq!(
            read_fd(r.as_fd(), &mut buf).unwrap(),
            ReadOutcome::WouldBlock
        );
        w.write_all(b"hi").unwrap();
        assert_eq!(read_fd(r.as_fd(), &mut buf).unwrap(), ReadOutcome::Data(2));
        assert_eq!(&buf[..2], b"hi");
        drop(w);
        for _ in 0..3 {
            assert_eq!(read_fd(r.as_fd(), &mut buf).unwrap(), ReadOutcome::Closed);
        }
    }

    #[test]
    fn dev_null_and_files_are_closed_not_pollable() {
        let null = File::open("/dev/null").unwrap();
        assert!(!is_pollable(null.as_fd()));
        let mut buf = [0u8; 8];
        assert_eq!(
            read_fd(null.as_fd(), &mut buf).unwrap(),
            ReadOutcome::Closed
        );

        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("input");
        std::fs::write(&path, b"abc").unwrap();
        let file = File::open(&path).unwrap();
        assert!(!is_pollable(file.as_fd()));
        assert_eq!(
            read_fd(file.as_fd(), &mut buf).unwrap(),
            ReadOutcome::Data(3)
        );
        assert_eq!(
            read_fd(file.as_fd(), &mut buf).unwrap(),
            ReadOutcome::Closed
        );
    }

    #[test]
    fn hung_up_pty_is_closed() {
        let (master, slave) = pty();
        let mut buf = [0u8; 8];
        assert_eq!(
            read_fd(slave.as_fd(), &mut buf).unwrap(),
            ReadOutcome::WouldBlock
        );
        drop(master);
        assert_eq!(
            read_fd(slave.as_fd(), &mut buf).unwrap(),
            ReadOutcome::Closed
        );
    }
}
