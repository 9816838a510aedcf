//! The egress policy of `http` steps: which addresses the engine may connect to on a tenant's
//! behalf. Only public addresses by default; an operator allows more per server and per tenant.
//!
//! A request is checked where it could reach an address: the host of its URL and of every
//! redirect when it is an IP literal (those never go through a resolver), and every address a
//! host name resolves to, inside the client's resolver, which hands the connector only the
//! addresses it allowed. So the addresses checked are the addresses connected to: a name that
//! resolves differently a moment later (DNS rebinding) gains nothing.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect;
use reqwest::Url;

/// Most redirects an `http` step follows, as reqwest's default policy.
const MAX_REDIRECTS: usize = 10;

/// What may be reached beyond public addresses: the server's allow-list, and each tenant's,
/// which adds to the server's.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    pub server: Allow,
    pub tenants: BTreeMap<String, Allow>,
}

impl EgressPolicy {
    /// For logs and banners: `public addresses` and what is allowed beyond them.
    pub fn summary(&self) -> String {
        let mut out = "public addresses".to_string();
        if !self.server.is_empty() {
            let entries: Vec<String> = self.server.entries().map(|e| e.to_string()).collect();
            out.push_str(&format!(", {}", entries.join(", ")));
        }
        if !self.tenants.is_empty() {
            out.push_str(&format!(
                " (more for tenants {})",
                self.tenants.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        out
    }

    /// Reads an egress config: `allow` (the server's list) and `tenants: {ID: {allow: [...]}}`,
    /// YAML or JSON. The error names the entry that is wrong.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            allow: Vec<String>,
            #[serde(default)]
            tenants: BTreeMap<String, TenantFile>,
        }
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct TenantFile {
            #[serde(default)]
            allow: Vec<String>,
        }
        let file: File = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        let mut policy = Self::default();
        for entry in &file.allow {
            policy.server.add(entry.parse().map_err(|e| format!("allow: {e}"))?);
        }
        for (tenant, t) in file.tenants {
            let mut allow = Allow::default();
            for entry in &t.allow {
                allow.add(entry.parse().map_err(|e| format!("tenants.{tenant}.allow: {e}"))?);
            }
            policy.tenants.insert(tenant, allow);
        }
        Ok(policy)
    }
}

/// One allow-list entry: a network, an address (a network of one), a host name, or every name
/// under a domain (`*.corp.example`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowEntry {
    Net(IpNet),
    Host(String),
    Domain(String),
}

impl AllowEntry {
    /// Loopback, IPv4 and IPv6: what `sluice dev` allows.
    pub fn loopback() -> [AllowEntry; 2] {
        [
            AllowEntry::Net(IpNet::new_assert(Ipv4Addr::new(127, 0, 0, 0).into(), 8)),
            AllowEntry::Net(IpNet::new_assert(Ipv6Addr::LOCALHOST.into(), 128)),
        ]
    }
}

impl FromStr for AllowEntry {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.contains('/') {
            let net: IpNet = s.parse().map_err(|_| format!("`{s}` is not a CIDR such as 10.1.0.0/16 or fd00::/8"))?;
            return Ok(AllowEntry::Net(net.trunc()));
        }
        if let Ok(ip) = s.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return Ok(AllowEntry::Net(IpNet::from(ip)));
        }
        let name = normalize_host(s);
        let (wildcard, rest) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, name.as_str()),
        };
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && !l.starts_with('-')
        };
        if rest.is_empty() || rest.len() > 253 || !rest.split('.').all(label_ok) {
            return Err(format!(
                "`{s}` is neither an address, a CIDR nor a host name (such as api.internal or *.corp.example)"
            ));
        }
        Ok(if wildcard { AllowEntry::Domain(rest.to_string()) } else { AllowEntry::Host(rest.to_string()) })
    }
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowEntry::Net(n) => write!(f, "{n}"),
            AllowEntry::Host(h) => f.write_str(h),
            AllowEntry::Domain(d) => write!(f, "*.{d}"),
        }
    }
}

/// An allow-list: what may be reached beyond public addresses.
#[derive(Debug, Clone, Default)]
pub struct Allow {
    nets: Vec<IpNet>,
    hosts: Vec<String>,
    domains: Vec<String>,
}

impl Allow {
    pub fn add(&mut self, entry: AllowEntry) {
        match entry {
            AllowEntry::Net(n) => self.nets.push(n),
            AllowEntry::Host(h) => self.hosts.push(h),
            AllowEntry::Domain(d) => self.domains.push(d),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty() && self.hosts.is_empty() && self.domains.is_empty()
    }

    pub fn entries(&self) -> impl Iterator<Item = AllowEntry> + '_ {
        let nets = self.nets.iter().map(|n| AllowEntry::Net(*n));
        let hosts = self.hosts.iter().map(|h| AllowEntry::Host(h.clone()));
        nets.chain(hosts).chain(self.domains.iter().map(|d| AllowEntry::Domain(d.clone())))
    }

    fn with(&self, more: &Allow) -> Allow {
        let mut all = self.clone();
        all.nets.extend(more.nets.iter().copied());
        all.hosts.extend(more.hosts.iter().cloned());
        all.domains.extend(more.domains.iter().cloned());
        all
    }

    /// Whether a host name is allowed by name, whatever it resolves to.
    fn allows_name(&self, host: &str) -> bool {
        let host = normalize_host(host);
        self.hosts.contains(&host)
            || self.domains.iter().any(|d| host.strip_suffix(d.as_str()).is_some_and(|sub| sub.ends_with('.')))
    }

    /// Whether an address may be connected to (`name`: the host name it was resolved from).
    pub fn permits(&self, name: Option<&str>, ip: IpAddr) -> bool {
        if name.is_some_and(|n| self.allows_name(n)) {
            return true;
        }
        let canonical = ip.to_canonical();
        is_public(ip) || self.nets.iter().any(|n| n.contains(&ip) || n.contains(&canonical))
    }

    /// The check of a URL before any connection: its host when it is an address (such hosts
    /// bypass the resolver). A host name passes here; its addresses are checked when resolved.
    pub fn permits_url(&self, url: &Url) -> bool {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.permits(None, ip.into()),
            Some(url::Host::Ipv6(ip)) => self.permits(None, ip.into()),
            Some(url::Host::Domain(_)) => true,
            None => false,
        }
    }

    /// The resolved addresses of `name` that may be connected to, in their order.
    pub fn filter(&self, name: &str, addrs: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
        addrs.into_iter().filter(|a| self.permits(Some(name), a.ip())).collect()
    }
}

/// Lowercase, without a final dot: `LocalHost.` and `localhost` are one name.
fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether an address is publicly routable: not loopback, private (RFC 1918, RFC 4193), shared
/// (CGNAT), link-local, multicast, broadcast, unspecified, documentation, benchmarking or
/// reserved. IPv6 forms that embed an IPv4 address (mapped, NAT64, 6to4) are judged by it.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => is_public_v6(ip),
    }
}

/// Non-public IPv4 ranges (RFC 6890 and successors).
const V4_DENIED: &[([u8; 4], u8)] = &[
    ([0, 0, 0, 0], 8),       // "this network", unspecified
    ([10, 0, 0, 0], 8),      // private
    ([100, 64, 0, 0], 10),   // shared address space (CGNAT)
    ([127, 0, 0, 0], 8),     // loopback
    ([169, 254, 0, 0], 16),  // link-local, cloud metadata
    ([172, 16, 0, 0], 12),   // private
    ([192, 0, 0, 0], 24),    // IETF protocol assignments
    ([192, 0, 2, 0], 24),    // documentation
    ([192, 88, 99, 0], 24),  // 6to4 relay anycast
    ([192, 168, 0, 0], 16),  // private
    ([198, 18, 0, 0], 15),   // benchmarking
    ([198, 51, 100, 0], 24), // documentation
    ([203, 0, 113, 0], 24),  // documentation
    ([224, 0, 0, 0], 4),     // multicast
    ([240, 0, 0, 0], 4),     // reserved, broadcast
];

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let ip = u32::from(ip);
    !V4_DENIED.iter().any(|(net, len)| (ip ^ u32::from_be_bytes(*net)) >> (32 - len) == 0)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    // NAT64 (RFC 6052): a DNS64 resolver maps IPv4-only names there.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_public_v4(embedded(s[6], s[7]));
    }
    // Outside 2000::/3 nothing is global unicast: unspecified, loopback, IPv4-compatible,
    // discard, unique local (fc00::/7), link-local (fe80::/10), site-local, multicast.
    if s[0] & 0xe000 != 0x2000 {
        return false;
    }
    match s[0] {
        // IETF protocol assignments (Teredo among them) and documentation.
        0x2001 => s[1] > 0x01ff && s[1] != 0x0db8,
        // 6to4 carries an IPv4 address.
        0x2002 => is_public_v4(embedded(s[1], s[2])),
        // Documentation (RFC 9637).
        0x3fff => s[1] > 0x0fff,
        _ => true,
    }
}

/// A connection refused by the policy. It carries nothing about the target, so no message
/// built from it can tell a tenant what the target resolved to or whether it would answer.
#[derive(Debug)]
pub(crate) struct Denied;

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("denied by the egress policy")
    }
}

impl std::error::Error for Denied {}

#[derive(Debug)]
struct TooManyRedirects;

impl fmt::Display for TooManyRedirects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "more than {MAX_REDIRECTS} redirects")
    }
}

impl std::error::Error for TooManyRedirects {}

/// Whether a request failed because the policy refused it (directly, in the resolver or on a
/// redirect).
pub(crate) fn is_denied(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<Denied>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// Resolves host names and keeps only the addresses the policy permits.
struct Resolver {
    allow: Arc<Allow>,
}

impl Resolve for Resolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = Arc::clone(&self.allow);
        let name = name.as_str().to_string();
        Box::pin(async move {
            let resolved = tokio::net::lookup_host((name.as_str(), 0)).await?;
            let permitted = allow.filter(&name, resolved);
            if permitted.is_empty() {
                tracing::info!(host = %name, "http step denied by the egress policy");
                return Err(Box::new(Denied) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

/// A client that can only connect where its allow-list permits.
pub(crate) struct Guarded {
    pub allow: Arc<Allow>,
    pub client: reqwest::Client,
}

impl Guarded {
    fn new(allow: Allow) -> reqwest::Result<Self> {
        let allow = Arc::new(allow);
        let hops = Arc::clone(&allow);
        let client = reqwest::Client::builder()
            .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(Resolver { allow: Arc::clone(&allow) }))
            .redirect(redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    attempt.error(TooManyRedirects)
                } else if !hops.permits_url(attempt.url()) {
                    tracing::info!(host = ?attempt.url().host_str(), "http step redirect denied by the egress policy");
                    attempt.error(Denied)
                } else {
                    attempt.follow()
                }
            }))
            // Through a proxy the proxy would resolve the target: connect directly, so that
            // what is checked is what is reached.
            .no_proxy()
            .build()?;
        Ok(Self { allow, client })
    }
}

/// The clients of `http` steps: one per tenant with an allow-list of its own (so no pooled
/// connection crosses between allow-lists), one for everybody else.
pub(crate) struct Egress {
    default: Guarded,
    tenants: HashMap<String, Guarded>,
}

impl Egress {
    pub fn new(policy: &EgressPolicy) -> reqwest::Result<Self> {
        let mut tenants = HashMap::new();
        for (tenant, allow) in &policy.tenants {
            tenants.insert(tenant.clone(), Guarded::new(policy.server.with(allow))?);
        }
        Ok(Self { default: Guarded::new(policy.server.clone())?, tenants })
    }

    pub fn of(&self, tenant: &str) -> &Guarded {
        self.tenants.get(tenant).unwrap_or(&self.default)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn url_permitted(allow: &Allow, url: &str) -> bool {
        allow.permits_url(&Url::parse(url).unwrap())
    }

    /// Issue #13, item 6: every non-public range is refused on the default policy, whatever the
    /// spelling of the address; public addresses pass.
    #[test]
    fn non_public_addresses_are_denied_in_every_spelling() {
        let none = Allow::default();
        let denied = [
            "http://127.0.0.1/",
            "http://127.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://127.0.0.1./",
            "http://127.255.255.254:8080/",
            "http://0.0.0.0/",
            "http://0/",
            "http://[::1]/",
            "http://[::]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::127.0.0.1]/",
            "http://[0:0:0:0:0:ffff:169.254.169.254]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00:ec2::254]/",
            "http://10.0.0.1/",
            "http://10.255.255.255/",
            "http://172.16.0.1/",
            "http://172.31.255.255/",
            "http://192.168.1.1/",
            "http://100.64.0.1/",
            "http://100.127.255.255/",
            "http://192.0.0.1/",
            "http://192.0.2.1/",
            "http://198.18.0.1/",
            "http://198.51.100.1/",
            "http://203.0.113.1/",
            "http://224.0.0.1/",
            "http://239.255.255.250/",
            "http://240.0.0.1/",
            "http://255.255.255.255/",
            "http://[fc00::1]/",
            "http://[fdff:ffff::1]/",
            "http://[fe80::1]/",
            "http://[febf::1]/",
            "http://[fec0::1]/",
            "http://[ff02::1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[64:ff9b::7f00:1]/",
            "http://[2002:7f00:1::]/",
            "http://[2002:c0a8:101::]/",
            "http://[2001:db8::1]/",
            "http://[2001::1]/",
            "http://[100::1]/",
            "http://[3fff::1]/",
        ];
        for url in denied {
            assert!(!url_permitted(&none, url), "{url} should be denied");
        }
        let public = [
            "http://1.1.1.1/",
            "http://8.8.8.8/",
            "http://100.63.255.255/",
            "http://100.128.0.1/",
            "http://172.15.255.255/",
            "http://172.32.0.1/",
            "http://169.253.255.255/",
            "http://192.169.0.1/",
            "http://223.255.255.255/",
            "http://[2606:4700:4700::1111]/",
            "http://[::ffff:8.8.8.8]/",
            "http://[64:ff9b::808:808]/",
            "http://[2002:808:808::]/",
            "http://[2001:4860:4860::8888]/",
            "https://example.com/",
        ];
        for url in public {
            assert!(url_permitted(&none, url), "{url} should be allowed");
        }
    }

    /// The resolver's side: a host name whose addresses are all non-public is refused, one with
    /// some public addresses is connected to those only (a rebinding answer mixing both gains
    /// nothing), and a name allowed by name keeps all of its addresses.
    #[test]
    fn resolved_addresses_are_filtered_before_connecting() {
        let addr = |s: &str| SocketAddr::new(s.parse().unwrap(), 80);
        let none = Allow::default();
        assert!(none.filter("localhost", [addr("127.0.0.1"), addr("::1")]).is_empty());
        assert!(none.filter("metadata.internal", [addr("169.254.169.254")]).is_empty());
        assert!(none.filter("rebind.example", [addr("10.0.0.1"), addr("192.168.1.1")]).is_empty());
        assert_eq!(none.filter("mixed.example", [addr("10.0.0.1"), addr("93.184.215.14")]), [addr("93.184.215.14")]);

        let mut by_name = Allow::default();
        by_name.add("localhost".parse().unwrap());
        by_name.add("*.corp.example".parse().unwrap());
        assert_eq!(by_name.filter("LocalHost.", [addr("127.0.0.1")]), [addr("127.0.0.1")]);
        assert_eq!(by_name.filter("db.corp.example", [addr("10.1.2.3")]), [addr("10.1.2.3")]);
        assert_eq!(by_name.filter("a.b.corp.example", [addr("10.1.2.3")]), [addr("10.1.2.3")]);
        assert!(by_name.filter("corp.example", [addr("10.1.2.3")]).is_empty(), "a wildcard is for names under it");
        assert!(by_name.filter("evilcorp.example", [addr("10.1.2.3")]).is_empty());
        assert!(by_name.filter("localhost.evil.example", [addr("127.0.0.1")]).is_empty());
        // A name allowed does not allow its addresses under another name or as literals.
        assert!(!url_permitted(&by_name, "http://127.0.0.1/"));
        assert!(url_permitted(&by_name, "http://localhost/"));
    }

    #[test]
    fn allow_entries_parse_as_networks_addresses_or_names() {
        let cases: &[(&str, Result<&str, ()>)] = &[
            ("10.1.0.0/16", Ok("10.1.0.0/16")),
            ("10.1.2.3/16", Ok("10.1.0.0/16")),
            ("127.0.0.1", Ok("127.0.0.1/32")),
            ("::1", Ok("::1/128")),
            ("[::1]", Ok("::1/128")),
            ("fd00::/8", Ok("fd00::/8")),
            ("API.Internal.", Ok("api.internal")),
            ("*.corp.example", Ok("*.corp.example")),
            ("10.0.0.0/33", Err(())),
            ("http://x", Err(())),
            ("a b", Err(())),
            ("", Err(())),
            ("*.", Err(())),
            ("-x.example", Err(())),
        ];
        for (input, expect) in cases {
            let got = input.parse::<AllowEntry>().map(|e| e.to_string()).map_err(|_| ());
            assert_eq!(got, expect.map(str::to_string), "{input:?}");
        }
        assert_eq!(AllowEntry::loopback().map(|e| e.to_string()), ["127.0.0.0/8", "::1/128"]);
    }

    /// An allowed network admits its addresses in every spelling, the IPv4-mapped IPv6 form
    /// included, and nothing next to it.
    #[test]
    fn an_allowed_network_admits_its_addresses_only() {
        let mut allow = Allow::default();
        allow.add("127.0.0.1/32".parse().unwrap());
        allow.add("10.1.0.0/16".parse().unwrap());
        for url in [
            "http://127.0.0.1/",
            "http://127.1/",
            "http://2130706433/",
            "http://[::ffff:127.0.0.1]/",
            "http://10.1.9.9/",
        ] {
            assert!(url_permitted(&allow, url), "{url}");
        }
        for url in
            ["http://127.0.0.2/", "http://0.0.0.0/", "http://[::1]/", "http://10.2.0.1/", "http://169.254.169.254/"]
        {
            assert!(!url_permitted(&allow, url), "{url}");
        }
    }

    #[test]
    fn the_config_file_names_its_wrong_entry_and_tenants_add_to_the_server() {
        let policy =
            EgressPolicy::from_yaml("allow: [10.1.0.0/16]\ntenants:\n  acme:\n    allow: [localhost]\n").unwrap();
        let acme = policy.server.with(&policy.tenants["acme"]);
        assert!(acme.permits(Some("localhost"), "127.0.0.1".parse().unwrap()));
        assert!(acme.permits(None, "10.1.0.1".parse().unwrap()));
        assert!(!policy.server.permits(Some("localhost"), "127.0.0.1".parse().unwrap()));
        let err = EgressPolicy::from_yaml("tenants: {acme: {allow: ['10.0.0.0/99']}}").unwrap_err();
        assert!(err.starts_with("tenants.acme.allow: `10.0.0.0/99`"), "{err}");
        assert!(EgressPolicy::from_yaml("allow: [x]\ndeny: [y]\n").is_err(), "unknown fields are refused");
    }
}
