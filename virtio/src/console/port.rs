//! One port of a virtio-console: its host end ([`PortBackend`]) and its data path, guest output
//! to the host ([`Port::drain_tx`]) and host input to the guest ([`Port::fill_rx`]).
//!
//! Nothing is lost while a host peer is attached, and nothing grows without bound:
//! - Guest output: one chain at a time is copied out and returned to the guest; the next one is
//!   taken only once the backend took all of it. A slow peer leaves the guest's buffers in the
//!   ring (the guest's writers block), and the peer's writability brings us back. With no peer,
//!   output is discarded, as QEMU does.
//! - Host input: read only while the guest has the port open and has posted a buffer, at most
//!   [`READ_CHUNK`] bytes ahead; the rest stays in the peer's socket until the guest posts more
//!   buffers (its notification brings us back).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use devices::chardev::{read_stream, send_iov_nonblocking, ChannelSocket, ReadOutcome};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::device::GuestMemoryMmap;

/// Most host input read ahead of the guest's buffers.
pub const READ_CHUNK: usize = 64 << 10;
/// Most guest output taken from one chain (Linux writes at most 32 KiB per buffer); the rest
/// of a longer chain is discarded and counted.
pub const MAX_CHAIN_BYTES: usize = 256 << 10;
/// Most descriptors of a chain sent straight from guest memory (a longer chain is copied).
const MAX_TX_IOVECS: usize = 64;

/// The host end of a port.
pub trait PortBackend: Send {
    /// The fds to watch now (edge-triggered, for input and output).
    fn fds(&self) -> Vec<RawFd>;
    /// Takes a waiting peer, if the backend has such a thing; true when one was taken.
    fn accept(&mut self) -> io::Result<bool> {
        Ok(false)
    }
    /// Whether a host peer is attached (told to the guest as PORT_OPEN).
    fn connected(&self) -> bool;
    /// Reads host input without blocking.
    fn read(&mut self, buf: &mut [u8]) -> ReadOutcome;
    /// Writes guest output without blocking: `Some(n)` bytes taken (0 when the peer is slow:
    /// wait for writability), `None` when there is no peer (the output is discarded).
    fn write(&mut self, buf: &[u8]) -> Option<usize>;
    /// [`PortBackend::write`] straight from several buffers (guest memory), in one call. A
    /// backend without a vectored path takes nothing here (`Some(0)`): the caller then copies
    /// the bytes and hands them to [`PortBackend::write`].
    ///
    /// # Safety
    /// Every iovec must name memory valid for reads of its length for the duration of the call.
    unsafe fn write_iov(&mut self, _iov: &[libc::iovec]) -> Option<usize> {
        Some(0)
    }
    /// The event loop no longer watches the fds of a peer that left: they may be closed.
    fn release(&mut self) {}
}

impl PortBackend for ChannelSocket {
    fn fds(&self) -> Vec<RawFd> {
        ChannelSocket::fds(self)
    }

    fn accept(&mut self) -> io::Result<bool> {
        ChannelSocket::accept(self)
    }

    fn connected(&self) -> bool {
        ChannelSocket::connected(self)
    }

    fn read(&mut self, buf: &mut [u8]) -> ReadOutcome {
        match ChannelSocket::read(self, buf) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("virtio-console: {}: {e}", self.path().display());
                ChannelSocket::disconnect(self);
                ReadOutcome::Closed
            }
        }
    }

    fn write(&mut self, buf: &[u8]) -> Option<usize> {
        ChannelSocket::write(self, buf)
    }

    unsafe fn write_iov(&mut self, iov: &[libc::iovec]) -> Option<usize> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { ChannelSocket::write_iov(self, iov) }
    }

    fn release(&mut self) {
        self.drop_retired();
    }
}

/// A peer attached for good: one end of a socket pair (the VMM's own guest-agent client), or
/// a test's. Non-blocking; once it hangs up, the port stays closed.
#[derive(Debug)]
pub struct StreamBackend {
    stream: Option<UnixStream>,
    gone: bool,
}

impl StreamBackend {
    /// Wraps `stream` (made non-blocking).
    pub fn new(stream: UnixStream) -> io::Result<StreamBackend> {
        stream.set_nonblocking(true)?;
        Ok(StreamBackend {
            stream: Some(stream),
            gone: false,
        })
    }
}

impl PortBackend for StreamBackend {
    fn fds(&self) -> Vec<RawFd> {
        match (&self.stream, self.gone) {
            (Some(s), false) => vec![s.as_raw_fd()],
            _ => Vec::new(),
        }
    }

    fn connected(&self) -> bool {
        self.stream.is_some() && !self.gone
    }

    fn read(&mut self, buf: &mut [u8]) -> ReadOutcome {
        let Some(s) = self.stream.as_mut().filter(|_| !self.gone) else {
            return ReadOutcome::Closed;
        };
        match read_stream(s, buf) {
            Ok(ReadOutcome::Closed) | Err(_) => {
                self.gone = true;
                ReadOutcome::Closed
            }
            Ok(r) => r,
        }
    }

    fn write(&mut self, buf: &[u8]) -> Option<usize> {
        use std::io::Write;
        let s = self.stream.as_mut().filter(|_| !self.gone)?;
        loop {
            return match s.write(buf) {
                Ok(n) => Some(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(0),
                Err(_) => {
                    self.gone = true;
                    None
                }
            };
        }
    }

    unsafe fn write_iov(&mut self, iov: &[libc::iovec]) -> Option<usize> {
        let s = self.stream.as_ref().filter(|_| !self.gone)?;
        // SAFETY: the caller's guarantee, passed on.
        match unsafe { send_iov_nonblocking(s.as_raw_fd(), iov) } {
            Ok(n) => Some(n),
            Err(_) => {
                self.gone = true;
                None
            }
        }
    }

    fn release(&mut self) {
        if self.gone {
            self.stream = None;
        }
    }
}

/// Errors of the rings (a guest that broke its own queue).
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The queue could not be read or written.
    #[error("queue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// Guest memory named by a descriptor is not there.
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// What a pass over a port's rings did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Chains were returned on the receive queue.
    pub rx_used: bool,
    /// Chains were returned on the transmit queue.
    pub tx_used: bool,
    /// The peer left (the caller tells the guest and stops watching its fds).
    pub hung_up: bool,
}

/// The data-path state of a port.
#[derive(Debug, Default)]
pub struct PortData {
    /// Guest output the backend has not taken yet (from `out_pos`).
    pub out: Vec<u8>,
    pub out_pos: usize,
    /// The chain being sent: (guest address, length) of its readable descriptors.
    segs: Vec<(GuestAddress, usize)>,
    /// Host input: read into `in_buf` (allocated once, [`READ_CHUNK`] bytes), not yet in a
    /// guest buffer from `in_start` to `in_end`.
    in_buf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    /// Bytes discarded from over-long chains.
    pub truncated: u64,
    /// Guest output discarded for want of a peer.
    pub discarded: u64,
    /// Bytes carried each way.
    pub to_host: u64,
    pub to_guest: u64,
}

impl PortData {
    /// Host input read but not yet in a guest buffer.
    pub fn pending_input(&self) -> &[u8] {
        &self.in_buf[self.in_start..self.in_end]
    }

    /// Puts back host input read ahead (a restore); at most [`READ_CHUNK`] bytes are kept.
    pub fn set_pending_input(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(READ_CHUNK);
        self.ensure_in_buf();
        self.in_buf[..n].copy_from_slice(&bytes[..n]);
        self.in_start = 0;
        self.in_end = n;
    }

    /// Forgets host input read ahead.
    pub fn clear_input(&mut self) {
        self.in_start = 0;
        self.in_end = 0;
    }

    fn ensure_in_buf(&mut self) {
        if self.in_buf.len() < READ_CHUNK {
            self.in_buf.resize(READ_CHUNK, 0);
        }
    }

    /// Sends pending guest output, then takes chains from `tx` until the backend pushes back.
    pub fn drain_tx(
        &mut self,
        backend: &mut dyn PortBackend,
        tx: &mut Queue,
        mem: &GuestMemoryMmap,
        progress: &mut Progress,
    ) -> Result<(), PortError> {
        let mut rechecked = false;
        loop {
            while self.out_pos < self.out.len() {
                match backend.write(&self.out[self.out_pos..]) {
                    Some(0) => return Ok(()),
                    Some(n) => {
                        self.out_pos += n;
                        self.to_host += n as u64;
                    }
                    None => {
                        self.discarded += (self.out.len() - self.out_pos) as u64;
                        self.out_pos = self.out.len();
                        if !backend.connected() {
                            progress.hung_up |= true;
                        }
                    }
                }
            }
            self.out.clear();
            self.out_pos = 0;
            let Some(chain) = tx.pop_descriptor_chain(mem) else {
                if look_again(tx, mem, &mut rechecked)? {
                    continue;
                }
                return Ok(());
            };
            rechecked = false;
            let head = chain.head_index();
            // The readable part of the chain, at most MAX_CHAIN_BYTES of it (the rest is
            // counted as truncated).
            self.segs.clear();
            let mut total = 0usize;
            for desc in chain {
                if desc.is_write_only() {
                    continue;
                }
                let len = desc.len() as usize;
                let take = len.min(MAX_CHAIN_BYTES - total);
                self.truncated += (len - take) as u64;
                if take > 0 {
                    self.segs.push((desc.addr(), take));
                    total += take;
                }
            }
            let result = self.send_chain(backend, mem, total, progress);
            tx.add_used(mem, head, 0)?;
            progress.tx_used = true;
            result?;
        }
    }

    /// Sends the chain in `segs` (`total` bytes) to the backend: straight from guest memory
    /// when every segment maps to one host range, and whatever the backend does not take now
    /// is copied into `out` (sent first next time). On an error the chain's bytes are lost.
    fn send_chain(
        &mut self,
        backend: &mut dyn PortBackend,
        mem: &GuestMemoryMmap,
        total: usize,
        progress: &mut Progress,
    ) -> Result<(), PortError> {
        if total == 0 {
            return Ok(());
        }
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_TX_IOVECS];
        let mut direct = self.segs.len() <= MAX_TX_IOVECS;
        if direct {
            for (slot, &(addr, len)) in iov.iter_mut().zip(&self.segs) {
                match mem.get_slice(addr, len) {
                    Ok(slice) => {
                        *slot = libc::iovec {
                            iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                            iov_len: len,
                        }
                    }
                    Err(_) => {
                        direct = false;
                        break;
                    }
                }
            }
        }
        let sent = if direct {
            // SAFETY: each iovec is a guest memory slice `get_slice` checked, and guest memory
            // stays mapped while the device runs.
            unsafe { backend.write_iov(&iov[..self.segs.len()]) }
        } else {
            Some(0)
        };
        let sent = match sent {
            None => {
                self.discarded += total as u64;
                if !backend.connected() {
                    progress.hung_up = true;
                }
                return Ok(());
            }
            Some(n) => n.min(total),
        };
        self.to_host += sent as u64;
        // The rest waits in `out` (the chain goes back to the guest now).
        let mut skip = sent;
        for &(addr, len) in &self.segs {
            if skip >= len {
                skip -= len;
                continue;
            }
            let at = self.out.len();
            self.out.resize(at + len - skip, 0);
            if let Err(e) = mem.read_slice(&mut self.out[at..], GuestAddress(addr.0 + skip as u64))
            {
                self.out.truncate(at);
                return Err(e.into());
            }
            skip = 0;
        }
        Ok(())
    }

    /// Moves host input into the guest's buffers on `rx` while there are some (the caller
    /// checked that the guest has the port open).
    pub fn fill_rx(
        &mut self,
        backend: &mut dyn PortBackend,
        rx: &mut Queue,
        mem: &GuestMemoryMmap,
        progress: &mut Progress,
    ) -> Result<(), PortError> {
        loop {
            // Out of buffers: ask to be told when the driver posts more (with EVENT_IDX it
            // notifies only past the index we publish), unless some came meanwhile.
            if !has_buffer(rx, mem)? && !rx.enable_notification(mem)? {
                return Ok(());
            }
            if self.in_start == self.in_end {
                self.ensure_in_buf();
                self.clear_input();
                match backend.read(&mut self.in_buf) {
                    ReadOutcome::Data(0) => return Ok(()),
                    ReadOutcome::Data(n) => self.in_end = n.min(READ_CHUNK),
                    ReadOutcome::WouldBlock => return Ok(()),
                    ReadOutcome::Closed => {
                        progress.hung_up = true;
                        return Ok(());
                    }
                }
            }
            let Some(chain) = rx.pop_descriptor_chain(mem) else {
                return Ok(());
            };
            let head = chain.head_index();
            let mut written = 0usize;
            for desc in chain {
                let pending = self.in_end - self.in_start;
                if !desc.is_write_only() || written == pending {
                    continue;
                }
                let n = (desc.len() as usize).min(pending - written);
                let from = self.in_start + written;
                if let Err(e) = mem.write_slice(&self.in_buf[from..from + n], desc.addr()) {
                    rx.add_used(mem, head, written as u32)?;
                    progress.rx_used = true;
                    self.in_start += written;
                    return Err(e.into());
                }
                written += n;
            }
            rx.add_used(mem, head, written as u32)?;
            progress.rx_used = true;
            self.to_guest += written as u64;
            self.in_start += written;
        }
    }
}

/// Out of work on `q`: publishes how far the device got (with EVENT_IDX the driver notifies
/// only past that index) and says whether to look at the ring again, because the driver posted
/// more meanwhile. Only once since the last chain was taken (`rechecked`): a ring whose index
/// says "more" with no chain to take is broken, and is not spun on.
pub fn look_again(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    rechecked: &mut bool,
) -> Result<bool, PortError> {
    Ok(q.enable_notification(mem)? && !std::mem::replace(rechecked, true))
}

/// Whether the driver has posted a buffer we have not taken.
fn has_buffer(q: &Queue, mem: &GuestMemoryMmap) -> Result<bool, PortError> {
    let avail = q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)?;
    Ok(avail.0 != q.next_avail())
}

/// Writes `bytes` into the next chain of `q` (a control message to the driver); false when
/// the driver has no buffer posted. A buffer too small gets what fits.
pub fn put_chain(q: &mut Queue, mem: &GuestMemoryMmap, bytes: &[u8]) -> Result<bool, PortError> {
    let Some(chain) = q.pop_descriptor_chain(mem) else {
        return Ok(false);
    };
    let head = chain.head_index();
    let mut written = 0usize;
    for desc in chain {
        if !desc.is_write_only() || written == bytes.len() {
            continue;
        }
        let n = (desc.len() as usize).min(bytes.len() - written);
        if mem
            .write_slice(&bytes[written..written + n], desc.addr())
            .is_err()
        {
            break;
        }
        written += n;
    }
    q.add_used(mem, head, written as u32)?;
    Ok(true)
}

/// Reads the readable part of the next chain of `q` (at most `max` bytes; a control message
/// from the driver); None when there is none.
pub fn take_chain(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    max: usize,
) -> Result<Option<Vec<u8>>, PortError> {
    let Some(chain) = q.pop_descriptor_chain(mem) else {
        return Ok(None);
    };
    let head = chain.head_index();
    let mut bytes = Vec::new();
    for desc in chain {
        if desc.is_write_only() || bytes.len() >= max {
            continue;
        }
        let n = (desc.len() as usize).min(max - bytes.len());
        let at = bytes.len();
        bytes.resize(at + n, 0);
        if mem
            .read_slice(&mut bytes[at..], GuestAddress(desc.addr().0))
            .is_err()
        {
            bytes.truncate(at);
            break;
        }
    }
    q.add_used(mem, head, 0)?;
    Ok(Some(bytes))
}
