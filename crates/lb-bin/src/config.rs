//! The TOML config file (SPEC.md, "Config file") and the effective settings: file values,
//! overridden by flags, validated once, with errors that name the file, the key and the line.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lb_core::select::StrategyKind;
use lb_core::Weight;
use lb_proxy::{HashKey, ProxyConfig};
use serde::Deserialize;
use toml::Spanned;

use crate::cli::{parse_addr, parse_duration, Cli, LogFormat};

/// A configuration `lb` refuses: exits 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigError {
    /// The config file, if the problem is in one.
    pub(crate) file: Option<PathBuf>,
    /// 1-based line of the key, where it exists in the file.
    pub(crate) line: Option<usize>,
    /// The key (`health.interval`, `backend[2].url`), or the flag.
    pub(crate) key: String,
    /// What is wrong.
    pub(crate) message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{line}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            _ => {}
        }
        // lb-core's messages already start with the setting's name.
        if self.key.is_empty() || self.message.starts_with(&self.key) {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

// --- the file, as written ---

type S<T> = Spanned<T>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<S<Vec<S<String>>>>,
    port: Option<S<u16>>,
    admin: Option<S<String>>,
    admin_token: Option<S<String>>,
    strategy: Option<S<String>>,
    hash_key: Option<S<String>>,
    log_format: Option<S<String>>,
    health: Option<Health>,
    passive: Option<Passive>,
    retry: Option<Retry>,
    timeouts: Option<Timeouts>,
    limits: Option<Limits>,
    tls: Option<Tls>,
    discovery: Option<Discovery>,
    #[serde(default)]
    backend: Vec<BackendEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Discovery {
    resolver: Option<S<String>>,
    refresh: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Health {
    interval: Option<S<String>>,
    timeout: Option<S<String>>,
    path: Option<S<String>>,
    rise: Option<S<i64>>,
    fall: Option<S<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Passive {
    consecutive_failures: Option<S<i64>>,
    ejection: Option<S<String>>,
    max_ejection: Option<S<String>>,
    max_ejected_percent: Option<S<i64>>,
    panic_threshold_percent: Option<S<i64>>,
    slow_start: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Retry {
    attempts: Option<S<i64>>,
    backoff: Option<S<String>>,
    budget_percent: Option<S<i64>>,
    min_retries_per_second: Option<S<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Timeouts {
    connect: Option<S<String>>,
    request: Option<S<String>>,
    idle: Option<S<String>>,
    header_read: Option<S<String>>,
    body_read: Option<S<String>>,
    drain: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Limits {
    max_header_bytes: Option<S<i64>>,
    max_connections: Option<S<i64>>,
    replay_buffer: Option<S<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tls {
    cert: Option<S<String>>,
    key: Option<S<String>>,
    upstream_ca: Option<S<String>>,
    #[serde(default)]
    certificates: Vec<CertEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertEntry {
    cert: S<String>,
    key: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendEntry {
    url: Option<S<String>>,
    srv: Option<S<String>>,
    scheme: Option<S<String>>,
    weight: Option<S<i64>>,
}

// --- the effective settings ---

/// Active health-check settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HealthSettings {
    /// Probe period; zero: no probes.
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    /// HTTP probe path; none: TCP probes.
    pub(crate) path: Option<String>,
}

/// TLS, loaded: the certificates as read when the settings were (a reload reads them again).
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsSettings {
    /// The certificate and key files served, the default first.
    pub(crate) files: Vec<(PathBuf, PathBuf)>,
    /// What they hold: none without a certificate (plain HTTP).
    pub(crate) certificates: Option<Arc<lb_proxy::tls::Certificates>>,
    /// Their DNS names, per file, for the summary.
    pub(crate) names: Vec<Vec<String>>,
    /// `tls.upstream_ca`.
    pub(crate) upstream_ca: Option<PathBuf>,
    /// How `https://` backends are verified: none when there is none.
    pub(crate) client: Option<Arc<rustls::ClientConfig>>,
    /// What `client` trusts, as read (the system's roots and `upstream_ca`'s certificates),
    /// to tell whether a reload changed it.
    pub(crate) client_roots: Option<Arc<lb_proxy::tls::ClientRoots>>,
}

impl TlsSettings {
    /// Keeps `old`'s client config when this one verifies the same way (the same system
    /// roots and the same `upstream_ca` certificates, as read): pooled connections to https
    /// backends, and their probes, are then kept across a reload rather than all opened
    /// afresh. A root removed from the system store is no longer trusted after a reload.
    pub(crate) fn keep_client_of(&mut self, old: &Self) {
        if self.client.is_some()
            && old.client.is_some()
            && self.client_roots.is_some()
            && self.client_roots == old.client_roots
        {
            self.client.clone_from(&old.client);
        }
    }
}

/// By the files named: what they hold is read afresh on every load anyway.
impl PartialEq for TlsSettings {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files && self.upstream_ca == other.upstream_ca
    }
}

/// A backend entry that DNS turns into backends (SPEC "Dynamic backends").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NameSpec {
    /// The `url` or `srv` as written: `/status` shows it as `"name"`, and it labels
    /// `lb_discovery_errors_total`.
    pub(crate) written: String,
    /// What to ask DNS.
    pub(crate) kind: NameKind,
    /// Whether its backends speak TLS (`https`); their certificates are verified for the
    /// name (`Host`) or the SRV target.
    pub(crate) https: bool,
}

/// What a [`NameSpec`] asks DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NameKind {
    /// A/AAAA records of `host`: each address at `port`, with `weight`.
    Host {
        host: String,
        port: u16,
        weight: Weight,
    },
    /// SRV records of the name: target, port, weight and priority from DNS.
    Srv(String),
}

/// `[discovery]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DiscoverySettings {
    /// The DNS server (UDP, TCP fallback); none: the system's configuration
    /// (`/etc/resolv.conf`, and `/etc/hosts`).
    pub(crate) resolver: Option<SocketAddr>,
    /// Re-resolve at least this often (sooner by TTL, never under 1 s).
    pub(crate) refresh: Duration,
}

impl Default for DiscoverySettings {
    fn default() -> Self {
        Self {
            resolver: None,
            refresh: Duration::from_secs(5),
        }
    }
}

/// Whether a backend URL's host is discovered through DNS: a host name that is neither an
/// IP literal nor `localhost` (or a name under `.localhost`).
///
/// `localhost` stays a static backend connected by name, as before discovery existed:
/// RFC 6761 reserves it for loopback (it is never asked of DNS), its `/etc/hosts` entries
/// often list `::1` where a backend started on `127.0.0.1` does not listen, and TLS
/// setups verify `https://localhost:PORT` backends by that name.
pub(crate) fn is_discovered_host(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let lower = bare.trim_end_matches('.').to_ascii_lowercase();
    bare.parse::<std::net::IpAddr>().is_err()
        && lower != "localhost"
        && !lower.ends_with(".localhost")
}

/// Everything `lb` runs with.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settings {
    pub(crate) file: Option<PathBuf>,
    pub(crate) listen: Vec<SocketAddr>,
    pub(crate) admin: Option<SocketAddr>,
    pub(crate) strategy: StrategyKind,
    pub(crate) hash_key: HashKey,
    pub(crate) health: HealthSettings,
    pub(crate) core: lb_core::Config,
    pub(crate) proxy: ProxyConfig,
    pub(crate) drain: Duration,
    /// The static backends: URLs whose host is an IP address (or `localhost`).
    pub(crate) backends: Vec<(String, Weight)>,
    /// The entries DNS resolves into backends.
    pub(crate) names: Vec<NameSpec>,
    pub(crate) discovery: DiscoverySettings,
    pub(crate) log_format: LogFormat,
    pub(crate) tls: TlsSettings,
    /// The admin API's bearer token (`--admin-token-file` or `admin_token`): none, and its
    /// mutating endpoints answer 403.
    pub(crate) admin_token: Option<crate::admin::Token>,
}

/// Reads the config file (if any), applies the flags over it, validates everything.
pub(crate) fn load(cli: &Cli) -> Result<Settings, ConfigError> {
    let (file, text) = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                file: Some(path.clone()),
                line: None,
                key: String::new(),
                message: format!("cannot read config file: {e}"),
            })?;
            (Some(path.clone()), text)
        }
        None => (None, String::new()),
    };
    load_text(cli, file.as_deref(), &text)
}

/// As [`load`], with the config file's text already read (`text` is empty without a file).
pub(crate) fn load_text(
    cli: &Cli,
    file: Option<&Path>,
    text: &str,
) -> Result<Settings, ConfigError> {
    let cx = Cx::new(file, text);
    let parsed: File = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| cx.line(&s));
        let message = e.message().trim().to_owned();
        // The field an unknown- or missing-field message names, under the key (table) the
        // error is in; a value of the wrong type is named by its own key.
        let field = key_of(&message);
        let at = e
            .span()
            .and_then(|s| key_at(text, s.start).or_else(|| key_on_line(text, s.start)));
        let key = match at {
            Some(at) if field.is_empty() || at == field || at.ends_with(&format!(".{field}")) => at,
            Some(at) => format!("{at}.{field}"),
            None => field,
        };
        ConfigError {
            file: file.map(Path::to_path_buf),
            line,
            key,
            message,
        }
    })?;
    settings(cli, &parsed, &cx)
}

struct Cx<'a> {
    file: Option<&'a Path>,
    text: &'a str,
    /// Where each key read so far is, so that an error found later (by `Config::validate`)
    /// can still point at its line.
    spans: RefCell<HashMap<String, Range<usize>>>,
}

impl<'a> Cx<'a> {
    fn new(file: Option<&'a Path>, text: &'a str) -> Self {
        Self {
            file,
            text,
            spans: RefCell::default(),
        }
    }

    fn span_of(&self, key: &str) -> Option<Range<usize>> {
        self.spans.borrow().get(key).cloned()
    }

    fn seen<T>(&self, key: &str, v: &S<T>) {
        self.spans.borrow_mut().insert(key.to_owned(), v.span());
    }

    /// A count as lb-core takes it (`u32`); whether it is in range is lb-core's to say.
    fn count(&self, key: &str, v: &Option<S<i64>>, default: u32) -> Result<u32, ConfigError> {
        let Some(s) = v else { return Ok(default) };
        self.seen(key, s);
        let n = *s.get_ref();
        u32::try_from(n).or_else(|_| self.err(key, Some(s.span()), format!("{n} is out of range")))
    }

    fn line(&self, span: &Range<usize>) -> usize {
        self.text
            .get(..span.start)
            .map_or(1, |t| t.matches('\n').count() + 1)
    }

    fn err<T>(
        &self,
        key: &str,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError {
            file: self.file.map(Path::to_path_buf),
            line: span.map(|s| self.line(&s)),
            key: key.to_owned(),
            message: message.into(),
        })
    }

    fn flag_err<T>(&self, flag: &str, message: impl Into<String>) -> Result<T, ConfigError> {
        Err(ConfigError {
            file: None,
            line: None,
            key: flag.to_owned(),
            message: message.into(),
        })
    }

    fn duration(
        &self,
        key: &str,
        v: &Option<S<String>>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => {
                self.seen(key, s);
                parse_duration(s.get_ref()).or_else(|e| self.err(key, Some(s.span()), e))
            }
        }
    }

    fn int(
        &self,
        key: &str,
        v: &Option<S<i64>>,
        default: u64,
        range: Range<u64>,
    ) -> Result<u64, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => {
                let n = *s.get_ref();
                match u64::try_from(n) {
                    Ok(n) if range.contains(&n) => Ok(n),
                    _ => self.err(
                        key,
                        Some(s.span()),
                        format!("{n} is out of range ({}..={})", range.start, range.end - 1),
                    ),
                }
            }
        }
    }
}

/// The offending key in serde's "unknown field `x`" (and missing, duplicate) messages; none
/// in any other message, whose backticks may quote a value (`invalid type: string "`b`
/// field"`).
fn key_of(message: &str) -> String {
    ["unknown field `", "missing field `", "duplicate field `"]
        .iter()
        .find_map(|p| message.strip_prefix(p))
        .and_then(|rest| rest.split('`').next())
        .unwrap_or_default()
        .to_owned()
}

/// The dotted key (`timeouts.body_reed`, `backend[1].weight`) at byte `at` of the file: the
/// innermost key whose name or value holds it, or the array-of-tables entry whose header
/// does. `None` where the text is not TOML.
fn key_at(text: &str, at: usize) -> Option<String> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut best = None;
    key_in(doc.get_ref(), at, "", &mut best);
    best.map(|(key, _)| key)
}

/// Where the file is not TOML (a duplicate key or table, a value missing) and [`key_at`]
/// has no document to walk: the key written on the line of byte `at` (or the table its
/// header names), under the last table header before that line. Read from the text, so a
/// header-like line inside a multi-line string can mislead it; it is only the fallback.
fn key_on_line(text: &str, at: usize) -> Option<String> {
    let start = text.get(..at)?.rfind('\n').map_or(0, |i| i + 1);
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut header = |line: &str| -> Option<String> {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
            let name = dotted(name);
            let n = counts.entry(name.clone()).or_default();
            *n += 1;
            Some(format!("{name}[{}]", *n - 1))
        } else {
            let name = line.strip_prefix('[')?.split(']').next()?;
            Some(dotted(name))
        }
    };
    let mut table = None;
    for line in text[..start].lines() {
        if let Some(h) = header(line) {
            table = Some(h);
        }
    }
    let line = text[start..].lines().next().unwrap_or_default();
    if let Some(h) = header(line) {
        return Some(h);
    }
    let key = dotted(line.split_once('=')?.0);
    if key.is_empty() {
        return None;
    }
    Some(table.map_or_else(|| key.clone(), |t| format!("{t}.{key}")))
}

/// `a . "b"` as `a.b`.
fn dotted(key: &str) -> String {
    key.split('.')
        .map(|part| part.trim().trim_matches(|c| c == '"' || c == '\''))
        .collect::<Vec<_>>()
        .join(".")
}

/// Walks `table` for [`key_at`]; `best` keeps the narrowest match (its span's length).
fn key_in(
    table: &toml::de::DeTable<'_>,
    at: usize,
    prefix: &str,
    best: &mut Option<(String, usize)>,
) {
    fn offer(best: &mut Option<(String, usize)>, at: usize, key: &str, span: Range<usize>) {
        if span.contains(&at) || span.start == at {
            let len = span.len();
            if best.as_ref().is_none_or(|(_, l)| len <= *l) {
                *best = Some((key.to_owned(), len));
            }
        }
    }
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.get_ref().to_string()
        } else {
            format!("{prefix}.{}", k.get_ref())
        };
        offer(best, at, &key, k.span());
        offer(best, at, &key, v.span());
        match v.get_ref() {
            toml::de::DeValue::Table(t) => key_in(t, at, &key, best),
            toml::de::DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let key = format!("{key}[{i}]");
                    offer(best, at, &key, item.span());
                    if let toml::de::DeValue::Table(t) = item.get_ref() {
                        key_in(t, at, &key, best);
                    }
                }
            }
            _ => {}
        }
    }
}

fn settings(cli: &Cli, f: &File, cx: &Cx<'_>) -> Result<Settings, ConfigError> {
    // Listen: flags replace the file's list; --port adds 0.0.0.0:N.
    let mut listen: Vec<SocketAddr> = cli.listen.clone();
    if let Some(port) = cli.port {
        listen.push(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if listen.is_empty() {
        if let Some(l) = &f.listen {
            for (i, a) in l.get_ref().iter().enumerate() {
                let addr = parse_addr(a.get_ref());
                listen.push(addr.or_else(|e| cx.err(&format!("listen[{i}]"), Some(a.span()), e))?);
            }
        }
        if let Some(p) = &f.port {
            listen.push(SocketAddr::from(([0, 0, 0, 0], *p.get_ref())));
        }
    }
    if listen.is_empty() {
        listen.push(SocketAddr::from(([127, 0, 0, 1], 3030)));
    }
    listen.dedup();

    let admin = match (cli.admin, &f.admin) {
        (Some(a), _) => Some(a),
        (None, Some(a)) => {
            Some(parse_addr(a.get_ref()).or_else(|e| cx.err("admin", Some(a.span()), e))?)
        }
        (None, None) => None,
    };
    let strategy = match (cli.strategy, &f.strategy) {
        (Some(s), _) => s,
        (None, Some(s)) => s
            .get_ref()
            .parse()
            .or_else(|e: lb_core::select::UnknownStrategy| {
                cx.err("strategy", Some(s.span()), e.to_string())
            })?,
        (None, None) => StrategyKind::RoundRobin,
    };
    let hash_key = match (&cli.hash_key, &f.hash_key) {
        (Some(k), _) => k.clone(),
        (None, Some(k)) => k
            .get_ref()
            .parse()
            .or_else(|e: lb_proxy::RouteError| cx.err("hash_key", Some(k.span()), e.to_string()))?,
        (None, None) => HashKey::ClientIp,
    };
    let log_format = match (cli.log_format, &f.log_format) {
        (Some(l), _) => l,
        (None, Some(l)) => match l.get_ref().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return cx.err(
                    "log_format",
                    Some(l.span()),
                    format!("{other:?} is not text or json"),
                )
            }
        },
        (None, None) => LogFormat::Text,
    };

    let h = f.health.as_ref();
    let none = Health::default();
    let h = h.unwrap_or(&none);
    let checker = lb_health::CheckerConfig::default();
    let interval = match cli.health_interval {
        Some(d) => d,
        None => cx.duration("health.interval", &h.interval, checker.interval)?,
    };
    let timeout = match cli.health_timeout {
        Some(d) => d,
        None => cx.duration("health.timeout", &h.timeout, checker.timeout)?,
    };
    if timeout.is_zero() && !interval.is_zero() {
        let why = "must be greater than zero";
        return match (cli.health_timeout, &h.timeout) {
            (None, Some(t)) => cx.err("health.timeout", Some(t.span()), why),
            _ => cx.flag_err("--health-timeout", why),
        };
    }
    let path = match (&cli.health_path, &h.path) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(p)) => Some(p.get_ref().clone()),
        (None, None) => None,
    };
    if let Some(p) = &path {
        if p.is_empty() || p.contains(char::is_whitespace) {
            let why = format!("{p:?} is not a path");
            return match (&cli.health_path, &h.path) {
                (None, Some(v)) => cx.err("health.path", Some(v.span()), why),
                _ => cx.flag_err("--health-path", why),
            };
        }
    }

    let core = core_config(h, f, cx)?;
    let admin_token = admin_token(cli, f, cx)?;
    let proxy = proxy_config(f, cx)?;
    let nt = Timeouts::default();
    let t = f.timeouts.as_ref().unwrap_or(&nt);
    let drain = match cli.drain_timeout {
        Some(d) => d,
        None => cx.duration("timeouts.drain", &t.drain, Duration::from_secs(30))?,
    };

    let (backends, names) = backends(cli, f, cx)?;
    let discovery = discovery(f, cx)?;
    let tls = tls(cli, f, cx, &backends, names.iter().any(|n| n.https))?;
    Ok(Settings {
        file: cx.file.map(Path::to_path_buf),
        listen,
        admin,
        strategy,
        hash_key,
        health: HealthSettings {
            interval,
            timeout,
            path,
        },
        core,
        proxy,
        drain,
        backends,
        names,
        discovery,
        log_format,
        tls,
        admin_token,
    })
}

/// `--admin-token-file` (one line, its newline ignored) or else `admin_token`.
fn admin_token(
    cli: &Cli,
    f: &File,
    cx: &Cx<'_>,
) -> Result<Option<crate::admin::Token>, ConfigError> {
    if let Some(path) = &cli.admin_token_file {
        let err = |message: String| ConfigError {
            file: Some(path.clone()),
            line: None,
            key: "--admin-token-file".into(),
            message,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(format!("cannot read the admin token file: {e}")))?;
        if text.trim_end().contains('\n') {
            return Err(err("the admin token file must hold one line".into()));
        }
        return token(&text)
            .map(|t| Some(crate::admin::Token::new(t)))
            .map_err(|why| err(format!("the admin token {why}")));
    }
    match &f.admin_token {
        Some(t) => match token(t.get_ref()) {
            Ok(tok) => Ok(Some(crate::admin::Token::new(tok))),
            Err(why) => cx.err("admin_token", Some(t.span()), format!("the token {why}")),
        },
        None => Ok(None),
    }
}

/// A bearer token as a client can send it: surrounding whitespace (a file's newline, a
/// stray space) is not part of it, since HTTP strips it from header values too; what is
/// left must be RFC 6750 `b64token` characters, or no request could ever match it.
fn token(raw: &str) -> Result<&str, &'static str> {
    let t = raw.trim();
    if t.is_empty() {
        return Err("is empty");
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
    if !t.chars().all(allowed) {
        return Err("may hold only letters, digits and -._~+/= (RFC 6750)");
    }
    Ok(t)
}

/// `[tls]` and `--tls-cert`/`--tls-key` (each flag replaces its key): the certificates read
/// and checked now, so that a bad one is a config error naming its file, at start-up and on
/// reload alike; and the verifier for `https://` backends, built when there is one.
fn tls(
    cli: &Cli,
    f: &File,
    cx: &Cx<'_>,
    backends: &[(String, Weight)],
    https_names: bool,
) -> Result<TlsSettings, ConfigError> {
    use lb_proxy::tls::{Certificate, Certificates};
    let none = Tls::default();
    let t = f.tls.as_ref().unwrap_or(&none);
    // (key, flag-or-file key, span) of each file, as it will be named in errors.
    let from =
        |flag: &Option<PathBuf>, key: &Option<S<String>>, name: &'static str| match (flag, key) {
            (Some(p), _) => Some((p.clone(), format!("--{}", name.replace('.', "-")), None)),
            (None, Some(v)) => Some((
                PathBuf::from(v.get_ref()),
                format!("tls.{}", name.trim_start_matches("tls.")),
                Some(v.span()),
            )),
            (None, None) => None,
        };
    let cert = from(&cli.tls_cert, &t.cert, "tls.cert");
    let key = from(&cli.tls_key, &t.key, "tls.key");
    let fail = |key: &str, span: Option<Range<usize>>, why: String| -> ConfigError {
        let e: Result<(), _> = if key.starts_with("--") {
            cx.flag_err(key, why)
        } else {
            cx.err(key, span, why)
        };
        e.err().unwrap_or_else(|| ConfigError {
            file: None,
            line: None,
            key: key.to_owned(),
            message: String::new(),
        })
    };
    let mut pairs = Vec::new();
    match (cert, key) {
        (Some(c), Some(k)) => pairs.push((c, k)),
        (Some((_, ck, span)), None) => {
            let want = if ck.starts_with("--") {
                "--tls-key"
            } else {
                "tls.key"
            };
            return Err(fail(
                &ck,
                span,
                format!("a certificate needs its private key: {want} is missing"),
            ));
        }
        (None, Some((_, kk, span))) => {
            let want = if kk.starts_with("--") {
                "--tls-cert"
            } else {
                "tls.cert"
            };
            return Err(fail(
                &kk,
                span,
                format!("a private key needs its certificate: {want} is missing"),
            ));
        }
        (None, None) => {}
    }
    for (i, c) in t.certificates.iter().enumerate() {
        pairs.push((
            (
                PathBuf::from(c.cert.get_ref()),
                format!("tls.certificates[{i}].cert"),
                Some(c.cert.span()),
            ),
            (
                PathBuf::from(c.key.get_ref()),
                format!("tls.certificates[{i}].key"),
                Some(c.key.span()),
            ),
        ));
    }
    let mut loaded = Vec::with_capacity(pairs.len());
    for ((cert, ckey, cspan), (key, kkey, kspan)) in &pairs {
        let c = Certificate::load(cert, key).map_err(|e| {
            // Named by the key of the file at fault.
            let on_key = match &e {
                lb_proxy::tls::TlsError::NoKey { .. }
                | lb_proxy::tls::TlsError::KeyMismatch { .. } => true,
                lb_proxy::tls::TlsError::NoCertificate { .. } => false,
                // The certificate is read first.
                lb_proxy::tls::TlsError::Read { path, .. }
                | lb_proxy::tls::TlsError::Invalid { path, .. } => path == key && path != cert,
            };
            if on_key {
                fail(kkey, kspan.clone(), e.to_string())
            } else {
                fail(ckey, cspan.clone(), e.to_string())
            }
        })?;
        loaded.push(c);
    }
    let names = loaded.iter().map(|c| c.names().to_vec()).collect();
    let mut loaded = loaded.into_iter();
    let certificates = loaded
        .next()
        .map(|default| Arc::new(Certificates::new(default, loaded)));
    let upstream_ca = t.upstream_ca.as_ref().map(|v| PathBuf::from(v.get_ref()));
    let https = backends
        .iter()
        .any(|(url, _)| lb_proxy::parse_backend(url).is_ok_and(|a| a.https))
        || https_names;
    let (client, client_roots) = if https || upstream_ca.is_some() {
        let on_ca = |e: lb_proxy::tls::TlsError| {
            let span = t.upstream_ca.as_ref().map(Spanned::span);
            fail("tls.upstream_ca", span, e.to_string())
        };
        // The config is built from the roots compared on reload: the same bytes.
        let roots = lb_proxy::tls::ClientRoots::load(upstream_ca.as_deref()).map_err(on_ca)?;
        let c = roots.client_config().map_err(on_ca)?;
        (Some(Arc::new(c)), Some(Arc::new(roots)))
    } else {
        (None, None)
    };
    Ok(TlsSettings {
        files: pairs
            .into_iter()
            .map(|((c, _, _), (k, _, _))| (c, k))
            .collect(),
        certificates,
        names,
        upstream_ca,
        client,
        client_roots,
    })
}

/// `[health]` thresholds, `[passive]`, `[retry]` and `timeouts.request`: lb-core's settings.
fn core_config(h: &Health, f: &File, cx: &Cx<'_>) -> Result<lb_core::Config, ConfigError> {
    // lb-core owns these settings' defaults and ranges: start from its defaults, map each key
    // the file has, and let `Config::validate` judge (its errors name the key, see below).
    let core = lb_core::Config::default();
    let (hd, pd, rd) = (core.health(), core.passive(), core.retry());
    let health = hd
        .with_rise(cx.count("health.rise", &h.rise, hd.rise())?)
        .with_fall(cx.count("health.fall", &h.fall, hd.fall())?);
    let np = Passive::default();
    let p = f.passive.as_ref().unwrap_or(&np);
    let passive = pd
        .with_consecutive_failures(cx.count(
            "passive.consecutive_failures",
            &p.consecutive_failures,
            pd.consecutive_failures(),
        )?)
        .with_ejection(cx.duration("passive.ejection", &p.ejection, pd.ejection())?)
        .with_max_ejection(cx.duration(
            "passive.max_ejection",
            &p.max_ejection,
            pd.max_ejection(),
        )?)
        .with_max_ejected_percent(cx.count(
            "passive.max_ejected_percent",
            &p.max_ejected_percent,
            pd.max_ejected_percent(),
        )?)
        .with_panic_threshold_percent(cx.count(
            "passive.panic_threshold_percent",
            &p.panic_threshold_percent,
            pd.panic_threshold_percent(),
        )?)
        .with_slow_start(cx.duration("passive.slow_start", &p.slow_start, pd.slow_start())?);
    let nr = Retry::default();
    let r = f.retry.as_ref().unwrap_or(&nr);
    let nt = Timeouts::default();
    let t = f.timeouts.as_ref().unwrap_or(&nt);
    let retry = rd
        .with_attempts(cx.count("retry.attempts", &r.attempts, rd.attempts())?)
        .with_backoff(cx.duration("retry.backoff", &r.backoff, rd.backoff())?)
        .with_budget_percent(cx.count(
            "retry.budget_percent",
            &r.budget_percent,
            rd.budget_percent(),
        )?)
        .with_min_retries_per_second(cx.count(
            "retry.min_retries_per_second",
            &r.min_retries_per_second,
            rd.min_retries_per_second(),
        )?)
        .with_attempt_timeout(cx.duration("timeouts.request", &t.request, rd.attempt_timeout())?);
    let core = core
        .with_health(health)
        .with_passive(passive)
        .with_retry(retry);
    core.validate().or_else(|e| {
        let key = e.setting().unwrap_or_default();
        cx.err(key, cx.span_of(key), e.to_string())
    })?;
    Ok(core)
}

/// `[timeouts]` and `[limits]` of the data plane: lb-proxy's settings.
fn proxy_config(f: &File, cx: &Cx<'_>) -> Result<ProxyConfig, ConfigError> {
    let nt = Timeouts::default();
    let t = f.timeouts.as_ref().unwrap_or(&nt);
    // lb-proxy owns its defaults; the ranges below are what this binary accepts of them.
    let mut proxy = ProxyConfig::default();
    let positive =
        |key: &str, v: &Option<S<String>>, d: Duration| -> Result<Duration, ConfigError> {
            let got = cx.duration(key, v, d)?;
            if got.is_zero() {
                return cx.err(
                    key,
                    v.as_ref().map(Spanned::span),
                    "must be greater than zero",
                );
            }
            Ok(got)
        };
    proxy.connect_timeout = positive("timeouts.connect", &t.connect, proxy.connect_timeout)?;
    proxy.idle_timeout = positive("timeouts.idle", &t.idle, proxy.idle_timeout)?;
    proxy.header_read_timeout = positive(
        "timeouts.header_read",
        &t.header_read,
        proxy.header_read_timeout,
    )?;
    proxy.body_read_timeout =
        positive("timeouts.body_read", &t.body_read, proxy.body_read_timeout)?;
    let l = f.limits.as_ref();
    let nl = Limits::default();
    let l = l.unwrap_or(&nl);
    proxy.max_header_bytes = cx.int(
        "limits.max_header_bytes",
        &l.max_header_bytes,
        proxy.max_header_bytes as u64,
        1024..16_777_217,
    )? as usize;
    proxy.max_connections = cx.int(
        "limits.max_connections",
        &l.max_connections,
        proxy.max_connections as u64,
        1..10_000_001,
    )? as usize;
    proxy.replay_buffer = cx.int(
        "limits.replay_buffer",
        &l.replay_buffer,
        proxy.replay_buffer as u64,
        0..1_073_741_825,
    )? as usize;
    Ok(proxy)
}

/// `[discovery]`: the resolver's address and the refresh period (at least 1 s).
fn discovery(f: &File, cx: &Cx<'_>) -> Result<DiscoverySettings, ConfigError> {
    let none = Discovery::default();
    let d = f.discovery.as_ref().unwrap_or(&none);
    let resolver = match &d.resolver {
        None => None,
        Some(v) => {
            cx.seen("discovery.resolver", v);
            Some(
                parse_addr(v.get_ref())
                    .or_else(|e| cx.err("discovery.resolver", Some(v.span()), e))?,
            )
        }
    };
    let refresh = cx.duration("discovery.refresh", &d.refresh, Duration::from_secs(5))?;
    if refresh < Duration::from_secs(1) {
        let span = d.refresh.as_ref().map(Spanned::span);
        return cx.err(
            "discovery.refresh",
            span,
            "must be at least 1s (DNS is not asked more often)",
        );
    }
    Ok(DiscoverySettings { resolver, refresh })
}

/// One backend URL: a static backend, or a host name DNS resolves (a [`NameSpec`]).
enum Parsed {
    Static(String),
    Name(NameSpec),
}

/// `url` as a static backend or a discovered name; its identity for duplicate checks.
fn parse_url(url: &str, weight: Weight) -> Result<(Parsed, String), String> {
    let addr = lb_proxy::parse_backend(url).map_err(|e| e.to_string())?;
    let identity = addr.identity();
    let host = addr.authority.host();
    if !is_discovered_host(host) {
        return Ok((Parsed::Static(url.to_owned()), identity));
    }
    let spec = NameSpec {
        written: url.to_owned(),
        kind: NameKind::Host {
            host: host.trim_end_matches('.').to_ascii_lowercase(),
            // `parse_backend` checked there is one.
            port: addr.authority.port_u16().unwrap_or(0),
            weight,
        },
        https: addr.https,
    };
    Ok((Parsed::Name(spec), identity))
}

type Backends = (Vec<(String, Weight)>, Vec<NameSpec>);

/// `[[backend]]` or the flags (which replace the file's list), each validated and distinct:
/// the static backends, and the entries DNS resolves.
fn backends(cli: &Cli, f: &File, cx: &Cx<'_>) -> Result<Backends, ConfigError> {
    let mut backends = Vec::new();
    let mut names = Vec::new();
    let mut seen = HashSet::new();
    let from_flags: Vec<&String> = cli
        .backend
        .iter()
        .chain(&cli.backends)
        .filter(|b| !b.trim().is_empty())
        .collect();
    if from_flags.is_empty() {
        for (i, b) in f.backend.iter().enumerate() {
            let entry = |k: &str| format!("backend[{i}].{k}");
            if let Some(s) = &b.scheme {
                if b.srv.is_none() {
                    return cx.err(
                        &entry("scheme"),
                        Some(s.span()),
                        "scheme goes with srv only (a url has its own)",
                    );
                }
            }
            let (url, srv) = match (&b.url, &b.srv) {
                (Some(u), Some(s)) => {
                    let at = u.span().start.max(s.span().start);
                    let span = if at == u.span().start {
                        u.span()
                    } else {
                        s.span()
                    };
                    return cx.err(
                        &entry(if at == u.span().start { "url" } else { "srv" }),
                        Some(span),
                        "give url or srv, not both",
                    );
                }
                (None, None) => {
                    // The entry's `[[backend]]` header, where the file has one.
                    let at = cx
                        .text
                        .match_indices("[[backend]]")
                        .nth(i)
                        .map(|(at, m)| at..at + m.len());
                    return cx.err(&entry("url"), at, "missing url (or srv)");
                }
                (Some(u), None) => (u, None),
                (None, Some(s)) => (s, Some(s)),
            };
            if let Some(srv) = srv {
                let key = entry("srv");
                if let Some(w) = &b.weight {
                    return cx.err(
                        &entry("weight"),
                        Some(w.span()),
                        "an srv entry's weights come from DNS",
                    );
                }
                let name = srv
                    .get_ref()
                    .trim()
                    .trim_end_matches('.')
                    .to_ascii_lowercase();
                if name.is_empty()
                    || name.contains(|c: char| c.is_whitespace() || c == '/' || c == ':')
                {
                    return cx.err(
                        &key,
                        Some(srv.span()),
                        format!("{:?} is not a DNS name", srv.get_ref()),
                    );
                }
                let https = match b.scheme.as_ref().map(|s| s.get_ref().to_ascii_lowercase()) {
                    None => false,
                    Some(s) if s == "http" => false,
                    Some(s) if s == "https" => true,
                    Some(s) => {
                        let span = b.scheme.as_ref().map(Spanned::span);
                        return cx.err(
                            &entry("scheme"),
                            span,
                            format!("{s:?}: scheme must be http or https"),
                        );
                    }
                };
                if !seen.insert(format!("srv:{https}:{name}")) {
                    return cx.err(&key, Some(srv.span()), format!("duplicate backend {name}"));
                }
                names.push(NameSpec {
                    written: srv.get_ref().trim().to_owned(),
                    kind: NameKind::Srv(name),
                    https,
                });
                continue;
            }
            let key = entry("url");
            // lb-core's `Weight` owns the range.
            let wkey = entry("weight");
            let weight = match &b.weight {
                None => Weight::ONE,
                Some(w) => Weight::new(cx.count(&wkey, &b.weight, 0)?)
                    .or_else(|e| cx.err(&wkey, Some(w.span()), e.to_string()))?,
            };
            let written = url.get_ref().trim().to_owned();
            let (parsed, identity) =
                parse_url(&written, weight).or_else(|e| cx.err(&key, Some(url.span()), e))?;
            if !seen.insert(identity) {
                return cx.err(
                    &key,
                    Some(url.span()),
                    format!("duplicate backend {written}"),
                );
            }
            match parsed {
                Parsed::Static(u) => backends.push((u, weight)),
                Parsed::Name(n) => names.push(n),
            }
        }
    } else {
        for url in from_flags {
            let url = url.trim().to_owned();
            let (parsed, identity) =
                parse_url(&url, Weight::ONE).or_else(|e| cx.flag_err("--backend", e))?;
            if !seen.insert(identity) {
                return cx.flag_err("--backend", format!("duplicate backend {url}"));
            }
            match parsed {
                Parsed::Static(u) => backends.push((u, Weight::ONE)),
                Parsed::Name(n) => names.push(n),
            }
        }
    }
    if backends.is_empty() && names.is_empty() {
        return match cx.file {
            Some(_) => cx.err(
                "backend",
                None,
                "no backends: add [[backend]] url = \"http://host:port\" (or --backend)",
            ),
            None => cx.flag_err(
                "--backend",
                "no backends: give --backend http://host:port (or --backends a,b, or --config)",
            ),
        };
    }
    Ok((backends, names))
}

impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        let listen: Vec<String> = self.listen.iter().map(ToString::to_string).collect();
        writeln!(
            f,
            "config: {}",
            self.file
                .as_ref()
                .map_or("(none: flags only)".into(), |p| p.display().to_string())
        )?;
        writeln!(f, "listen: {}", listen.join(", "))?;
        writeln!(
            f,
            "admin: {}",
            self.admin.map_or("off".into(), |a| a.to_string())
        )?;
        writeln!(
            f,
            "strategy: {} (hash key {})",
            self.strategy, self.hash_key
        )?;
        writeln!(f, "backends: {}", self.backends.len() + self.names.len())?;
        for (url, w) in &self.backends {
            writeln!(f, "  {url} weight {}", w.get())?;
        }
        for n in &self.names {
            match &n.kind {
                NameKind::Host { weight, .. } => {
                    writeln!(
                        f,
                        "  {} weight {} (every A/AAAA record)",
                        n.written,
                        weight.get()
                    )?;
                }
                NameKind::Srv(_) => {
                    let scheme = if n.https { "https" } else { "http" };
                    writeln!(
                        f,
                        "  srv {} ({scheme}; targets, ports, weights from DNS)",
                        n.written
                    )?;
                }
            }
        }
        if !self.names.is_empty() {
            let d = &self.discovery;
            writeln!(
                f,
                "discovery: resolver {}, refresh {}",
                d.resolver
                    .map_or("system (/etc/resolv.conf)".into(), |a| a.to_string()),
                humantime::format_duration(d.refresh)
            )?;
        }
        if self.tls.files.is_empty() {
            writeln!(f, "tls: off (plain HTTP)")?;
        } else {
            writeln!(
                f,
                "tls: HTTPS (ALPN h2, http/1.1; TLS 1.3, 1.2), certificates by SNI:"
            )?;
            for (i, ((cert, _), names)) in self.tls.files.iter().zip(&self.tls.names).enumerate() {
                let default = if i == 0 { " (default)" } else { "" };
                writeln!(f, "  {}{default}: {}", cert.display(), names.join(", "))?;
            }
        }
        if self.tls.client.is_some() {
            let extra = self
                .tls
                .upstream_ca
                .as_ref()
                .map_or(String::new(), |p| format!(" + {}", p.display()));
            writeln!(f, "upstream tls: system roots{extra}")?;
        }
        if self.health.interval.is_zero() {
            writeln!(f, "health: off")?;
        } else {
            let kind = self
                .health
                .path
                .as_ref()
                .map_or("tcp".into(), |p| format!("http GET {p}"));
            let c = self.core.health();
            writeln!(
                f,
                "health: {kind} every {}, timeout {}, rise {}, fall {}",
                d(self.health.interval),
                d(self.health.timeout),
                c.rise(),
                c.fall()
            )?;
        }
        let p = self.core.passive();
        writeln!(
            f,
            "passive: eject after {} failures for {} (max {}), max ejected {}%, panic below {}%, slow start {}",
            p.consecutive_failures(), d(p.ejection()), d(p.max_ejection()), p.max_ejected_percent(), p.panic_threshold_percent(), d(p.slow_start())
        )?;
        let r = self.core.retry();
        writeln!(
            f,
            "retry: {} attempts, backoff {}, budget {}% + {}/s",
            r.attempts(),
            d(r.backoff()),
            r.budget_percent(),
            r.min_retries_per_second()
        )?;
        let x = &self.proxy;
        writeln!(
            f,
            "timeouts: connect {}, request {}, idle {}, header_read {}, body_read {}, drain {}",
            d(x.connect_timeout),
            d(r.attempt_timeout()),
            d(x.idle_timeout),
            d(x.header_read_timeout),
            d(x.body_read_timeout),
            d(self.drain)
        )?;
        write!(
            f,
            "limits: max_header_bytes {}, max_connections {}, replay_buffer {}",
            x.max_header_bytes, x.max_connections, x.replay_buffer
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn with_file(text: &str, args: &[&str]) -> Result<Settings, ConfigError> {
        // One directory per call: tests run in parallel, and two texts may share a length.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("lb-config-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lb.toml");
        std::fs::write(&path, text).unwrap();
        let mut argv = vec![
            "lb".to_owned(),
            "--config".to_owned(),
            path.display().to_string(),
        ];
        argv.extend(args.iter().map(|s| (*s).to_owned()));
        load(&Cli::parse_from(argv))
    }

    /// A certificate for `names` and its key, as PEM files in a fresh directory.
    fn pem_pair(names: &[&str]) -> (PathBuf, PathBuf) {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("lb-config-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    const ONE_BACKEND: &str = "[[backend]]\nurl = \"http://127.0.0.1:1\"\n";

    #[test]
    fn tls_certificates_load_from_keys_and_flags_each_flag_replacing_its_key() {
        let (c, k) = pem_pair(&["default.test"]);
        let (c2, k2) = pem_pair(&["a.test", "*.b.test"]);
        let text = format!(
            "[tls]\ncert = {c:?}\nkey = {k:?}\n[[tls.certificates]]\ncert = {c2:?}\nkey = {k2:?}\n{ONE_BACKEND}"
        );
        let s = with_file(&text, &[]).unwrap();
        assert_eq!(
            s.tls.files,
            [(c.clone(), k.clone()), (c2.clone(), k2.clone())]
        );
        assert_eq!(
            s.tls.names,
            [vec!["default.test"], vec!["a.test", "*.b.test"]]
        );
        assert!(s.tls.certificates.is_some());
        assert!(s.tls.client.is_none(), "no https backend, no upstream_ca");
        // The flags replace the default certificate, not the others.
        let (c3, k3) = pem_pair(&["flag.test"]);
        let s = with_file(
            &text,
            &[
                "--tls-cert",
                c3.to_str().unwrap(),
                "--tls-key",
                k3.to_str().unwrap(),
            ],
        )
        .unwrap();
        assert_eq!(s.tls.files, [(c3, k3), (c2, k2)]);
        assert!(s.to_string().contains("default): flag.test"), "{s}");
    }

    #[test]
    fn tls_errors_name_the_file_and_the_key() {
        let (c, k) = pem_pair(&["a.test"]);
        let (_, other_key) = pem_pair(&["b.test"]);
        let err = |text: String, args: &[&str]| with_file(&text, args).unwrap_err();
        let e = err(format!("[tls]\ncert = {c:?}\n{ONE_BACKEND}"), &[]);
        assert_eq!((e.key.as_str(), e.line), ("tls.cert", Some(2)), "{e}");
        assert!(e.message.contains("tls.key is missing"), "{e}");
        let e = err(ONE_BACKEND.to_owned(), &["--tls-key", k.to_str().unwrap()]);
        assert_eq!(e.key, "--tls-key", "{e}");
        assert!(e.message.contains("--tls-cert is missing"), "{e}");
        let e = err(
            format!("[tls]\ncert = \"/nonexistent/cert.pem\"\nkey = {k:?}\n{ONE_BACKEND}"),
            &[],
        );
        assert_eq!(e.key, "tls.cert", "{e}");
        assert!(
            e.to_string().contains("/nonexistent/cert.pem: cannot read"),
            "{e}"
        );
        let e = err(
            format!("[tls]\ncert = {c:?}\nkey = {other_key:?}\n{ONE_BACKEND}"),
            &[],
        );
        assert_eq!((e.key.as_str(), e.line), ("tls.key", Some(3)), "{e}");
        assert!(
            e.to_string().contains("does not match the certificate"),
            "{e}"
        );
        assert!(e.to_string().contains(other_key.to_str().unwrap()), "{e}");
        // The key file given as the certificate: no certificate in it.
        let e = err(
            format!("[tls]\ncert = {k:?}\nkey = {k:?}\n{ONE_BACKEND}"),
            &[],
        );
        assert_eq!(e.key, "tls.cert", "{e}");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        let e = err(
            format!("[tls]\ncert = {c:?}\nkey = {c:?}\n{ONE_BACKEND}"),
            &[],
        );
        assert_eq!(e.key, "tls.key", "{e}");
        assert!(e.to_string().contains("no PEM private key"), "{e}");
        let e = err(format!("[tls]\nupstream_ca = {k:?}\n{ONE_BACKEND}"), &[]);
        assert_eq!(e.key, "tls.upstream_ca", "{e}");
        let e = err(
            format!("[[tls.certificates]]\ncert = {c:?}\n{ONE_BACKEND}"),
            &[],
        );
        assert!(e.to_string().contains("key"), "{e}");
    }

    #[test]
    fn tls_with_only_upstream_ca_is_a_plain_listener_verifying_https_backends() {
        let (c, _) = pem_pair(&["ca.test"]);
        let s = with_file(
            &format!("[tls]\nupstream_ca = {c:?}\n[[backend]]\nurl = \"https://localhost:8443\"\n[[backend]]\nurl = \"http://localhost:8443\"\n"),
            &[],
        )
        .unwrap();
        assert!(s.tls.certificates.is_none() && s.tls.files.is_empty());
        assert!(s.tls.client.is_some());
        assert_eq!(
            s.backends.len(),
            2,
            "http and https to the same host:port are two backends"
        );
        assert!(
            s.to_string().contains("upstream tls: system roots + "),
            "{s}"
        );
    }

    #[test]
    fn full_example_parses() {
        let s = with_file(
            r#"
listen = ["127.0.0.1:3030"]
admin = "127.0.0.1:9901"
strategy = "weighted-round-robin"
hash_key = "header:X-User"

[health]
interval = "2s"
timeout = "1s"
path = "/healthz"
rise = 2
fall = 3

[passive]
consecutive_failures = 5
ejection = "10s"
max_ejection = "5m"
max_ejected_percent = 50
panic_threshold_percent = 50
slow_start = "30s"

[retry]
attempts = 3
backoff = "10ms"
budget_percent = 20
min_retries_per_second = 10

[timeouts]
connect = "1s"
request = "30s"
idle = "60s"
header_read = "10s"
body_read = "45s"
drain = "30s"

[limits]
max_header_bytes = 32768
max_connections = 10000
replay_buffer = 65536

[[backend]]
url = "http://127.0.0.1:3031"
weight = 3

[[backend]]
url = "http://127.0.0.1:3032"
weight = 1
"#,
            &[],
        )
        .unwrap();
        assert_eq!(s.strategy, StrategyKind::WeightedRoundRobin);
        assert_eq!(s.backends.len(), 2);
        assert_eq!(s.backends[0].1.get(), 3);
        assert_eq!(s.health.interval, Duration::from_secs(2));
        assert_eq!(s.core.passive().max_ejection(), Duration::from_secs(300));
        assert_eq!(s.admin, Some("127.0.0.1:9901".parse().unwrap()));
        assert_eq!(s.proxy.body_read_timeout, Duration::from_secs(45));
    }

    #[test]
    fn admin_token_from_the_key_or_the_file_which_wins() {
        let base = "[[backend]]\nurl = \"http://a:1\"\n";
        let s = with_file(base, &[]).unwrap();
        assert_eq!(s.admin_token, None);
        let s = with_file(&format!("admin_token = \"k\"\n{base}"), &[]).unwrap();
        assert_eq!(s.admin_token, Some(crate::admin::Token::new("k")));
        let e = with_file(&format!("admin_token = 1\n{base}"), &[]).unwrap_err();
        assert_eq!(e.key, "admin_token", "{e}");
        let e = with_file(
            &format!("strategy = \"random\"\nadmin_token = \"\"\n{base}"),
            &[],
        )
        .unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (Some(2), "admin_token"), "{e}");
        let e = with_file(&format!("admin_token = \" \"\n{base}"), &[]).unwrap_err();
        assert!(
            e.to_string().contains("empty"),
            "a token of spaces could never match: {e}"
        );

        let dir = std::env::temp_dir().join(format!("lb-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "from-file\r\n").unwrap();
        let flag = file.display().to_string();
        let s = with_file(
            &format!("admin_token = \"k\"\n{base}"),
            &["--admin-token-file", &flag],
        )
        .unwrap();
        assert_eq!(
            s.admin_token,
            Some(crate::admin::Token::new("from-file")),
            "the flag wins"
        );
        std::fs::write(&file, " spaced-out \r\n").unwrap();
        let s = with_file(base, &["--admin-token-file", &flag]).unwrap();
        assert_eq!(
            s.admin_token,
            Some(crate::admin::Token::new("spaced-out")),
            "surrounding whitespace is not the token's (HTTP strips it from the header)"
        );
        for (text, why) in [
            ("", "empty"),
            ("\n", "empty"),
            ("  \r\n", "empty"),
            ("a\nb\n", "one line"),
            ("a b\n", "RFC 6750"),
        ] {
            std::fs::write(&file, text).unwrap();
            let e = with_file(base, &["--admin-token-file", &flag]).unwrap_err();
            assert_eq!(e.file.as_deref(), Some(file.as_path()), "{e}");
            assert!(e.to_string().contains(why), "{e}");
        }
        let missing = dir.join("missing").display().to_string();
        let e = with_file(base, &["--admin-token-file", &missing]).unwrap_err();
        assert!(e.to_string().starts_with(&missing), "{e}");
    }

    #[test]
    fn errors_name_file_key_and_line() {
        let e = with_file("strategy = \"round-robin\"\nbogus = 1\n", &[]).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (Some(2), "bogus"), "{e}");
        let e = with_file(
            "[[backend]]\nurl = \"http://a:1\"\n[timeouts]\nbody_read = \"5s\"\nbody_reed = \"5s\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (Some(5), "timeouts.body_reed"),
            "{e}"
        );
        let e = with_file(
            "[[backend]]\nurl = \"http://a:1\"\n[[backend]]\nurl = \"http://b:1\"\nwieght = 2\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (Some(5), "backend[1].wieght"),
            "{e}"
        );
        let e = with_file(
            "[[backend]]\nurl = \"http://a:1\"\n[[backend]]\nurl = \"ftp://b:2\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (Some(4), "backend[1].url"), "{e}");
        let e = with_file(
            "[health]\ninterval = \"soon\"\n[[backend]]\nurl = \"http://a:1\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (Some(2), "health.interval"),
            "{e}"
        );
        let e = with_file("[[backend]]\nurl = \"http://a:1\"\nweight = 0\n", &[]).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (Some(3), "backend[0].weight"),
            "{e}"
        );
        let e = with_file(
            "[[backend]]\nurl = \"http://a:1\"\n[[backend]]\nurl = \"http://a:1/\"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("duplicate backend"), "{e}");
        // Ranges are lb-core's; the key and line are still this file's.
        let b = "[[backend]]\nurl = \"http://a:1\"\n";
        for (text, line, key, says) in [
            (
                "[retry]\n\nattempts = 11\n",
                3,
                "retry.attempts",
                "between 1 and 10, got 11",
            ),
            ("[health]\nrise = -1\n", 2, "health.rise", "out of range"),
            (
                "[health]\nfall = 1001\n",
                2,
                "health.fall",
                "between 1 and 1000",
            ),
            (
                "[passive]\nejection = \"1m\"\nmax_ejection = \"10s\"\n",
                3,
                "passive.max_ejection",
                "shorter",
            ),
            (
                "[passive]\nmax_ejected_percent = 101\n",
                2,
                "passive.max_ejected_percent",
                "between 0 and 100",
            ),
            (
                "[timeouts]\nrequest = \"0s\"\n",
                2,
                "timeouts.request",
                "greater than zero",
            ),
        ] {
            let e = with_file(&format!("{b}{text}"), &[]).unwrap_err();
            assert_eq!((e.line, e.key.as_str()), (Some(line + 2), key), "{e}");
            let shown = e.to_string();
            assert!(
                shown.contains(says) && shown.contains(&format!("lb.toml:{}: {key}", line + 2)),
                "{shown}"
            );
            assert_eq!(shown.matches(key).count(), 1, "the key once: {shown}");
        }
        let e = with_file("listen = [\"127.0.0.1:1\"]\n", &[]).unwrap_err();
        assert!(e.to_string().contains("no backends"), "{e}");
        assert!(e.to_string().contains("lb.toml"), "names the file: {e}");
    }

    /// Found by the config fuzz target (lb-fuzz `config`): these two were reported without
    /// the file and the line, as if they came from flags.
    #[test]
    fn health_path_and_timeout_errors_name_the_file_and_line() {
        let b = "[[backend]]\nurl = \"http://a:1\"\n";
        for (text, key) in [
            ("[health]\npath = \"\"\n", "health.path"),
            (
                "[health]\ninterval = \"1s\"\npath = \"a b\"\n",
                "health.path",
            ),
            ("[health]\ntimeout = \"0s\"\n", "health.timeout"),
        ] {
            let e = with_file(&format!("{b}{text}"), &[]).unwrap_err();
            let line = text.lines().count() + 2;
            assert_eq!((e.line, e.key.as_str()), (Some(line), key), "{e}");
            assert!(e.file.is_some(), "{e}");
            assert!(
                e.to_string().contains(&format!("lb.toml:{line}: {key}")),
                "{e}"
            );
        }
        let e = with_file(b, &["--health-timeout", "0s"]).unwrap_err();
        assert_eq!((e.file, e.key.as_str()), (None, "--health-timeout"));
    }

    /// Found by the config fuzz target (lb-fuzz `config`): a value of the wrong type was
    /// reported with no key, and a missing `url` under the second `[[backend]]` as the
    /// first one's.
    #[test]
    fn type_errors_and_missing_keys_name_the_key() {
        for (text, line, key) in [
            ("[health]\nrise = \"2\"\n", 2, "health.rise"),
            ("port = \"80\"\n", 1, "port"),
            (
                "[[backend]]\nurl = \"http://a:1\"\nweight = \"5m\"\n",
                3,
                "backend[0].weight",
            ),
            (
                "[[backend]]\nurl = \"http://a:1\"\n[[backend]]\nweight = 2\n",
                3,
                "backend[1].url",
            ),
            (
                "[[backend]]\nurl = \"http://a:1\"\n[[backend]]\nurl = 7\n",
                4,
                "backend[1].url",
            ),
            ("listen = [\"127.0.0.1:1\", 2]\n", 1, "listen[1]"),
            ("[timeouts]\nidle = 5\n", 2, "timeouts.idle"),
            ("timeouts = { idle = 5 }\n", 1, "timeouts.idle"),
            ("health.rise = true\n", 1, "health.rise"),
        ] {
            let e = with_file(text, &[]).unwrap_err();
            assert_eq!((e.line, e.key.as_str()), (Some(line), key), "{text:?}: {e}");
            assert!(e.to_string().contains(key), "{e}");
        }
    }

    /// A file that is not TOML (a key or table twice, a value missing) named no key: the
    /// error's span points into a document that cannot be walked.
    #[test]
    fn duplicate_keys_and_missing_values_name_the_key() {
        let b = "[[backend]]\nurl = \"http://a:1\"\n";
        for (text, line, key) in [
            ("[retry]\nattempts = 1\nattempts = 2\n", 3, "retry.attempts"),
            (
                "strategy = \"random\"\nstrategy = \"random\"\n",
                2,
                "strategy",
            ),
            (
                "[timeouts]\nidle = \"1s\"\n[timeouts]\ndrain = \"1s\"\n",
                3,
                "timeouts",
            ),
            ("[health]\ninterval = \n", 2, "health.interval"),
        ] {
            let e = with_file(&format!("{text}{b}"), &[]).unwrap_err();
            assert_eq!((e.line, e.key.as_str()), (Some(line), key), "{text:?}: {e}");
            assert!(
                e.to_string().contains(&format!("lb.toml:{line}: {key}")),
                "{e}"
            );
        }
        let e = with_file(
            "[[backend]]\nurl = \"http://a:1\"\n[[backend]]\nurl = \"http://b:1\"\nweight = 1\nweight = 2\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (Some(6), "backend[1].weight"),
            "{e}"
        );
    }

    /// A bad address in a `listen` list written over several lines was reported at the
    /// list's first line, as `listen`: its own index and line.
    #[test]
    fn a_bad_listen_address_names_its_index_and_line() {
        let e = with_file(
            "listen = [\n  \"127.0.0.1:1\",\n  \"bad\",\n]\n[[backend]]\nurl = \"http://a:1\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (Some(3), "listen[1]"), "{e}");
    }

    /// A value of the wrong type quoting backticks and the word "field" was read as a serde
    /// field message: `port = "a `b` field"` was reported as key `port.b`.
    #[test]
    fn a_value_quoting_a_field_message_is_named_by_its_own_key() {
        for (text, line, key) in [
            ("port = \"a `b` field\"\n", 1, "port"),
            (
                "[[backend]]\nurl = \"http://a:1\"\nweight = \"`x` field\"\n",
                3,
                "backend[0].weight",
            ),
        ] {
            let e = with_file(text, &[]).unwrap_err();
            assert_eq!((e.line, e.key.as_str()), (Some(line), key), "{text:?}: {e}");
        }
    }

    /// lb-bin has no defaults of its own for the libraries' settings: an empty file gives
    /// exactly lb-core's, lb-proxy's and lb-health's.
    #[test]
    fn defaults_are_the_libraries_own() {
        let s = with_file("[[backend]]\nurl = \"http://a:1\"\n", &[]).unwrap();
        assert_eq!(s.core, lb_core::Config::default());
        assert_eq!(s.proxy, ProxyConfig::default());
        let c = lb_health::CheckerConfig::default();
        assert_eq!(
            (s.health.interval, s.health.timeout),
            (c.interval, c.timeout)
        );
    }

    #[test]
    fn host_names_and_srv_entries_are_discovered() {
        let s = with_file(
            "[[backend]]\nurl = \"http://127.0.0.1:1\"\n[[backend]]\nurl = \"http://localhost:2\"\n\
             [[backend]]\nurl = \"http://Api.Internal.:8080\"\nweight = 2\n\
             [[backend]]\nsrv = \"_http._tcp.api.service.consul\"\nscheme = \"https\"\n\
             [discovery]\nresolver = \"127.0.0.1:8600\"\nrefresh = \"2s\"\n",
            &[],
        )
        .unwrap();
        let statics: Vec<&str> = s.backends.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(
            statics,
            ["http://127.0.0.1:1", "http://localhost:2"],
            "IP literals and localhost are static"
        );
        assert_eq!(
            s.names[0].kind,
            NameKind::Host {
                host: "api.internal".into(),
                port: 8080,
                weight: Weight::new(2).unwrap()
            }
        );
        assert!(!s.names[0].https);
        assert_eq!(
            s.names[1].kind,
            NameKind::Srv("_http._tcp.api.service.consul".into())
        );
        assert!(s.names[1].https);
        assert_eq!(s.names[1].written, "_http._tcp.api.service.consul");
        assert_eq!(
            s.discovery.resolver,
            Some("127.0.0.1:8600".parse().unwrap())
        );
        assert_eq!(s.discovery.refresh, Duration::from_secs(2));
        assert!(
            s.tls.client.is_some(),
            "an https srv entry needs the verifier"
        );
        // Only names: no static backend is fine (503 until one resolves).
        let s = with_file("[[backend]]\nsrv = \"_x._tcp.a\"\n", &[]).unwrap();
        assert!(s.backends.is_empty());
        assert_eq!(s.discovery, DiscoverySettings::default());
        for (text, line, key) in [
            (
                "[[backend]]\nurl = \"http://a:1\"\nsrv = \"_x._tcp.a\"\n",
                3,
                "backend[0].srv",
            ),
            (
                "[[backend]]\nurl = \"http://a:1\"\nscheme = \"http\"\n",
                3,
                "backend[0].scheme",
            ),
            (
                "[[backend]]\nsrv = \"_x._tcp.a\"\nweight = 2\n",
                3,
                "backend[0].weight",
            ),
            (
                "[[backend]]\nsrv = \"_x._tcp.a\"\nscheme = \"ftp\"\n",
                3,
                "backend[0].scheme",
            ),
            (
                "[[backend]]\nsrv = \"_x._tcp.a\"\n[[backend]]\nsrv = \"_X._tcp.a.\"\n",
                4,
                "backend[1].srv",
            ),
            ("[[backend]]\nsrv = \"http://a:1\"\n", 2, "backend[0].srv"),
            (
                "[[backend]]\nsrv = \"_x._tcp.a\"\n[discovery]\nrefresh = \"500ms\"\n",
                4,
                "discovery.refresh",
            ),
            (
                "[[backend]]\nsrv = \"_x._tcp.a\"\n[discovery]\nresolver = \"nowhere\"\n",
                4,
                "discovery.resolver",
            ),
            (
                "[[backend]]\nsrv = \"_x._tcp.a\"\n[discovery]\nresolvr = \"1.1.1.1:53\"\n",
                4,
                "discovery.resolvr",
            ),
        ] {
            let e = with_file(text, &[]).unwrap_err();
            assert_eq!((e.line, e.key.as_str()), (Some(line), key), "{text:?}: {e}");
        }
        assert!(is_discovered_host("api.internal"));
        for not in [
            "127.0.0.1",
            "[::1]",
            "localhost",
            "LOCALHOST.",
            "a.localhost",
        ] {
            assert!(!is_discovered_host(not), "{not}");
        }
    }

    #[test]
    fn flags_override_the_file_and_port_adds_a_listener() {
        let s = with_file(
            "listen = [\"127.0.0.1:4000\"]\nstrategy = \"random\"\n[[backend]]\nurl = \"http://a:1\"\n",
            &["--strategy", "least-connections", "--backend", "http://b:2", "--port", "5000", "--listen", "127.0.0.1:6000"],
        )
        .unwrap();
        assert_eq!(s.strategy, StrategyKind::LeastConnections);
        assert!(s.backends.is_empty(), "a host name is discovered");
        let written: Vec<&str> = s.names.iter().map(|n| n.written.as_str()).collect();
        assert_eq!(written, ["http://b:2"]);
        assert_eq!(
            s.listen,
            vec![
                "127.0.0.1:6000".parse().unwrap(),
                "0.0.0.0:5000".parse().unwrap()
            ]
        );
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use clap::Parser;
    use proptest::prelude::*;

    fn load_text(text: &str) -> Result<Settings, ConfigError> {
        let cli = Cli::parse_from(["lb"]);
        let parsed: File = match toml::from_str(text) {
            Ok(f) => f,
            Err(_) => {
                return Err(ConfigError {
                    file: None,
                    line: None,
                    key: String::new(),
                    message: String::new(),
                })
            }
        };
        settings(&cli, &parsed, &Cx::new(None, text))
    }

    proptest! {
        /// No input makes config loading panic: arbitrary text, and arbitrary values under
        /// every key.
        #[test]
        fn never_panics(text in ".{0,400}") {
            let _ = load_text(&text);
        }

        #[test]
        fn never_panics_on_odd_values(
            key in prop::sample::select(vec![
                "strategy", "hash_key", "admin", "log_format", "health.interval", "health.rise",
                "passive.ejection", "passive.max_ejected_percent", "retry.attempts", "retry.backoff",
                "timeouts.request", "timeouts.body_read", "limits.max_header_bytes", "limits.replay_buffer", "port",
            ]),
            value in prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                "[a-z0-9:/.\\[\\] -]{0,30}".prop_map(|s| format!("{s:?}")),
                Just("1e308".to_owned()),
                Just("true".to_owned()),
            ],
        ) {
            let (section, name) = key.split_once('.').map_or(("", key), |(s, n)| (s, n));
            let text = if section.is_empty() {
                format!("{name} = {value}\n[[backend]]\nurl = \"http://a:1\"\n")
            } else {
                format!("[[backend]]\nurl = \"http://a:1\"\n[{section}]\n{name} = {value}\n")
            };
            let _ = load_text(&text);
        }
    }
}
