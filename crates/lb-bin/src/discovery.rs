//! DNS discovery (SPEC "Dynamic backends"): host-name and SRV backend entries resolved at
//! start-up and re-resolved every `[discovery] refresh` (sooner when the answers' TTL is
//! shorter, never more often than once a second).
//!
//! # Why a resolver without a cache
//! lb asks the DNS server each time: a cache would answer from what it saw and hide a change
//! until the TTL ran out on its side as well as ours. hickory's own cache is off
//! (`cache_size: 0`); the refresh period and the TTL decide when to ask again.
//!
//! # What counts as a change
//! An answer with records is the name's new set. An answer that the name has no such
//! records (NXDOMAIN, or NOERROR with no answer) empties it. Anything else (a timeout, a
//! SERVFAIL or REFUSED, an I/O error) keeps the last known set, is logged and counted in
//! `lb_discovery_errors_total{name}`: a DNS outage must not take every backend away.
//!
//! The sets are applied by [`crate::app::Control`], like a reload on the balancer in force.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{ResolveError, TokioResolver};
use lb_core::Weight;
use lb_proxy::BackendSpec;

use crate::config::{DiscoverySettings, NameKind, NameSpec};

/// The shortest time between two lookups of a name.
pub(crate) const MIN_REFRESH: Duration = Duration::from_secs(1);

/// How long one lookup may take, all attempts included: within it a lost UDP answer is
/// asked again (and a truncated one over TCP).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// One backend a name resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Found {
    /// `scheme://addr:port` (IPv6 in brackets).
    pub(crate) url: String,
    /// From the entry (`url`) or the SRV record (0 counts as 1).
    pub(crate) weight: Weight,
    /// SRV priority (lower is preferred); 0 for a host name.
    pub(crate) priority: u16,
    /// The name an https backend's certificate is verified for.
    pub(crate) server_name: Option<String>,
}

impl Found {
    /// As lb-proxy routes it.
    pub(crate) fn spec(&self) -> BackendSpec {
        BackendSpec {
            url: self.url.clone(),
            weight: self.weight,
            server_name: self.server_name.clone(),
            priority: self.priority,
        }
    }
}

/// What one lookup of a name said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Its backends (sorted), and how long the answer is valid.
    Found(Vec<Found>, Duration),
    /// The name has no such records (NXDOMAIN, or none of the type asked): no backends.
    Empty,
    /// The lookup failed (timeout, SERVFAIL, ...): keep the last known set.
    Failed(String),
}

/// The resolver `[discovery]` asks for: its `resolver` over UDP with TCP fallback (no hosts
/// file: that server is the source of truth), else the system's configuration, where
/// `/etc/hosts` applies as it does for every other program.
pub(crate) fn resolver(settings: &DiscoverySettings) -> Result<TokioResolver, ResolveError> {
    let (config, mut opts) = match settings.resolver {
        Some(addr) => {
            let servers = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
            let mut opts = ResolverOpts::default();
            opts.use_hosts_file = ResolveHosts::Never;
            (ResolverConfig::from_parts(None, vec![], servers), opts)
        }
        None => {
            let (config, mut opts) = hickory_resolver::system_conf::read_system_conf()?;
            opts.use_hosts_file = ResolveHosts::Always;
            (config, opts)
        }
    };
    opts.cache_size = 0;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.timeout = Duration::from_millis(900);
    opts.attempts = 1;
    opts.try_tcp_on_error = true;
    Ok(
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
            .with_options(opts)
            .build(),
    )
}

/// Whether `e` says the name has no records of the type asked (NXDOMAIN, or NOERROR with
/// an empty answer), as opposed to a failure to learn anything.
fn is_empty_answer(e: &ResolveError) -> bool {
    match e.proto().map(|p| p.kind()) {
        Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) => {
            matches!(
                *response_code,
                ResponseCode::NXDomain | ResponseCode::NoError
            )
        }
        _ => false,
    }
}

fn failed(e: &ResolveError) -> Answer {
    if is_empty_answer(e) {
        Answer::Empty
    } else {
        Answer::Failed(e.to_string())
    }
}

/// `scheme://ip:port`.
fn url_of(https: bool, ip: IpAddr, port: u16) -> String {
    let scheme = if https { "https" } else { "http" };
    format!("{scheme}://{}", SocketAddr::new(ip, port))
}

/// How long until `valid_until` (tokio's clock, as the rest of lb-bin reads time).
fn ttl_of(valid_until: std::time::Instant) -> Duration {
    valid_until.saturating_duration_since(tokio::time::Instant::now().into_std())
}

/// `fqdn`'s A and AAAA addresses, asked separately: `None` when both say the name has no
/// such records, an error when either failed (a timeout or SERVFAIL of one half must not
/// drop that half's addresses, nor, beside an empty other half, all of them: hickory's
/// dual-stack `lookup_ip` returns what one half found, or the first error, for that).
async fn addresses(
    resolver: &TokioResolver,
    fqdn: &str,
) -> Result<Option<(Vec<IpAddr>, Duration)>, String> {
    // A name the hosts file has (the system resolver only) is the file's, both families,
    // as for every other program: DNS is not asked the family the file lacks, so DNS
    // being unreachable does not make such a name fail.
    if resolver.options().use_hosts_file != ResolveHosts::Never {
        if let Some(found) = from_hosts_file(fqdn) {
            return Ok(Some(found));
        }
    }
    let (v4, v6) = tokio::join!(resolver.ipv4_lookup(fqdn), resolver.ipv6_lookup(fqdn));
    let mut ips = Vec::new();
    let mut ttl: Option<Duration> = None;
    match v4 {
        Ok(l) => {
            ttl = Some(ttl_of(l.as_lookup().valid_until()));
            ips.extend(l.iter().map(|a| IpAddr::V4(a.0)));
        }
        Err(e) if is_empty_answer(&e) => {}
        Err(e) => return Err(format!("A: {e}")),
    }
    match v6 {
        Ok(l) => {
            let t = ttl_of(l.as_lookup().valid_until());
            ttl = Some(ttl.map_or(t, |x| x.min(t)));
            ips.extend(l.iter().map(|a| IpAddr::V6(a.0)));
        }
        Err(e) if is_empty_answer(&e) => {}
        Err(e) => return Err(format!("AAAA: {e}")),
    }
    Ok(ttl.filter(|_| !ips.is_empty()).map(|t| (ips, t)))
}

/// `fqdn`'s addresses in the system hosts file (read each time: an edit applies at the
/// next refresh), if it has the name.
fn from_hosts_file(fqdn: &str) -> Option<(Vec<IpAddr>, Duration)> {
    use hickory_resolver::proto::op::Query;
    use hickory_resolver::proto::rr::{Name, RecordType};
    let hosts = hickory_resolver::Hosts::from_system().ok()?;
    let name = Name::from_ascii(fqdn).ok()?;
    let mut ips = Vec::new();
    for t in [RecordType::A, RecordType::AAAA] {
        if let Some(l) = hosts.lookup_static_host(&Query::query(name.clone(), t)) {
            ips.extend(l.iter().filter_map(|r| match r {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            }));
        }
    }
    // No TTL: `refresh` decides when to read it again.
    (!ips.is_empty()).then_some((ips, Duration::MAX))
}

/// Looks `spec` up once.
pub(crate) async fn resolve(resolver: &TokioResolver, spec: &NameSpec) -> Answer {
    let answer = tokio::time::timeout(LOOKUP_TIMEOUT, resolve_inner(resolver, spec)).await;
    answer.unwrap_or_else(|_| Answer::Failed(format!("no answer within {LOOKUP_TIMEOUT:?}")))
}

async fn resolve_inner(resolver: &TokioResolver, spec: &NameSpec) -> Answer {
    let https = spec.https;
    match &spec.kind {
        NameKind::Host { host, port, weight } => {
            // Absolute: the search list of resolv.conf does not apply to a backend's name.
            let fqdn = format!("{host}.");
            match addresses(resolver, &fqdn).await {
                Ok(None) => Answer::Empty,
                Ok(Some((ips, ttl))) => {
                    let mut found: Vec<Found> = ips
                        .iter()
                        .map(|ip| Found {
                            url: url_of(https, *ip, *port),
                            weight: *weight,
                            priority: 0,
                            server_name: https.then(|| host.clone()),
                        })
                        .collect();
                    found.sort_by(|a, b| a.url.cmp(&b.url));
                    found.dedup_by(|a, b| a.url == b.url);
                    if found.is_empty() {
                        return Answer::Empty;
                    }
                    Answer::Found(found, ttl)
                }
                Err(why) => Answer::Failed(why),
            }
        }
        NameKind::Srv(name) => {
            let fqdn = format!("{name}.");
            let srv = match resolver.srv_lookup(fqdn.as_str()).await {
                Ok(srv) => srv,
                Err(e) => return failed(&e),
            };
            let mut ttl = ttl_of(srv.as_lookup().valid_until());
            // The additional section's addresses, when the server sent them (Consul does).
            let additional: Vec<(String, IpAddr)> = srv
                .as_lookup()
                .record_iter()
                .filter_map(|r| {
                    let target = r
                        .name()
                        .to_ascii()
                        .trim_end_matches('.')
                        .to_ascii_lowercase();
                    match r.data() {
                        RData::A(a) => Some((target, IpAddr::V4(a.0))),
                        RData::AAAA(a) => Some((target, IpAddr::V6(a.0))),
                        _ => None,
                    }
                })
                .collect();
            let mut found = Vec::new();
            let records: Vec<_> = srv.iter().collect();
            let groups = srv_groups(
                &records
                    .iter()
                    .map(|r| (r.priority(), r.weight()))
                    .collect::<Vec<_>>(),
            );
            for (record, (priority, weight)) in records.into_iter().zip(groups) {
                let target = record
                    .target()
                    .to_ascii()
                    .trim_end_matches('.')
                    .to_ascii_lowercase();
                // An https target is verified for its name: one no certificate can name
                // (a last label of digits, say) gives no backend, and must not make the
                // routes of the whole set (at start-up, lb itself) fail.
                if https && rustls::pki_types::ServerName::try_from(target.clone()).is_err() {
                    tracing::warn!(target: "lb::discovery", name = %spec.written, target = %target, "SRV target is not a name a certificate can be verified for: skipped");
                    continue;
                }
                let mut ips: Vec<IpAddr> = additional
                    .iter()
                    .filter(|(t, _)| *t == target)
                    .map(|(_, ip)| *ip)
                    .collect();
                if ips.is_empty() {
                    if let Ok(ip) = target.parse::<IpAddr>() {
                        ips.push(ip);
                    } else {
                        match addresses(resolver, &format!("{target}.")).await {
                            Ok(Some((l, t))) => {
                                ttl = ttl.min(t);
                                ips.extend(l);
                            }
                            // A target without addresses gives no backend.
                            Ok(None) => {}
                            // The set would be partial: keep the last known one.
                            Err(e) => return Answer::Failed(format!("{target}: {e}")),
                        }
                    }
                }
                for ip in ips {
                    found.push(Found {
                        url: url_of(https, ip, record.port()),
                        weight,
                        priority,
                        server_name: https.then(|| target.clone()),
                    });
                }
            }
            // One address under several records: the most preferred record's, whatever
            // order the server sent them in (every instance, every lookup, keeps the same).
            found.sort_by(|a, b| {
                (&a.url, a.priority, std::cmp::Reverse(a.weight.get())).cmp(&(
                    &b.url,
                    b.priority,
                    std::cmp::Reverse(b.weight.get()),
                ))
            });
            found.dedup_by(|a, b| a.url == b.url);
            if found.is_empty() {
                return Answer::Empty;
            }
            Answer::Found(found, ttl)
        }
    }
}

/// Each SRV record's `(priority, weight)` as lb-core groups and weighs it: the priorities
/// ranked within the entry (its lowest present is group 0, as every configured or
/// host-name backend is, so an SRV entry answered with priority 1, as Consul does, is used
/// beside them rather than only as their fail-over), and the weights with 0 counting as 1,
/// scaled down in proportion when one is above [`Weight::MAX`] (not turned into 1).
fn srv_groups(records: &[(u16, u16)]) -> Vec<(u16, Weight)> {
    let mut priorities: Vec<u16> = records.iter().map(|r| r.0).collect();
    priorities.sort_unstable();
    priorities.dedup();
    let max = records.iter().map(|r| u32::from(r.1)).max().unwrap_or(0);
    records
        .iter()
        .map(|&(p, w)| {
            let rank = priorities.binary_search(&p).unwrap_or(0);
            let mut w = u32::from(w).max(1);
            if max > Weight::MAX {
                w = (u64::from(w) * u64::from(Weight::MAX) / u64::from(max)).max(1) as u32;
            }
            (
                u16::try_from(rank).unwrap_or(u16::MAX),
                Weight::new(w).unwrap_or(Weight::ONE),
            )
        })
        .collect()
}

/// `lb --check`: looks every name up once and says which give no backend now (a warning,
/// not an error: lb would start and keep trying).
pub(crate) fn check_names(settings: &crate::config::Settings) -> Vec<String> {
    if settings.names.is_empty() {
        return Vec::new();
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return vec![format!("cannot check DNS names: {e}")],
    };
    rt.block_on(async {
        let resolver = match resolver(&settings.discovery) {
            Ok(r) => r,
            Err(e) => return vec![format!("cannot set up the DNS resolver: {e}")],
        };
        let mut warnings = Vec::new();
        for n in &settings.names {
            match resolve(&resolver, n).await {
                Answer::Found(..) => {}
                Answer::Empty => warnings.push(format!(
                    "{} does not resolve (no such records): no backends from it until it does",
                    n.written
                )),
                Answer::Failed(why) => warnings.push(format!(
                    "{} does not resolve ({why}): no backends from it until it does",
                    n.written
                )),
            }
        }
        warnings
    })
}

/// When to ask again after `answer`: `refresh`, or sooner by the answer's TTL, never under
/// [`MIN_REFRESH`].
pub(crate) fn next_refresh(answer: &Answer, refresh: Duration) -> Duration {
    match answer {
        Answer::Found(_, ttl) => refresh.min(*ttl).max(MIN_REFRESH),
        _ => refresh.max(MIN_REFRESH),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_is_the_shorter_of_period_and_ttl_but_at_least_a_second() {
        let five = Duration::from_secs(5);
        let found = |ttl| Answer::Found(Vec::new(), ttl);
        assert_eq!(next_refresh(&found(Duration::from_secs(60)), five), five);
        assert_eq!(
            next_refresh(&found(Duration::from_secs(2)), five),
            Duration::from_secs(2)
        );
        assert_eq!(next_refresh(&found(Duration::ZERO), five), MIN_REFRESH);
        assert_eq!(next_refresh(&Answer::Empty, five), five);
        assert_eq!(next_refresh(&Answer::Failed("x".into()), five), five);
    }

    /// Review13b: weights above 10000 (SRV allows 65535) were turned into 1, below a
    /// weight of 100 beside them; an entry's priorities are ranked within it.
    #[test]
    fn srv_weights_scale_and_priorities_rank_within_the_entry() {
        let w = |n| Weight::new(n).unwrap();
        assert_eq!(
            srv_groups(&[(1, 60000), (1, 100)]),
            [(0, w(10000)), (0, w(16))]
        );
        assert_eq!(
            srv_groups(&[(10, 0), (20, 3), (10, 5)]),
            [(0, w(1)), (1, w(3)), (0, w(5))]
        );
        assert_eq!(
            srv_groups(&[(1, 65535), (2, 0)]),
            [(0, w(10000)), (1, w(1))]
        );
    }

    /// A name the hosts file has is answered from it, both families, without DNS.
    #[test]
    fn a_hosts_file_name_is_the_files() {
        let text = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        let has = text.lines().any(|l| {
            let mut w = l.split('#').next().unwrap_or("").split_whitespace();
            w.next() == Some("127.0.0.1") && w.any(|n| n == "localhost")
        });
        if has {
            let (ips, _) = from_hosts_file("localhost.").expect("in the hosts file");
            assert!(ips.contains(&IpAddr::from([127, 0, 0, 1])), "{ips:?}");
        }
        assert_eq!(from_hosts_file("no-such-name.invalid."), None);
    }

    #[test]
    fn urls_by_address() {
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(url_of(false, v6, 80), "http://[::1]:80");
        let v4: IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(url_of(true, v4, 443), "https://10.0.0.7:443");
    }
}
