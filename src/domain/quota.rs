//! Per-tenant quotas: hard limits on what one tenant's active allocations may hold at once.
//!
//! A request's tenant is its `tenant` field, or else the value of the config's
//! `tenant_metadata_key` in its metadata (so existing callers that tag `metadata.tenant` are
//! covered). A request past its tenant's quota is rejected with reason `quota`, in the words
//! Kubernetes uses for resource quotas. Quotas are part of the config, so they change only by a
//! recorded config change; lowering one below what a tenant holds never revokes anything, it
//! only refuses the tenant's next requests until its use falls under the limit.

use crate::domain::config::{mcp_name_allowed, mcp_name_error};
use crate::domain::model::Resources;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Longest tenant name, in characters.
pub const MAX_TENANT_CHARS: usize = 128;
/// The name under which requests without a tenant are counted (and shown).
pub const NO_TENANT: &str = "(none)";

/// The limits of one tenant; a limit left out is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// CPU the tenant's workers may hold at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millicores: Option<u64>,
    /// Memory the tenant's workers may hold at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Worker slots the tenant may hold at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
    /// Per MCP server name: how many of the tenant's active allocations may use it at once.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mcp_servers: BTreeMap<String, u32>,
}

/// What one tenant's active allocations hold: their workers' resources (MCP server costs are
/// the pool's, charged once however many tenants share a server) and how many use each server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantUse {
    /// Workers, and the CPU and memory they hold.
    pub resources: Resources,
    /// Active allocations per MCP server name.
    pub mcp_servers: BTreeMap<String, u32>,
}

impl TenantUse {
    /// Adds an allocation's holdings.
    pub fn add(&mut self, r: Resources, servers: impl Iterator<Item = impl AsRef<str>>) {
        self.resources = self.resources.checked_add(r).unwrap_or(self.resources);
        for s in servers {
            match self.mcp_servers.get_mut(s.as_ref()) {
                Some(n) => *n += 1,
                None => {
                    self.mcp_servers.insert(s.as_ref().to_string(), 1);
                }
            }
        }
    }

    /// Removes an allocation's holdings.
    pub fn remove(&mut self, r: Resources, servers: impl Iterator<Item = impl AsRef<str>>) {
        self.resources = self.resources.checked_sub(r).unwrap_or_default();
        for s in servers {
            if let Some(n) = self.mcp_servers.get_mut(s.as_ref()) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.mcp_servers.remove(s.as_ref());
                }
            }
        }
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.resources == Resources::default() && self.mcp_servers.is_empty()
    }
}

/// Which limit a request would pass, and by how much: recorded in its rejection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaExceeded {
    /// The tenant ([`NO_TENANT`] for requests without one).
    pub tenant: String,
    /// `workers`, `cpu_millicores`, `memory_mib` or `mcp_servers.NAME`.
    pub resource: String,
    /// What the request asked for of it.
    pub requested: u64,
    /// What the tenant held of it when the request was decided.
    pub used: u64,
    /// The limit.
    pub limited: u64,
}

impl QuotaExceeded {
    /// Kubernetes' wording: `exceeded quota for tenant t1: requested workers=4, used=8, limited=10`.
    pub fn message(&self) -> String {
        format!(
            "exceeded quota for tenant {}: requested {}={}, used={}, limited={}",
            self.tenant, self.resource, self.requested, self.used, self.limited
        )
    }
}

/// The first limit of `quota` that `used` plus the request (`asked`, and one more user of each
/// of `servers`) would pass, checked in the order workers, CPU, memory, MCP servers.
pub fn first_exceeded(
    tenant: &str,
    quota: &Quota,
    used: &TenantUse,
    asked: Resources,
    servers: &[String],
) -> Option<QuotaExceeded> {
    let over = |resource: &str, requested: u64, used: u64, limited: Option<u64>| {
        let limited = limited?;
        (used.saturating_add(requested) > limited).then(|| QuotaExceeded {
            tenant: tenant.to_string(),
            resource: resource.to_string(),
            requested,
            used,
            limited,
        })
    };
    over("workers", u64::from(asked.workers), u64::from(used.resources.workers), quota.workers.map(u64::from))
        .or_else(|| over("cpu_millicores", asked.cpu_millicores, used.resources.cpu_millicores, quota.cpu_millicores))
        .or_else(|| over("memory_mib", asked.memory_mib, used.resources.memory_mib, quota.memory_mib))
        .or_else(|| {
            servers.iter().find_map(|name| {
                let limit = quota.mcp_servers.get(name).copied().map(u64::from);
                let in_use = used.mcp_servers.get(name).copied().map_or(0, u64::from);
                over(&format!("mcp_servers.{name}"), 1, in_use, limit)
            })
        })
}

/// Checks a tenant name from outside: 1 to 128 characters, no control characters.
pub fn validate_tenant(field: &str, tenant: &str) -> Result<()> {
    let chars = tenant.chars().count();
    if tenant.trim().is_empty() || chars > MAX_TENANT_CHARS || tenant.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            format!(
                "{:?} is not a tenant name: use 1 to {MAX_TENANT_CHARS} characters without control characters",
                tenant.chars().take(40).collect::<String>()
            ),
        ));
    }
    if tenant == NO_TENANT {
        return Err(Error::invalid(field, format!("{NO_TENANT} is reserved for requests without a tenant")));
    }
    Ok(())
}

/// Checks the quotas of a config: tenant and MCP server names.
pub fn validate_quotas(quotas: &BTreeMap<String, Quota>, default: Option<&Quota>) -> Result<()> {
    for (tenant, q) in quotas {
        validate_tenant(&format!("config.quotas.{tenant}"), tenant)?;
        validate_quota(&format!("config.quotas.{tenant}"), q)?;
    }
    default.map_or(Ok(()), |q| validate_quota("config.default_quota", q))
}

fn validate_quota(field: &str, q: &Quota) -> Result<()> {
    for name in q.mcp_servers.keys() {
        if !mcp_name_allowed(name) {
            return Err(mcp_name_error(&format!("{field}.mcp_servers"), name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_limit_passed_is_reported_in_kubernetes_words() {
        let quota = Quota { workers: Some(10), mcp_servers: [("github".to_string(), 1)].into(), ..Quota::default() };
        let mut used = TenantUse::default();
        used.add(Resources { workers: 8, cpu_millicores: 8000, memory_mib: 1 }, ["github"].iter());
        let asked = Resources { workers: 4, cpu_millicores: 4000, memory_mib: 1 };
        let e = first_exceeded("t1", &quota, &used, asked, &[]).unwrap();
        assert_eq!(e.message(), "exceeded quota for tenant t1: requested workers=4, used=8, limited=10");
        let two = Resources { workers: 2, ..asked };
        assert_eq!(first_exceeded("t1", &quota, &used, two, &[]), None, "8 + 2 = 10 is within");
        let e = first_exceeded("t1", &quota, &used, two, &["github".into()]).unwrap();
        assert_eq!(e.message(), "exceeded quota for tenant t1: requested mcp_servers.github=1, used=1, limited=1");
        used.remove(Resources { workers: 8, cpu_millicores: 8000, memory_mib: 1 }, ["github"].iter());
        assert!(used.is_empty());
    }
}
