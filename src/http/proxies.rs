//! The client address behind trusted proxies: RFC 7239 `Forwarded` (else
//! `X-Forwarded-For`) is read only when the socket peer is trusted, and the client is the
//! right-most hop that is not itself a trusted proxy.

use std::net::IpAddr;

use ipnet::IpNet;

/// One trusted-proxy entry: `*` (every peer), an address, or a CIDR range.
#[derive(Clone, Debug, PartialEq)]
pub enum Trusted {
    Any,
    Net(IpNet),
}

/// Parses `*`, `10.0.0.1`, `10.0.0.0/8`, `::1`, `fd00::/8`. For configuration checks: a
/// bad entry is an error with a message that names it.
pub fn parse_trusted(entry: &str) -> Result<Trusted, String> {
    let e = entry.trim();
    if e == "*" {
        return Ok(Trusted::Any);
    }
    if let Ok(net) = e.parse::<IpNet>() {
        return Ok(Trusted::Net(net.trunc()));
    }
    if let Ok(ip) = e.parse::<IpAddr>() {
        return Ok(Trusted::Net(IpNet::from(canonical(ip))));
    }
    Err(format!(
        "trusted proxy {e:?} is not an address, a CIDR range (10.0.0.0/8, fd00::/8) or '*'"
    ))
}

/// Every entry parsed, or the first error.
pub fn parse_trusted_list<S: AsRef<str>>(entries: &[S]) -> Result<Vec<Trusted>, String> {
    entries.iter().map(|e| parse_trusted(e.as_ref())).collect()
}

/// IPv4-mapped IPv6 (`::ffff:10.0.0.1`, what a dual-stack socket reports) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn is_trusted(list: &[Trusted], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    list.iter().any(|t| match t {
        Trusted::Any => true,
        Trusted::Net(net) => net.contains(&ip),
    })
}

/// A hop as an address: `1.2.3.4`, `1.2.3.4:80`, `[2001:db8::1]`, `[2001:db8::1]:80`,
/// `2001:db8::1`. Obfuscated identifiers (`_hidden`), `unknown` and garbage give `None`.
pub fn parse_hop(hop: &str) -> Option<IpAddr> {
    let h = hop.trim().trim_matches('"');
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = h.strip_prefix('[') {
        let (inner, _) = rest.split_once(']')?;
        return inner.parse::<IpAddr>().ok().map(canonical);
    }
    let (host, port) = h.rsplit_once(':')?;
    if port.bytes().all(|c| c.is_ascii_digit()) {
        return host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4);
    }
    None
}

/// The `for=` values of every `Forwarded` element, in order (several headers join into one
/// list, as RFC 7239 says). Quoted values may hold commas and semicolons.
pub fn forwarded_for(values: &[&str]) -> Vec<String> {
    let mut hops = Vec::new();
    for value in values {
        let mut element_for: Option<String> = None;
        let mut key = String::new();
        let mut val = String::new();
        let mut in_value = false;
        let mut quoted = false;
        let mut escaped = false;
        for c in value.chars().chain(std::iter::once(',')) {
            if quoted {
                if escaped {
                    val.push(c);
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    quoted = false;
                } else {
                    val.push(c);
                }
                continue;
            }
            match c {
                '"' if in_value => quoted = true,
                '=' if !in_value => in_value = true,
                ';' | ',' => {
                    end_pair(&mut key, &mut val, &mut element_for);
                    in_value = false;
                    if c == ',' {
                        if let Some(f) = element_for.take() {
                            hops.push(f);
                        }
                    }
                }
                _ if in_value => val.push(c),
                _ => key.push(c),
            }
        }
    }
    hops
}

fn end_pair(key: &mut String, val: &mut String, element_for: &mut Option<String>) {
    if key.trim().eq_ignore_ascii_case("for") && element_for.is_none() {
        *element_for = Some(val.trim().to_owned());
    }
    key.clear();
    val.clear();
}

/// The client: the peer itself unless it is trusted; then, walking the forwarded hops from
/// the right, the first one that is not trusted. A hop that is not an address (obfuscated,
/// `unknown`) ends the walk: what lies left of it was written by a party no trusted proxy
/// vouched for, so the last trusted address is reported instead. When every hop is
/// trusted, the left-most is the client.
pub fn client_addr(trusted: &[Trusted], peer: &str, forwarded: &[&str], xff: &[&str]) -> String {
    let Some(peer_ip) = parse_hop(peer) else {
        return peer.to_owned();
    };
    if !is_trusted(trusted, peer_ip) {
        return peer.to_owned();
    }
    let hops: Vec<String> = if forwarded.is_empty() {
        xff.iter()
            .flat_map(|v| v.split(','))
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .collect()
    } else {
        forwarded_for(forwarded)
    };
    let mut last_trusted = peer_ip;
    for hop in hops.iter().rev() {
        match parse_hop(hop) {
            Some(ip) if is_trusted(trusted, ip) => last_trusted = ip,
            Some(ip) => return ip.to_string(),
            None => return last_trusted.to_string(),
        }
    }
    last_trusted.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Vec<Trusted> {
        parse_trusted_list(entries).unwrap()
    }

    #[test]
    fn entries_and_errors() {
        assert_eq!(parse_trusted("*").unwrap(), Trusted::Any);
        assert!(parse_trusted("10.0.0.0/8").is_ok());
        assert!(parse_trusted("10.1.2.3/8").is_ok());
        assert!(parse_trusted("fd00::/8").is_ok());
        assert!(parse_trusted("::1").is_ok());
        for bad in ["10.0.0.0/33", "proxy.local", "", "10.0.0"] {
            assert!(
                parse_trusted(bad).unwrap_err().contains("not an address"),
                "{bad}"
            );
        }
    }

    #[test]
    fn hops() {
        assert_eq!(parse_hop("1.2.3.4:80"), "1.2.3.4".parse().ok());
        assert_eq!(
            parse_hop("\"[2001:db8:cafe::17]:4711\""),
            "2001:db8:cafe::17".parse().ok()
        );
        assert_eq!(parse_hop("2001:db8::1"), "2001:db8::1".parse().ok());
        assert_eq!(parse_hop("::ffff:10.0.0.1"), "10.0.0.1".parse().ok());
        assert_eq!(parse_hop("_hidden"), None);
        assert_eq!(parse_hop("unknown"), None);
    }

    #[test]
    fn forwarded_header_elements() {
        assert_eq!(
            forwarded_for(&[
                r#"for=192.0.2.60;proto=http;by=203.0.113.43, For="[2001:db8:cafe::17]:4711""#,
                "for=_hidden, for=\"10.0.0.2\"",
            ]),
            [
                "192.0.2.60",
                "[2001:db8:cafe::17]:4711",
                "_hidden",
                "10.0.0.2"
            ]
        );
        assert_eq!(forwarded_for(&["proto=https;by=x"]), Vec::<String>::new());
    }

    #[test]
    fn rightmost_untrusted_hop_in_ranges() {
        let t = list(&["10.0.0.0/8", "fd00::/8"]);
        let xff = ["6.6.6.6, 1.2.3.4, 10.9.9.9"];
        assert_eq!(client_addr(&t, "10.0.0.1", &[], &xff), "1.2.3.4");
        // An untrusted peer's headers are ignored.
        assert_eq!(client_addr(&t, "192.0.2.1", &[], &xff), "192.0.2.1");
        let fwd = [r#"for=6.6.6.6, for="[2001:db8::5]:1234", for="[fd00::2]""#];
        assert_eq!(client_addr(&t, "fd00::1", &fwd, &xff), "2001:db8::5");
        // An obfuscated hop ends the walk at the last trusted address.
        assert_eq!(
            client_addr(
                &t,
                "10.0.0.1",
                &["for=6.6.6.6, for=_hidden, for=10.2.2.2"],
                &[]
            ),
            "10.2.2.2"
        );
        // Every hop trusted: the left-most.
        assert_eq!(
            client_addr(&t, "10.0.0.1", &[], &["10.5.5.5, 10.6.6.6"]),
            "10.5.5.5"
        );
        assert_eq!(
            client_addr(&list(&["*"]), "127.0.0.1", &[], &["1.2.3.4"]),
            "1.2.3.4"
        );
        assert_eq!(
            client_addr(&[], "127.0.0.1", &[], &["1.2.3.4"]),
            "127.0.0.1"
        );
    }
}
