//! Who a client is, for the per-client limits: its IP address (an IPv6 client by its
//! /64, the block one host or one customer usually gets), taken from the TCP peer, from a
//! PROXY protocol header, or from `X-Forwarded-For` when the peer is a trusted proxy.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use crate::error::Reject;

/// The key a client is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientAddr(IpAddr);

impl ClientAddr {
    /// An IPv4 address as is (also when mapped into IPv6); an IPv6 address by its /64.
    pub fn of(ip: IpAddr) -> ClientAddr {
        match ip {
            IpAddr::V4(_) => ClientAddr(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientAddr(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    ClientAddr(IpAddr::V6(Ipv6Addr::from(bits)))
                }
            },
        }
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// A block of addresses (`10.0.0.0/8`, `::1/128`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, bits) = s.split_once('/').unwrap_or((s, ""));
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or ADDRESS/BITS"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = if bits.is_empty() {
            max
        } else {
            match bits.parse::<u8>() {
                Ok(b) if b <= max => b,
                _ => return Err(format!("{s:?}: the prefix length must be 0 to {max}")),
            }
        };
        Ok(Cidr { net, bits })
    }
}

/// The client behind a trusted proxy: the nearest address of `X-Forwarded-For` (read from
/// the right, each proxy appends the address it got the request from) that is not itself
/// a trusted proxy. An entry that is no address ends the walk: what lies left of it was
/// written by someone we cannot vouch for. `None`: only trusted hops.
pub fn forwarded_client<'a>(
    values: impl Iterator<Item = &'a [u8]>,
    trusted: &[Cidr],
) -> Option<IpAddr> {
    let entries: Vec<&[u8]> = values.flat_map(|v| v.split(|&c| c == b',')).collect();
    for entry in entries.into_iter().rev() {
        let ip = parse_hop(std::str::from_utf8(entry).ok()?.trim())?;
        if !trusted.iter().any(|c| c.contains(ip)) {
            return Some(ip);
        }
    }
    None
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:5678`, `::1` or `[::1]:5678`.
fn parse_hop(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    s.rsplit_once(':')?.0.parse().ok()
}

/// Open connections per client address, shared by every thread of a server.
#[derive(Debug, Clone, Default)]
pub struct ClientConns(Arc<Mutex<HashMap<ClientAddr, usize>>>);

/// One connection counted under its client; it counts until dropped.
#[derive(Debug)]
pub struct ClientConn {
    map: Arc<Mutex<HashMap<ClientAddr, usize>>>,
    addr: ClientAddr,
}

impl ClientConns {
    /// Counts a connection of `addr`; past `max` (0: no limit) it is refused, and not
    /// counted.
    pub fn open(&self, addr: ClientAddr, max: usize) -> Result<ClientConn, Reject> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = map.entry(addr).or_default();
        if max > 0 && *count >= max {
            if *count == 0 {
                map.remove(&addr);
            }
            return Err(Reject::ClientConnections { max });
        }
        *count += 1;
        Ok(ClientConn {
            map: Arc::clone(&self.0),
            addr,
        })
    }

    /// Connections `addr` has open now.
    pub fn count(&self, addr: ClientAddr) -> usize {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&addr).copied().unwrap_or(0)
    }
}

impl Drop for ClientConn {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = map.get_mut(&self.addr) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                map.remove(&self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_and_mapped_ipv4_as_ipv4() {
        let a = ClientAddr::of(ip("2001:db8:1:2:aaaa::1"));
        assert_eq!(a, ClientAddr::of(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(a, ClientAddr::of(ip("2001:db8:1:3::1")));
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        assert_eq!(
            ClientAddr::of(ip("::ffff:127.0.0.2")),
            ClientAddr::of(ip("127.0.0.2"))
        );
        assert_ne!(
            ClientAddr::of(ip("127.0.0.1")),
            ClientAddr::of(ip("127.0.0.2"))
        );
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.1.200.3")));
        assert!(c.contains(ip("::ffff:10.1.0.1")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(!c.contains(ip("::1")));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let all: Cidr = "::/0".parse().unwrap();
        assert!(all.contains(ip("2001:db8::1")));
        for bad in ["10.0.0.0/33", "::/129", "example.com", "10.0.0.0/x", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_client_is_the_nearest_untrusted_hop() {
        let trusted = cidrs(&["10.0.0.0/8"]);
        let xff = |vals: &[&str]| forwarded_client(vals.iter().map(|v| v.as_bytes()), &trusted);
        assert_eq!(xff(&["203.0.113.9"]), Some(ip("203.0.113.9")));
        // A client can write anything left of what our proxies appended.
        assert_eq!(
            xff(&["1.1.1.1, 203.0.113.9, 10.0.0.2"]),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            xff(&["1.1.1.1", "203.0.113.9:4711"]),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(xff(&["[2001:db8::1]:80"]), Some(ip("2001:db8::1")));
        assert_eq!(xff(&["garbage, 10.0.0.3"]), None);
        assert_eq!(xff(&["10.0.0.3"]), None);
        assert_eq!(xff(&[]), None);
    }

    #[test]
    fn connections_are_counted_per_client_until_dropped() {
        let conns = ClientConns::default();
        let a = ClientAddr::of(ip("127.0.0.1"));
        let b = ClientAddr::of(ip("127.0.0.2"));
        let first = conns.open(a, 2).unwrap();
        let _second = conns.open(a, 2).unwrap();
        let third = conns.open(a, 2).unwrap_err();
        assert_eq!(third, Reject::ClientConnections { max: 2 });
        assert_eq!(third.status(), 429);
        assert!(conns.open(b, 2).is_ok(), "another address is served");
        drop(first);
        assert_eq!(conns.count(a), 1);
        assert!(conns.open(a, 2).is_ok());
        assert!(conns.open(a, 0).is_ok(), "0 is no limit");
    }
}
