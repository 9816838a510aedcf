//! Roles, the permissions each one grants, and the principal a request acts as.

use serde::{Deserialize, Serialize};

/// A role in a tenant. Owners and admins manage people and keys (only an owner makes owners);
/// editors publish and run workflows and call the gateway; viewers read; workers take and finish
/// tasks and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Owner,
    Admin,
    Editor,
    Viewer,
    Worker,
}

/// What an endpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Perm {
    /// See workflows, executions, histories, queries, the DLQ, usage and budgets.
    Read,
    /// Publish workflow versions.
    Publish,
    /// Start, signal, cancel and redrive executions.
    Operate,
    /// Poll for tasks and report their results (external workers).
    Work,
    /// Call models through the gateway.
    Gateway,
    /// Manage users and API keys, read the audit log.
    Manage,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Owner, Role::Admin, Role::Editor, Role::Viewer, Role::Worker];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Editor => "editor",
            Role::Viewer => "viewer",
            Role::Worker => "worker",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    pub fn allows(self, perm: Perm) -> bool {
        use Perm::*;
        match self {
            Role::Owner | Role::Admin => true,
            Role::Editor => matches!(perm, Read | Publish | Operate | Gateway),
            Role::Viewer => matches!(perm, Read),
            Role::Worker => matches!(perm, Work),
        }
    }

    /// Whether someone with this role may give `other` to a user or key: owners any role,
    /// admins any but owner, others none.
    pub fn may_grant(self, other: Role) -> bool {
        match self {
            Role::Owner => true,
            Role::Admin => other != Role::Owner,
            _ => false,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who acts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    User {
        email: String,
    },
    ApiKey {
        id: String,
        name: String,
    },
    /// A server started with authentication switched off.
    Anonymous,
}

/// The identity a request acts as: its tenant, who, and with which role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant: String,
    pub actor: Actor,
    pub role: Role,
}

impl Principal {
    pub fn can(&self, perm: Perm) -> bool {
        self.role.allows(perm)
    }

    /// `user:<email>`, `key:<id>` or `anonymous`: the audit log's actor.
    pub fn label(&self) -> String {
        match &self.actor {
            Actor::User { email } => format!("user:{email}"),
            Actor::ApiKey { id, .. } => format!("key:{id}"),
            Actor::Anonymous => "anonymous".into(),
        }
    }

    /// The API key id, for per-key budgets and limits.
    pub fn api_key(&self) -> Option<&str> {
        match &self.actor {
            Actor::ApiKey { id, .. } => Some(id),
            _ => None,
        }
    }

    pub fn user(&self) -> Option<&str> {
        match &self.actor {
            Actor::User { email } => Some(email),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_grant_what_the_docs_say() {
        use Perm::*;
        let table = [
            (Role::Owner, vec![Read, Publish, Operate, Work, Gateway, Manage]),
            (Role::Admin, vec![Read, Publish, Operate, Work, Gateway, Manage]),
            (Role::Editor, vec![Read, Publish, Operate, Gateway]),
            (Role::Viewer, vec![Read]),
            (Role::Worker, vec![Work]),
        ];
        for (role, allowed) in table {
            for perm in [Read, Publish, Operate, Work, Gateway, Manage] {
                assert_eq!(role.allows(perm), allowed.contains(&perm), "{role} {perm:?}");
            }
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert!(Role::Owner.may_grant(Role::Owner));
        assert!(!Role::Admin.may_grant(Role::Owner));
        assert!(Role::Admin.may_grant(Role::Admin));
        assert!(!Role::Editor.may_grant(Role::Viewer));
        assert_eq!(Role::parse("root"), None);
    }
}
