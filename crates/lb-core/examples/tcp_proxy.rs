//! A complete (if minimal) TCP load balancer on `std` alone, driven by lb-core: the shortest
//! honest answer to "how do I embed this in my proxy?".
//!
//! ```text
//! cargo run --release -p lb-core --example tcp_proxy -- 127.0.0.1:3030 127.0.0.1:3031 127.0.0.1:3032
//! ```
//! Listens on the first address and balances connections (round robin) over the others. A
//! backend that refuses is retried on another one and, after 5 refusals in a row, ejected.
//! One thread per connection: fine for a demo, not for production (that is lb-proxy's job).
#![allow(clippy::disallowed_methods)] // this is the shell: it, not the core, reads the clock

use std::io;
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
fn serve(lb: &Balancer, addrs: &[(lb_core::BackendId, String)], client: TcpStream) {
    // Nothing is sent before the connection is made, so any connection may be retried.
    let (mut req, mut action) = lb.start(RequestInfo::new(false, true), Instant::now());
    loop {
        match action {
            Action::Forward {
                backend,
                not_before,
                ..
            } => {
                std::thread::sleep(not_before.saturating_duration_since(Instant::now()));
                let addr = addrs
                    .iter()
                    .find(|(id, _)| *id == backend)
                    .map(|(_, a)| a.as_str());
                let upstream = addr
                    .and_then(|a| a.parse().ok())
                    .map(|sa| TcpStream::connect_timeout(&sa, Duration::from_secs(1)));
                match upstream {
                    Some(Ok(up)) => {
                        // Connected: from here on the bytes are the response; relay them.
                        action = lb.handle_outcome(
                            &mut req,
                            Outcome::Response { status: 200 },
                            Instant::now(),
                        );
                        let _ = action;
                        let ok = pipe(client, up).is_ok();
                        let end = if ok {
                            Completion::Done
                        } else {
                            Completion::ClientGone
                        };
                        eprintln!("{}: {req}", addr.unwrap_or("?"));
                        lb.finish(req, end, Instant::now());
                        return;
                    }
                    Some(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {
                        action =
                            lb.handle_outcome(&mut req, Outcome::ConnectTimeout, Instant::now());
                    }
                    _ => {
                        action =
                            lb.handle_outcome(&mut req, Outcome::ConnectRefused, Instant::now())
                    }
                }
            }
            Action::Relay => return,
            Action::Fail(f) => {
                eprintln!("no backend ({}): {req}", f.status());
                let _ = client.shutdown(Shutdown::Both);
                lb.abandon(req, Instant::now());
                return;
            }
        }
    }
}

/// Copies both ways until either side closes.
fn pipe(client: TcpStream, upstream: TcpStream) -> io::Result<()> {
    let (mut c_read, mut u_write) = (client.try_clone()?, upstream.try_clone()?);
    let up = std::thread::spawn(move || {
        let r = io::copy(&mut c_read, &mut u_write);
        let _ = u_write.shutdown(Shutdown::Write);
        r
    });
    let (mut u_read, mut c_write) = (upstream, client);
    let down = io::copy(&mut u_read, &mut c_write);
    let _ = c_write.shutdown(Shutdown::Write);
    let up = up
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("copy thread panicked")));
    down.and(up).map(|_| ())
}
