//! An IPv4 prefix (`10.244.0.0/16`) as the proxy's flags and rules need it: parsed strictly,
//! printed in the canonical form nft accepts (host bits cleared).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix_len: u8,
}

impl Ipv4Cidr {
    /// The prefix holding `addr` with `prefix_len` leading bits; host bits are cleared so the
    /// printed form is one nft takes without complaint.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Ipv4Cidr, Error> {
        if prefix_len > 32 {
            return Err(Error::InvalidCidr(format!("{addr}/{prefix_len}")));
        }
        let mask = Self::mask(prefix_len);
        Ok(Ipv4Cidr { addr: Ipv4Addr::from(u32::from(addr) & mask), prefix_len })
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix_len) == u32::from(self.addr)
    }

    pub(crate) fn mask(prefix_len: u8) -> u32 {
        // `checked_shl` because shifting a u32 by 32 overflows: /0 means "no bits fixed".
        u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = Error;

    /// `a.b.c.d/n`, or a bare address meaning `/32`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::InvalidCidr(s.to_string());
        let (addr, len) = match s.trim().split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().map_err(|_| bad())?),
            None => (s.trim(), 32),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        Ipv4Cidr::new(addr, len).map_err(|_| bad())
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_parses_and_prints_canonically() {
        let c: Ipv4Cidr = "10.244.3.7/16".parse().expect("parse");
        assert_eq!(c.to_string(), "10.244.0.0/16");
        assert!(c.contains("10.244.200.1".parse().expect("ip")));
        assert!(!c.contains("10.245.0.1".parse().expect("ip")));
    }

    #[test]
    fn a_bare_address_is_a_single_host() {
        let c: Ipv4Cidr = "192.168.1.4".parse().expect("parse");
        assert_eq!(c.to_string(), "192.168.1.4/32");
    }

    #[test]
    fn slash_zero_contains_everything() {
        let c: Ipv4Cidr = "1.2.3.4/0".parse().expect("parse");
        assert_eq!(c.to_string(), "0.0.0.0/0");
        assert!(c.contains(Ipv4Addr::new(8, 8, 8, 8)));
    }

    #[test]
    fn malformed_prefixes_are_errors() {
        for s in ["10.0.0.0/33", "10.0.0/8", "fd00::/8", "x", "10.0.0.0/"] {
            assert!(s.parse::<Ipv4Cidr>().is_err(), "{s}");
        }
    }
}
