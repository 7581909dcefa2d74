//! virtio-console tests: the control protocol, the data path and the state contract, driven
//! through `virtio_queue::mock::MockSplitQueue` with socket-pair peers.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use super::control::*;
use super::*;
use crate::test_rig::*;

/// The console's control queue, as its driver uses it.
trait ConsoleRig {
    fn send_ctrl(&mut self, dev: &mut Console, msg: ControlMsg);
    fn ctrl_msgs(&mut self, dev: &mut Console) -> Vec<ControlMsg>;
}

impl ConsoleRig for Rig {
    fn send_ctrl(&mut self, dev: &mut Console, msg: ControlMsg) {
        self.post(CTRL_TX as usize, Some(&msg.encode()), 0);
        dev.process_queue(CTRL_TX);
    }

    /// Control messages the device handed over (posting a buffer for each one waiting).
    fn ctrl_msgs(&mut self, dev: &mut Console) -> Vec<ControlMsg> {
        let q = CTRL_RX as usize;
        for _ in 0..dev.ctrl_out.len() {
            let slot = self.slots[q];
            let addr = self.post(q, None, 4096);
            self.addrs.insert((q, slot), addr);
        }
        dev.process_queue(CTRL_RX);
        let used = self.used(q);
        used.iter()
            .map(|&(id, len)| {
                let addr = self.addrs[&(q, id as u16)];
                let mut b = vec![0u8; len as usize];
                self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                let mut m = ControlMsg::decode(&b).unwrap();
                m.data = b[HEADER_LEN..].to_vec();
                m
            })
            .collect()
    }
}

type Changes = Arc<Mutex<Vec<(String, bool)>>>;

/// A console on port 0 and a channel "org.test.a" on port 1 over these backends.
fn two_ports(port0: Box<dyn PortBackend>, port1: Box<dyn PortBackend>) -> Console {
    Console::new(vec![
        PortConfig {
            id: 0,
            label: "console0".into(),
            name: None,
            console: true,
            backend: port0,
        },
        PortConfig {
            id: 1,
            label: "channel0".into(),
            name: Some("org.test.a".into()),
            console: false,
            backend: port1,
        },
    ])
    .unwrap()
}

fn stream(s: UnixStream) -> Box<dyn PortBackend> {
    Box::new(StreamBackend::new(s).unwrap())
}

/// [`two_ports`] with socket-pair peers, and the VSERPORT_CHANGE reports.
fn console() -> (Console, UnixStream, UnixStream, Changes) {
    let (c0, p0) = UnixStream::pair().unwrap();
    let (c1, p1) = UnixStream::pair().unwrap();
    let mut dev = two_ports(stream(c0), stream(c1));
    let changes: Changes = Arc::default();
    let c = changes.clone();
    dev.set_port_events(Box::new(move |id: &str, open: bool| {
        c.lock().unwrap().push((id.to_string(), open))
    }));
    (dev, p0, p1, changes)
}

/// Runs the driver's side of the handshake up to both ports ready.
fn handshake(r: &mut Rig, dev: &mut Console) -> Vec<ControlMsg> {
    r.send_ctrl(dev, ControlMsg::new(0, DEVICE_READY, 1));
    r.send_ctrl(dev, ControlMsg::new(0, PORT_READY, 1));
    r.send_ctrl(dev, ControlMsg::new(1, PORT_READY, 1));
    r.ctrl_msgs(dev)
}

#[test]
fn layout_and_config() {
    let (dev, ..) = console();
    assert_eq!(dev.device_type(), 3);
    assert_eq!(dev.queue_max_sizes().len(), 6);
    let mut cfg = [0xffu8; 12];
    dev.read_config(0, &mut cfg);
    assert_eq!(cfg, [0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(rx_queue(0), 0);
    assert_eq!(rx_queue(1), 4);
    assert_eq!(rx_queue(3), 8);
    assert_eq!(port_of_queue(5), Some((1, false)));
    assert_eq!(port_of_queue(8), Some((3, true)));
    assert_eq!(port_of_queue(2), None);
}

#[test]
fn handshake_in_qemus_order_and_queued_while_the_driver_has_no_buffer() {
    let (mut dev, ..) = console();
    let mut r = Rig::new(6);
    r.activate(&mut dev);
    // No control buffer is posted yet: the answers wait, none is lost.
    let msgs = handshake(&mut r, &mut dev);
    let got: Vec<(u32, u16, u16, Vec<u8>)> = msgs
        .into_iter()
        .map(|m| (m.id, m.event, m.value, m.data))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, DEVICE_ADD, 1, vec![]),
            (1, DEVICE_ADD, 1, vec![]),
            (0, CONSOLE_PORT, 1, vec![]),
            (0, PORT_OPEN, 1, vec![]),
            (1, PORT_NAME, 1, b"org.test.a\0".to_vec()),
            (1, PORT_OPEN, 1, vec![]),
        ]
    );
}

#[test]
fn the_device_asks_for_every_next_notification() {
    // With EVENT_IDX a driver kicks only when its avail index passes the avail_event the device
    // published: a device that never publishes it hears the first message and no other.
    let (mut dev, _p0, mut p1, _) = console();
    let mut r = Rig::new(6);
    r.activate(&mut dev);
    handshake(&mut r, &mut dev);
    assert_eq!(
        r.avail_event(CTRL_TX as usize),
        3,
        "three control messages taken"
    );
    r.send_ctrl(&mut dev, ControlMsg::new(1, PORT_OPEN, 1));
    assert_eq!(r.avail_event(CTRL_TX as usize), 4);
    // A transmit chain taken, and the receive queue found empty: both ask for the next kick.
    r.post(5, Some(b"x"), 0);
    dev.process_queue(5);
    assert_eq!(r.avail_event(5), 1);
    p1.write_all(b"y").unwrap();
    let idx = dev.fd_ports().iter().position(|&(_, i)| i == 1).unwrap();
    dev.process_backend(idx, EventSet::IN);
    assert_eq!(
        r.avail_event(4),
        0,
        "no buffer yet: told to kick at the first one"
    );
    r.post(4, None, 64);
    dev.process_queue(4);
    assert_eq!(r.used(4), vec![(0, 1)]);
}

#[test]
fn a_hostile_control_queue_is_counted_and_ignored() {
    let (mut dev, ..) = console();
    let mut r = Rig::new(6);
    r.activate(&mut dev);
    r.send_ctrl(&mut dev, ControlMsg::new(0, 99, 1)); // unknown event
    r.send_ctrl(&mut dev, ControlMsg::new(77, PORT_READY, 1)); // no such port
    r.send_ctrl(&mut dev, ControlMsg::new(1234, PORT_OPEN, 1)); // no such port
    r.post(CTRL_TX as usize, Some(&[1, 2, 3]), 0); // too short
    dev.process_queue(CTRL_TX);
    assert_eq!(dev.counters().bogus_control, 4);
    assert!(r.ctrl_msgs(&mut dev).is_empty());
    // A flood of PORT_READY with no buffer posted: bounded, never a growing queue.
    for _ in 0..200 {
        r.post(
            CTRL_TX as usize,
            Some(&ControlMsg::new(1, PORT_READY, 1).encode()),
            0,
        );
    }
    dev.process_queue(CTRL_TX);
    assert!(dev.ctrl_out.len() <= dev.ctrl_capacity());
    assert!(dev.counters().control_dropped > 0);
    // The device still works: every chain was returned.
    assert_eq!(r.used(CTRL_TX as usize).len(), 204);
}

#[test]
fn data_both_ways_and_vserport_change() {
    let (mut dev, _p0, mut p1, changes) = console();
    let mut r = Rig::new(6);
    r.activate(&mut dev);
    handshake(&mut r, &mut dev);
    // Host input waits in the socket until the guest opens its end.
    p1.write_all(b"hello guest").unwrap();
    let rx_buf = r.post(4, None, 4096);
    dev.process_queue(4);
    assert!(r.used(4).is_empty(), "the guest has not opened the port");
    r.send_ctrl(&mut dev, ControlMsg::new(1, PORT_OPEN, 1));
    assert_eq!(
        *changes.lock().unwrap(),
        vec![("channel0".to_string(), true)]
    );
    assert_eq!(r.used(4), vec![(0, 11)]);
    assert_eq!(r.read(rx_buf, 11), b"hello guest");
    // Guest output reaches the peer.
    r.post(5, Some(b"hello host"), 0);
    dev.process_queue(5);
    assert_eq!(r.used(5), vec![(0, 0)]);
    let mut got = [0u8; 10];
    p1.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello host");
    r.send_ctrl(&mut dev, ControlMsg::new(1, PORT_OPEN, 0));
    assert_eq!(
        changes.lock().unwrap().last(),
        Some(&("channel0".to_string(), false))
    );
}

#[test]
fn a_slow_peer_throttles_the_guest_and_nothing_is_lost() {
    let (mut dev, _p0, mut p1, _) = console();
    let mut r = Rig::new(6);
    r.activate(&mut dev);
    handshake(&mut r, &mut dev);
    r.send_ctrl(&mut dev, ControlMsg::new(1, PORT_OPEN, 1));
    // Every chain different, so that a byte out of order shows.
    let chunk_of = |c: u32| -> Vec<u8> { (0..16384u32).map(|i| ((i + c) % 251) as u8).collect() };
    let chunk = chunk_of(0);
    let chains = 200;
    for c in 0..chains {
        r.post(5, Some(&chunk_of(c as u32)), 0);
    }
    dev.process_queue(5);
    let taken = r.used(5).len();
    assert!(
        taken < chains,
        "the socket never pushed back ({taken} chains taken)"
    );
    // The peer reads everything; each time it drains, the device is woken (its fd's writability).
    let idx = dev.fd_ports().iter().position(|&(_, i)| i == 1).unwrap();
    let want = chunk.len() * chains;
    let mut got = Vec::with_capacity(want);
    let mut buf = vec![0u8; 1 << 16];
    p1.set_nonblocking(true).unwrap();
    let mut idle = 0;
    while got.len() < want && idle < 1000 {
        match p1.read(&mut buf) {
            Ok(n) if n > 0 => {
                got.extend_from_slice(&buf[..n]);
                idle = 0;
            }
            _ => idle += 1,
        }
        dev.process_backend(idx, EventSet::OUT);
    }
    let later = r.used(5);
    assert_eq!(got.len(), want);
    let bad: Vec<usize> = got
        .chunks(chunk.len())
        .enumerate()
        .filter(|(c, bytes)| *bytes != chunk_of(*c as u32).as_slice())
        .map(|(c, _)| c)
        .collect();
    assert!(bad.is_empty(), "chains out of order or damaged: {bad:?}");
    assert_eq!(taken + later.len(), chains);
}

#[test]
fn no_peer_discards_output_and_the_guest_is_told_as_peers_come_and_go() {
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let path = dir.as_path().join("ch.sock");
    let sock = devices::chardev::ChannelSocket::bind(&path).unwrap();
    let mut dev = Console::new(vec![PortConfig {
        id: 1,
        label: "channel0".into(),
        name: Some("org.test.b".into()),
        console: false,
        backend: Box::new(sock),
    }])
    .unwrap();
    let mut r = Rig::new(dev.queue_max_sizes().len());
    r.activate(&mut dev);
    r.send_ctrl(&mut dev, ControlMsg::new(0, DEVICE_READY, 1));
    r.send_ctrl(&mut dev, ControlMsg::new(1, PORT_READY, 1));
    let opens = |msgs: &[ControlMsg]| -> Vec<u16> {
        msgs.iter()
            .filter(|m| m.event == PORT_OPEN)
            .map(|m| m.value)
            .collect()
    };
    assert_eq!(
        opens(&r.ctrl_msgs(&mut dev)),
        Vec::<u16>::new(),
        "no peer yet"
    );
    r.send_ctrl(&mut dev, ControlMsg::new(1, PORT_OPEN, 1));
    r.post(5, Some(b"into the void"), 0);
    dev.process_queue(5);
    assert_eq!(r.used(5).len(), 1, "discarded, the guest is not held up");
    // A peer connects (the listener's event): PORT_OPEN 1.
    let mut peer = UnixStream::connect(&path).unwrap();
    dev.process_backend(0, EventSet::IN);
    assert!(dev.backend_fds_changed());
    assert_eq!(opens(&r.ctrl_msgs(&mut dev)), vec![1]);
    r.post(5, Some(b"ping"), 0);
    dev.process_queue(5);
    let mut got = [0u8; 4];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    // It leaves: PORT_OPEN 0 (noticed on its fd's hang-up).
    drop(peer);
    r.post(4, None, 4096);
    dev.process_backend(1, EventSet::IN);
    assert_eq!(opens(&r.ctrl_msgs(&mut dev)), vec![0]);
    assert!(dev.backend_fds_changed());
    assert_eq!(dev.backend_fds().len(), 1);
}

#[test]
fn state_round_trips_and_a_restored_console_tells_the_guest_its_peers_are_gone() {
    let (mut dev, _p0, p1, _) = console();
    let mut r = Rig::new(6);
    r.activate(&mut dev);
    handshake(&mut r, &mut dev);
    r.send_ctrl(&mut dev, ControlMsg::new(1, PORT_OPEN, 1));
    // Something in flight: a control message with no buffer, and host input with no buffer.
    r.send_ctrl(&mut dev, ControlMsg::new(0, DEVICE_READY, 1));
    let saved = dev.save_state();
    // A fresh console of the same shape takes it, and saves the same.
    let (mut fresh, ..) = console();
    fresh.restore_state(&saved).unwrap();
    assert_eq!(fresh.save_state(), saved);
    // A different shape is refused.
    let (c, _p) = UnixStream::pair().unwrap();
    let mut other = Console::new(vec![PortConfig {
        id: 1,
        label: "x".into(),
        name: Some("other".into()),
        console: false,
        backend: stream(c),
    }])
    .unwrap();
    assert!(other.restore_state(&saved).is_err());
    // Restored where port 1's peer is gone: the guest hears PORT_OPEN 0 after the queued ones.
    drop(p1);
    let (c0, _q0) = UnixStream::pair().unwrap();
    let mut gone = StreamBackend::new(UnixStream::pair().unwrap().0).unwrap();
    let _ = gone.read(&mut [0u8; 1]); // its peer is already closed: EOF
    let mut restored = two_ports(stream(c0), Box::new(gone));
    restored.restore_state(&saved).unwrap();
    let mut r2 = Rig::new(6);
    r2.activate(&mut restored);
    let msgs = r2.ctrl_msgs(&mut restored);
    let tail: Vec<(u32, u16, u16)> = msgs.iter().map(|m| (m.id, m.event, m.value)).collect();
    assert_eq!(
        tail,
        vec![(0, DEVICE_ADD, 1), (1, DEVICE_ADD, 1), (1, PORT_OPEN, 0)]
    );
}

#[test]
fn restore_refuses_oversized_buffers() {
    let (dev, ..) = console();
    let mut s = match dev.save_state() {
        VirtioDeviceState::Console(s) => s,
        _ => unreachable!(),
    };
    s.ports[1].pending_output = vec![0; MAX_CHAIN_BYTES + 1];
    let (mut fresh, ..) = console();
    assert!(fresh.restore_state(&VirtioDeviceState::Console(s)).is_err());
}
