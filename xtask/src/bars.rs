//! The bars of issue 11, each with this run's measured value and whether it was met.
//!
//! "Best peer" is the better of nginx and haproxy (the peers; Pingora has a row of
//! its own but no bar). A bar whose rows were not run (`--quick`, `--only`, a peer missing)
//! says "not measured".

use std::fmt::Write as _;

use serde::Serialize;

use crate::bench::Summary;

/// One bar: what it asks, what this run measured, and whether it was met.
#[derive(Debug, Serialize)]
pub(crate) struct Bar {
    pub(crate) bar: String,
    pub(crate) measured: String,
    /// `None`: not measured in this run.
    pub(crate) met: Option<bool>,
}

const C64: &str = "h1 keep-alive 1 KiB c64";
const C256: &str = "h1 keep-alive 1 KiB c256";
const BIG: &str = "h1 keep-alive 64 KiB c256";
const CLOSE: &str = "h1 new connection 1 KiB c64";
const H2C: &str = "h2c 1 KiB c64";
const HTTPS_NEW: &str = "https handshake 1 KiB c64";
const HTTPS_H1: &str = "https keep-alive 1 KiB c64 h1";
const HTTPS_H2: &str = "https h2 1 KiB c64";
const BACKENDS_1000: &str = "h1 keep-alive 1 KiB c256, 1000 backends";
const PEERS: [&str; 2] = ["nginx", "haproxy"];

/// The bars, judged on `summaries` for the lb target named `lb`.
pub(crate) fn bars(summaries: &[Summary], lb: &str) -> Vec<Bar> {
    let get = |row: &str, target: &str| {
        summaries
            .iter()
            .find(|s| s.row == row && s.target == target)
    };
    // The peer with the most requests/s in `row`.
    let best = |row: &str| {
        PEERS
            .iter()
            .filter_map(|p| get(row, p))
            .max_by(|a, b| a.rps.total_cmp(&b.rps))
    };
    let not_measured = |bar: String| Bar {
        bar,
        measured: "not measured".into(),
        met: None,
    };
    let mut out = Vec::new();
    for (row, conns) in [(C64, 64), (C256, 256)] {
        let bar = format!(
            "1 KiB keep-alive c{conns}: req/s ≥ 1.10 × the best of nginx and haproxy, p99 ≤ theirs"
        );
        let (Some(l), Some(b)) = (get(row, lb), best(row)) else {
            out.push(not_measured(bar));
            continue;
        };
        let peer_p99 = PEERS
            .iter()
            .filter_map(|p| get(row, p)?.p99_ms)
            .reduce(f64::min);
        let ratio = l.rps / b.rps;
        let p99_ok = match (l.p99_ms, peer_p99) {
            (Some(a), Some(b)) => a <= b,
            _ => false,
        };
        out.push(Bar {
            bar,
            measured: format!(
                "{:.0} vs {} {:.0} = {ratio:.2}×; p99 {} vs {} ms",
                l.rps,
                b.target,
                b.rps,
                ms(l.p99_ms),
                ms(peer_p99)
            ),
            met: Some(ratio >= 1.10 && p99_ok),
        });
    }
    for (row, conns) in [(C64, 64), (C256, 256)] {
        let bar = format!("CPU s per 100k requests ≤ the best peer's (1 KiB c{conns})");
        let peer = PEERS
            .iter()
            .filter_map(|p| get(row, p))
            .filter_map(|s| Some((s.target.as_str(), s.cpu_s_per_100k?)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        match (get(row, lb).and_then(|s| s.cpu_s_per_100k), peer) {
            (Some(l), Some((name, p))) => out.push(Bar {
                bar,
                measured: format!("{l:.2} vs {name} {p:.2} = {:.2}×", l / p),
                met: Some(l <= p),
            }),
            _ => out.push(not_measured(bar)),
        }
    }
    {
        // The worst load row that ran both (the idle row has a table of its own).
        let bar = "peak RSS ≤ 2 × nginx's (the worst load row)".to_owned();
        let worst = summaries
            .iter()
            .filter(|s| s.target == lb && s.idle.is_none())
            .filter_map(|l| {
                let n = get(&l.row, "nginx")?.peak_rss_mib?;
                Some((l.row.as_str(), l.peak_rss_mib?, n))
            })
            .max_by(|a, b| (a.1 / a.2).total_cmp(&(b.1 / b.2)));
        match worst {
            Some((row, l, n)) => out.push(Bar {
                bar,
                measured: format!("{l:.1} vs nginx {n:.1} MiB = {:.2}× ({row})", l / n),
                met: Some(l <= 2.0 * n),
            }),
            None => out.push(not_measured(bar)),
        }
    }
    for (row, bar) in [
        (BIG, "64 KiB bodies (c256): req/s ≥ the best peer"),
        (
            CLOSE,
            "new connection per request (c64): req/s ≥ the best peer",
        ),
    ] {
        match (get(row, lb), best(row)) {
            (Some(l), Some(b)) => out.push(Bar {
                bar: bar.into(),
                measured: format!(
                    "{:.0} vs {} {:.0} = {:.2}×",
                    l.rps,
                    b.target,
                    b.rps,
                    l.rps / b.rps
                ),
                met: Some(l.rps >= b.rps),
            }),
            _ => out.push(not_measured(bar.into())),
        }
    }
    {
        let bar = "1,000 backends: CPU per request within 5 % of 3 backends (c256)".to_owned();
        let cpu = |row: &str| get(row, lb).and_then(|s| s.cpu_s_per_100k);
        match (cpu(BACKENDS_1000), cpu(C256)) {
            (Some(a), Some(b)) => out.push(Bar {
                bar,
                measured: format!("{a:.2} vs {b:.2} s/100k = {:+.1} %", (a / b - 1.0) * 100.0),
                met: Some(a <= b * 1.05),
            }),
            _ => out.push(not_measured(bar)),
        }
    }
    {
        let bar = "idle keep-alive connection: memory ≤ 2 × HAProxy's, and all answered".to_owned();
        let idle = |t: &str| {
            summaries
                .iter()
                .find(|s| s.target == t && s.idle.is_some())
                .and_then(|s| s.idle.as_ref())
        };
        match (idle(lb), idle("haproxy")) {
            (Some(l), Some(h)) => out.push(Bar {
                bar,
                measured: format!(
                    "{:.2} vs haproxy {:.2} KiB per connection; {}/{} answered 200",
                    l.kib_per_conn, h.kib_per_conn, l.ok, l.conns
                ),
                met: Some(l.kib_per_conn <= 2.0 * h.kib_per_conn.max(0.0) && l.ok == l.conns),
            }),
            _ => out.push(not_measured(bar)),
        }
    }
    match (get(H2C, lb), get(H2C, "haproxy")) {
        (Some(l), Some(h)) => out.push(Bar {
            bar: "h2c (c64): req/s ≥ HAProxy's".into(),
            measured: format!(
                "{:.0} vs haproxy {:.0} = {:.2}×",
                l.rps,
                h.rps,
                l.rps / h.rps
            ),
            met: Some(l.rps >= h.rps),
        }),
        _ => out.push(not_measured("h2c (c64): req/s ≥ HAProxy's".into())),
    }
    {
        let bar =
            "HTTPS kept-alive requests (c64, h1 and h2): req/s ahead of both nginx and haproxy"
                .to_owned();
        let both: Option<Vec<(&str, f64, &Summary, &Summary)>> =
            [("h1", HTTPS_H1), ("h2", HTTPS_H2)]
                .into_iter()
                .map(|(label, row)| {
                    let (l, b) = (get(row, lb)?, best(row)?);
                    Some((label, l.rps / b.rps, l, b))
                })
                .collect();
        match both {
            Some(both) => out.push(Bar {
                bar,
                measured: both
                    .iter()
                    .map(|(label, r, l, b)| {
                        format!(
                            "{label} {:.0} vs {} {:.0} = {r:.2}×",
                            l.rps, b.target, b.rps
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
                met: Some(both.iter().all(|(_, r, _, _)| *r > 1.0)),
            }),
            None => out.push(not_measured(bar)),
        }
    }
    {
        let bar =
            "HTTPS full handshakes (c64): req/s within 10 % of the better of nginx and haproxy"
                .to_owned();
        match (get(HTTPS_NEW, lb), best(HTTPS_NEW)) {
            (Some(l), Some(b)) => out.push(Bar {
                bar,
                // The client's handshakes share the machine: CPU per handshake too.
                measured: format!(
                    "{:.0} vs {} {:.0} = {:.2}×; CPU s/100k {} vs {}",
                    l.rps,
                    b.target,
                    b.rps,
                    l.rps / b.rps,
                    ms(l.cpu_s_per_100k),
                    ms(b.cpu_s_per_100k)
                ),
                met: Some(l.rps >= 0.9 * b.rps),
            }),
            _ => out.push(not_measured(bar)),
        }
    }
    let rows = summaries.iter().filter(|s| s.target == "pingora").count();
    out.push(Bar {
        bar: "a Pingora row beside nginx and haproxy".into(),
        measured: format!("pingora in {rows} row(s)"),
        met: Some(rows > 0),
    });
    out
}

fn ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.2}"))
}

/// The bars as a markdown section.
pub(crate) fn markdown(bars: &[Bar], lb: &str) -> String {
    let mut md = format!(
        "\n### Bars of issue 11\n\nFor `{lb}`, from this run's medians; \"best peer\" is the better of nginx and haproxy.\n\n| bar | measured (lb vs peer) | met |\n|---|---|---|\n"
    );
    for b in bars {
        let met = match b.met {
            Some(true) => "yes",
            Some(false) => "no",
            None => "–",
        };
        let _ = writeln!(md, "| {} | {} | {met} |", b.bar, b.measured);
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(bars: &'a [Bar], start: &str) -> &'a Bar {
        bars.iter().find(|b| b.bar.starts_with(start)).unwrap()
    }

    #[test]
    fn throughput_bar_needs_ten_percent_over_the_best_peer_and_no_worse_p99() {
        let lb = "lb round-robin";
        let s = |t: &str, rps, p99| Summary::for_test(C64, t, rps, p99, 1.0);
        let got = bars(
            &[
                s(lb, 110.0, 1.0),
                s("nginx", 100.0, 1.0),
                s("haproxy", 90.0, 2.0),
            ],
            lb,
        );
        assert_eq!(find(&got, "1 KiB keep-alive c64").met, Some(true));
        assert_eq!(find(&got, "1 KiB keep-alive c256").met, None);
        let got = bars(&[s(lb, 109.0, 1.0), s("nginx", 100.0, 1.0)], lb);
        assert_eq!(find(&got, "1 KiB keep-alive c64").met, Some(false));
        // 10 % ahead, but a p99 worse than either peer's.
        let got = bars(
            &[
                s(lb, 120.0, 1.5),
                s("nginx", 100.0, 3.0),
                s("haproxy", 90.0, 1.0),
            ],
            lb,
        );
        assert_eq!(find(&got, "1 KiB keep-alive c64").met, Some(false));
    }

    #[test]
    fn https_bars_need_both_kept_alive_rows_ahead_and_handshakes_within_ten_percent() {
        let lb = "lb round-robin";
        let s = |row: &str, t: &str, rps| Summary::for_test(row, t, rps, 1.0, 1.0);
        let peers = || {
            vec![
                s(HTTPS_H1, "nginx", 100.0),
                s(HTTPS_H1, "haproxy", 90.0),
                s(HTTPS_H2, "haproxy", 100.0),
                s(HTTPS_NEW, "nginx", 80.0),
                s(HTTPS_NEW, "haproxy", 100.0),
            ]
        };
        let with = |lbs: &[(&str, f64)]| {
            let mut v = peers();
            v.extend(lbs.iter().map(|(row, rps)| s(row, lb, *rps)));
            bars(&v, lb)
        };
        // The h2 row without lb: not measured; handshakes 0.91 of haproxy's.
        let got = with(&[(HTTPS_H1, 101.0), (HTTPS_NEW, 91.0)]);
        assert_eq!(find(&got, "HTTPS kept-alive").met, None);
        assert_eq!(find(&got, "HTTPS full handshakes").met, Some(true));
        // Behind haproxy on h2.
        let got = with(&[(HTTPS_H1, 101.0), (HTTPS_H2, 99.0), (HTTPS_NEW, 89.0)]);
        assert_eq!(find(&got, "HTTPS kept-alive").met, Some(false));
        assert_eq!(find(&got, "HTTPS full handshakes").met, Some(false));
        let got = with(&[(HTTPS_H1, 101.0), (HTTPS_H2, 120.0)]);
        assert_eq!(find(&got, "HTTPS kept-alive").met, Some(true));
        assert_eq!(find(&got, "HTTPS full handshakes").met, None);
    }

    #[test]
    fn backends_bar_compares_lb_with_itself() {
        let lb = "lb round-robin";
        let got = bars(
            &[
                Summary::for_test(C256, lb, 1.0, 1.0, 2.0),
                Summary::for_test(BACKENDS_1000, lb, 1.0, 1.0, 2.1),
            ],
            lb,
        );
        let b = find(&got, "1,000 backends");
        assert_eq!(b.met, Some(true), "{}", b.measured);
        assert_eq!(find(&got, "a Pingora row").met, Some(false));
    }
}
