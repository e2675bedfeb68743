//! The PROXY protocol (v1 text and v2 binary, as HAProxy and nginx send it): the first
//! bytes of a connection from a proxy, naming the client the proxy serves. Parsed from
//! the connection's first bytes, before the HTTP head.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The v2 signature.
const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 line is at most 107 bytes with its CRLF (the specification's bound).
const V1_MAX: usize = 107;
/// Largest v2 header taken (16 bytes, addresses and TLVs): a proxy sends a few hundred
/// bytes at most; more is not a proxy.
pub const V2_MAX: usize = 4096;

/// A complete header: who the client is (`None`: the proxy's own connection, a health
/// check, or an unknown family: the TCP peer stands for itself), and how many bytes it
/// took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub client: Option<IpAddr>,
    pub len: usize,
}

/// Parses the header at the start of `buf`: `Ok(None)` while more bytes are needed,
/// `Err` with what is wrong once it cannot be one.
pub fn parse(buf: &[u8]) -> Result<Option<Header>, &'static str> {
    let n = buf.len().min(V2_SIG.len());
    if buf[..n] == V2_SIG[..n] {
        return if n < V2_SIG.len() { Ok(None) } else { v2(buf) };
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return if n < 6 { Ok(None) } else { v1(buf) };
    }
    Err("no PROXY header")
}

fn v1(buf: &[u8]) -> Result<Option<Header>, &'static str> {
    let Some(end) = buf.windows(2).take(V1_MAX - 1).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err("PROXY v1 line too long")
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| "PROXY v1 line is not text")?;
    let words: Vec<&str> = line.split(' ').collect();
    let client = match words.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let src: IpAddr = src.parse().map_err(|_| "bad PROXY v1 source address")?;
            let dst: IpAddr = dst.parse().map_err(|_| "bad PROXY v1 address")?;
            let v4 = *family == "TCP4";
            if src.is_ipv4() != v4 || dst.is_ipv4() != v4 {
                return Err("PROXY v1 addresses do not match their family");
            }
            for port in [sport, dport] {
                if port.is_empty() || port.starts_with('+') || port.parse::<u16>().is_err() {
                    return Err("bad PROXY v1 port");
                }
            }
            Some(src)
        }
        _ => return Err("malformed PROXY v1 line"),
    };
    Ok(Some(Header {
        client,
        len: end + 2,
    }))
}

fn v2(buf: &[u8]) -> Result<Option<Header>, &'static str> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let version = buf[12] >> 4;
    let command = buf[12] & 0x0f;
    if version != 2 {
        return Err("PROXY v2 header of another version");
    }
    let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX {
        return Err("PROXY v2 header too large");
    }
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[16..len];
    let client = match (command, buf[13] >> 4) {
        // LOCAL: the proxy's own connection (a health check); the addresses are ignored.
        (0, _) => None,
        (1, 1) => {
            let a: [u8; 4] = body
                .get(..4)
                .and_then(|s| s.try_into().ok())
                .ok_or("PROXY v2 IPv4 addresses cut short")?;
            if body.len() < 12 {
                return Err("PROXY v2 IPv4 addresses cut short");
            }
            Some(IpAddr::V4(Ipv4Addr::from(a)))
        }
        (1, 2) => {
            let a: [u8; 16] = body
                .get(..16)
                .and_then(|s| s.try_into().ok())
                .ok_or("PROXY v2 IPv6 addresses cut short")?;
            if body.len() < 36 {
                return Err("PROXY v2 IPv6 addresses cut short");
            }
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
        // UNSPEC or a UNIX socket: no address to count the client by.
        (1, _) => None,
        _ => return Err("PROXY v2 header with an unknown command"),
    };
    Ok(Some(Header { client, len }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every prefix of a valid header asks for more; the whole gives the header.
    fn whole(raw: &[u8]) -> Header {
        for k in 0..raw.len() {
            assert_eq!(parse(&raw[..k]), Ok(None), "prefix of {k} bytes");
        }
        let mut with_http = raw.to_vec();
        with_http.extend_from_slice(b"GET / HTTP/1.1\r\n");
        parse(&with_http).unwrap().unwrap()
    }

    pub fn v2_tcp4(src: [u8; 4]) -> Vec<u8> {
        let mut h = V2_SIG.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0, 12]);
        h.extend_from_slice(&src);
        h.extend_from_slice(&[127, 0, 0, 1, 0x12, 0x34, 0, 80]);
        h
    }

    #[test]
    fn v1_names_the_client() {
        let raw = b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n";
        let h = whole(raw);
        assert_eq!(h.client, Some("203.0.113.7".parse().unwrap()));
        assert_eq!(h.len, raw.len());
        let h6 = whole(b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n");
        assert_eq!(h6.client, Some("2001:db8::1".parse().unwrap()));
        assert_eq!(whole(b"PROXY UNKNOWN\r\n").client, None);
    }

    #[test]
    fn v2_names_the_client_and_local_is_the_peer() {
        let h = whole(&v2_tcp4([198, 51, 100, 4]));
        assert_eq!(h.client, Some("198.51.100.4".parse().unwrap()));
        assert_eq!(h.len, 28);
        let mut six = V2_SIG.to_vec();
        six.extend_from_slice(&[0x21, 0x21, 0, 36 + 5]);
        let mut src = [0u8; 16];
        src[0] = 0x20;
        src[1] = 0x01;
        src[15] = 9;
        six.extend_from_slice(&src);
        six.extend_from_slice(&[0; 20]);
        six.extend_from_slice(&[4, 0, 2, b'i', b'd']); // a TLV, skipped
        let h = whole(&six);
        assert_eq!(h.client, Some("2001::9".parse().unwrap()));
        let mut local = V2_SIG.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(whole(&local).client, None);
    }

    #[test]
    fn anything_else_is_refused_with_a_reason() {
        let long = format!("PROXY TCP4 {} 1 2\r\n", "1".repeat(120));
        let cases: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\n".to_vec(),
            b"PROXY TCP4 203.0.113.7 10.0.0.1 56324\r\n".to_vec(),
            b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n".to_vec(),
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            long.into_bytes(),
            {
                let mut h = v2_tcp4([1, 2, 3, 4]);
                h[12] = 0x11;
                h
            },
            {
                let mut h = v2_tcp4([1, 2, 3, 4]);
                h[15] = 4;
                h
            },
            {
                let mut h = V2_SIG.to_vec();
                h.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
                h
            },
        ];
        for raw in cases {
            assert!(parse(&raw).is_err(), "{:?}", String::from_utf8_lossy(&raw));
        }
    }
}
