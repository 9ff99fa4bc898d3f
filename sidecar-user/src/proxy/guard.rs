//! Destinations the proxy refuses whatever the policy says, unless explicitly allowed.
//!
//! The cloud metadata endpoint hands out the node's credentials to anyone who can reach it;
//! a workload that only ever needed its service peers should not get them through the
//! sidecar. `--allow-metadata` lifts the refusal for workloads that do need it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// AWS, GCP, Azure, OpenStack, …: the link-local metadata address.
const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// AWS's IPv6 metadata address (Nitro instances).
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);

/// Whether `ip` is a cloud metadata address (IPv4, v4-mapped IPv6, or AWS's IPv6 one).
pub fn is_cloud_metadata(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == METADATA_V4,
        IpAddr::V6(v6) => v6 == METADATA_V6 || v6.to_ipv4_mapped() == Some(METADATA_V4),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_addresses_in_every_form() {
        for yes in ["169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254"] {
            assert!(is_cloud_metadata(yes.parse().unwrap()), "{yes}");
        }
        for no in [
            "169.254.169.253",
            "127.0.0.1",
            "fd00:ec2::253",
            "::1",
            "169.254.0.1",
        ] {
            assert!(!is_cloud_metadata(no.parse().unwrap()), "{no}");
        }
    }
}
