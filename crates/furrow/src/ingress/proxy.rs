//! The PROXY protocol (v1 text, v2 binary) in front of furrow/1, for
//! gateways behind a TCP load balancer such as HAProxy (`send-proxy-v2`).
//!
//! Behind a balancer every connection comes from the balancer's address.
//! With `proxy_protocol.enabled`, each connection must start with a PROXY
//! header saying who the device really is; that address then becomes the
//! session's peer (logs, the registry, the API).
//!
//! ```text
//! v1: "PROXY TCP4 203.0.113.7 192.0.2.1 51234 7700\r\n"       (at most 107 bytes)
//! v2: \r\n\r\n\0\r\nQUIT\n | 0x21 | 0x11 | len:u16 | addresses | TLVs
//!     12-byte signature    ver/cmd fam/proto       (16 + len, capped here)
//! ```
//!
//! The header is read inside the connection's task, never in the accept
//! loop, so a slow sender cannot hold up accepts. Reads are bounded (v1 by
//! its 107-byte limit, v2 by [`MAX_V2_LEN`], checked from the length field
//! before buffering) and timed (`proxy_protocol.header_timeout_ms`). Only
//! TCP peers in `proxy_protocol.trusted` may send one: anyone else could
//! claim any address, so they are refused before a byte is read.
//!
//! Parsing of a complete header is `ppp`'s; this module finds where the
//! header ends (bounded), and adds the caps, the choice of address, and the
//! trust check.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use ppp::{v1, v2};

/// The v2 signature (12 bytes) that starts every binary header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Fixed part of a v2 header: signature, version/command, family/protocol,
/// length.
const V2_FIXED: usize = 16;

/// Largest v2 header accepted (fixed part included): room for IPv6
/// addresses (36 bytes) plus the TLVs HAProxy may add (authority, unique
/// id, SSL details), or for UNIX addresses (216). A longer one is refused
/// from its length field alone, before its bytes are buffered.
pub const MAX_V2_LEN: usize = 536;

/// Longest v1 header, by its specification (CRLF included).
pub const MAX_V1_LEN: usize = 107;

/// Why a PROXY header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The bytes are not a PROXY header (a device that connected directly
    /// sends a furrow/1 frame here).
    #[error("not a valid PROXY protocol header")]
    Invalid,
    /// A v2 header announces more than [`MAX_V2_LEN`] bytes.
    #[error("PROXY v2 header of {0} bytes is above the {MAX_V2_LEN}-byte cap")]
    TooLong(usize),
}

impl ProxyError {
    /// A stable label for the `furrow_proxy_headers_total` metric.
    pub fn outcome(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::TooLong(_) => "too_long",
        }
    }
}

/// A complete header found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The client's address, or `None` when the connection is the
    /// balancer's own (v2 LOCAL, e.g. a health check) or its family is not
    /// TCP over IP (v1 UNKNOWN, v2 UNSPEC or UNIX): then the TCP peer is
    /// kept.
    pub source: Option<SocketAddr>,
    /// Bytes the header takes; what follows is furrow/1.
    pub len: usize,
}

/// Decodes a PROXY header at the start of `buf`. `Ok(None)`: not enough
/// bytes yet (the caller reads more; it never needs more than
/// [`MAX_V2_LEN`]). Bytes after the header are left alone.
pub fn decode(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    let sig = &V2_SIGNATURE[..buf.len().min(V2_SIGNATURE.len())];
    if buf.starts_with(sig) {
        decode_v2(buf)
    } else {
        decode_v1(buf)
    }
}

/// v2: the cap is checked on the length field, before the body is waited
/// for; then ppp decodes the whole header.
fn decode_v2(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    let Some(len) = buf.get(14..16) else {
        return Ok(None);
    };
    let total = V2_FIXED + usize::from(u16::from_be_bytes([len[0], len[1]]));
    if total > MAX_V2_LEN {
        return Err(ProxyError::TooLong(total));
    }
    if buf.len() < total {
        return Ok(None);
    }
    let h = v2::Header::try_from(&buf[..total]).map_err(|_| ProxyError::Invalid)?;
    let source = match (h.command, h.addresses) {
        (v2::Command::Local, _) => None,
        (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (v2::Command::Proxy, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
    };
    Ok(Some(Header { source, len: total }))
}

/// v1 is one line of at most 107 bytes. Until its LF arrives only the
/// prefix is checked (anything else is refused at once); the whole line
/// then goes to ppp. ppp is not asked about a line in progress: it judges
/// some cuts wrongly (after "... 51234 " it reports an invalid port).
fn decode_v1(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    const PREFIX: &[u8] = b"PROXY ";
    let head = &buf[..buf.len().min(MAX_V1_LEN)];
    let Some(lf) = head.iter().position(|&b| b == b'\n') else {
        let start = &buf[..buf.len().min(PREFIX.len())];
        return if buf.len() < MAX_V1_LEN && PREFIX.starts_with(start) {
            Ok(None)
        } else {
            Err(ProxyError::Invalid)
        };
    };
    let line = &buf[..=lf];
    let h = v1::Header::try_from(line).map_err(|_| ProxyError::Invalid)?;
    // ppp stops at the first CR: the header must be the whole line.
    if h.header.len() != line.len() {
        return Err(ProxyError::Invalid);
    }
    let source = match h.addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => None,
    };
    Ok(Some(Header {
        source,
        len: line.len(),
    }))
}

/// Whether `ip` (an IPv4-mapped IPv6 address counts as its IPv4 address,
/// as a dual-stack listener reports them) is in one of `nets`.
pub fn is_trusted(ip: IpAddr, nets: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.push(0x20 | cmd);
        b.push(fam);
        b.extend_from_slice(&(body.len() as u16).to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    fn v2_ipv4(src: [u8; 4], sport: u16) -> Vec<u8> {
        let mut body = src.to_vec();
        body.extend_from_slice(&[192, 0, 2, 1]);
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&7700u16.to_be_bytes());
        v2(1, 0x11, &body)
    }

    fn v2_ipv6(src: [u8; 16], sport: u16) -> Vec<u8> {
        let mut body = src.to_vec();
        body.extend_from_slice(&[0; 16]);
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&7700u16.to_be_bytes());
        v2(1, 0x21, &body)
    }

    /// A furrow/1 HELLO's first bytes, as a device behind the header sends.
    const HELLO_START: &[u8] = &[0, 0, 0, 40, 1, 0, 1];

    fn with_tail(mut h: Vec<u8>) -> Vec<u8> {
        h.extend_from_slice(HELLO_START);
        h
    }

    #[test]
    fn v1_ipv4_and_ipv6() {
        let h = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 7700\r\n";
        let got = decode(&with_tail(h.to_vec())).unwrap().unwrap();
        assert_eq!(got.source, Some("203.0.113.7:51234".parse().unwrap()));
        assert_eq!(got.len, h.len(), "the HELLO after it is left alone");

        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 7700\r\n";
        let got = decode(h).unwrap().unwrap();
        assert_eq!(got.source, Some("[2001:db8::7]:40000".parse().unwrap()));
        assert_eq!(got.len, h.len());
    }

    #[test]
    fn v1_unknown_keeps_the_tcp_peer() {
        let h = b"PROXY UNKNOWN\r\n";
        assert_eq!(
            decode(h).unwrap(),
            Some(Header {
                source: None,
                len: h.len()
            })
        );
    }

    #[test]
    fn v2_ipv4_ipv6_local() {
        let h = v2_ipv4([198, 51, 100, 9], 4242);
        let got = decode(&with_tail(h.clone())).unwrap().unwrap();
        assert_eq!(got.source, Some("198.51.100.9:4242".parse().unwrap()));
        assert_eq!(got.len, h.len());

        let mut ip6 = [0u8; 16];
        ip6[0] = 0x20;
        ip6[1] = 0x01;
        ip6[2] = 0x0d;
        ip6[3] = 0xb8;
        ip6[15] = 9;
        let h = v2_ipv6(ip6, 555);
        let got = decode(&h).unwrap().unwrap();
        assert_eq!(got.source, Some("[2001:db8::9]:555".parse().unwrap()));

        // LOCAL (HAProxy's health checks): the TCP peer stays.
        let h = v2(0, 0x00, &[]);
        assert_eq!(
            decode(&with_tail(h)).unwrap(),
            Some(Header {
                source: None,
                len: 16
            })
        );
        // LOCAL with addresses: still the TCP peer.
        let mut local = v2_ipv4([10, 1, 1, 1], 1);
        local[12] = 0x20;
        assert_eq!(decode(&local).unwrap().unwrap().source, None);
    }

    #[test]
    fn v2_tlvs_are_skipped() {
        let mut body = vec![198, 51, 100, 9, 192, 0, 2, 1, 0, 1, 0, 2];
        // PP2_TYPE_AUTHORITY "gw", PP2_TYPE_UNIQUE_ID "abc".
        body.extend_from_slice(&[0x02, 0, 2, b'g', b'w', 0x05, 0, 3, b'a', b'b', b'c']);
        let h = v2(1, 0x11, &body);
        let got = decode(&with_tail(h.clone())).unwrap().unwrap();
        assert_eq!(got.source, Some("198.51.100.9:1".parse().unwrap()));
        assert_eq!(got.len, h.len());
    }

    #[test]
    fn truncated_headers_ask_for_more() {
        for h in [
            b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 7700\r\n".to_vec(),
            v2_ipv4([1, 2, 3, 4], 5),
        ] {
            for cut in 0..h.len() {
                assert_eq!(decode(&h[..cut]), Ok(None), "cut at {cut} of {h:?}");
            }
        }
    }

    #[test]
    fn garbage_and_missing_headers_are_invalid() {
        for bad in [
            HELLO_START,
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 not-an-ip 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 192.0.2.1 99999 2\r\n",
            b"PROXY TCP5 1.2.3.4 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 192.0.2.1 1 2\n\n",
            b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x0c............",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x04....",
            // A line that ends early: ppp alone would wait for more.
            b"PROXY TCP4 1.2.3.4\r\n\0\0\0\x28\x01\0",
        ] {
            assert_eq!(decode(bad), Err(ProxyError::Invalid), "{bad:?}");
        }
    }

    #[test]
    fn oversize_headers_are_refused_early() {
        // v1 without CRLF within its 107 bytes.
        let long = format!("PROXY TCP4 {}", "1".repeat(120));
        assert_eq!(decode(long.as_bytes()), Err(ProxyError::Invalid));
        let cr_then_garbage = format!("PROXY TCP4 1.2.3.4\r{}", "x".repeat(100));
        assert_eq!(decode(cr_then_garbage.as_bytes()), Err(ProxyError::Invalid));
        // v2 announcing more than the cap: refused from the 16 fixed bytes.
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(decode(&h), Err(ProxyError::TooLong(16 + 0xffff)));
        // Exactly the cap is fine.
        let mut body = vec![1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2];
        body.extend_from_slice(&[0x04, 0x01, 0xf9]);
        body.resize(MAX_V2_LEN - V2_FIXED, 0);
        assert_eq!(
            decode(&v2(1, 0x11, &body)).unwrap().unwrap().len,
            MAX_V2_LEN
        );
        body.push(0);
        assert_eq!(
            decode(&v2(1, 0x11, &body)),
            Err(ProxyError::TooLong(MAX_V2_LEN + 1))
        );
    }

    #[test]
    fn trust_is_by_network_and_sees_through_mapped_addresses() {
        let nets: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        assert!(is_trusted("127.0.0.1".parse().unwrap(), &nets));
        assert!(is_trusted("::ffff:127.0.0.1".parse().unwrap(), &nets));
        assert!(is_trusted("::1".parse().unwrap(), &nets));
        assert!(!is_trusted("10.0.0.1".parse().unwrap(), &nets));
        assert!(!is_trusted("127.0.0.1".parse().unwrap(), &[]));
    }

    proptest! {
        /// Whatever arrives, decode never panics, never claims more bytes
        /// than it has, and never waits for more than the caps allow.
        #[test]
        fn decode_is_total(buf in proptest::collection::vec(any::<u8>(), 0..700)) {
            match decode(&buf) {
                Ok(Some(h)) => prop_assert!(h.len <= buf.len() && h.len <= MAX_V2_LEN),
                Ok(None) => prop_assert!(buf.len() < MAX_V2_LEN),
                Err(_) => {}
            }
        }

        /// Garbage after a PROXY signature: still total.
        #[test]
        fn decode_is_total_after_a_signature(
            tail in proptest::collection::vec(any::<u8>(), 0..600),
            v1 in any::<bool>(),
        ) {
            let mut buf = if v1 { b"PROXY ".to_vec() } else { V2_SIGNATURE.to_vec() };
            buf.extend_from_slice(&tail);
            if let Ok(None) = decode(&buf) {
                prop_assert!(buf.len() < MAX_V2_LEN);
            }
        }

        /// Any address round-trips through both versions, whatever follows,
        /// and every strict prefix asks for more.
        #[test]
        fn addresses_round_trip(
            ip in any::<std::net::IpAddr>(),
            port in any::<u16>(),
            tail in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let src = SocketAddr::new(ip, port);
            let v1 = match ip {
                IpAddr::V4(a) => format!("PROXY TCP4 {a} 192.0.2.1 {port} 7700\r\n"),
                IpAddr::V6(a) => format!("PROXY TCP6 {a} ::1 {port} 7700\r\n"),
            }.into_bytes();
            let v2 = match ip {
                IpAddr::V4(a) => v2_ipv4(a.octets(), port),
                IpAddr::V6(a) => v2_ipv6(a.octets(), port),
            };
            for h in [v1, v2] {
                let mut buf = h.clone();
                buf.extend_from_slice(&tail);
                prop_assert_eq!(decode(&buf), Ok(Some(Header { source: Some(src), len: h.len() })));
                for cut in 0..h.len() {
                    prop_assert_eq!(decode(&h[..cut]), Ok(None));
                }
            }
        }
    }
}
