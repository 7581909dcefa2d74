//! The VMM's own client of the QEMU guest agent (`qemu-ga` in the guest, on the virtio-console
//! port `org.qemu.guest_agent.0`), speaking the protocol the way libvirt does:
//!
//! - one command at a time, each with a timeout;
//! - every new session, and every session after a timeout or an answer that does not parse,
//!   starts with a resynchronisation: the 0xFF byte (which resets the agent's parser), then
//!   `guest-sync-delimited` with a random id; the agent's 0xFF marks where its answer starts, and
//!   whatever came before it (a late answer to an abandoned command) is thrown away;
//! - the commands that end the guest's agent without an answer (`guest-shutdown`,
//!   `guest-suspend-*`) are sent and not waited for.
//!
//! The client runs on a worker thread of its own ([`AgentWorker`]): a guest whose agent never
//! answers costs a request its timeout, never the event loop, the API or the monitor.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use api::config::AGENT_PORT_NAME;
/// The time a command is given when its caller names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest answer line accepted (guest-exec-status and guest-file-read carry base64 data).
const MAX_LINE: usize = 16 << 20;

/// Commands the agent does not answer when they succeed (qga/qapi-schema.json).
const NO_REPLY: &[&str] = &[
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
];

/// Why an agent command failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AgentError {
    /// The agent did not answer in time (not running, or busy).
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent answered with an error.
    #[error("the guest agent refused `{command}`: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// QEMU's error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// Its description.
        desc: String,
    },
    /// The answer was not what the protocol says.
    #[error("the guest agent answered garbage: {0}")]
    Garbage(String),
    /// The channel to the agent is gone.
    #[error("the guest agent channel is closed")]
    Closed,
    /// The command itself is malformed.
    #[error("bad agent command: {0}")]
    BadCommand(String),
}

/// A qemu-ga client over a connected stream.
pub struct AgentClient {
    stream: UnixStream,
    buf: Vec<u8>,
    synced: bool,
    seed: u64,
}

impl AgentClient {
    /// A client on `stream` (made non-blocking; reads wait with poll and a deadline).
    pub fn new(stream: UnixStream) -> io::Result<AgentClient> {
        stream.set_nonblocking(true)?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        Ok(AgentClient {
            stream,
            buf: Vec::new(),
            synced: false,
            seed,
        })
    }

    /// Runs `command` with `arguments` and returns its `return` value (`null` for the commands
    /// that are not answered).
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        if command.is_empty() || command.starts_with("guest-sync") {
            return Err(AgentError::BadCommand(format!(
                "`{command}`: the client synchronises by itself"
            )));
        }
        if arguments.is_some_and(|a| !a.is_object()) {
            return Err(AgentError::BadCommand(
                "`arguments` must be an object".into(),
            ));
        }
        let deadline = Instant::now() + timeout;
        if !self.synced {
            self.sync(deadline, timeout)?;
        }
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a.clone();
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        self.send(&line, deadline, timeout)?;
        if NO_REPLY.contains(&command) {
            // Whatever the agent says now (nothing, or an error) belongs to no one: resync.
            self.synced = false;
            return Ok(Value::Null);
        }
        let answer = self.read_json(deadline, timeout)?;
        if let Some(r) = answer.get("return") {
            return Ok(r.clone());
        }
        if let Some(e) = answer.get("error") {
            return Err(AgentError::Refused {
                command: command.to_string(),
                class: e["class"].as_str().unwrap_or("GenericError").to_string(),
                desc: e["desc"].as_str().unwrap_or("").to_string(),
            });
        }
        self.synced = false;
        Err(AgentError::Garbage(format!(
            "no `return` or `error` in {answer}"
        )))
    }

    fn next_id(&mut self) -> u64 {
        // xorshift: a different id per sync, so a stale answer never matches.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed % (1 << 31)
    }

    /// 0xFF, guest-sync-delimited, then: skip to the agent's 0xFF, and read answers until the
    /// one with our id.
    fn sync(&mut self, deadline: Instant, timeout: Duration) -> Result<(), AgentError> {
        let id = self.next_id();
        let mut msg = vec![0xff];
        msg.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        msg.push(b'\n');
        self.send(&msg, deadline, timeout)?;
        loop {
            if let Some(p) = self.buf.iter().position(|&b| b == 0xff) {
                self.buf.drain(..=p);
                break;
            }
            self.buf.clear();
            self.fill(deadline, timeout)?;
        }
        loop {
            let v = self.read_json(deadline, timeout)?;
            if v.get("return").and_then(Value::as_u64) == Some(id) {
                self.synced = true;
                return Ok(());
            }
        }
    }

    fn send(
        &mut self,
        mut data: &[u8],
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        while !data.is_empty() {
            match self.stream.write(data) {
                Ok(0) => return Err(self.lost()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(libc::POLLOUT, deadline, timeout)?
                }
                Err(_) => return Err(self.lost()),
            }
        }
        Ok(())
    }

    /// Reads more bytes into the buffer (at least one), waiting until `deadline`.
    fn fill(&mut self, deadline: Instant, timeout: Duration) -> Result<(), AgentError> {
        let mut chunk = [0u8; 65536];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(self.lost()),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(libc::POLLIN, deadline, timeout)?
                }
                Err(_) => return Err(self.lost()),
            }
        }
    }

    /// The next JSON object the agent sent (one per line).
    fn read_json(&mut self, deadline: Instant, timeout: Duration) -> Result<Value, AgentError> {
        loop {
            if let Some(p) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=p).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\u{fffd}');
                if text.is_empty() {
                    continue;
                }
                return match serde_json::from_str::<Value>(text) {
                    Ok(v) if v.is_object() => Ok(v),
                    _ => {
                        self.synced = false;
                        let shown: String = text.chars().take(80).collect();
                        Err(AgentError::Garbage(format!("`{shown}`")))
                    }
                };
            }
            if self.buf.len() > MAX_LINE {
                self.buf.clear();
                self.synced = false;
                return Err(AgentError::Garbage(format!(
                    "an answer longer than {MAX_LINE} bytes"
                )));
            }
            self.fill(deadline, timeout)?;
        }
    }

    fn wait(
        &mut self,
        events: i16,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.synced = false;
            return Err(AgentError::Timeout(timeout));
        }
        let mut pfd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n == 0 {
            self.synced = false;
            return Err(AgentError::Timeout(timeout));
        }
        Ok(())
    }

    fn lost(&mut self) -> AgentError {
        self.synced = false;
        AgentError::Closed
    }
}

/// A command for the worker, and where its result goes.
pub struct AgentJob {
    /// The command.
    pub command: String,
    /// Its arguments (an object), if any.
    pub arguments: Option<Value>,
    /// How long to wait for the answer.
    pub timeout: Duration,
    /// Called with the result, on the worker thread.
    pub reply: Box<dyn FnOnce(Result<Value, AgentError>) + Send>,
}

/// The agent client on a thread of its own, taking one job at a time.
pub struct AgentWorker {
    tx: Mutex<Option<mpsc::Sender<AgentJob>>>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl AgentWorker {
    /// Starts the worker over `client`.
    pub fn start(mut client: AgentClient) -> io::Result<AgentWorker> {
        let (tx, rx) = mpsc::channel::<AgentJob>();
        let thread = thread::Builder::new().name("agent".into()).spawn(move || {
            for job in rx {
                let r = client.execute(&job.command, job.arguments.as_ref(), job.timeout);
                (job.reply)(r);
            }
        })?;
        Ok(AgentWorker {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues `job`; its reply is called with `Closed` at once if the worker is gone.
    pub fn submit(&self, job: AgentJob) {
        let tx = crate::lock(&self.tx);
        match tx.as_ref().map(|t| t.send(job)) {
            Some(Ok(())) => {}
            Some(Err(mpsc::SendError(job))) => (job.reply)(Err(AgentError::Closed)),
            None => {}
        }
    }

    /// Runs `command` and waits for its result (for callers on threads of their own).
    pub fn call(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let (tx, rx) = mpsc::channel();
        self.submit(AgentJob {
            command: command.to_string(),
            arguments,
            timeout,
            reply: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        rx.recv().unwrap_or(Err(AgentError::Closed))
    }
}

impl Drop for AgentWorker {
    fn drop(&mut self) {
        crate::lock(&self.tx).take();
        if let Some(t) = crate::lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    /// A fake qemu-ga on the other end: answers like the real one, or misbehaves as told.
    fn fake_agent(stream: UnixStream, mode: &'static str) -> thread::JoinHandle<()> {
        thread::spawn(move || {
            let mut out = stream.try_clone().unwrap();
            let mut rd = io::BufReader::new(stream);
            let mut line = Vec::new();
            let mut first = true;
            loop {
                line.clear();
                if rd.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                    return;
                }
                let text: Vec<u8> = line.iter().copied().filter(|&b| b != 0xff).collect();
                let v: Value = match serde_json::from_slice(&text) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                let cmd = v["execute"].as_str().unwrap_or("").to_string();
                if first && mode == "stale" {
                    // An answer left over from an earlier session comes first.
                    out.write_all(b"{\"return\": {\"stale\": true}}\n").unwrap();
                }
                first = false;
                match cmd.as_str() {
                    "guest-sync-delimited" => {
                        let mut b = vec![0xff];
                        b.extend(json!({"return": v["arguments"]["id"]}).to_string().bytes());
                        b.push(b'\n');
                        out.write_all(&b).unwrap();
                    }
                    "guest-ping" if mode == "silent" => {}
                    "guest-ping" if mode == "garbage" => out.write_all(b"}}not json{{\n").unwrap(),
                    "guest-ping" => out.write_all(b"{\"return\": {}}\n").unwrap(),
                    "guest-shutdown" => {}
                    _ => out
                        .write_all(
                            format!(
                                "{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"The command {cmd} has not been found\"}}}}\n"
                            )
                            .as_bytes(),
                        )
                        .unwrap(),
                }
            }
        })
    }

    fn client(mode: &'static str) -> (AgentClient, thread::JoinHandle<()>) {
        let (a, b) = UnixStream::pair().unwrap();
        (AgentClient::new(a).unwrap(), fake_agent(b, mode))
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn syncs_then_answers_and_reports_refusals() {
        let (mut c, _t) = client("stale");
        assert_eq!(c.execute("guest-ping", None, T), Ok(json!({})));
        match c.execute("guest-nope", Some(&json!({})), T) {
            Err(AgentError::Refused { class, .. }) => assert_eq!(class, "CommandNotFound"),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.execute("guest-shutdown", None, T), Ok(Value::Null));
        assert!(matches!(
            c.execute("guest-sync", None, T),
            Err(AgentError::BadCommand(_))
        ));
        assert!(matches!(
            c.execute("guest-ping", Some(&json!([1])), T),
            Err(AgentError::BadCommand(_))
        ));
    }

    #[test]
    fn a_silent_agent_times_out_and_garbage_is_an_error_not_a_hang() {
        let (mut c, _t) = client("silent");
        let t0 = Instant::now();
        let short = Duration::from_millis(300);
        assert_eq!(
            c.execute("guest-ping", None, short),
            Err(AgentError::Timeout(short))
        );
        assert!(t0.elapsed() < Duration::from_secs(3));
        let (mut g, _t) = client("garbage");
        assert!(matches!(
            g.execute("guest-ping", None, T),
            Err(AgentError::Garbage(_))
        ));
        // The next command resynchronises first and still gets its answer path.
        assert!(matches!(
            g.execute("guest-info", None, T),
            Err(AgentError::Refused { .. })
        ));
    }

    #[test]
    fn a_closed_channel_is_reported() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut c = AgentClient::new(a).unwrap();
        assert_eq!(c.execute("guest-ping", None, T), Err(AgentError::Closed));
    }

    #[test]
    fn the_worker_serialises_and_replies() {
        let (a, b) = UnixStream::pair().unwrap();
        let _t = fake_agent(b, "");
        let w = AgentWorker::start(AgentClient::new(a).unwrap()).unwrap();
        for _ in 0..3 {
            assert_eq!(w.call("guest-ping", None, T), Ok(json!({})));
        }
    }
}
