//! A raw HTTP/2 client that writes whatever frames a test asks for (hostile ones included),
//! a backend that records the exact bytes lb forwards, and the measurements the attack tests
//! take of the `lb` process (RSS, `/metrics`) and of well-behaved clients beside the attack.
#![allow(dead_code, unreachable_pub)]
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Lb;

/// Generous bound for anything a test waits on: a busy machine is slow, never this slow.
pub const WAIT: Duration = Duration::from_secs(20);

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const CONTINUATION: u8 = 9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 1;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 4;

pub const NO_ERROR: u32 = 0;
pub const PROTOCOL_ERROR: u32 = 1;
pub const CANCEL: u32 = 8;
pub const COMPRESSION_ERROR: u32 = 9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame: the 9-byte header, then `payload`.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    assert!(len < 1 << 24);
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

pub fn settings(values: &[(u16, u32)]) -> Vec<u8> {
    let mut payload = Vec::new();
    for (id, v) in values {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&v.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &payload)
}

pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

pub fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

/// An HPACK integer with an `n`-bit prefix, the prefix byte's other bits being `flags`.
pub fn hpack_int(out: &mut Vec<u8>, flags: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(flags | u8::try_from(value).unwrap());
        return;
    }
    out.push(flags | u8::try_from(max).unwrap());
    value -= max;
    while value >= 128 {
        out.push(u8::try_from(value % 128).unwrap() | 0x80);
        value /= 128;
    }
    out.push(u8::try_from(value).unwrap());
}

/// A plain (not Huffman) HPACK string literal.
pub fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// A header block of literal fields without indexing and with literal names: every byte
/// the test wrote reaches lb's decoder as written (uppercase, CR, NUL included).
pub fn hpack_literal(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_str(&mut out, name);
        hpack_str(&mut out, value);
    }
    out
}

/// The fields of a plain GET to `path`: what most cases start from.
pub fn get_fields(path: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    vec![
        (b":method".to_vec(), b"GET".to_vec()),
        (b":scheme".to_vec(), b"http".to_vec()),
        (b":authority".to_vec(), b"a.example".to_vec()),
        (b":path".to_vec(), path.as_bytes().to_vec()),
    ]
}

pub fn block(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let refs: Vec<(&[u8], &[u8])> = fields
        .iter()
        .map(|(n, v)| (n.as_slice(), v.as_slice()))
        .collect();
    hpack_literal(&refs)
}

// --- HPACK decoding (RFC 7541), enough to read lb's responses whatever its encoder chooses.

const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Code lengths of the HPACK Huffman code (RFC 7541 Appendix B) for bytes 0..=255; the code
/// is canonical, so the lengths alone define it (EOS, 30 bits of ones, is never a symbol).
const HUFFMAN_LENGTHS: [u8; 256] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
];

fn huffman_decode(bits: &[u8]) -> Option<Vec<u8>> {
    // Canonical code: symbols sorted by (length, value) take consecutive codes.
    let mut symbols: Vec<u8> = (0..=255).collect();
    symbols.sort_by_key(|&s| (HUFFMAN_LENGTHS[usize::from(s)], s));
    let mut first = [0u64; 31]; // first code of each length
    let mut count = [0u64; 31];
    let mut offset = [0usize; 31]; // index in `symbols` of that first code
    for &s in &symbols {
        count[usize::from(HUFFMAN_LENGTHS[usize::from(s)])] += 1;
    }
    let (mut code, mut at) = (0u64, 0usize);
    for len in 1..31 {
        first[len] = code;
        offset[len] = at;
        code = (code + count[len]) << 1;
        at += usize::try_from(count[len]).unwrap();
    }
    let mut out = Vec::new();
    let (mut code, mut len) = (0u64, 0usize);
    for byte in bits {
        for i in (0..8).rev() {
            code = code << 1 | u64::from(byte >> i & 1);
            len += 1;
            if len > 30 {
                return None;
            }
            if code >= first[len] && code - first[len] < count[len] {
                let k = usize::try_from(code - first[len]).unwrap();
                out.push(symbols[offset[len] + k]);
                code = 0;
                len = 0;
            }
        }
    }
    // What is left must be padding: fewer than 8 bits, all ones.
    (len < 8 && code == (1 << len) - 1).then_some(out)
}

/// An HPACK decoder with its dynamic table (lb's encoder may index what it sends).
#[derive(Default)]
pub struct Hpack {
    table: Vec<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max: usize,
}

impl Hpack {
    pub fn new() -> Self {
        Self {
            max: 4096,
            ..Self::default()
        }
    }

    fn int(src: &[u8], at: &mut usize, n: u32) -> Option<usize> {
        let mask = (1usize << n) - 1;
        let mut v = usize::from(*src.get(*at)?) & mask;
        *at += 1;
        if v < mask {
            return Some(v);
        }
        let mut shift = 0;
        loop {
            let b = *src.get(*at)?;
            *at += 1;
            v = v.checked_add(usize::from(b & 0x7f).checked_shl(shift)?)?;
            shift += 7;
            if b & 0x80 == 0 {
                return Some(v);
            }
            if shift > 28 {
                return None;
            }
        }
    }

    fn string(src: &[u8], at: &mut usize) -> Option<Vec<u8>> {
        let huffman = src.get(*at)? & 0x80 != 0;
        let len = Self::int(src, at, 7)?;
        let raw = src.get(*at..at.checked_add(len)?)?;
        *at += len;
        if huffman {
            huffman_decode(raw)
        } else {
            Some(raw.to_vec())
        }
    }

    fn get(&self, index: usize) -> Option<(Vec<u8>, Vec<u8>)> {
        if index == 0 {
            return None;
        }
        if let Some((n, v)) = STATIC.get(index - 1) {
            return Some((n.as_bytes().to_vec(), v.as_bytes().to_vec()));
        }
        self.table.get(index - 62).cloned()
    }

    fn evict(&mut self) {
        while self.size > self.max {
            let Some((n, v)) = self.table.pop() else {
                break;
            };
            self.size -= n.len() + v.len() + 32;
        }
    }

    fn insert(&mut self, field: (Vec<u8>, Vec<u8>)) {
        self.size += field.0.len() + field.1.len() + 32;
        self.table.insert(0, field);
        self.evict();
    }

    /// The fields of one header block, or None if it does not decode.
    pub fn decode(&mut self, src: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < src.len() {
            let b = src[at];
            if b & 0x80 != 0 {
                out.push(self.get(Self::int(src, &mut at, 7)?)?);
            } else if b & 0xe0 == 0x20 {
                self.max = Self::int(src, &mut at, 5)?;
                self.evict();
            } else {
                let (n, incremental) = if b & 0x40 != 0 { (6, true) } else { (4, false) };
                let index = Self::int(src, &mut at, n)?;
                let name = if index == 0 {
                    Self::string(src, &mut at)?
                } else {
                    self.get(index)?.0
                };
                let value = Self::string(src, &mut at)?;
                if incremental {
                    self.insert((name.clone(), value.clone()));
                }
                out.push((name, value));
            }
        }
        Some(out)
    }
}

// --- The raw client.

#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY.
    pub fn code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes(b.try_into().ok()?))
    }
}

/// What became of a request on the raw client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A response: its status and body.
    Response(u16, Vec<u8>),
    /// RST_STREAM with this code.
    Reset(u32),
    /// GOAWAY with this (non-zero) code, before any response.
    GoAway(u32),
    /// The connection closed before any answer.
    Closed,
}

impl Outcome {
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Response(s, _) => Some(*s),
            _ => None,
        }
    }
}

/// An HTTP/2 (prior knowledge) connection written frame by frame.
pub struct RawH2 {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pub hpack: Hpack,
    /// Every frame read so far that `outcome` did not consume.
    pub seen: Vec<Frame>,
    pub closed: bool,
}

impl RawH2 {
    /// Connects, sends the preface and `settings`, and takes lb's SETTINGS (acknowledged).
    pub fn connect(addr: SocketAddr, settings_values: &[(u16, u32)]) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut c = Self {
            stream,
            buf: Vec::new(),
            hpack: Hpack::new(),
            seen: Vec::new(),
            closed: false,
        };
        let mut hello = PREFACE.to_vec();
        hello.extend(settings(settings_values));
        c.send(&hello).unwrap();
        c
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.set_write_timeout(Some(WAIT)).unwrap();
        self.stream.write_all(bytes)
    }

    /// HEADERS (one frame, END_HEADERS) on `stream` with `fields` as literals.
    pub fn headers(&mut self, stream: u32, fields: &[(Vec<u8>, Vec<u8>)], end_stream: bool) {
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        let f = frame(HEADERS, flags, stream, &block(fields));
        let _ = self.send(&f);
    }

    /// The next frame, or None when the connection closed or nothing came within `within`.
    pub fn read_frame(&mut self, within: Duration) -> Option<Frame> {
        let deadline = Instant::now() + within;
        loop {
            if self.buf.len() >= 9 {
                let len = usize::try_from(u32::from_be_bytes([
                    0,
                    self.buf[0],
                    self.buf[1],
                    self.buf[2],
                ]))
                .unwrap();
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes(self.buf[5..9].try_into().unwrap())
                            & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            if self.closed {
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk) {
                Ok(0) => self.closed = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return None
                }
                Err(_) => self.closed = true,
            }
        }
    }

    /// Answers what a polite peer must (SETTINGS ACK, PING ACK); returns true if it did.
    fn polite(&mut self, f: &Frame) -> bool {
        match f.kind {
            SETTINGS if f.flags & ACK == 0 => {
                let _ = self.send(&frame(SETTINGS, ACK, 0, &[]));
                true
            }
            SETTINGS => true,
            PING if f.flags & ACK == 0 => {
                let _ = self.send(&frame(PING, ACK, 0, &f.payload));
                true
            }
            _ => false,
        }
    }

    /// Waits for what lb makes of `stream`: a whole response, RST_STREAM, GOAWAY or close.
    pub fn outcome(&mut self, stream: u32) -> Outcome {
        let deadline = Instant::now() + WAIT;
        let mut status = None;
        let mut block = Vec::new();
        let mut body = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(f) = self.read_frame(left) else {
                assert!(self.closed, "no answer on stream {stream} within {WAIT:?}");
                return Outcome::Closed;
            };
            if self.polite(&f) {
                continue;
            }
            if f.kind == GOAWAY {
                let code = f.code().unwrap_or(u32::MAX);
                let last = u32::from_be_bytes(f.payload[..4].try_into().unwrap()) & 0x7fff_ffff;
                if code != NO_ERROR || last < stream {
                    return Outcome::GoAway(code);
                }
                self.seen.push(f);
                continue;
            }
            if f.stream != stream {
                self.seen.push(f);
                continue;
            }
            match f.kind {
                RST_STREAM => return Outcome::Reset(f.code().unwrap_or(u32::MAX)),
                HEADERS | CONTINUATION => {
                    let mut p = f.payload.as_slice();
                    if f.kind == HEADERS {
                        if f.flags & 0x8 != 0 {
                            let pad = usize::from(p[0]);
                            p = &p[1..p.len() - pad];
                        }
                        if f.flags & 0x20 != 0 {
                            p = &p[5..];
                        }
                    }
                    block.extend_from_slice(p);
                    if f.flags & END_HEADERS != 0 {
                        let fields = self.hpack.decode(&block).expect("lb's HPACK decodes");
                        block.clear();
                        let s = fields
                            .iter()
                            .find(|(n, _)| n == b":status")
                            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok());
                        // A 1xx is followed by the final response.
                        if s.is_some_and(|s: u16| s >= 200) {
                            status = s;
                        }
                    }
                    if let (true, Some(s)) = (f.flags & END_STREAM != 0, status) {
                        return Outcome::Response(s, body);
                    }
                }
                DATA => {
                    body.extend_from_slice(&f.payload);
                    if !f.payload.is_empty() {
                        let n = u32::try_from(f.payload.len()).unwrap();
                        let mut wu = window_update(0, n);
                        wu.extend(window_update(stream, n));
                        let _ = self.send(&wu);
                    }
                    if f.flags & END_STREAM != 0 {
                        return Outcome::Response(status.unwrap_or(0), body);
                    }
                }
                _ => {}
            }
        }
    }

    /// Reads until the connection closes (or `within` passes): the GOAWAY code seen, if any.
    pub fn drain_until_closed(&mut self, within: Duration) -> (bool, Option<u32>) {
        let deadline = Instant::now() + within;
        let mut goaway = self
            .seen
            .iter()
            .find(|f| f.kind == GOAWAY)
            .and_then(Frame::code);
        while !self.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let Some(f) = self.read_frame(left) {
                if f.kind == GOAWAY {
                    goaway = goaway.or(f.code());
                }
            }
        }
        (self.closed, goaway)
    }
}

// --- The recording HTTP/1.1 backend.

/// One request as the backend read it off the wire.
#[derive(Debug, Clone)]
pub struct Received {
    /// Which accepted connection it came on (0, 1, ...).
    pub conn: usize,
    /// The exact bytes: head and body.
    pub bytes: Vec<u8>,
    /// False if the connection closed before the request was whole.
    pub complete: bool,
}

impl Received {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The request line and the header lines, sorted (lb's order is not the contract).
    pub fn head(&self) -> (String, Vec<String>) {
        let text = self.text();
        let head = text.split("\r\n\r\n").next().unwrap_or_default();
        let mut lines = head.split("\r\n").map(str::to_owned);
        let first = lines.next().unwrap_or_default();
        let mut headers: Vec<String> = lines.collect();
        headers.sort();
        (first, headers)
    }

    pub fn body(&self) -> Vec<u8> {
        let at = self
            .bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(self.bytes.len(), |p| p + 4);
        self.bytes[at..].to_vec()
    }
}

/// A TCP backend that records every request's exact bytes (parsed with httparse to find
/// where each ends) and answers each with fixed bytes.
pub struct RecordingBackend {
    pub addr: SocketAddr,
    /// `GET /big...` requests are answered with this instead, if set.
    pub big: Option<&'static [u8]>,
    pub requests: Arc<Mutex<Vec<Received>>>,
    pub connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

/// The length of the request at the start of `buf` once it is whole; Err if it cannot be
/// read as HTTP/1.1 at all.
fn request_len(buf: &[u8]) -> Result<Option<usize>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let value = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
    };
    if value("transfer-encoding").is_some() {
        // Chunked: sizes, data, the last chunk and the empty line (lb sends no trailers).
        let mut at = head;
        loop {
            let Some(line) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
                return Ok(None);
            };
            let size = String::from_utf8_lossy(&buf[at..at + line]).into_owned();
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| ())?;
            at += line + 2;
            if size == 0 {
                return Ok((buf.len() >= at + 2).then_some(at + 2));
            }
            at += size + 2;
            if buf.len() < at {
                return Ok(None);
            }
        }
    }
    let len: usize = match value("content-length") {
        Some(v) => v.parse().map_err(|_| ())?,
        None => 0,
    };
    Ok((buf.len() >= head + len).then_some(head + len))
}

impl RecordingBackend {
    pub fn start(response: &'static [u8]) -> Self {
        Self::start_with_big(response, None)
    }

    pub fn start_with_big(response: &'static [u8], big: Option<&'static [u8]>) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, c, st) = (requests.clone(), connections.clone(), stop.clone());
        std::thread::spawn(move || {
            // Two threads: writing large responses must not hold up the small ones, so that
            // the good clients' latency is lb's, not this backend's.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                while !st.load(Ordering::SeqCst) {
                    let accepted =
                        tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
                    let Ok(Ok((s, _))) = accepted else {
                        continue;
                    };
                    let conn = c.fetch_add(1, Ordering::SeqCst);
                    if big.is_some() {
                        // Without this, loopback's autotuned buffers take hundreds of MiB of
                        // the large responses at once: the kernel's copying, not lb, would
                        // then be what the good clients wait for.
                        let _ = socket2::SockRef::from(&s).set_send_buffer_size(128 << 10);
                    }
                    tokio::spawn(serve(s, conn, r.clone(), response, big));
                }
            });
        });
        Self {
            addr,
            big,
            requests,
            connections,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// How many requests whose target starts with `prefix` arrived.
    pub fn count_path_prefix(&self, prefix: &str) -> usize {
        let line = format!(" {prefix}");
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| {
                let head = r.bytes.split(|&b| b == b'\n').next().unwrap_or_default();
                head.windows(line.len()).any(|w| w == line.as_bytes())
            })
            .count()
    }

    /// How many requests for `path` arrived.
    pub fn count_path(&self, path: &str) -> usize {
        let line = format!(" {path} HTTP/1.1\r\n");
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.bytes.windows(line.len()).any(|w| w == line.as_bytes()))
            .count()
    }
}

impl Drop for RecordingBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

async fn serve(
    mut s: tokio::net::TcpStream,
    conn: usize,
    requests: Arc<Mutex<Vec<Received>>>,
    response: &'static [u8],
    big: Option<&'static [u8]>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    loop {
        loop {
            match request_len(&buf) {
                Ok(Some(n)) => {
                    let bytes: Vec<u8> = buf.drain(..n).collect();
                    let answer = match big {
                        Some(big) if bytes.starts_with(b"GET /big") => big,
                        _ => response,
                    };
                    requests.lock().unwrap().push(Received {
                        conn,
                        bytes,
                        complete: true,
                    });
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(()) => {
                    // Unreadable: recorded as it came, and the connection closed.
                    requests.lock().unwrap().push(Received {
                        conn,
                        bytes: std::mem::take(&mut buf),
                        complete: false,
                    });
                    return;
                }
            }
        }
        let mut chunk = [0u8; 16384];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                if !buf.is_empty() {
                    // What arrived of a request that never completed is recorded too.
                    requests.lock().unwrap().push(Received {
                        conn,
                        bytes: std::mem::take(&mut buf),
                        complete: false,
                    });
                }
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

// --- lb, its admin server and its process.

pub use super::free_port_addr as free_addr;

/// `lb` with one listener (HTTP/1.1 and h2c), the admin server and `backends`.
pub struct LbH2 {
    pub lb: Lb,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    dir: std::path::PathBuf,
}

impl LbH2 {
    /// `extra` is TOML appended to the config (sections such as `[timeouts]`).
    pub fn start(name: &str, backends: &[String], extra: &str) -> Self {
        let (addr, admin) = (free_addr(), free_addr());
        let mut text = format!(
            "listen = [\"{addr}\"]\nadmin = \"{admin}\"\n[health]\ninterval = \"0s\"\n{extra}\n"
        );
        for u in backends {
            text.push_str(&format!("[[backend]]\nurl = \"{u}\"\n"));
        }
        let dir = std::env::temp_dir().join(format!("lb-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lb.toml");
        std::fs::write(&path, text).unwrap();
        let mut lb = Lb::spawn(&path);
        lb.wait_for("lb to listen", |_| {
            TcpStream::connect(addr).is_ok() && TcpStream::connect(admin).is_ok()
        });
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

    /// lb's resident set size, KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// The sum of `lb_requests_total` over every backend and code.
    pub fn requests_total(&self) -> u64 {
        let (code, metrics) = http_get(self.admin, "/metrics");
        assert_eq!(code, 200);
        metrics
            .lines()
            .filter(|l| l.starts_with("lb_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }

    /// The sum of `lb_backend_active_requests` (requests lb has in flight to backends).
    pub fn active_requests(&self) -> u64 {
        let (code, metrics) = http_get(self.admin, "/metrics");
        assert_eq!(code, 200);
        metrics
            .lines()
            .filter(|l| l.starts_with("lb_backend_active_requests{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }

    pub fn assert_alive(&mut self) {
        assert!(self.lb.child.try_wait().unwrap().is_none(), "lb exited");
    }
}

impl Drop for LbH2 {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Samples lb's RSS every 50 ms until stopped; the maximum seen.
pub struct RssWatch {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<u64>>,
}

impl RssWatch {
    pub fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut max = rss_kib(pid);
            while !s.load(Ordering::SeqCst) {
                max = max.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            max.max(rss_kib(pid))
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    pub fn max_kib(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().unwrap().join().unwrap()
    }
}

/// A GET over a fresh HTTP/1.1 connection: (status, body), status 0 if there was none.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    super::procfs::admin_get(addr, path)
}

// --- Well-behaved clients beside an attack.

/// Latencies and failures of the good clients, split at the attack's start.
#[derive(Debug, Default, Clone)]
pub struct GoodStats {
    pub baseline_ms: Vec<f64>,
    pub during_ms: Vec<f64>,
    pub failures: Vec<String>,
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((s.len() as f64 - 1.0) * p).round() as usize;
    s[i]
}

impl GoodStats {
    pub fn p50(&self) -> f64 {
        percentile(&self.during_ms, 0.5)
    }
    pub fn p99(&self) -> f64 {
        percentile(&self.during_ms, 0.99)
    }
    pub fn baseline_p99(&self) -> f64 {
        percentile(&self.baseline_ms, 0.99)
    }
}

/// An HTTP/1.1 client (a fresh connection per request) and an HTTP/2 client (the h2 crate,
/// one connection) asking lb for `/good` every 20 ms each, until stopped.
pub struct GoodClients {
    stop: Arc<AtomicBool>,
    attack: Arc<AtomicBool>,
    stats: Arc<Mutex<GoodStats>>,
    done: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
}

impl GoodClients {
    pub fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let attack = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(GoodStats::default()));
        let done = Arc::new(AtomicUsize::new(0));
        let record = {
            let (attack, stats, done) = (attack.clone(), stats.clone(), done.clone());
            move |r: Result<f64, String>| {
                let mut s = stats.lock().unwrap();
                match r {
                    Ok(ms) if attack.load(Ordering::SeqCst) => s.during_ms.push(ms),
                    Ok(ms) => s.baseline_ms.push(ms),
                    Err(e) => s.failures.push(e),
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        };
        let mut threads = Vec::new();
        {
            let (stop, record) = (stop.clone(), record.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let t = Instant::now();
                    let (status, body) = http_get(addr, "/good");
                    let ms = t.elapsed().as_secs_f64() * 1000.0;
                    record(if status == 200 && body == "ok" {
                        Ok(ms)
                    } else {
                        Err(format!("HTTP/1.1: {status} {body:?}"))
                    });
                    std::thread::sleep(Duration::from_millis(20));
                }
            }));
        }
        {
            let (stop, record) = (stop.clone(), record);
            threads.push(std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(good_h2(addr, stop, record));
            }));
        }
        Self {
            stop,
            attack,
            stats,
            done,
            threads,
        }
    }

    /// Waits for `n` requests served before the attack (the baseline), then marks its start.
    pub fn attack_starts(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        while self.done.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "good clients not served");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.attack.store(true, Ordering::SeqCst);
    }

    /// Waits until at least `n` more requests were answered since the call: the good
    /// clients are still being served after the attack.
    pub fn served_more(&self, n: usize) {
        let from = self.done.load(Ordering::SeqCst);
        let deadline = Instant::now() + WAIT;
        while self.done.load(Ordering::SeqCst) < from + n {
            assert!(
                Instant::now() < deadline,
                "good clients stopped being answered"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stop(mut self) -> GoodStats {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        self.stats.lock().unwrap().clone()
    }
}

impl Drop for GoodClients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

async fn good_h2(addr: SocketAddr, stop: Arc<AtomicBool>, record: impl Fn(Result<f64, String>)) {
    let mut client = None;
    while !stop.load(Ordering::SeqCst) {
        let t = Instant::now();
        let r = tokio::time::timeout(WAIT, good_h2_once(addr, &mut client)).await;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        record(match r {
            Ok(Ok(())) => Ok(ms),
            Ok(Err(e)) => {
                client = None;
                Err(format!("HTTP/2: {e}"))
            }
            Err(_) => {
                client = None;
                Err("HTTP/2: no answer within the bound".to_owned())
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn good_h2_once(
    addr: SocketAddr,
    client: &mut Option<h2::client::SendRequest<bytes::Bytes>>,
) -> Result<(), String> {
    if client.is_none() {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (c, conn) = h2::client::handshake(tcp)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        *client = Some(c);
    }
    let c = client.as_mut().unwrap();
    let mut ready = c.clone().ready().await.map_err(|e| e.to_string())?;
    let req = http::Request::get("http://good.example/good")
        .body(())
        .unwrap();
    let (resp, _) = ready.send_request(req, true).map_err(|e| e.to_string())?;
    let resp = resp.await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    if status == 200 && got == b"ok" {
        Ok(())
    } else {
        Err(format!("{status} {:?}", String::from_utf8_lossy(&got)))
    }
}

/// Whether the long form runs (`LB_RELIABILITY=long`): heavier attacks, and figures printed.
pub fn long() -> bool {
    std::env::var("LB_RELIABILITY").is_ok_and(|v| v == "long")
}

/// Prints the one `RELIABILITY {json}` line the orchestrator collects.
pub fn report(figures: serde_json::Value) {
    println!("RELIABILITY {figures}");
}
