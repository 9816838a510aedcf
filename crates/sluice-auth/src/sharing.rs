//! Sharing of workflows: by default every member of a tenant reaches every workflow as far as
//! their role allows; a workflow can be *restricted* to its creator, the tenant's owners and
//! admins, and the users, API keys and roles it is shared with, each at a level (`view`, `run`,
//! `edit`). To everyone else a restricted workflow and its executions do not exist (404).
//!
//! A workflow's sharing also names the visibility of its executions started without one
//! (`tenant`, the default, or `private`: only their owner, the tenant's owners and admins reach
//! them). A child execution is reached only by who reaches its ancestors' workflows too.
//!
//! The level and the role both apply: an editor who was given `view` can only read, and a viewer
//! given `edit` still cannot publish. Shares are directory documents (`workflow_share`, one per
//! workflow), cached per node for a few seconds like users and keys.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
pub use sluice_core::event::Visibility;
use sluice_store::{Doc, Store};

use crate::role::{Perm, Principal, Role};
use crate::{now_ms, AuthError};

const SHARE: &str = "workflow_share";
/// Most grants on one workflow.
pub const MAX_GRANTS: usize = 100;

/// How far someone reaches a workflow and its executions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Not at all: the workflow is not there for them.
    None,
    /// Read the workflow, its executions and their histories.
    View,
    /// Also start, signal, cancel and redrive its executions.
    Run,
    /// Also publish new versions.
    Edit,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::None => "none",
            Access::View => "view",
            Access::Run => "run",
            Access::Edit => "edit",
        }
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One grant: `to` is `user:<email>`, `key:<api key id>` or `role:<role>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub to: String,
    pub access: Access,
}

/// Who may reach one workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sharing {
    /// When false (the default) every member of the tenant reaches it as their role allows.
    pub restricted: bool,
    /// Who published its first version (`user:<email>` or `key:<id>`), when known.
    #[serde(default)]
    pub created_by: Option<String>,
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// The visibility of its executions started without one.
    #[serde(default)]
    pub visibility: Visibility,
    #[serde(default)]
    pub updated_by: Option<String>,
    #[serde(default)]
    pub updated_at_ms: i64,
}

impl Sharing {
    fn open(created_by: Option<String>) -> Self {
        Self {
            restricted: false,
            created_by,
            grants: Vec::new(),
            visibility: Visibility::Tenant,
            updated_by: None,
            updated_at_ms: now_ms(),
        }
    }

    /// How far `p` reaches the workflow (before its role is checked).
    pub fn access(&self, p: &Principal) -> Access {
        if !self.restricted || self.may_change(p) {
            return Access::Edit;
        }
        let (me, my_role) = (p.label(), format!("role:{}", p.role));
        self.grants.iter().filter(|g| g.to == me || g.to == my_role).map(|g| g.access).max().unwrap_or(Access::None)
    }

    /// Owners, admins and the workflow's creator change its sharing.
    pub fn may_change(&self, p: &Principal) -> bool {
        p.can(Perm::Manage) || self.created_by.as_deref().is_some_and(|c| c == p.label())
    }
}

/// Checks and normalizes a grantee: `user:<email>` (lower-cased), `key:<id>` or `role:<role>`.
pub fn check_grantee(to: &str) -> Result<String, AuthError> {
    let bad = |why: &str| AuthError::invalid("grants[].to", format!("{why}, got {to:?}"));
    let (kind, who) = to.split_once(':').ok_or_else(|| bad("expected `user:<email>`, `key:<id>` or `role:<role>`"))?;
    match kind {
        "user" => match crate::text::check_email(who) {
            Ok(email) => Ok(format!("user:{email}")),
            Err(_) => Err(bad("expected an email after `user:`")),
        },
        "key" => {
            if who.len() != 16 || !who.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad("expected the 16 hex digits of an API key id after `key:`"));
            }
            Ok(format!("key:{}", who.to_ascii_lowercase()))
        }
        "role" => match Role::parse(who) {
            Some(r) => Ok(format!("role:{r}")),
            None => Err(bad("expected owner, admin, editor, viewer or worker after `role:`")),
        },
        _ => Err(bad("expected `user:<email>`, `key:<id>` or `role:<role>`")),
    }
}

struct Cached {
    at: Instant,
    shares: Arc<HashMap<String, Sharing>>,
}

/// The shares of every tenant, read through a short per-node cache.
pub struct Shares {
    store: Arc<dyn Store>,
    ttl: Duration,
    cache: Mutex<HashMap<String, Cached>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn decode(doc: &Doc) -> Result<Sharing, AuthError> {
    serde_json::from_value(doc.body.clone())
        .map_err(|e| AuthError::Internal(format!("stored sharing of {} does not parse: {e}", doc.id)))
}

impl Shares {
    pub fn new(store: Arc<dyn Store>, ttl: Duration) -> Self {
        Self { store, ttl, cache: Mutex::new(HashMap::new()) }
    }

    /// The tenant's shares; what was read before while the store cannot be reached.
    async fn of_tenant(&self, tenant: &str) -> Result<Arc<HashMap<String, Sharing>>, AuthError> {
        let stale = match lock(&self.cache).get(tenant) {
            Some(c) if c.at.elapsed() < self.ttl => return Ok(c.shares.clone()),
            Some(c) => Some(c.shares.clone()),
            None => None,
        };
        let docs = match self.store.list_docs(tenant, SHARE).await {
            Ok(docs) => docs,
            Err(e) => {
                return match stale {
                    Some(shares) => Ok(shares),
                    None => Err(e.into()),
                }
            }
        };
        let mut shares = HashMap::with_capacity(docs.len());
        for d in &docs {
            shares.insert(d.id.clone(), decode(d)?);
        }
        let shares = Arc::new(shares);
        lock(&self.cache).insert(tenant.to_string(), Cached { at: Instant::now(), shares: shares.clone() });
        Ok(shares)
    }

    /// Whether any workflow of the tenant is restricted: when none is, nothing needs checking.
    pub async fn any_restricted(&self, tenant: &str) -> Result<bool, AuthError> {
        Ok(self.of_tenant(tenant).await?.values().any(|s| s.restricted))
    }

    /// How far `p` reaches `workflow` (before its role is checked).
    pub async fn access(&self, p: &Principal, workflow: &str) -> Result<Access, AuthError> {
        Ok(self.of_tenant(&p.tenant).await?.get(workflow).map_or(Access::Edit, |s| s.access(p)))
    }

    /// How far `p` reaches every one of `workflows`: the least of its reach of each.
    pub async fn access_all<'a>(
        &self,
        p: &Principal,
        workflows: impl IntoIterator<Item = &'a str>,
    ) -> Result<Access, AuthError> {
        let shares = self.of_tenant(&p.tenant).await?;
        Ok(workflows
            .into_iter()
            .map(|w| shares.get(w).map_or(Access::Edit, |s| s.access(p)))
            .min()
            .unwrap_or(Access::Edit))
    }

    /// The visibility of executions of `workflow` started without one.
    pub async fn default_visibility(&self, tenant: &str, workflow: &str) -> Result<Visibility, AuthError> {
        Ok(self.of_tenant(tenant).await?.get(workflow).map_or(Visibility::Tenant, |s| s.visibility))
    }

    /// The workflows of `p`'s tenant that `p` does not reach at all, to leave out of listings.
    pub async fn hidden(&self, p: &Principal) -> Result<Vec<String>, AuthError> {
        let shares = self.of_tenant(&p.tenant).await?;
        let mut hidden: Vec<String> =
            shares.iter().filter(|(_, s)| s.access(p) == Access::None).map(|(name, _)| name.clone()).collect();
        hidden.sort();
        Ok(hidden)
    }

    /// The sharing of `workflow`, read from the store (open, with no creator, when never set).
    pub async fn get(&self, tenant: &str, workflow: &str) -> Result<(Sharing, i64), AuthError> {
        match self.store.get_doc(tenant, SHARE, workflow).await? {
            Some(d) => Ok((decode(&d)?, d.version)),
            None => Ok((Sharing::open(None), 0)),
        }
    }

    /// Records who published the first version of `workflow`; a no-op when it has sharing.
    pub async fn record_creator(&self, p: &Principal, workflow: &str) -> Result<(), AuthError> {
        let body = serde_json::to_value(Sharing::open(Some(p.label())))
            .map_err(|e| AuthError::Internal(format!("cannot encode sharing: {e}")))?;
        let doc = Doc {
            tenant: p.tenant.clone(),
            kind: SHARE.into(),
            id: workflow.into(),
            body,
            version: 0,
            updated_at_ms: now_ms(),
        };
        self.store.put_doc(doc).await?;
        lock(&self.cache).remove(&p.tenant);
        Ok(())
    }

    /// Replaces the sharing of `workflow`: only its creator, owners and admins may.
    pub async fn set(
        &self,
        p: &Principal,
        workflow: &str,
        restricted: bool,
        grants: Vec<Grant>,
        visibility: Visibility,
    ) -> Result<Sharing, AuthError> {
        if grants.len() > MAX_GRANTS {
            return Err(AuthError::invalid("grants", format!("at most {MAX_GRANTS} grants, got {}", grants.len())));
        }
        let mut checked: Vec<Grant> = Vec::with_capacity(grants.len());
        for g in grants {
            if g.access == Access::None {
                return Err(AuthError::invalid(
                    "grants[].access",
                    "expected view, run or edit (leave a grant out to give none)",
                ));
            }
            let to = check_grantee(&g.to)?;
            // One grant per grantee: the widest wins.
            match checked.iter_mut().find(|c| c.to == to) {
                Some(c) => c.access = c.access.max(g.access),
                None => checked.push(Grant { to, access: g.access }),
            }
        }
        let (current, version) = self.get(&p.tenant, workflow).await?;
        if !current.may_change(p) {
            return Err(AuthError::Forbidden(format!(
                "only the tenant's owners and admins and the workflow's creator change the sharing of `{workflow}`"
            )));
        }
        let next = Sharing {
            restricted,
            created_by: current.created_by,
            grants: checked,
            visibility,
            updated_by: Some(p.label()),
            updated_at_ms: now_ms(),
        };
        let body =
            serde_json::to_value(&next).map_err(|e| AuthError::Internal(format!("cannot encode sharing: {e}")))?;
        let doc = Doc {
            tenant: p.tenant.clone(),
            kind: SHARE.into(),
            id: workflow.into(),
            body,
            version,
            updated_at_ms: now_ms(),
        };
        if !self.store.put_doc(doc).await? {
            return Err(AuthError::Conflict(format!(
                "the sharing of `{workflow}` changed meanwhile; read it and retry"
            )));
        }
        lock(&self.cache).remove(&p.tenant);
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::role::Actor;

    fn user(email: &str, role: Role) -> Principal {
        Principal { tenant: "t".into(), actor: Actor::User { email: email.into() }, role }
    }

    fn restricted(grants: &[(&str, Access)]) -> Sharing {
        Sharing {
            restricted: true,
            created_by: Some("user:ada@example.com".into()),
            grants: grants.iter().map(|(to, access)| Grant { to: (*to).into(), access: *access }).collect(),
            visibility: Visibility::Tenant,
            updated_by: None,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn open_workflows_reach_everyone() {
        let s = Sharing::open(None);
        assert_eq!(s.access(&user("bob@example.com", Role::Viewer)), Access::Edit);
    }

    #[test]
    fn restricted_workflows_reach_creator_managers_and_grantees_only() {
        let s = restricted(&[("user:bob@example.com", Access::View), ("role:editor", Access::Run)]);
        assert_eq!(s.access(&user("ada@example.com", Role::Editor)), Access::Edit, "creator");
        assert_eq!(s.access(&user("root@example.com", Role::Admin)), Access::Edit, "admin");
        assert_eq!(s.access(&user("bob@example.com", Role::Viewer)), Access::View);
        // The widest of a user's grant and their role's grant.
        assert_eq!(s.access(&user("bob@example.com", Role::Editor)), Access::Run);
        assert_eq!(s.access(&user("eve@example.com", Role::Viewer)), Access::None);
        let key = Principal {
            tenant: "t".into(),
            actor: Actor::ApiKey { id: "0123456789abcdef".into(), name: "ci".into() },
            role: Role::Viewer,
        };
        assert_eq!(s.access(&key), Access::None);
        let s = restricted(&[("key:0123456789abcdef", Access::Edit)]);
        assert_eq!(s.access(&key), Access::Edit);
    }

    #[test]
    fn only_managers_and_the_creator_change_sharing() {
        let s = restricted(&[("user:bob@example.com", Access::Edit)]);
        assert!(s.may_change(&user("ada@example.com", Role::Editor)));
        assert!(s.may_change(&user("x@example.com", Role::Owner)));
        assert!(!s.may_change(&user("bob@example.com", Role::Editor)), "edit is not sharing");
    }

    #[test]
    fn grantees_are_checked_and_normalized() {
        assert_eq!(check_grantee("user:Bob@Example.com").unwrap(), "user:bob@example.com");
        assert_eq!(check_grantee("role:viewer").unwrap(), "role:viewer");
        assert_eq!(check_grantee("key:0123456789ABCDEF").unwrap(), "key:0123456789abcdef");
        for bad in ["bob@example.com", "user:bob", "role:boss", "key:123", "group:x", ""] {
            let err = check_grantee(bad).unwrap_err();
            assert!(matches!(err, AuthError::Invalid { ref field, .. } if field == "grants[].to"), "{bad}: {err}");
        }
    }
}
