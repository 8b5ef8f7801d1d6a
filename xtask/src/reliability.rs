//! `cargo xtask reliability`: the long form of the reliability program. It runs each part's
//! tests in release mode with `LB_RELIABILITY=long` (the same tests `cargo test` runs in
//! their bounded form), collects the `RELIABILITY {json}` figure lines they print, and writes
//! `RELIABILITY.md` with every figure, each part's verdict and the command that regenerates it.
//!
//! `--render` only rewrites `RELIABILITY.md` from the saved runs (`target/reliability/*.json`).
//!
//! The figures come from the tests themselves, so that a bar asserted in CI and the number
//! published for it can never come from two different harnesses.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::Value;

/// One part of the program: what it proves, and the command whose output carries its figures.
struct Part {
    key: &'static str,
    title: &'static str,
    /// What the part asserts (the bar), in Markdown.
    bar: &'static str,
    /// `cargo` arguments; `None` means `fuzz/run.sh`.
    cargo: Option<&'static [&'static str]>,
}

const PARTS: &[Part] = &[
    Part {
        key: "chaos",
        title: "Chaos under load",
        bar: "Five real backend processes behind lb under sustained load (GETs and POSTs) while a \
              seeded schedule SIGKILLs and restarts backends, makes one slow, one reset \
              connections mid-response, one close kept-alive connections at random, black-holes \
              one and points lb at an address whose SYNs are dropped. Bar: zero failed \
              idempotent requests while a backend is healthy (responses already streaming when \
              their backend died are counted apart), zero POSTs delivered twice (counted at the \
              backends). The same schedule runs against the seed design (3 retries on the same \
              backend 10 ms apart, then mark it down) as the baseline, and against HAProxy or \
              NGINX when installed. Reading the figures: `failed_streamed` are responses cut \
              off after their status line had reached the client (no proxy can retry those); \
              `failed_post` are POSTs already sent to a backend that then died, reset or \
              black-holed them (502/504: they may have been processed, so they are never \
              replayed; the seed design replays them, hence its `post_duplicates`); `detect` \
              gives, per fault, when it began and how long lb took to stop routing to it \
              passively (ejection) and by probe; `exact_backends` are the backends whose own \
              count equals `lb_requests_total` exactly (never killed, never closing \
              connections under lb).",
        cargo: Some(&["--test", "chaos"]),
    },
    Part {
        key: "hostile",
        title: "Hostile clients",
        bar: "A corpus of request-smuggling and desync attempts over HTTP/1.1 and HTTP/2 against \
              lb in front of a backend that records raw bytes: each case asserts the status the \
              client got and the exact bytes forwarded (or that nothing was). Resource attacks \
              (slowloris on head and body, clients that never read, HTTP/2 rapid reset, \
              CONTINUATION floods, HPACK bombs, SETTINGS and PING floods) each run beside good \
              clients, whose requests must all succeed; their latency is reported beside a \
              baseline without the attack.",
        cargo: Some(&["--test", "hostile_h1", "--test", "hostile_h2"]),
    },
    Part {
        key: "h2spec",
        title: "HTTP/2 conformance (h2spec)",
        bar: "h2spec against lb's h2c listener: 145 of 146 cases pass; the one failure, \
              `http2/3.5/2`, is by design on a port shared by HTTP/1.1 and h2c (those bytes are \
              a malformed HTTP/1.1 request and get 400).",
        cargo: Some(&["--test", "h2spec"]),
    },
    Part {
        key: "fuzz",
        title: "Fuzzing",
        bar: "libFuzzer targets for the config parser, HTTP/1 request heads through lb-proxy's \
              validation and header rewriting, and arbitrary event sequences into lb-core \
              checked against its invariants, seeded from the corpus in the repository. Bar: \
              zero crashes. The same targets run under proptest in `cargo test`.",
        cargo: None,
    },
    Part {
        key: "soak",
        title: "Soak",
        bar: "1,000,000 requests through lb (100,000 in CI): open file descriptors and RSS at \
              start and end stay flat within the stated tolerance, in-flight counters return \
              to zero, and `lb_requests_total` equals the backends' own counts exactly.",
        cargo: Some(&["--test", "soak"]),
    },
    Part {
        key: "idle",
        title: "Idle connections at scale",
        bar: "10,000 idle keep-alive connections (HTTP/1.1 and HTTP/2) held open, RSS per \
              connection measured, active clients served beside them (latency beside a \
              baseline), and `max_connections` enforced as one limit across workers.",
        cargo: Some(&["--test", "idle"]),
    },
    Part {
        key: "storm",
        title: "Reload storms",
        bar: "50 SIGHUP reloads under sustained load, alternating backend sets and strategies: \
              no failed requests, no request to a removed backend, no leaked probes, RSS flat.",
        cargo: Some(&["--test", "storm"]),
    },
];

const USAGE: &str = "usage: cargo xtask reliability [--only chaos,hostile,h2spec,fuzz,soak,idle,storm] [--fuzz-seconds N] [--out FILE] [--render]";

/// One part's run, kept in `target/reliability/<part>.json` so that `--only` can refresh some
/// parts and the report still shows the latest run of every part.
#[derive(serde::Serialize, serde::Deserialize)]
struct Outcome {
    key: String,
    command: String,
    passed: bool,
    elapsed_s: f64,
    figures: Vec<Value>,
    log: String,
    commit: String,
    started: String,
}

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let mut only: Option<BTreeSet<String>> = None;
    let mut fuzz_seconds: u64 = 300;
    let mut out = PathBuf::from("RELIABILITY.md");
    let mut render_only = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--only" => only = Some(value()?.split(',').map(str::to_owned).collect()),
            "--fuzz-seconds" => {
                fuzz_seconds = value()?
                    .parse()
                    .map_err(|_| format!("--fuzz-seconds: not a number\n{USAGE}"))?;
            }
            "--out" => out = PathBuf::from(value()?),
            "--render" => render_only = true,
            "-h" | "--help" => {
                eprintln!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if let Some(only) = &only {
        if let Some(bad) = only
            .iter()
            .find(|k| !PARTS.iter().any(|p| p.key == k.as_str()))
        {
            return Err(format!("--only: unknown part {bad:?}\n{USAGE}"));
        }
    }
    let root = workspace_root()?;
    let logs = root.join("target/reliability");
    std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let commit = commit_of(&root);
    let mut failed = Vec::new();
    for part in PARTS {
        if render_only || only.as_ref().is_some_and(|o| !o.contains(part.key)) {
            continue;
        }
        eprintln!("xtask reliability: {} ...", part.title);
        let outcome = run_part(&root, &logs, part, fuzz_seconds, &commit)?;
        eprintln!(
            "xtask reliability: {} {} in {:.0} s ({} figure lines; log {})",
            part.title,
            if outcome.passed { "PASSED" } else { "FAILED" },
            outcome.elapsed_s,
            outcome.figures.len(),
            outcome.log
        );
        if !outcome.passed {
            failed.push(part.key);
        }
        let saved = logs.join(format!("{}.json", part.key));
        let json = serde_json::to_string_pretty(&outcome).map_err(|e| e.to_string())?;
        std::fs::write(&saved, json).map_err(|e| format!("{}: {e}", saved.display()))?;
    }
    let outcomes: Vec<(&Part, Outcome)> = PARTS
        .iter()
        .filter_map(|p| {
            let text = std::fs::read_to_string(logs.join(format!("{}.json", p.key))).ok()?;
            Some((p, serde_json::from_str(&text).ok()?))
        })
        .collect();
    let text = render(&root, &outcomes);
    let out = if out.is_absolute() {
        out
    } else {
        root.join(out)
    };
    std::fs::write(&out, text).map_err(|e| format!("{}: {e}", out.display()))?;
    eprintln!("xtask reliability: wrote {}", out.display());
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "failed: {}; see RELIABILITY.md and target/reliability/*.log",
            failed.join(", ")
        ))
    }
}

fn workspace_root() -> Result<PathBuf, String> {
    // xtask's manifest sits one level below the workspace root.
    let manifest = std::env::var("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| "cannot find the workspace root".into())
}

fn run_part(
    root: &Path,
    logs: &Path,
    part: &'static Part,
    fuzz_seconds: u64,
    commit: &str,
) -> Result<Outcome, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let (mut cmd, shown) = match part.cargo {
        Some(tests) => {
            let mut c = Command::new(&cargo);
            // --no-fail-fast: one failing test binary must not hide the figures of the next.
            c.args(["test", "--release", "--no-fail-fast", "-p", "lb-bin"])
                .args(tests)
                .args(["--", "--nocapture", "--test-threads=1"]);
            let shown = format!(
                "LB_RELIABILITY=long cargo test --release --no-fail-fast -p lb-bin {} -- --nocapture --test-threads=1",
                tests.join(" ")
            );
            (c, shown)
        }
        None => {
            let mut c = Command::new("bash");
            c.arg(root.join("fuzz/run.sh"))
                .arg(fuzz_seconds.to_string());
            (c, format!("fuzz/run.sh {fuzz_seconds}"))
        }
    };
    let log = logs.join(format!("{}.log", part.key));
    let started = now_utc();
    let began = Instant::now();
    let output = cmd
        .current_dir(root)
        .env("LB_RELIABILITY", "long")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{shown}: {e}"))?;
    let elapsed = began.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    std::fs::write(&log, format!("$ {shown}\n{stdout}\n--- stderr\n{stderr}"))
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let figures = stdout
        .lines()
        .filter_map(|l| l.split_once("RELIABILITY ").map(|(_, j)| j))
        .filter_map(|j| serde_json::from_str::<Value>(j.trim()).ok())
        .collect();
    Ok(Outcome {
        key: part.key.to_owned(),
        command: shown,
        passed: output.status.success(),
        elapsed_s: elapsed.as_secs_f64(),
        figures,
        log: log.display().to_string(),
        commit: commit.to_owned(),
        started,
    })
}

fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn shell(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn commit_of(root: &Path) -> String {
    let commit = shell(&format!(
        "git -C '{}' rev-parse --short HEAD",
        root.display()
    ));
    let dirty = !shell(&format!(
        "git -C '{}' status --porcelain --untracked-files=no",
        root.display()
    ))
    .is_empty();
    if dirty {
        format!("{commit}+changes")
    } else {
        commit
    }
}

fn render(root: &Path, outcomes: &[(&Part, Outcome)]) -> String {
    let mut s = String::new();
    let cpu = shell("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2");
    let cores = shell("nproc");
    let kernel = shell("uname -r");
    let _ = writeln!(s, "# lb reliability report\n");
    let _ = writeln!(
        s,
        "Generated by `cargo xtask reliability` ({}, at `{}`), on {cores} cores ({}), Linux {kernel}. \
         Every figure below is printed by the tests themselves (`RELIABILITY {{json}}` lines); the \
         same tests run in a bounded form in `cargo test --workspace` (and so in `.ci/run`), \
         where they assert the same bars. `cargo xtask reliability --only PART[,PART]` reruns \
         some parts and keeps the latest run of the others. Raw logs: `target/reliability/*.log`.\n",
        now_utc(),
        commit_of(root),
        cpu.trim()
    );
    let _ = writeln!(
        s,
        "| part | verdict | time | run at | commit | command |\n|---|---|---:|---|---|---|"
    );
    for (p, o) in outcomes {
        let _ = writeln!(
            s,
            "| [{}](#{}) | {} | {:.0} s | {} | `{}` | `{}` |",
            p.title,
            anchor(p.title),
            if o.passed { "pass" } else { "**FAIL**" },
            o.elapsed_s,
            o.started,
            o.commit,
            o.command
        );
    }
    for (p, o) in outcomes {
        let _ = writeln!(s, "\n## {}\n\n{}\n", p.title, p.bar);
        let _ = writeln!(
            s,
            "Verdict: **{}** in {:.0} s. Regenerate: `{}`.\n",
            if o.passed { "pass" } else { "FAIL" },
            o.elapsed_s,
            o.command
        );
        if o.figures.is_empty() {
            let _ = writeln!(s, "No figures were printed (see the log).");
            continue;
        }
        // One table per section the part's tests report (a part may report several).
        let mut sections: Vec<String> = Vec::new();
        for f in &o.figures {
            let sec = f
                .get("section")
                .and_then(Value::as_str)
                .unwrap_or(p.key)
                .to_owned();
            if !sections.contains(&sec) {
                sections.push(sec);
            }
        }
        for sec in sections {
            let rows: Vec<&Value> = o
                .figures
                .iter()
                .filter(|f| f.get("section").and_then(Value::as_str).unwrap_or(p.key) == sec)
                .collect();
            let mut cols: Vec<String> = Vec::new();
            for r in &rows {
                if let Some(obj) = r.as_object() {
                    for k in obj.keys() {
                        if k != "section" && !cols.contains(k) {
                            cols.push(k.clone());
                        }
                    }
                }
            }
            let _ = writeln!(s, "`{sec}`\n");
            // Lists of records (a run's detections, say) get tables of their own below.
            let nested: Vec<String> = cols
                .iter()
                .filter(|c| rows.iter().any(|r| is_records(r.get(c.as_str()))))
                .cloned()
                .collect();
            let flat: Vec<String> = cols
                .iter()
                .filter(|c| !nested.contains(c))
                .cloned()
                .collect();
            if flat.len() > 8 && rows.len() <= 10 {
                // Wide and short: one column per run reads better than forty columns.
                let labels: Vec<String> =
                    rows.iter().enumerate().map(|(i, r)| label(r, i)).collect();
                let _ = writeln!(s, "| figure | {} |", labels.join(" | "));
                let _ = writeln!(s, "|---|{}", "---|".repeat(labels.len()));
                for c in &flat {
                    let cells: Vec<String> = rows.iter().map(|r| cell(r.get(c.as_str()))).collect();
                    let _ = writeln!(s, "| {c} | {} |", cells.join(" | "));
                }
            } else {
                let _ = writeln!(s, "| {} |", flat.join(" | "));
                let _ = writeln!(s, "|{}", "---|".repeat(flat.len().max(1)));
                for r in &rows {
                    let cells: Vec<String> = flat.iter().map(|c| cell(r.get(c.as_str()))).collect();
                    let _ = writeln!(s, "| {} |", cells.join(" | "));
                }
            }
            let _ = writeln!(s);
            for (i, r) in rows.iter().enumerate() {
                for c in &nested {
                    let Some(Value::Array(items)) = r.get(c.as_str()) else {
                        continue;
                    };
                    let mut sub: Vec<String> = Vec::new();
                    for item in items {
                        if let Some(obj) = item.as_object() {
                            for k in obj.keys() {
                                if !sub.contains(k) {
                                    sub.push(k.clone());
                                }
                            }
                        }
                    }
                    let _ = writeln!(s, "`{sec}` {}: `{c}`\n", label(r, i));
                    let _ = writeln!(s, "| {} |", sub.join(" | "));
                    let _ = writeln!(s, "|{}", "---|".repeat(sub.len().max(1)));
                    for item in items {
                        let cells: Vec<String> =
                            sub.iter().map(|k| cell(item.get(k.as_str()))).collect();
                        let _ = writeln!(s, "| {} |", cells.join(" | "));
                    }
                    let _ = writeln!(s);
                }
            }
        }
    }
    s
}

fn is_records(v: Option<&Value>) -> bool {
    matches!(v, Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_object))
}

/// A run's name in its section: its first naming field, else its place.
fn label(r: &Value, i: usize) -> String {
    ["proxy", "case", "protocol", "target"]
        .iter()
        .find_map(|k| r.get(*k).and_then(Value::as_str))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("run {}", i + 1))
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(t)) => t.replace('|', "\\|"),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if n.is_f64() => {
                if f.abs() >= 100.0 {
                    format!("{f:.0}")
                } else {
                    format!("{f:.2}")
                }
            }
            _ => n.to_string(),
        },
        Some(other) => format!("`{}`", other.to_string().replace('|', "\\|")),
    }
}

fn anchor(title: &str) -> String {
    title
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            'a'..='z' | '0'..='9' | '-' | '_' => Some(c),
            ' ' => Some('-'),
            _ => None,
        })
        .collect()
}
