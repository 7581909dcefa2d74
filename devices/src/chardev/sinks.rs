//! Output sinks for guest console bytes: stdout, a file, nothing, and [`LossyWriter`], the
//! adapter that turns any sink's errors into dropped output so a device never fails (or panics)
//! because the host side went away.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use super::ChardevError;

/// Writes to the process's stdout, flushing after every write so console output appears
/// immediately.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdoutSink;

impl Write for StdoutSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().lock().flush()
    }
}

/// How [`FileSink::open`] treats an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileMode {
    /// Create the file, or empty it if it exists.
    Truncate,
    /// Create the file, or append to it if it exists.
    Append,
}

/// Writes to a regular file (unbuffered: each write is a `write(2)`, so nothing is lost if the
/// VMM dies).
#[derive(Debug)]
pub struct FileSink(File);

impl FileSink {
    /// Opens (creating if needed) `path` for output, per `mode`. The fd is close-on-exec.
    pub fn open(path: impl AsRef<Path>, mode: FileMode) -> Result<FileSink, ChardevError> {
        let path = path.as_ref();
        let mut opts = OpenOptions::new();
        opts.create(true);
        match mode {
            FileMode::Truncate => opts.write(true).truncate(true),
            FileMode::Append => opts.append(true),
        };
        opts.open(path)
            .map(FileSink)
            .map_err(|source| ChardevError::File {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Another handle on the same open file (e.g. for a new VM incarnation after a reset).
    pub fn try_clone(&self) -> io::Result<FileSink> {
        self.0.try_clone().map(FileSink)
    }
}

impl Write for FileSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Discards everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl Write for NullSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Wraps a sink so that writes always succeed: bytes the inner sink cannot take (EPIPE, ENOSPC,
/// EAGAIN, a closed peer, ...) are dropped, with a warning logged once per wrapper. Devices use
/// this so host-side trouble can never turn into a device error.
pub struct LossyWriter<W: Write> {
    inner: W,
    warned: bool,
    dropped: u64,
}

impl<W: Write> LossyWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        LossyWriter {
            inner,
            warned: false,
            dropped: 0,
        }
    }

    /// Bytes dropped so far because the inner sink failed.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped
    }

    /// The wrapped sink.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    fn note_error(&mut self, what: &str, err: &io::Error, lost: usize) {
        self.dropped = self.dropped.saturating_add(lost as u64);
        if !self.warned {
            self.warned = true;
            log::warn!("console output {what} failed ({err}); output is dropped while it fails");
        }
    }
}

impl<W: Write> Write for LossyWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.write(&buf[done..]) {
                // A sink that takes nothing would loop forever: treat it as broken.
                Ok(0) => {
                    let err = io::Error::from(io::ErrorKind::WriteZero);
                    self.note_error("write", &err, buf.len() - done);
                    break;
                }
                Ok(n) => done += n.min(buf.len() - done),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.note_error("write", &e, buf.len() - done);
                    break;
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Err(e) = self.inner.flush() {
            self.note_error("flush", &e, 0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    #[test]
    fn file_sink_truncates_or_appends() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("out.log");
        FileSink::open(&path, FileMode::Truncate)
            .unwrap()
            .write_all(b"one\n")
            .unwrap();
        FileSink::open(&path, FileMode::Append)
            .unwrap()
            .write_all(b"two\n")
            .unwrap();
        let mut s = String::new();
        File::open(&path).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "one\ntwo\n");
        FileSink::open(&path, FileMode::Truncate)
            .unwrap()
            .write_all(b"three\n")
            .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");

        let missing = dir.as_path().join("no/such/dir/file");
        assert!(matches!(
            FileSink::open(missing, FileMode::Append),
            Err(ChardevError::File { .. })
        ));
    }

    /// Fails every call after `ok` bytes.
    struct Broken {
        ok: usize,
        got: Vec<u8>,
    }

    impl Write for Broken {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.got.len() >= self.ok {
                return Err(io::Error::from_raw_os_error(libc::EPIPE));
            }
            let n = buf.len().min(self.ok - self.got.len());
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EPIPE))
        }
    }

    #[test]
    fn lossy_writer_drops_on_errors() {
        let mut w = LossyWriter::new(Broken { ok: 3, got: vec![] });
        assert_eq!(w.write(b"hello").unwrap(), 5);
        assert_eq!(w.write(b"more").unwrap(), 4);
        w.flush().unwrap();
        assert_eq!(w.get_ref().got, b"hel");
        assert_eq!(w.dropped_bytes(), 6);
    }

    #[test]
    fn lossy_writer_survives_a_closed_pipe() {
        let (rx, tx) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(rx);
        let mut w = LossyWriter::new(tx);
        // EPIPE (SIGPIPE is ignored by the Rust runtime) must not surface.
        assert_eq!(w.write(b"x").unwrap(), 1);
        assert_eq!(w.dropped_bytes(), 1);
    }

    #[test]
    fn null_and_stdout_sinks_accept_everything() {
        assert_eq!(NullSink.write(b"abc").unwrap(), 3);
        assert_eq!(StdoutSink.write(b"").unwrap(), 0);
    }
}
