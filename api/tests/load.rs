//! Load: well over 100 clients at once on both doors (QMP over TCP and unix, HTTP), most of
//! them misbehaving (garbage, half messages left hanging, oversized input, leaving mid-command,
//! idling), while one well-behaved QMP client and one well-behaved HTTP client keep getting
//! correct answers to every request within a bounded time. Loopback only; bounded in clients,
//! requests and time.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::http::ApiServer;
use api::qmp::QmpServer;
use api::server::Limits;
use api::QmpEndpoint;
use common::{tmpdir, FakeVmm, Http, Qmp};
use serde_json::json;

/// Bad clients per door target and round.
const BAD_PER_TARGET: usize = 45;
/// Requests of each well-behaved client.
const GOOD_REQUESTS: usize = 150;
/// Rounds of bad clients (over all targets) the good clients live through at least.
const MIN_ROUNDS: usize = 15;
/// Slowest acceptable answer for a well-behaved client.
const MAX_LATENCY: Duration = Duration::from_secs(2);
/// The whole test stops by itself after this.
const BUDGET: Duration = Duration::from_secs(60);

#[derive(Clone)]
enum Target {
    QmpUnix(PathBuf),
    QmpTcp(SocketAddr),
    Http(PathBuf),
}

enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn open(t: &Target) -> Option<Conn> {
        match t {
            Target::QmpUnix(p) | Target::Http(p) => UnixStream::connect(p).ok().map(Conn::Unix),
            Target::QmpTcp(a) => TcpStream::connect(a).ok().map(Conn::Tcp),
        }
    }

    fn send(&mut self, b: &[u8]) {
        let _ = match self {
            Conn::Unix(s) => {
                let _ = s.set_nonblocking(true);
                s.write(b)
            }
            Conn::Tcp(s) => {
                let _ = s.set_nonblocking(true);
                s.write(b)
            }
        };
    }
}

/// One round of misbehaviour on `target`: every connection is opened first (so they are all
/// connected at once), then each does its bad thing. Returns the connections still held open.
fn bad_round(target: &Target, round: usize) -> Vec<Conn> {
    let is_http = matches!(target, Target::Http(_));
    let mut conns: Vec<Conn> = (0..BAD_PER_TARGET)
        .filter_map(|_| Conn::open(target))
        .collect();
    let mut kept = Vec::new();
    for (i, mut c) in conns.drain(..).enumerate() {
        match (i + round) % 5 {
            // Garbage, including control characters and invalid UTF-8.
            0 => c.send(b"\x00\xff}{]garbage\x01\r\n\r\n{\"execute\":\xfe}"),
            // Half a message, then silence (dropped by the stall timeout).
            1 => {
                if is_http {
                    c.send(b"GET /vm HTTP/1.1\r\nHost: x");
                } else {
                    c.send(b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"query-");
                }
                kept.push(c);
                continue;
            }
            // Oversized input.
            2 => {
                let mut big = if is_http {
                    b"GET /vm HTTP/1.1\r\nX: ".to_vec()
                } else {
                    b"{\"execute\": \"".to_vec()
                };
                big.extend(std::iter::repeat_n(b'x', 80 << 10));
                c.send(&big);
            }
            // A command, then gone before the answer.
            3 => {
                if is_http {
                    c.send(b"GET /vm HTTP/1.1\r\n\r\n");
                } else {
                    c.send(b"{\"execute\":\"qmp_capabilities\"}{\"execute\":\"query-status\"}");
                }
            }
            // Connected, silent, never reading.
            _ => {
                kept.push(c);
                continue;
            }
        }
        drop(c);
    }
    kept
}

/// Keeps a well-behaved client going until it made `GOOD_REQUESTS` requests and the crowd did
/// `MIN_ROUNDS` rounds (or the budget ran out).
fn keep_going(i: usize, rounds: &AtomicUsize, start: Instant) -> bool {
    start.elapsed() < BUDGET && (i < GOOD_REQUESTS || rounds.load(Ordering::Relaxed) < MIN_ROUNDS)
}

fn good_qmp(mut c: Qmp, worst: &AtomicUsize, rounds: &AtomicUsize, start: Instant) {
    let mut i = 0;
    while keep_going(i, rounds, start) {
        let i = {
            i += 1;
            i - 1
        };
        let t = Instant::now();
        let (req, expected) = match i % 4 {
            0 => (json!({"execute": "stop", "id": i}), json!({})),
            1 => (
                json!({"execute": "query-status", "id": i}),
                json!({"running": false, "singlestep": false, "status": "paused"}),
            ),
            2 => (json!({"execute": "cont", "id": i}), json!({})),
            _ => (
                json!({"execute": "human-monitor-command", "id": i,
                       "arguments": {"command-line": "info status"}}),
                json!("VM status: running\r\n"),
            ),
        };
        let r = c.cmd(&req);
        assert_eq!(r["id"], i, "{r}");
        assert_eq!(r["return"], expected, "{r}");
        worst.fetch_max(t.elapsed().as_millis() as usize, Ordering::Relaxed);
    }
}

fn good_http(path: &Path, worst: &AtomicUsize, rounds: &AtomicUsize, start: Instant) {
    let mut c = Http::connect(path);
    let mut i = 0;
    while keep_going(i, rounds, start) {
        let i = {
            i += 1;
            i - 1
        };
        let t = Instant::now();
        if i % 2 == 0 {
            let r = c.request("GET", "/vm");
            assert_eq!(r.status, 200);
            assert!(r.json()["vcpus"].is_array());
        } else {
            let r = c.request("GET", "/version");
            assert_eq!(r.status, 200);
        }
        worst.fetch_max(t.elapsed().as_millis() as usize, Ordering::Relaxed);
    }
}

#[test]
fn many_bad_clients_do_not_starve_a_good_one() {
    let start = Instant::now();
    let dir = tmpdir("load");
    let (vmm, handle) = FakeVmm::start();
    let limits = Limits {
        stall_timeout: Duration::from_secs(1),
        ..Limits::qmp()
    };
    let qmp_sock = dir.join("qmp.sock");
    let qmp = QmpServer::start_with_limits(
        &[
            QmpEndpoint::Unix(qmp_sock.clone()),
            QmpEndpoint::Tcp("127.0.0.1:0".into()),
        ],
        handle.clone(),
        vmm.events(),
        limits.clone(),
    )
    .unwrap();
    let api_sock = dir.join("api.sock");
    let api = ApiServer::start_with_limits(
        &api_sock,
        handle,
        Limits {
            stall_timeout: Duration::from_secs(1),
            ..Limits::http()
        },
    )
    .unwrap();
    let targets = [
        Target::QmpUnix(qmp_sock.clone()),
        Target::QmpTcp(qmp.tcp_addrs()[0]),
        Target::Http(api_sock.clone()),
    ];

    // The well-behaved clients connect first, then the crowd arrives.
    let good = Qmp::tcp(qmp.tcp_addrs()[0]).greeted(true);
    let done = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let bad: Vec<_> = targets
        .iter()
        .cloned()
        .map(|t| {
            let done = done.clone();
            let rounds = rounds.clone();
            std::thread::spawn(move || {
                let mut round = 0;
                while !done.load(Ordering::Relaxed) && start.elapsed() < BUDGET && round < 50 {
                    let held = bad_round(&t, round);
                    std::thread::sleep(Duration::from_millis(100));
                    drop(held);
                    round += 1;
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Wait until the first wave (3 × 45 clients) is in.
    while rounds.load(Ordering::Relaxed) < 3 && start.elapsed() < BUDGET {
        std::thread::sleep(Duration::from_millis(10));
    }

    let worst_qmp = Arc::new(AtomicUsize::new(0));
    let worst_http = Arc::new(AtomicUsize::new(0));
    let (wq, wh) = (worst_qmp.clone(), worst_http.clone());
    let api_path = api_sock.clone();
    let (r1, r2) = (rounds.clone(), rounds.clone());
    let g1 = std::thread::spawn(move || good_qmp(good, &wq, &r1, start));
    let g2 = std::thread::spawn(move || good_http(&api_path, &wh, &r2, start));
    let r1 = g1.join();
    let r2 = g2.join();
    done.store(true, Ordering::Relaxed);
    for b in bad {
        b.join().unwrap();
    }
    r1.expect("well-behaved QMP client");
    r2.expect("well-behaved HTTP client");
    let total_rounds = rounds.load(Ordering::Relaxed);
    assert!(
        total_rounds >= MIN_ROUNDS,
        "{total_rounds} rounds of bad clients"
    );
    assert!(
        worst_qmp.load(Ordering::Relaxed) < MAX_LATENCY.as_millis() as usize,
        "QMP worst latency {} ms",
        worst_qmp.load(Ordering::Relaxed)
    );
    assert!(
        worst_http.load(Ordering::Relaxed) < MAX_LATENCY.as_millis() as usize,
        "HTTP worst latency {} ms",
        worst_http.load(Ordering::Relaxed)
    );
    eprintln!(
        "load: {total_rounds} rounds of {BAD_PER_TARGET} bad clients; worst latency QMP {} ms, HTTP {} ms; {:?}",
        worst_qmp.load(Ordering::Relaxed),
        worst_http.load(Ordering::Relaxed),
        start.elapsed()
    );
    qmp.shutdown();
    api.shutdown();
    assert!(!qmp_sock.exists() && !api_sock.exists());
}
