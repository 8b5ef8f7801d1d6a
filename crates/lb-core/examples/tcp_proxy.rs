//! A complete (if minimal) TCP load balancer on `std` alone, driven by lb-core: the shortest
//! honest answer to "how do I embed this in my proxy?".
//!
//! ```text
//! cargo run --release -p lb-core --example tcp_proxy -- 127.0.0.1:3030 127.0.0.1:3031 127.0.0.1:3032
//! ```
//! Listens on the first address and balances connections (round robin) over the others. A
//! backend that refuses is retried on another one and, after 5 failures in a row (refused,
//! timed out, reset before its first byte, or no first byte within `timeouts.request`),
//! ejected.
//! One thread per connection: fine for a demo, not for production (that is lb-proxy's job).
#![allow(clippy::disallowed_methods)] // this is the shell: it, not the core, reads the clock

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_core::select::{AnySelect, StrategyKind};
use lb_core::{Action, Backend, Balancer, Completion, Config, Outcome, RequestInfo, Weight};

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((listen, backends)) = args.split_first().filter(|(_, b)| !b.is_empty()) else {
        eprintln!("usage: tcp_proxy LISTEN BACKEND [BACKEND ...]   (addresses as host:port)");
        std::process::exit(2);
    };
    let lb = Balancer::new(Config::default(), AnySelect::new(StrategyKind::RoundRobin))
        .map_err(io::Error::other)?;
    let set = backends
        .iter()
        .map(|b| Backend::new(b.clone(), Weight::ONE));
    let ids = lb
        .set_backends(set, Instant::now())
        .map_err(io::Error::other)?;
    let addrs: Arc<Vec<(lb_core::BackendId, String)>> =
        Arc::new(ids.into_iter().zip(backends.iter().cloned()).collect());
    let lb = Arc::new(lb);

    // The timer task: expire ejections and advance slow start when the core asks.
    let timer = Arc::clone(&lb);
    std::thread::spawn(move || loop {
        let now = Instant::now();
        match timer.poll_timeout() {
            Some(at) if at <= now => timer.handle_timeout(now),
            Some(at) => std::thread::sleep((at - now).min(Duration::from_millis(500))),
            None => std::thread::sleep(Duration::from_millis(500)),
        }
        while let Some(event) = timer.poll_event() {
            eprintln!("{event}");
        }
    });

    let listener = TcpListener::bind(listen)?;
    eprintln!("balancing {listen} over {backends:?}");
    for client in listener.incoming() {
        let (client, lb, addrs) = (client?, Arc::clone(&lb), Arc::clone(&addrs));
        std::thread::spawn(move || serve(&lb, &addrs, client));
    }
    Ok(())
}

/// One client connection: pick, connect (retrying elsewhere on refusal), then pipe bytes.
///
/// The "response head" of a TCP connection is the backend's first byte: until it arrives
/// the attempt can still fail as `Reset` (closed or broken first) or `TimedOut` (nothing by
/// `try_deadline`). The client's bytes are forwarded as they come, so once connected the
/// request counts as sent, and it is not idempotent: the core never retries it then.
fn serve(lb: &Balancer, addrs: &[(lb_core::BackendId, String)], client: TcpStream) {
    let (mut req, mut action) = lb.start(RequestInfo::new(false, false), Instant::now());
    loop {
        match action {
            Action::Forward {
                backend,
                not_before,
                try_deadline,
            } => {
                std::thread::sleep(not_before.saturating_duration_since(Instant::now()));
                let addr = addrs
                    .iter()
                    .find(|(id, _)| *id == backend)
                    .map(|(_, a)| a.as_str());
                let upstream = addr
                    .and_then(|a| a.parse().ok())
                    .map(|sa| TcpStream::connect_timeout(&sa, Duration::from_secs(1)));
                let up = match upstream {
                    Some(Ok(up)) => up,
                    Some(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {
                        action =
                            lb.handle_outcome(&mut req, Outcome::ConnectTimeout, Instant::now());
                        continue;
                    }
                    _ => {
                        action =
                            lb.handle_outcome(&mut req, Outcome::ConnectRefused, Instant::now());
                        continue;
                    }
                };
                let Ok(upload) = forward_client(&client, &up) else {
                    lb.abandon(req, Instant::now());
                    return;
                };
                let (outcome, first) = first_bytes(&up, try_deadline);
                action = lb.handle_outcome(&mut req, outcome, Instant::now());
                if action != Action::Relay {
                    // Reset or TimedOut of a sent request: never retried (`Fail` follows).
                    let _ = up.shutdown(Shutdown::Both);
                    let _ = upload.join();
                    continue;
                }
                let end = match relay(&first, &up, &client) {
                    Ok(()) => Completion::Done,
                    Err(Broke::Backend) => Completion::BackendFailed,
                    Err(Broke::Client) => Completion::ClientGone,
                };
                let _ = upload.join();
                eprintln!("{}: {req}", addr.unwrap_or("?"));
                lb.finish(req, end, Instant::now());
                return;
            }
            Action::Relay => return,
            Action::Fail(f) => {
                eprintln!("failed ({}): {req}", f.status());
                let _ = client.shutdown(Shutdown::Both);
                lb.abandon(req, Instant::now());
                return;
            }
        }
    }
}

/// Copies the client's bytes to the backend on a thread of their own, until either closes.
fn forward_client(client: &TcpStream, up: &TcpStream) -> io::Result<std::thread::JoinHandle<()>> {
    let (mut c_read, mut u_write) = (client.try_clone()?, up.try_clone()?);
    Ok(std::thread::spawn(move || {
        let _ = io::copy(&mut c_read, &mut u_write);
        let _ = u_write.shutdown(Shutdown::Write);
    }))
}

/// Waits for the backend's first bytes until `try_deadline`: they are the "response head".
fn first_bytes(up: &TcpStream, try_deadline: Instant) -> (Outcome, Vec<u8>) {
    let left = try_deadline.saturating_duration_since(Instant::now());
    let mut buf = vec![0u8; 16 * 1024];
    // A zero read timeout would mean "block forever": the deadline passing is a timeout.
    if left.is_zero() || up.set_read_timeout(Some(left)).is_err() {
        return (Outcome::TimedOut, Vec::new());
    }
    let read = (&*up).read(&mut buf);
    let _ = up.set_read_timeout(None);
    match read {
        Ok(0) => (Outcome::Reset, Vec::new()),
        Ok(n) => {
            buf.truncate(n);
            (Outcome::Response { status: 200 }, buf)
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            (Outcome::TimedOut, Vec::new())
        }
        Err(_) => (Outcome::Reset, Vec::new()),
    }
}

/// Which side broke off the relay.
enum Broke {
    Backend,
    Client,
}

/// Sends the first bytes, then copies the backend's bytes to the client until it closes.
fn relay(first: &[u8], up: &TcpStream, client: &TcpStream) -> Result<(), Broke> {
    let (mut up, mut client) = (up, client);
    client.write_all(first).map_err(|_| Broke::Client)?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = up.read(&mut buf).map_err(|_| Broke::Backend)?;
        if n == 0 {
            let _ = client.shutdown(Shutdown::Write);
            return Ok(());
        }
        client.write_all(&buf[..n]).map_err(|_| Broke::Client)?;
    }
}
