//! The OIDC config file (YAML or JSON): the issuer, this server as its client, the tenant its
//! users land in and how their claims map to a Sluice role. Unknown fields are errors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

use crate::role::Role;

/// The config as written in the file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    issuer: String,
    client_id: String,
    #[serde(default)]
    client_secret_env: Option<String>,
    #[serde(default)]
    client_secret_file: Option<PathBuf>,
    #[serde(default)]
    client_auth: ClientAuth,
    redirect_url: String,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    tenant: String,
    #[serde(default)]
    default_role: Option<String>,
    #[serde(default)]
    role_claim: Option<String>,
    #[serde(default)]
    roles: BTreeMap<String, String>,
    #[serde(default)]
    provision: Provision,
}

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// HTTP Basic with the form-encoded client id and secret (`client_secret_basic`).
    #[default]
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the form body (`client_secret_post`).
    ClientSecretPost,
}

/// Who may sign in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provision {
    /// A first sign-in creates the user with the mapped role.
    #[default]
    Auto,
    /// Only users that exist in the tenant already may sign in.
    Existing,
}

/// The client secret; never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The checked config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Exactly as the issuer names itself in its discovery document and its tokens (`iss`).
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub client_auth: ClientAuth,
    /// This server's `/v1/auth/oidc/callback` as the issuer knows it.
    pub redirect_url: String,
    /// Always starts with `openid`.
    pub scopes: Vec<String>,
    pub tenant: String,
    pub roles: RoleMap,
    pub provision: Provision,
}

/// How an ID token's claims become a role: the highest role any value of `claim` maps to, else
/// `default` (`None`: such users are refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleMap {
    pub default: Option<Role>,
    pub claim: Option<String>,
    pub map: BTreeMap<String, Role>,
}

impl RoleMap {
    /// The role for these ID token claims. The claim may be a string or an array of strings;
    /// when several values map, the role that allows most wins (owner, admin, editor, viewer,
    /// worker).
    pub fn role_of(&self, claims: &Value) -> Option<Role> {
        let values: Vec<&str> = match self.claim.as_deref().map(|c| &claims[c]) {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let mapped: Vec<Role> = values.iter().filter_map(|v| self.map.get(*v).copied()).collect();
        Role::ALL.into_iter().find(|r| mapped.contains(r)).or(self.default)
    }
}

/// What is wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid OIDC config: {0}")]
    Parse(String),
    #[error("invalid OIDC config at {field}: {message}")]
    Invalid { field: &'static str, message: String },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, message: message.into() }
}

/// Whether `url` is `https://`, or `http://` to this machine (a local issuer for tests).
fn check_url(field: &'static str, url: &str) -> Result<(), ConfigError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| invalid(field, format!("{url:?} is not a URL: {e}")))?;
    let local = matches!(parsed.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if local => Ok(()),
        _ => Err(invalid(field, format!("{url:?}: expected an https:// URL (http:// only for localhost)"))),
    }
}

fn role(field: &'static str, s: &str) -> Result<Role, ConfigError> {
    Role::parse(s)
        .ok_or_else(|| invalid(field, format!("unknown role {s:?}; expected owner, admin, editor, viewer or worker")))
}

impl Config {
    /// Parses a config file (YAML, or JSON, which YAML reads too). `env` looks up environment
    /// variables and `read` reads files, for the client secret.
    pub fn from_yaml(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
        read: impl Fn(&std::path::Path) -> std::io::Result<String>,
    ) -> Result<Self, ConfigError> {
        let f: File = serde_norway::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        check_url("issuer", &f.issuer)?;
        check_url("redirect_url", &f.redirect_url)?;
        if f.client_id.trim().is_empty() {
            return Err(invalid("client_id", "expected the client id the issuer gave this server"));
        }
        crate::check_tenant_id(&f.tenant).map_err(|m| invalid("tenant", m))?;
        let secret = match (&f.client_secret_env, &f.client_secret_file) {
            (Some(var), None) => env(var).filter(|s| !s.is_empty()).ok_or_else(|| {
                invalid("client_secret_env", format!("the environment variable {var} is not set; export it"))
            })?,
            (None, Some(path)) => read(path)
                .map(|s| s.trim().to_string())
                .map_err(|e| invalid("client_secret_file", format!("cannot read {}: {e}", path.display())))?,
            (Some(_), Some(_)) => {
                return Err(invalid("client_secret_env", "give client_secret_env or client_secret_file, not both"))
            }
            (None, None) => {
                return Err(invalid(
                    "client_secret_env",
                    "the client secret is needed: name an environment variable (client_secret_env) or a file \
                     (client_secret_file) that holds it",
                ))
            }
        };
        if secret.is_empty() {
            return Err(invalid("client_secret_file", "the file is empty"));
        }
        let mut scopes = vec!["openid".to_string()];
        for s in f.scopes.unwrap_or_else(|| vec!["email".into(), "profile".into()]) {
            if s.is_empty() || s.contains(char::is_whitespace) {
                return Err(invalid("scopes", format!("{s:?} is not a scope")));
            }
            if !scopes.contains(&s) {
                scopes.push(s);
            }
        }
        let default = match f.default_role.as_deref() {
            None => Some(Role::Viewer),
            Some("none") => None,
            Some(r) => Some(role("default_role", r)?),
        };
        let map =
            f.roles.iter().map(|(k, v)| Ok((k.clone(), role("roles", v)?))).collect::<Result<_, ConfigError>>()?;
        if f.role_claim.is_none() && !f.roles.is_empty() {
            return Err(invalid("role_claim", "`roles` maps values of a claim: name the claim (e.g. groups)"));
        }
        if default.is_none() && f.roles.is_empty() {
            return Err(invalid("default_role", "with `none` and no `roles`, nobody could sign in"));
        }
        Ok(Self {
            issuer: f.issuer,
            client_id: f.client_id,
            client_secret: Secret(secret),
            client_auth: f.client_auth,
            redirect_url: f.redirect_url,
            scopes,
            tenant: f.tenant,
            roles: RoleMap { default, claim: f.role_claim, map },
            provision: f.provision,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(
            text,
            |v| (v == "SECRET").then(|| "s3cret".to_string()),
            |p| {
                if p == std::path::Path::new("/secret") {
                    Ok("from-file\n".into())
                } else {
                    Err(std::io::ErrorKind::NotFound.into())
                }
            },
        )
    }

    const BASE: &str = "issuer: https://idp.example.com\nclient_id: sluice\nclient_secret_env: SECRET\n\
                        redirect_url: https://sluice.example.com/v1/auth/oidc/callback\ntenant: acme\n";

    #[test]
    fn a_minimal_config_has_sensible_defaults() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.client_secret.expose(), "s3cret");
        assert_eq!(c.scopes, ["openid", "email", "profile"]);
        assert_eq!(c.client_auth, ClientAuth::ClientSecretBasic);
        assert_eq!(c.provision, Provision::Auto);
        assert_eq!(c.roles.role_of(&json!({"groups": ["x"]})), Some(Role::Viewer));
        assert!(!format!("{c:?}").contains("s3cret"), "the secret is redacted");
    }

    #[test]
    fn roles_map_from_a_claim_and_the_strongest_wins() {
        let c = parse(&format!(
            "{BASE}role_claim: groups\ndefault_role: none\nroles: {{ops: admin, devs: editor, all: viewer}}\n\
             scopes: [email, groups]\nclient_auth: client_secret_post\nprovision: existing\n"
        ))
        .unwrap();
        assert_eq!(c.scopes, ["openid", "email", "groups"]);
        assert_eq!(c.client_auth, ClientAuth::ClientSecretPost);
        assert_eq!(c.provision, Provision::Existing);
        let role = |claims| c.roles.role_of(&claims);
        assert_eq!(role(json!({"groups": ["all", "devs"]})), Some(Role::Editor));
        assert_eq!(role(json!({"groups": ["devs", "ops"]})), Some(Role::Admin));
        assert_eq!(role(json!({"groups": "all"})), Some(Role::Viewer), "a single string counts too");
        assert_eq!(role(json!({"groups": ["strangers"]})), None, "no default: refused");
        assert_eq!(role(json!({})), None);
    }

    #[test]
    fn mistakes_name_their_field() {
        let cases: &[(&str, &str)] = &[
            ("issuer: http://idp.example.com", "issuer"),
            ("client_secret_env: MISSING", "client_secret_env"),
            ("tenant: Acme", "tenant"),
            ("default_role: root", "default_role"),
            ("roles: {a: editor}", "role_claim"),
            ("default_role: none", "default_role"),
            ("client_secret_file: /nope", "client_secret_file"),
        ];
        for (line, field) in cases {
            let key = line.split(':').next().unwrap();
            let drop =
                |l: &str| l.starts_with(key) || (key.starts_with("client_secret") && l.starts_with("client_secret"));
            let text: String = BASE.lines().filter(|l| !drop(l)).map(|l| format!("{l}\n")).collect::<String>() + line;
            match parse(&text) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, *field, "{line}"),
                other => panic!("{line}: {other:?}"),
            }
        }
        let from_file = BASE.replace("client_secret_env: SECRET", "client_secret_file: /secret");
        assert_eq!(parse(&from_file).unwrap().client_secret.expose(), "from-file");
        assert!(matches!(parse(&format!("{BASE}colour: blue\n")), Err(ConfigError::Parse(m)) if m.contains("colour")));
        assert!(parse(&BASE.replace("https://idp.example.com", "http://127.0.0.1:9000")).is_ok(), "local http");
    }
}
