//! CIDR blocks from the command line (`10.0.0.0/8`, `fd00::/8`, or a bare address).

use std::{fmt, net::IpAddr, str::FromStr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR (expected e.g. 10.0.0.0/8 or fd00::/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        refuse_v4_mapped(s, addr, prefix)?;
        Ok(Self { addr, prefix })
    }
}

/// Matching treats an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4 address it
/// carries, so a mapped block's prefix would be read against 32 bits while it was written
/// against 128: `::ffff:10.0.0.0/104` means 10.0.0.0/8 to its author and would have matched
/// every IPv4 address. Such blocks are refused with the IPv4 spelling to use instead.
fn refuse_v4_mapped(s: &str, addr: IpAddr, prefix: u8) -> Result<(), String> {
    let IpAddr::V6(v6) = addr else {
        return Ok(());
    };
    let Some(v4) = v6.to_ipv4_mapped() else {
        return Ok(());
    };
    let hint = match prefix.checked_sub(96) {
        Some(p) => format!("write it as {v4}/{p}"),
        None => "a prefix shorter than /96 is not an IPv4 block: write the IPv4 block".into(),
    };
    Err(format!(
        "{s:?} is an IPv4-mapped IPv6 block, which is matched as IPv4: {hint}"
    ))
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().prefix, 8);
        assert_eq!("fd00::/8".parse::<Cidr>().unwrap().to_string(), "fd00::/8");
        assert_eq!("127.0.0.1".parse::<Cidr>().unwrap().prefix, 32);
        assert_eq!("::1".parse::<Cidr>().unwrap().prefix, 128);
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "nope/8",
            "10.0.0.0/x",
            "",
            "/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn ipv4_mapped_blocks_are_refused_with_the_ipv4_spelling() {
        let err = "::ffff:10.0.0.0/104".parse::<Cidr>().unwrap_err();
        assert!(err.contains("10.0.0.0/8"), "{err}");
        let err = "::ffff:10.1.2.3".parse::<Cidr>().unwrap_err();
        assert!(err.contains("10.1.2.3/32"), "{err}");
        for bad in [
            "::ffff:0.0.0.0/96",
            "::ffff:10.0.0.0/33",
            "::ffff:10.0.0.0/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad} should be rejected");
        }
        // Neighbours of the mapped range are ordinary IPv6 blocks.
        assert!("::/0".parse::<Cidr>().is_ok());
        assert!("64:ff9b::/96".parse::<Cidr>().is_ok());
    }
}

impl Cidr {
    /// Whether `ip` is inside the block (IPv4 and v4-mapped IPv6 are the same address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let norm = |ip: IpAddr| match ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        // Parsing refuses mapped blocks; one built by hand is read as the IPv4 block it
        // spells (`::ffff:10.0.0.0/104` is 10.0.0.0/8), never against the wrong width.
        let (net, prefix) = match self.addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if self.prefix >= 96 => (IpAddr::V4(v4), self.prefix - 96),
                _ => (IpAddr::V6(v6), self.prefix),
            },
            v4 => (v4, self.prefix),
        };
        match (net, norm(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let Some(host_bits) = 32u32.checked_sub(u32::from(prefix)) else {
                    return false;
                };
                let mask = u32::MAX.checked_shl(host_bits).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let Some(host_bits) = 128u32.checked_sub(u32::from(prefix)) else {
                    return false;
                };
                let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod contains_tests {
    use super::*;

    #[test]
    fn membership() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.255.1.2".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.1.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(
            v6.contains("fd12::1".parse().unwrap()) && !v6.contains("fe80::1".parse().unwrap())
        );
        let host: Cidr = "127.0.0.1".parse().unwrap();
        assert!(
            host.contains("127.0.0.1".parse().unwrap())
                && !host.contains("127.0.0.2".parse().unwrap())
        );
    }

    /// A mapped block built by hand (parsing refuses it) with a prefix past 32: reading it
    /// against IPv4's 32 bits underflowed, which in a release build matched every address.
    #[test]
    fn a_mapped_block_built_by_hand_is_its_ipv4_block() {
        let c = Cidr {
            addr: "::ffff:10.0.0.0".parse().unwrap(),
            prefix: 104,
        };
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("192.0.2.1".parse().unwrap()));
    }
}
