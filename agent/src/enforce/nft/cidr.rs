//! IPv4/IPv6 networks in canonical form and the country CIDR file the `geo_v4`/`geo_v6`
//! sets are filled from.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use super::EnforceError;

/// An IPv4 or IPv6 network in canonical form (no host bits set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Cidr {
    /// Parses `addr/len` or a bare address (a host route). Host bits must be clear: a CIDR
    /// with them set is more likely a typo than a network.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("invalid address {addr:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => {
                l.parse::<u8>().ok().filter(|l| *l <= max).ok_or(format!("invalid prefix length {l:?}"))?
            }
            None => max,
        };
        let cidr = Self { addr, len };
        if cidr.network() != addr {
            return Err(format!("host bits set in {s} (network is {})", cidr.network()));
        }
        Ok(cidr)
    }

    /// Whether this is an IPv4 network.
    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }

    fn network(&self) -> IpAddr {
        mask(self.addr, self.len)
    }
}

pub(super) fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Drops networks contained in another one: nft rejects overlapping intervals.
pub(super) fn without_nested(cidrs: BTreeSet<Cidr>) -> BTreeSet<Cidr> {
    let all: HashSet<Cidr> = cidrs.iter().copied().collect();
    cidrs
        .into_iter()
        .filter(|c| !(0..c.len).any(|l| all.contains(&Cidr { addr: mask(c.addr, l), len: l })))
        .collect()
}

/// Country code (ISO 3166 alpha-2, upper case) → its (IPv4, IPv6) networks.
pub type CountryCidrs = BTreeMap<String, (Vec<Cidr>, Vec<Cidr>)>;

/// Loads a country CIDR file: one `CC CIDR` per line (ISO 3166 alpha-2 code, then an IPv4
/// or IPv6 network); `#` starts a comment; blank lines are ignored.
pub fn load_country_cidrs(path: &Path) -> Result<CountryCidrs, EnforceError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| EnforceError::CidrFileIo { path: path.to_path_buf(), source })?;
    parse_country_cidrs(path, &text)
}

pub(super) fn parse_country_cidrs(path: &Path, text: &str) -> Result<CountryCidrs, EnforceError> {
    let mut out = CountryCidrs::new();
    for (i, raw) in text.lines().enumerate() {
        let bad = |reason: String| EnforceError::CidrFile { path: path.to_path_buf(), line: i + 1, reason };
        let line = raw.split_once('#').map_or(raw, |(l, _)| l).trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(cc), Some(cidr), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(bad("expected `CC CIDR`".into()));
        };
        if cc.len() != 2 || !cc.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(bad(format!("invalid country code {cc:?}")));
        }
        let cidr = Cidr::parse(cidr).map_err(bad)?;
        let entry = out.entry(cc.to_ascii_uppercase()).or_default();
        if cidr.is_v4() {
            entry.0.push(cidr);
        } else {
            entry.1.push(cidr);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cidrs_canonically() {
        assert_eq!(Cidr::parse("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(Cidr::parse("1.2.3.4").unwrap().to_string(), "1.2.3.4/32");
        assert_eq!(Cidr::parse("2001:db8::/32").unwrap().to_string(), "2001:db8::/32");
        assert!(Cidr::parse("10.0.0.1/8").unwrap_err().contains("host bits"));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("10.0.0/8").is_err());
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().len, 0);
    }

    #[test]
    fn nested_networks_are_dropped() {
        let s: BTreeSet<Cidr> = ["10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/24", "0.0.0.0/1"]
            .iter()
            .map(|c| Cidr::parse(c).unwrap())
            .collect();
        let kept: Vec<String> = without_nested(s).iter().map(Cidr::to_string).collect();
        assert_eq!(kept, ["0.0.0.0/1"]);
    }

    #[test]
    fn country_file_parses_and_names_bad_lines() {
        let p = Path::new("geo.txt");
        let m =
            parse_country_cidrs(p, "# comment\n\nde 5.1.0.0/16 # trailing\nDE 2a00:1::/32\nFR 2.0.0.0/12\n")
                .unwrap();
        assert_eq!(m["DE"].0, vec![Cidr::parse("5.1.0.0/16").unwrap()]);
        assert_eq!(m["DE"].1, vec![Cidr::parse("2a00:1::/32").unwrap()]);
        assert_eq!(m["FR"].0.len(), 1);
        for (text, line) in [
            ("DE 1.2.3.0/24\nDEU 1.0.0.0/8\n", 2),
            ("\n\nDE\n", 3),
            ("DE 1.2.3.4/24\n", 1),
            ("DE 1.0.0.0/8 x\n", 1),
        ] {
            match parse_country_cidrs(p, text) {
                Err(EnforceError::CidrFile { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }
}
