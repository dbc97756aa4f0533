//! Who is asking: the client address behind the reverse proxy, from the TCP peer and `X-Forwarded-For`.
//!
//! `X-Forwarded-For` is a list any client can write. Only the entries appended by proxies we run can be
//! believed, so the header is read only when the TCP peer is one of [`TrustedProxies`], and then from the
//! right: each trusted hop appended the address it saw, so the first untrusted address from the right is
//! the one the outermost trusted proxy saw connect — the client. Everything left of it was written by the
//! client itself. With no trusted proxies (the default) the header is ignored and the peer is the client.
//!
//! [`client_address`] is the pure rule; [`resolve`] is the middleware that puts its answer in the request
//! extensions as [`ClientAddr`] for the access log and the login rate limit.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use ipnet::{IpNet, Ipv4Net};

use super::AppState;

/// The proxies whose `X-Forwarded-For` entries are believed (setting `trusted_proxies`). A value is a
/// list of valid networks; IPv4-mapped IPv6 networks are stored as the IPv4 networks they mean.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

/// An entry of `trusted_proxies` that is neither an address nor a CIDR network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?} is not an IP address or CIDR network (e.g. 10.0.0.0/8, 127.0.0.1, ::1)")]
pub struct BadProxyEntry {
    pub entry: String,
}

impl TrustedProxies {
    /// Trusts nobody: `X-Forwarded-For` is ignored.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The networks, as configured (normalised).
    pub fn networks(&self) -> &[IpNet] {
        &self.0
    }

    /// Whether `ip` is one of ours. IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// Parses a comma-separated list (`COZY_TRUSTED_PROXIES`); empty items are skipped, so an empty
    /// string trusts nobody.
    pub fn parse_list(text: &str) -> Result<Self, BadProxyEntry> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(parse_entry)
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }
}

impl fmt::Display for TrustedProxies {
    /// Comma-separated networks, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, net) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

/// One entry: `10.0.0.0/8`, `2001:db8::/32`, or a bare address (`127.0.0.1`, `::1`) meaning that host.
/// Host bits below the prefix are dropped (`10.1.2.3/8` is `10.0.0.0/8`), as nginx's `set_real_ip_from`
/// does.
fn parse_entry(text: &str) -> Result<IpNet, BadProxyEntry> {
    let bad = || BadProxyEntry {
        entry: text.to_string(),
    };
    let net = match text.parse::<IpNet>() {
        Ok(net) => net.trunc(),
        Err(_) if !text.contains('/') => IpNet::from(text.parse::<IpAddr>().map_err(|_| bad())?),
        Err(_) => return Err(bad()),
    };
    Ok(canonical_net(net))
}

/// `::ffff:10.0.0.0/104` is `10.0.0.0/8`: peers are compared in their canonical (IPv4) form.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

impl<'de> serde::Deserialize<'de> for TrustedProxies {
    /// A YAML list of entries; a bad one is reported at its own line and column.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry(IpNet);
        impl<'de> serde::Deserialize<'de> for Entry {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(EntryVisitor)
            }
        }
        // Parsing inside the visitor, not after it, is what makes serde_yaml_ng put the entry's own
        // line and column on the error (else it gets the list's).
        struct EntryVisitor;
        impl serde::de::Visitor<'_> for EntryVisitor {
            type Value = Entry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an IP address or CIDR network")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Entry, E> {
                parse_entry(text.trim()).map(Entry).map_err(E::custom)
            }
        }
        let entries = Vec::<Entry>::deserialize(d)?;
        Ok(TrustedProxies(entries.into_iter().map(|e| e.0).collect()))
    }
}

impl FromStr for TrustedProxies {
    type Err = BadProxyEntry;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_list(s)
    }
}

/// The client behind the proxies (`ip`) and the TCP peer that brought the request (`peer`), both in
/// canonical form (an IPv4-mapped IPv6 peer is shown as IPv4). In the request extensions of every
/// request that went through [`resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr {
    pub ip: IpAddr,
    pub peer: SocketAddr,
}

/// The client address of a request from `peer` carrying the `X-Forwarded-For` header values
/// `forwarded_for` (in the order received; several headers read as one comma-joined list):
///
/// - a peer that is not trusted is the client, whatever the header says;
/// - from a trusted peer, the header is walked from the right, skipping trusted addresses; the first
///   untrusted one is the client;
/// - when every entry is trusted, or the walk meets an entry that is not an address (`unknown`, garbage),
///   the leftmost trusted address walked over is the client, or the peer when there is none.
pub fn client_address<'a>(
    peer: IpAddr,
    forwarded_for: impl IntoIterator<Item = &'a HeaderValue>,
    trusted: &TrustedProxies,
) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted.contains(peer) {
        return peer;
    }
    // `None` for an entry that is not an address, so that the walk stops there.
    let hops: Vec<Option<IpAddr>> = forwarded_for
        .into_iter()
        .flat_map(|value| match value.to_str() {
            Ok(text) => text.split(',').map(parse_hop).collect::<Vec<_>>(),
            Err(_) => vec![None],
        })
        .collect();
    let mut leftmost_trusted = None;
    for hop in hops.into_iter().rev() {
        match hop {
            None => break,
            Some(ip) if trusted.contains(ip) => leftmost_trusted = Some(ip),
            Some(ip) => return ip,
        }
    }
    leftmost_trusted.unwrap_or(peer)
}

/// One entry of `X-Forwarded-For`: an address, possibly with a port (`1.2.3.4:5678`, `[2001:db8::1]:80`)
/// as some proxies write it.
fn parse_hop(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let ip = text
        .parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            text.strip_prefix('[')
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<IpAddr>().ok())
        })?;
    Some(ip.to_canonical())
}

/// Middleware: resolves [`ClientAddr`] with the configured trusted proxies. The peer comes from the
/// `ConnectInfo` our accept loop sets on every request (src/http/server.rs); a router driven some
/// other way (no peer known) sees `0.0.0.0:0`.
pub async fn resolve(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| SocketAddr::new(peer.ip().to_canonical(), peer.port()))
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let ip = client_address(
        peer.ip(),
        req.headers().get_all("x-forwarded-for"),
        &app.settings.trusted_proxies,
    );
    req.extensions_mut().insert(ClientAddr { ip, peer });
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(list: &str) -> TrustedProxies {
        TrustedProxies::parse_list(list).unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// The client address of a request from `peer` with these `X-Forwarded-For` header values.
    fn client(peer: &str, headers: &[&str], proxies: &TrustedProxies) -> IpAddr {
        let values: Vec<HeaderValue> = headers
            .iter()
            .map(|h| HeaderValue::from_str(h).unwrap())
            .collect();
        client_address(ip(peer), &values, proxies)
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_x_forwarded_for_says() {
        let none = TrustedProxies::none();
        assert_eq!(
            client("203.0.113.7", &["198.51.100.1"], &none),
            ip("203.0.113.7")
        );
        let proxies = trusted("10.0.0.0/8");
        assert_eq!(
            client("203.0.113.7", &["10.0.0.1, 198.51.100.1"], &proxies),
            ip("203.0.113.7")
        );
    }

    #[test]
    fn from_a_trusted_peer_the_rightmost_untrusted_entry_is_the_client() {
        let proxies = trusted("10.0.0.0/8, 127.0.0.1");
        // The client wrote "1.1.1.1" itself; nginx appended the address it saw (198.51.100.9), an
        // inner proxy appended nginx's (10.0.0.2).
        assert_eq!(
            client("127.0.0.1", &["1.1.1.1, 198.51.100.9, 10.0.0.2"], &proxies),
            ip("198.51.100.9")
        );
        assert_eq!(
            client("10.1.2.3", &["198.51.100.9"], &proxies),
            ip("198.51.100.9")
        );
    }

    #[test]
    fn several_x_forwarded_for_headers_read_as_one_list_in_order() {
        let proxies = trusted("127.0.0.1");
        assert_eq!(
            client("127.0.0.1", &["1.1.1.1", "198.51.100.9"], &proxies),
            ip("198.51.100.9")
        );
    }

    #[test]
    fn when_every_entry_is_trusted_the_leftmost_is_the_client() {
        let proxies = trusted("10.0.0.0/8");
        assert_eq!(
            client("10.0.0.1", &["10.0.0.7, 10.0.0.3"], &proxies),
            ip("10.0.0.7")
        );
    }

    #[test]
    fn a_missing_or_garbled_header_leaves_the_peer_or_the_trusted_hops_walked() {
        let proxies = trusted("10.0.0.0/8");
        assert_eq!(client("10.0.0.1", &[], &proxies), ip("10.0.0.1"));
        assert_eq!(client("10.0.0.1", &["garbage"], &proxies), ip("10.0.0.1"));
        assert_eq!(client("10.0.0.1", &[""], &proxies), ip("10.0.0.1"));
        // The walk stops at the garbage: what the client wrote left of it is never reached.
        assert_eq!(
            client("10.0.0.1", &["198.51.100.1, unknown, 10.0.0.4"], &proxies),
            ip("10.0.0.4")
        );
        // Garbage left of the client's entry does not matter.
        assert_eq!(
            client("10.0.0.1", &["x, 198.51.100.1, 10.0.0.4"], &proxies),
            ip("198.51.100.1")
        );
        let binary = HeaderValue::from_bytes(b"\xff\xfe").unwrap();
        assert_eq!(
            client_address(ip("10.0.0.1"), [&binary], &proxies),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn entries_with_ports_and_brackets_are_addresses() {
        let proxies = trusted("127.0.0.1");
        assert_eq!(
            client("127.0.0.1", &["198.51.100.1:4711"], &proxies),
            ip("198.51.100.1")
        );
        assert_eq!(
            client("127.0.0.1", &["[2001:db8::1]:443"], &proxies),
            ip("2001:db8::1")
        );
        assert_eq!(
            client("127.0.0.1", &["[2001:db8::1]"], &proxies),
            ip("2001:db8::1")
        );
        assert_eq!(
            client("127.0.0.1", &["2001:db8::1"], &proxies),
            ip("2001:db8::1")
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_peers_and_entries_count_as_ipv4() {
        let proxies = trusted("127.0.0.1");
        assert_eq!(
            client("::ffff:127.0.0.1", &["::ffff:198.51.100.1"], &proxies),
            ip("198.51.100.1")
        );
        let none = TrustedProxies::none();
        assert_eq!(client("::ffff:203.0.113.7", &[], &none), ip("203.0.113.7"));
        // A mapped network in the setting means the IPv4 network.
        let mapped = trusted("::ffff:10.0.0.0/104");
        assert_eq!(mapped.networks(), trusted("10.0.0.0/8").networks());
        assert!(mapped.contains(ip("10.9.9.9")));
    }

    #[test]
    fn trusted_proxies_take_networks_and_bare_addresses() {
        let proxies = trusted(" 10.0.0.0/8 ,127.0.0.1,::1, 2001:db8::/32,");
        assert_eq!(
            proxies.to_string(),
            "10.0.0.0/8,127.0.0.1/32,::1/128,2001:db8::/32"
        );
        assert!(proxies.contains(ip("10.255.0.1")));
        assert!(proxies.contains(ip("::1")));
        assert!(!proxies.contains(ip("127.0.0.2")));
        assert!(!proxies.contains(ip("11.0.0.1")));
        // Host bits below the prefix are dropped.
        assert_eq!(trusted("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert!(TrustedProxies::parse_list("").unwrap().is_empty());
    }

    #[test]
    fn a_bad_entry_is_named_in_the_error() {
        for bad in ["10.0.0.0/33", "10.0.0", "localhost", "::1/129", "10.0.0.0/"] {
            let err = TrustedProxies::parse_list(&format!("127.0.0.1,{bad}")).unwrap_err();
            assert_eq!(err.entry, bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn a_yaml_list_loads_and_a_bad_entry_fails() {
        let ok: TrustedProxies =
            serde_yaml_ng::from_str("- 10.0.0.0/8\n- 127.0.0.1\n- ::1\n- \"fd00::/8\"\n").unwrap();
        assert_eq!(ok.to_string(), "10.0.0.0/8,127.0.0.1/32,::1/128,fd00::/8");
        let err =
            serde_yaml_ng::from_str::<TrustedProxies>("- 127.0.0.1\n- 10.0.0.0/33\n").unwrap_err();
        assert!(err.to_string().contains("\"10.0.0.0/33\""), "{err}");
        assert_eq!(err.location().map(|l| l.line()), Some(2), "{err}");
    }
}
