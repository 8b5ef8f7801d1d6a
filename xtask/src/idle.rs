//! The idle row: memory per idle keep-alive client connection.
//!
//! The measurement: with the proxy warmed up and no client connected, sum VmRSS over
//! its process tree; open 9,000 HTTP/1.1 connections, send one `GET /` on each and read the
//! whole answer, then leave them silent; wait a moment and sum VmRSS again. The growth over
//! the count is the memory an idle client connection holds. The opener is a child xtask
//! (`xtask idle-open`) started through `sh -c 'ulimit -n …'`, so that the xtask needs no
//! rlimit call of its own; it holds the sockets until its stdin closes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

/// How long the held connections sit silent before the second reading.
pub(crate) const SETTLE: Duration = Duration::from_secs(2);

/// One idle measurement.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Idle {
    /// VmRSS of the proxy's tree, warmed up, with no client connection, in KiB.
    pub(crate) before_kib: u64,
    /// The same with the connections held.
    pub(crate) after_kib: u64,
    /// Connections asked for.
    pub(crate) conns: u32,
    /// Connections that got a `200` answer (and were held).
    pub(crate) ok: u32,
    /// (after − before) ÷ conns, in KiB.
    pub(crate) kib_per_conn: f64,
    /// Seconds the opener took for all of them.
    pub(crate) open_s: f64,
}

/// Measures the proxy `pid` (listening on `port`) with `conns` idle connections.
pub(crate) fn measure(pid: u32, port: u16, conns: u32) -> Result<Idle, String> {
    // Let the warm-up's connections close and their memory go back.
    std::thread::sleep(Duration::from_secs(1));
    let before_kib = crate::bench::tree_status_kib(pid, "VmRSS:");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let cmd = format!(
        "{}; exec {} idle-open {port} {conns}",
        crate::bench::RAISE_NOFILE,
        exe.display()
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let result = (|| {
        let out = child.stdout.take().ok_or("no opener stdout")?;
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        // "opened OK SECONDS"
        let mut f = line.split_whitespace().skip(1);
        let ok: u32 = f
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("idle-open said: {line:?}"))?;
        let open_s: f64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        std::thread::sleep(SETTLE);
        let after_kib = crate::bench::tree_status_kib(pid, "VmRSS:");
        Ok(Idle {
            before_kib,
            after_kib,
            conns,
            ok,
            kib_per_conn: (after_kib as f64 - before_kib as f64) / f64::from(conns.max(1)),
            open_s,
        })
    })();
    // Closing its stdin lets the opener go, and its sockets with it.
    drop(child.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return result;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// `xtask idle-open PORT COUNT` (internal): opens COUNT connections to 127.0.0.1:PORT, one
/// `GET /` on each, reads each answer whole, prints `opened OK SECONDS`, and holds them all
/// until its stdin closes. Gives up after 100 failures in a row or 60 s.
pub(crate) fn open(args: &[String]) -> Result<(), String> {
    let num = |i: usize, name: &str| -> Result<u32, String> {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("idle-open: missing or bad {name}"))
    };
    let (port, count) = (num(0, "PORT")?, num(1, "COUNT")?);
    let addr = SocketAddr::from((
        [127, 0, 0, 1],
        u16::try_from(port).map_err(|e| e.to_string())?,
    ));
    let started = Instant::now();
    let mut held = Vec::with_capacity(count as usize);
    let (mut ok, mut failed_in_a_row) = (0u32, 0u32);
    for _ in 0..count {
        if failed_in_a_row >= 100 || started.elapsed() > Duration::from_secs(60) {
            break;
        }
        match get(addr) {
            Ok((stream, status)) => {
                failed_in_a_row = 0;
                if status == 200 {
                    ok += 1;
                }
                held.push(stream);
            }
            Err(_) => failed_in_a_row += 1,
        }
    }
    println!("opened {ok} {:.2}", started.elapsed().as_secs_f64());
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    // Hold them until the parent closes our stdin.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(held);
    Ok(())
}

/// One request on a new connection; the connection and the answer's status.
fn get(addr: SocketAddr) -> std::io::Result<(TcpStream, u16)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut have = buf.len() - head_end;
    while have < length {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
    }
    Ok((s, status))
}
