//! Reading the table back: the JSON of `nft -j list table inet kycd` into [`NftActual`].

use std::net::IpAddr;

use serde_json::Value;

use super::cidr::Cidr;
use super::ruleset::cgroup_id;
use super::{EnforceError, NftActual, CG_SET, GEO_CG_SET};

/// Parses `nft -j list table inet kycd`.
pub(super) fn parse_actual(json: &str) -> Result<NftActual, EnforceError> {
    let doc: Value = serde_json::from_str(json).map_err(|e| EnforceError::NftParse(e.to_string()))?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| EnforceError::NftParse("no `nftables` array".into()))?;
    let mut actual = NftActual::default();
    let mut structure = Vec::new();
    for item in items {
        let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else { continue };
        let Some(body) = body.as_object() else { continue };
        let mut cleaned = body.clone();
        cleaned.remove("handle");
        match kind.as_str() {
            "metainfo" => continue,
            "table" => actual.present = true,
            "set" => {
                let name = body.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
                let elems = cleaned.remove("elem");
                let elems = elems.as_ref().and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
                parse_set_elements(&mut actual, &name, elems);
            }
            _ => {}
        }
        structure.push(serde_json::json!({ kind: cleaned }));
    }
    actual.structure = Value::Array(structure).to_string();
    Ok(actual)
}

fn parse_set_elements(actual: &mut NftActual, name: &str, elems: &[Value]) {
    let level_of = |prefix: &str| name.strip_prefix(prefix).and_then(|l| l.parse::<usize>().ok());
    let cgroup_set = match (level_of(CG_SET), level_of(GEO_CG_SET)) {
        (Some(level), _) => Some((level, &mut actual.cgroups, &mut actual.unresolved_levels)),
        (_, Some(level)) => Some((level, &mut actual.geo_cgroups, &mut actual.geo_unresolved_levels)),
        _ => None,
    };
    if let Some((level, sets, unresolved)) = cgroup_set {
        let ids = sets.entry(level).or_default();
        for e in elems {
            // Ids when read with an empty /sys/fs/cgroup; paths if that mount failed.
            let id = e.as_str().and_then(|s| s.parse::<u64>().ok().or_else(|| cgroup_id(s)));
            match id {
                Some(id) => {
                    ids.insert(id);
                }
                None => {
                    unresolved.insert(level);
                }
            }
        }
        return;
    }
    for e in elems {
        let parsed = match name {
            "ifaces" | "geo_ifaces" => e.as_str().map(|s| {
                let set = if name == "ifaces" { &mut actual.interfaces } else { &mut actual.geo_interfaces };
                set.insert(s.to_owned());
            }),
            "geo_v4" | "geo_v6" => element_cidr(e).map(|c| {
                if c.is_v4() {
                    actual.cidrs_v4.insert(c);
                } else {
                    actual.cidrs_v6.insert(c);
                }
            }),
            _ => Some(()), // a set kycd does not define: the structure check catches it
        };
        if parsed.is_none() {
            actual.foreign_elements.insert(name.to_owned());
        }
    }
}

/// A CIDR element as nft prints it: `"1.2.3.4"` or `{"prefix": {"addr": …, "len": n}}`.
fn element_cidr(e: &Value) -> Option<Cidr> {
    if let Some(s) = e.as_str() {
        return Cidr::parse(s).ok();
    }
    let p = e.get("prefix")?;
    let addr: IpAddr = p.get("addr")?.as_str()?.parse().ok()?;
    let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
    Cidr::parse(&format!("{addr}/{len}")).ok()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn parses_nft_json_listing() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "kycd", "handle": 1}},
            {"set": {"family": "inet", "name": "cg_l2", "table": "kycd", "type": "cgroupsv2", "handle": 3, "elem": ["44", "/nonexistent/x"]}},
            {"set": {"family": "inet", "name": "ifaces", "table": "kycd", "type": "ifname", "handle": 4, "elem": ["vnet0"]}},
            {"set": {"family": "inet", "name": "geo_v4", "table": "kycd", "type": "ipv4_addr", "handle": 5, "flags": ["interval"],
               "elem": ["1.2.3.4", {"prefix": {"addr": "5.0.0.0", "len": 24}}, {"range": ["6.0.0.1", "6.0.0.9"]}]}},
            {"rule": {"family": "inet", "table": "kycd", "chain": "output", "handle": 6, "comment": "kycd:cg_l2", "expr": []}}]}"#;
        let a = parse_actual(json).unwrap();
        assert!(a.present);
        assert_eq!(a.cgroups[&2], BTreeSet::from([44]));
        assert!(a.unresolved_levels.contains(&2));
        assert_eq!(a.interfaces, BTreeSet::from(["vnet0".to_owned()]));
        assert_eq!(a.cidrs_v4.len(), 2);
        assert!(a.foreign_elements.contains("geo_v4"));
        assert!(!a.structure.contains("handle"));
        assert!(!a.structure.contains("vnet0"));
        let b =
            parse_actual(&json.replace("\"handle\": 6", "\"handle\": 60").replace("vnet0", "vnet9")).unwrap();
        assert_eq!(a.structure, b.structure, "handles and elements are not structure");
        assert!(parse_actual("[]").is_err());
    }
}
