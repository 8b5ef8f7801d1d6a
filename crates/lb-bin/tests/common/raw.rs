//! Raw-socket tools for the hostile-client tests: a backend that records every byte lb
//! forwards to it (per connection, split into requests with httparse), a raw client that
//! reads lb's answers and tells a closed connection from an open one, and the `lb` process
//! with its admin server (`/status`) and its resident memory.
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::Lb;

/// Generous bound for anything a test waits on (a hang guard, not a timing assertion).
pub const WAIT: Duration = Duration::from_secs(20);

/// What the backend answers a request with, given the request's raw bytes.
pub type Responder = Arc<dyn Fn(&[u8]) -> Arc<Vec<u8>> + Send + Sync>;

/// The fixed answer of [`RawBackend::ok`].
pub const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

#[derive(Default)]
struct State {
    /// Every byte each connection received, in accept order.
    conns: Vec<Vec<u8>>,
    /// Per connection: where its bytes not yet part of a complete request start.
    parsed: Vec<usize>,
    /// Per connection: bytes that cannot be the start of a request (httparse refused them).
    garbage: Vec<bool>,
    /// Complete requests, in the order they completed.
    requests: Vec<Vec<u8>>,
    /// When the last byte arrived, on any connection.
    last_byte: Option<Instant>,
}

struct Rec {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    /// Responses whose writing failed (the peer went away mid-response).
    aborted: AtomicUsize,
}

/// A TCP backend on 127.0.0.1 that records every byte it receives and answers every
/// complete request (framed by its Content-Length or chunked coding) with its responder's
/// bytes. One thread per connection.
pub struct RawBackend {
    pub addr: SocketAddr,
    rec: Arc<Rec>,
}

/// A point in the backend's record, to ask what arrived after it.
#[derive(Debug, Clone)]
pub struct Mark {
    requests: usize,
    conn_lens: Vec<usize>,
}

impl RawBackend {
    /// Answers every request with [`OK`].
    pub fn ok() -> Self {
        let ok = Arc::new(OK.to_vec());
        Self::start(Arc::new(move |_| Arc::clone(&ok)))
    }

    pub fn start(respond: Responder) -> Self {
        // A deep accept queue: lb opens upstream connections in bursts when thousands of
        // attackers stream bodies at once, and std's 128 would drop SYNs (then lb's connect
        // times out, which is the test backend's fault, not lb's).
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        socket.listen(4096).unwrap();
        let listener: TcpListener = socket.into();
        let addr = listener.local_addr().unwrap();
        let rec = Arc::new(Rec {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            aborted: AtomicUsize::new(0),
        });
        let r = Arc::clone(&rec);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if r.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let id = {
                    let mut st = r.state.lock().unwrap();
                    st.conns.push(Vec::new());
                    st.parsed.push(0);
                    st.garbage.push(false);
                    st.conns.len() - 1
                };
                let (r, respond) = (Arc::clone(&r), Arc::clone(&respond));
                std::thread::spawn(move || serve(stream, id, &r, &*respond));
            }
        });
        Self { addr, rec }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn mark(&self) -> Mark {
        let st = self.rec.state.lock().unwrap();
        Mark {
            requests: st.requests.len(),
            conn_lens: st.conns.iter().map(Vec::len).collect(),
        }
    }

    /// How many connections lb has opened to this backend.
    pub fn connections(&self) -> usize {
        self.rec.state.lock().unwrap().conns.len()
    }

    /// Responses the backend could not finish writing because lb went away.
    pub fn aborted(&self) -> usize {
        self.rec.aborted.load(Ordering::SeqCst)
    }

    /// The complete requests received after `mark`, in order.
    pub fn requests_since(&self, mark: &Mark) -> Vec<Vec<u8>> {
        self.rec.state.lock().unwrap().requests[mark.requests..].to_vec()
    }

    /// Bytes received after `mark` that are not (yet) part of a complete request, per
    /// connection that has any: a request cut off, or bytes no request can start with.
    pub fn partial_since(&self, mark: &Mark) -> Vec<Vec<u8>> {
        let st = self.rec.state.lock().unwrap();
        st.conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let from = st.parsed[i].max(mark.conn_lens.get(i).copied().unwrap_or(0));
                (from < c.len()).then(|| c[from..].to_vec())
            })
            .collect()
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Vec<u8>> {
        self.rec.state.lock().unwrap().requests.clone()
    }

    /// Waits (bounded by [`WAIT`]) until `f` holds of the complete requests received so far.
    pub fn wait_requests(&self, what: &str, f: impl Fn(&[Vec<u8>]) -> bool) {
        let deadline = Instant::now() + WAIT;
        let mut st = self.rec.state.lock().unwrap();
        while !f(&st.requests) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for the backend to receive {what}; it has {:?} and partial {:?}",
                st.requests.iter().map(|r| show(r)).collect::<Vec<_>>(),
                st.conns
                    .iter()
                    .zip(&st.parsed)
                    .filter(|(c, p)| **p < c.len())
                    .map(|(c, p)| show(&c[*p..]))
                    .collect::<Vec<_>>()
            );
            st = self.rec.changed.wait_timeout(st, left).unwrap().0;
        }
    }

    /// Waits until no byte has arrived for `quiet` (bounded by [`WAIT`]).
    pub fn wait_quiet(&self, quiet: Duration) {
        let deadline = Instant::now() + WAIT;
        loop {
            let last = self.rec.state.lock().unwrap().last_byte;
            match last {
                Some(t) if t.elapsed() < quiet => {
                    assert!(Instant::now() < deadline, "backend never went quiet");
                    std::thread::sleep(quiet - t.elapsed().min(quiet));
                }
                _ => return,
            }
        }
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.rec.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(mut stream: TcpStream, id: usize, rec: &Rec, respond: &dyn Fn(&[u8]) -> Arc<Vec<u8>>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if rec.stop.load(Ordering::SeqCst) {
            return;
        }
        let mut answers = Vec::new();
        {
            let mut st = rec.state.lock().unwrap();
            st.conns[id].extend_from_slice(&buf[..n]);
            st.last_byte = Some(Instant::now());
            while !st.garbage[id] {
                let from = st.parsed[id];
                match request_len(&st.conns[id][from..]) {
                    Ok(Some(len)) => {
                        let req = st.conns[id][from..from + len].to_vec();
                        answers.push(respond(&req));
                        st.requests.push(req);
                        st.parsed[id] = from + len;
                    }
                    Ok(None) => break,
                    Err(()) => st.garbage[id] = true,
                }
            }
            rec.changed.notify_all();
        }
        for a in answers {
            if stream.write_all(&a).is_err() {
                rec.aborted.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The length of a complete chunked body (trailers included) at the start of `b`, if it
/// is all there; `Err` if it is not chunked framing.
pub fn chunked_len(b: &[u8]) -> Result<Option<usize>, ()> {
    let mut at = 0;
    loop {
        let Some(line) = find(&b[at..], b"\r\n") else {
            return Ok(None);
        };
        let size = std::str::from_utf8(&b[at..at + line]).map_err(drop)?;
        let size = size.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16).map_err(drop)?;
        at += line + 2;
        if size == 0 {
            // Trailer fields, then the empty line.
            loop {
                let Some(line) = find(&b[at..], b"\r\n") else {
                    return Ok(None);
                };
                at += line + 2;
                if line == 0 {
                    return Ok(Some(at));
                }
            }
        }
        at += size + 2;
        if b.len() < at {
            return Ok(None);
        }
        if &b[at - 2..at] != b"\r\n" {
            return Err(());
        }
    }
}

/// The length of the request (head and body) at the start of `buf`, once it is all there.
pub fn request_len(buf: &[u8]) -> Result<Option<usize>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    body_end(req.headers, buf, head)
}

/// Where the message whose head ends at `head` ends, framed by its headers.
fn body_end(
    headers: &[httparse::Header<'_>],
    buf: &[u8],
    head: usize,
) -> Result<Option<usize>, ()> {
    let chunked = headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .contains("chunked")
    });
    if chunked {
        return Ok(chunked_len(&buf[head..])?.map(|n| head + n));
    }
    let length = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or(())
        })
        .transpose()?
        .unwrap_or(0);
    Ok((buf.len() >= head + length).then_some(head + length))
}

/// Bytes as readable text for assertion messages.
pub fn show(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

// === the client side ===

/// One response a raw client got: its status and its whole bytes.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub bytes: Vec<u8>,
}

/// The length of the response at the start of `buf` once it is all there (no HEAD or 1xx
/// requests in these tests), or `Err` for bytes that are not a response.
fn response_len(buf: &[u8]) -> Result<Option<(u16, usize)>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let status = resp.code.ok_or(())?;
    Ok(body_end(resp.headers, buf, head)?.map(|end| (status, end)))
}

/// What a raw client connection saw: the responses it got, whether lb closed the
/// connection after them, and anything left over that was not a response.
#[derive(Debug)]
pub struct Seen {
    pub answers: Vec<Answer>,
    pub closed: bool,
    pub rest: Vec<u8>,
    /// lb neither answered nor closed within the client's read timeout.
    pub stalled: bool,
}

impl Seen {
    pub fn statuses(&self) -> Vec<u16> {
        self.answers.iter().map(|a| a.status).collect()
    }
}

/// A raw client connection to lb.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
    stalled: bool,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Self {
        Self::connect_waiting(addr, WAIT)
    }

    /// A client whose reads give up after `wait` (then [`Seen::stalled`]).
    pub fn connect_waiting(addr: SocketAddr, wait: Duration) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(wait)).unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            buf: Vec::new(),
            eof: false,
            stalled: false,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        // lb may close (and reset) while a rejected request's tail is still being sent.
        let _ = self.stream.write_all(bytes);
    }

    /// Reads until `n` whole responses have arrived or lb closes, or a read times out
    /// (then the client is stalled).
    pub fn read_answers(&mut self, n: usize) -> Vec<Answer> {
        let mut out = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        while out.len() < n {
            match response_len(&self.buf) {
                Ok(Some((status, len))) => {
                    out.push(Answer {
                        status,
                        bytes: self.buf.drain(..len).collect(),
                    });
                    continue;
                }
                Ok(None) => {}
                Err(()) => break,
            }
            if self.eof || self.stalled {
                break;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => self.eof = true,
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                    self.stalled = true;
                }
                // A reset after lb's answer (it closed with unread bytes of ours).
                Err(_) => self.eof = true,
            }
        }
        out
    }

    /// Reads until lb closes the connection (or a read times out: stalled); what arrived
    /// meanwhile.
    pub fn read_to_close(&mut self) -> Vec<u8> {
        let mut chunk = vec![0u8; 64 * 1024];
        while !self.eof && !self.stalled {
            match self.stream.read(&mut chunk) {
                Ok(0) => self.eof = true,
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                    self.stalled = true;
                }
                Err(_) => self.eof = true,
            }
        }
        std::mem::take(&mut self.buf)
    }

    /// Sends `bytes` and reads `n` answers; then tells whether lb keeps the connection open
    /// by sending one more request (`probe`) on it: an open connection answers it (and
    /// that answer is returned too), a closed one reads to its end.
    pub fn exchange(&mut self, bytes: &[u8], n: usize, probe: &[u8]) -> Seen {
        self.send(bytes);
        let mut answers = self.read_answers(n);
        if self.eof || self.stalled {
            let rest = self.read_to_close();
            return Seen {
                answers,
                closed: self.eof,
                rest,
                stalled: self.stalled,
            };
        }
        // Open as far as we can tell: the probe request settles it.
        let _ = self.stream.write_all(probe);
        let more = self.read_answers(1);
        let closed = more.is_empty() && !self.stalled;
        answers.extend(more);
        let rest = if closed {
            self.read_to_close()
        } else {
            std::mem::take(&mut self.buf)
        };
        Seen {
            answers,
            closed,
            rest,
            stalled: self.stalled,
        }
    }

    pub fn close(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// A plain keep-alive-free GET through lb: (status, body), or `None` if lb did not answer
/// whole (within [`WAIT`]).
pub fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(WAIT)).ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: good\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Some((status, len))) = response_len(&out) {
            let head = find(&out, b"\r\n\r\n")? + 4;
            return Some((status, out[head..len].to_vec()));
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(k) => out.extend_from_slice(&chunk[..k]),
        }
    }
}

// === lb ===

pub use super::free_port_addr as free_addr;

/// `lb` on a free port with its admin server, probes off, in front of `backend_url`, with
/// `extra` TOML (a `[timeouts]` table, say) in its config file.
pub struct LbProc {
    pub lb: Lb,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    dir: PathBuf,
}

impl LbProc {
    pub fn start(name: &str, backend_url: &str, extra: &str) -> Self {
        let addr = free_addr();
        let admin = free_addr();
        let dir = std::env::temp_dir().join(format!("lb-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lb.toml");
        std::fs::write(
            &path,
            format!(
                "listen = [\"{addr}\"]\nadmin = \"{admin}\"\n{extra}\n[health]\ninterval = \"0s\"\n\
                 [[backend]]\nurl = \"{backend_url}\"\n"
            ),
        )
        .unwrap();
        let mut lb = Lb::spawn(&path);
        lb.wait_for("lb to listen", |lb| lb.logged("lb started") == 1);
        Self {
            lb,
            addr,
            admin,
            dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.lb.child.id()
    }

    /// lb's resident set size in KiB (`VmRSS` in `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// The admin server's `/status`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let (code, body) = try_get(self.admin, "/status").expect("admin /status answers");
        assert_eq!(code, 200);
        serde_json::from_slice(&body).unwrap()
    }

    /// The one backend's `/status` entry.
    pub fn backend_status(&self) -> serde_json::Value {
        self.status()["backends"][0].clone()
    }
}

impl Drop for LbProc {
    fn drop(&mut self) {
        let _ = self.lb.child.kill();
        let _ = self.lb.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// === figures ===

/// Whether the long form (`LB_RELIABILITY=long`) was asked for.
pub fn long() -> bool {
    std::env::var("LB_RELIABILITY").is_ok_and(|v| v == "long")
}

/// The `p`th percentile (0..=100) of `samples`, in milliseconds (0 for none).
pub fn percentile_ms(samples: &[Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut s = samples.to_vec();
    s.sort();
    let rank = ((p / 100.0) * (s.len() as f64 - 1.0)).round() as usize;
    let ms = s[rank.min(s.len() - 1)].as_secs_f64() * 1000.0;
    (ms * 100.0).round() / 100.0
}

/// Prints the test's figures as one `RELIABILITY {json}` line (collected by the long run).
pub fn report(figures: serde_json::Value) {
    println!("RELIABILITY {figures}");
}
