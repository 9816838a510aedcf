//! The identity directory: tenants, users, API keys and signing keys, as documents in the store,
//! and authentication of a request's bearer credential against them.
//!
//! Lookups are cached per node for `AuthConfig::cache_ttl`; a change made on this node (revoking a
//! key, removing a user) takes effect here at once and on other nodes within that time. While the
//! database cannot be reached, what the node read before still authenticates.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_store::{Doc, Store};

use crate::jwt::{Claims, Signer, StoredKey, Verifier, AUDIENCE, ISSUER};
use crate::role::{Actor, Principal, Role};
use crate::seal::ServerKey;
use crate::text::{check_email, check_visible, normalize_email};
use crate::{apikey, check_tenant_id, now_ms, password, AuthError, LoginFailure, SYSTEM_SCOPE};

const TENANT: &str = "tenant";
const USER: &str = "user";
const API_KEY: &str = "api_key";
const SIGNING_KEY: &str = "signing_key";
/// A client certificate's SHA-256 fingerprint → the API key it stands for.
const CLIENT_CERT: &str = "client_cert";
/// A key's last-used time is written at most this often.
const TOUCH_EVERY_MS: i64 = 60_000;
/// The check that the server key is the one the database was set up with (in `SYSTEM_SCOPE`).
const SERVER_KEY: &str = "server_key";
const SERVER_KEY_CHECK: &str = "check";
/// An unknown `kid` is looked up in the store again after this long (made-up tokens must not
/// reach the store on every request; a key made on another node is found within it).
const UNKNOWN_KID_TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// How long a session token from a login is valid.
    pub token_ttl: Duration,
    /// The signing key is replaced when it is this old.
    pub rotate_after: Duration,
    /// How long a node trusts what it read of a key or user.
    pub cache_ttl: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            token_ttl: Duration::from_secs(3600),
            rotate_after: Duration::from_secs(24 * 3600),
            cache_ttl: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TenantDoc {
    name: String,
    created_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UserDoc {
    /// The user's unique id (UUID v7), which session tokens name: a user removed and made again
    /// with the same email is another user. Users stored before ids existed get one the first
    /// time they are read (`Directory::load_user`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    email: String,
    role: Role,
    /// Absent for users who sign in only through an identity provider.
    password_hash: Option<String>,
    created_at_ms: i64,
    created_by: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyDoc {
    name: String,
    role: Role,
    digest: String,
    created_at_ms: i64,
    created_by: String,
    expires_at_ms: Option<i64>,
    revoked_at_ms: Option<i64>,
    last_used_ms: Option<i64>,
    /// The client certificate this key is bound to: over mutual TLS the certificate alone
    /// authenticates as this key, and the key works only over a connection with it.
    #[serde(default)]
    client_cert_sha256: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ServerKeyCheck {
    /// Names the server key, for the error when another key is given.
    fingerprint: String,
    /// A constant sealed with it.
    sealed: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CertDoc {
    key_id: String,
}

/// A user as the API shows it (never the password hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserView {
    pub id: String,
    pub email: String,
    pub role: Role,
    pub created_at_ms: i64,
    pub created_by: String,
}

/// An API key as the API shows it (never the key or its digest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKeyView {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at_ms: i64,
    pub created_by: String,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    pub last_used_ms: Option<i64>,
    pub client_cert_sha256: Option<String>,
}

/// A session opened by a password login.
#[derive(Debug, Clone)]
pub struct Session {
    pub token: String,
    pub expires_at_ms: i64,
    pub user: UserView,
}

pub struct NewUser {
    pub email: String,
    /// `None`: the user signs in only through the identity provider.
    pub password: Option<String>,
    pub role: Role,
}

pub struct NewApiKey {
    pub name: String,
    pub role: Role,
    pub expires_in: Option<Duration>,
    /// Bind the key to this client certificate (SHA-256 of its DER, hex; colons allowed).
    pub client_cert_sha256: Option<String>,
    /// The certificate the request's connection presented (verified by the TLS layer), which a
    /// binding asked for over the API must be: whoever binds a certificate proves they hold it.
    /// The command line (an operator, `by` = `None`) binds without it.
    pub presented_cert_sha256: Option<String>,
}

/// A fingerprint as 64 lowercase hex characters, or why it is not one.
fn check_fingerprint(fp: &str) -> Result<String, AuthError> {
    let hex: String = fp.chars().filter(|c| *c != ':').collect::<String>().to_lowercase();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(AuthError::invalid("client_cert_sha256", "expected the SHA-256 of the certificate: 64 hex characters"))
    }
}

type TenantKey = (String, KeyDoc);
type CachedUser = Cached<Option<UserDoc>>;

struct Cached<T> {
    value: T,
    at: Instant,
}

/// The ids of the tenants in `store`, in order (no server key needed).
pub async fn tenant_ids(store: &dyn Store) -> Result<Vec<String>, AuthError> {
    Ok(store.list_docs(SYSTEM_SCOPE, TENANT).await?.into_iter().map(|d| d.id).collect())
}

/// See the module docs.
pub struct Directory {
    store: Arc<dyn Store>,
    config: AuthConfig,
    /// Key id → its tenant and document (or `None`: no such key).
    keys: Mutex<HashMap<String, Cached<Option<TenantKey>>>>,
    /// (tenant, email) → the user (or `None`).
    users: Mutex<HashMap<(String, String), CachedUser>>,
    /// Seals the signing keys in the store.
    server_key: ServerKey,
    /// Tenant → its current signing key.
    signers: Mutex<HashMap<String, Arc<Signer>>>,
    /// Signing key id → the public key and its tenant (or `None`: no such key).
    verifiers: Mutex<HashMap<String, Cached<Option<Arc<Verifier>>>>>,
    touched: Mutex<HashMap<String, i64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn decode<T: DeserializeOwned>(doc: &Doc) -> Result<T, AuthError> {
    serde_json::from_value(doc.body.clone())
        .map_err(|e| AuthError::Internal(format!("stored {} {} does not parse: {e}", doc.kind, doc.id)))
}

fn encode<T: Serialize>(value: &T) -> Result<Value, AuthError> {
    serde_json::to_value(value).map_err(|e| AuthError::Internal(format!("cannot encode a directory document: {e}")))
}

fn doc(tenant: &str, kind: &str, id: &str, body: Value, version: i64) -> Doc {
    Doc { tenant: tenant.into(), kind: kind.into(), id: id.into(), body, version, updated_at_ms: now_ms() }
}

fn key_view(id: &str, k: &KeyDoc) -> ApiKeyView {
    ApiKeyView {
        id: id.into(),
        name: k.name.clone(),
        role: k.role,
        created_at_ms: k.created_at_ms,
        created_by: k.created_by.clone(),
        expires_at_ms: k.expires_at_ms,
        revoked_at_ms: k.revoked_at_ms,
        last_used_ms: k.last_used_ms,
        client_cert_sha256: k.client_cert_sha256.clone(),
    }
}

fn user_view(u: &UserDoc) -> UserView {
    UserView {
        id: u.id.clone().unwrap_or_default(),
        email: u.email.clone(),
        role: u.role,
        created_at_ms: u.created_at_ms,
        created_by: u.created_by.clone(),
    }
}

fn new_user_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn creator(by: Option<&Principal>) -> String {
    by.map(Principal::label).unwrap_or_else(|| "cli".into())
}

fn check_grant(by: Option<&Principal>, role: Role) -> Result<(), AuthError> {
    match by {
        Some(p) if !p.role.may_grant(role) => {
            Err(AuthError::Forbidden(format!("a {} cannot give the role {role}", p.role)))
        }
        _ => Ok(()),
    }
}

impl Directory {
    /// Opens the directory. `server_key` seals the session signing keys in the store; it must
    /// be the key the database was first used with (this checks it, and records it on a new
    /// database).
    pub async fn open(
        store: Arc<dyn Store>,
        config: AuthConfig,
        server_key: ServerKey,
    ) -> Result<Arc<Self>, AuthError> {
        let dir = Arc::new(Self {
            store,
            config,
            keys: Mutex::default(),
            users: Mutex::default(),
            server_key,
            signers: Mutex::default(),
            verifiers: Mutex::default(),
            touched: Mutex::default(),
        });
        dir.check_server_key().await?;
        dir.retire_shared_signing_keys().await?;
        Ok(dir)
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// Fails unless the server key opens the check the database was set up with; writes that
    /// check on a database that has none.
    async fn check_server_key(&self) -> Result<(), AuthError> {
        const WHAT: &str = "server key check";
        loop {
            match self.store.get_doc(SYSTEM_SCOPE, SERVER_KEY, SERVER_KEY_CHECK).await? {
                Some(d) => {
                    let stored: ServerKeyCheck = decode(&d)?;
                    if self.server_key.open(&stored.sealed, WHAT).is_err() {
                        return Err(AuthError::Internal(format!(
                            "the server key {} is not the one this database was set up with ({}): give every node \
                             and `sluice admin` command the same --secret-key-file or SLUICE_SECRET_KEY",
                            self.server_key.fingerprint(),
                            stored.fingerprint
                        )));
                    }
                    return Ok(());
                }
                None => {
                    let check = ServerKeyCheck {
                        fingerprint: self.server_key.fingerprint().to_string(),
                        sealed: self.server_key.seal(WHAT.as_bytes(), WHAT)?,
                    };
                    let body = encode(&check)?;
                    if self.store.put_doc(doc(SYSTEM_SCOPE, SERVER_KEY, SERVER_KEY_CHECK, body, 0)).await? {
                        tracing::info!(fingerprint = %check.fingerprint, "this database's secrets are sealed with the server key");
                        return Ok(());
                    }
                    // Another node wrote it first: check against theirs.
                }
            }
        }
    }

    /// Removes the signing keys that versions before per-tenant keys shared between tenants (and
    /// stored in clear): no token they signed is accepted any more, since such tokens named
    /// their user by email.
    async fn retire_shared_signing_keys(&self) -> Result<(), AuthError> {
        for d in self.store.list_docs(SYSTEM_SCOPE, SIGNING_KEY).await? {
            self.store.delete_doc(SYSTEM_SCOPE, SIGNING_KEY, &d.id).await?;
            tracing::info!(kid = %d.id, "retired a session signing key shared by every tenant");
        }
        Ok(())
    }

    // ---- tenants ----

    /// Creates a tenant; false when it exists already.
    pub async fn create_tenant(&self, id: &str, name: &str) -> Result<bool, AuthError> {
        check_tenant_id(id).map_err(|m| AuthError::invalid("tenant", m))?;
        check_visible("name", name)?;
        let body = encode(&TenantDoc { name: name.into(), created_at_ms: now_ms() })?;
        Ok(self.store.put_doc(doc(SYSTEM_SCOPE, TENANT, id, body, 0)).await?)
    }

    pub async fn tenant_exists(&self, id: &str) -> Result<bool, AuthError> {
        Ok(self.store.get_doc(SYSTEM_SCOPE, TENANT, id).await?.is_some())
    }

    /// Tenant ids, in order.
    pub async fn tenants(&self) -> Result<Vec<String>, AuthError> {
        tenant_ids(&*self.store).await
    }

    // ---- users ----

    /// Adds a user; `by` is who asks (`None`: the command line, which may do anything).
    pub async fn create_user(&self, tenant: &str, by: Option<&Principal>, new: NewUser) -> Result<UserView, AuthError> {
        let email = check_email(&new.email)?;
        check_grant(by, new.role)?;
        let password_hash = match new.password {
            Some(pw) => {
                password::check(&pw)?;
                Some(
                    tokio::task::spawn_blocking(move || password::hash(&pw))
                        .await
                        .map_err(|e| AuthError::Internal(format!("password hashing stopped: {e}")))??,
                )
            }
            None => None,
        };
        let user = UserDoc {
            id: Some(new_user_id()),
            email: email.clone(),
            role: new.role,
            password_hash,
            created_at_ms: now_ms(),
            created_by: creator(by),
        };
        if !self.store.put_doc(doc(tenant, USER, &email, encode(&user)?, 0)).await? {
            return Err(AuthError::Conflict(format!("a user {email} exists already in this tenant")));
        }
        lock(&self.users).remove(&(tenant.to_string(), email));
        Ok(user_view(&user))
    }

    pub async fn list_users(&self, tenant: &str) -> Result<Vec<UserView>, AuthError> {
        let mut users = Vec::new();
        for d in self.store.list_docs(tenant, USER).await? {
            let u: UserDoc = decode(&d)?;
            let u = match u.id {
                Some(_) => u,
                None => match self.load_user(tenant, &d.id).await? {
                    Some(u) => u,
                    None => continue,
                },
            };
            users.push(user_view(&u));
        }
        Ok(users)
    }

    /// Removes a user; their session tokens stop working within the cache time. Returns the
    /// email as stored. (It finds users stored before emails were normalised under their old
    /// form too, so that look-alikes made then can be removed.)
    pub async fn delete_user(&self, tenant: &str, by: &Principal, email: &str) -> Result<String, AuthError> {
        let Some((email, found)) = self.find_user_doc(tenant, email).await? else {
            return Err(AuthError::NotFound(format!("no user {} in this tenant", normalize_email(email))));
        };
        let user: UserDoc = decode(&found)?;
        check_grant(Some(by), user.role)?;
        self.store.delete_doc(tenant, USER, &email).await?;
        lock(&self.users).remove(&(tenant.to_string(), email.clone()));
        Ok(email)
    }

    /// The stored id (the email) and document of the user `email` names: under its normal form,
    /// else under the form versions before NFKC stored (trimmed, lower case).
    async fn find_user_doc(&self, tenant: &str, email: &str) -> Result<Option<(String, Doc)>, AuthError> {
        let normal = normalize_email(email);
        let legacy = email.trim().to_lowercase();
        for id in [normal, legacy] {
            if let Some(d) = self.store.get_doc(tenant, USER, &id).await? {
                return Ok(Some((id, d)));
            }
        }
        Ok(None)
    }

    /// Signs in a user whom an identity provider vouched for (`source`, e.g. `oidc:<issuer>`):
    /// returns the user and whether this call created them.
    ///
    /// A user the provider created (`created_by` is `source`) takes `role` at every sign-in, so a
    /// change of groups at the provider applies at the next one; `None` (no role maps) refuses
    /// them. A user created in Sluice keeps the role given there. An unknown user is created
    /// with `role` when `provision` is set, else refused.
    pub async fn sign_in_external(
        &self,
        tenant: &str,
        email: &str,
        role: Option<Role>,
        provision: bool,
        source: &str,
    ) -> Result<(UserView, bool), AuthError> {
        let email = check_email(email)?;
        let no_role = || {
            AuthError::Forbidden(format!(
                "no Sluice role is mapped for {email}; ask an admin to map one of your groups or to set a default role"
            ))
        };
        let result = loop {
            let found = self.load_user_doc(tenant, &email).await?;
            match found {
                Some((mut user, version)) => {
                    if user.created_by != source {
                        break (user_view(&user), false);
                    }
                    let role = role.ok_or_else(no_role)?;
                    if user.role == role {
                        break (user_view(&user), false);
                    }
                    user.role = role;
                    if self.store.put_doc(doc(tenant, USER, &email, encode(&user)?, version)).await? {
                        tracing::info!(tenant, email = %email, role = %role, "role of an external user follows the identity provider");
                        break (user_view(&user), false);
                    }
                }
                None if !provision => {
                    return Err(AuthError::Forbidden(format!(
                        "{email} is not a user of this tenant, and sign-in does not create users here; ask an admin to add you"
                    )));
                }
                None => {
                    let role = role.ok_or_else(no_role)?;
                    let user = UserDoc {
                        id: Some(new_user_id()),
                        email: email.clone(),
                        role,
                        password_hash: None,
                        created_at_ms: now_ms(),
                        created_by: source.to_string(),
                    };
                    if self.store.put_doc(doc(tenant, USER, &email, encode(&user)?, 0)).await? {
                        tracing::info!(tenant, email = %email, role = %role, "user created at first sign-in");
                        break (user_view(&user), true);
                    }
                }
            }
            // Another sign-in wrote the user first: read it again.
        };
        lock(&self.users).remove(&(tenant.to_string(), email));
        Ok(result)
    }

    async fn user(&self, tenant: &str, email: &str) -> Result<Option<UserDoc>, AuthError> {
        let key = (tenant.to_string(), email.to_string());
        if let Some(c) = lock(&self.users).get(&key) {
            if c.at.elapsed() < self.config.cache_ttl {
                return Ok(c.value.clone());
            }
        }
        let user = match self.load_user(tenant, email).await {
            Ok(u) => u,
            Err(e) => match lock(&self.users).get(&key) {
                Some(stale) => return Ok(stale.value.clone()),
                None => return Err(e),
            },
        };
        lock(&self.users).insert(key, Cached { value: user.clone(), at: Instant::now() });
        Ok(user)
    }

    /// The user stored under `email`, uncached; see [`Self::load_user_doc`].
    async fn load_user(&self, tenant: &str, email: &str) -> Result<Option<UserDoc>, AuthError> {
        Ok(self.load_user_doc(tenant, email).await?.map(|(u, _)| u))
    }

    /// The user stored under `email` and the version of its document, uncached. A user stored
    /// before users had ids is given one here, and it is written back so that every node agrees
    /// on it (whoever writes first wins; the others read the winner's).
    async fn load_user_doc(&self, tenant: &str, email: &str) -> Result<Option<(UserDoc, i64)>, AuthError> {
        loop {
            let Some(d) = self.store.get_doc(tenant, USER, email).await? else { return Ok(None) };
            let mut user: UserDoc = decode(&d)?;
            if user.id.is_some() {
                return Ok(Some((user, d.version)));
            }
            user.id = Some(new_user_id());
            if self.store.put_doc(doc(tenant, USER, email, encode(&user)?, d.version)).await? {
                tracing::info!(tenant, email = %email, "gave a user stored without an id its id");
                return Ok(Some((user, d.version + 1)));
            }
        }
    }

    // ---- API keys ----

    /// Makes a key; returns it with the key itself, which is never shown again.
    pub async fn create_api_key(
        &self,
        tenant: &str,
        by: Option<&Principal>,
        new: NewApiKey,
    ) -> Result<(ApiKeyView, String), AuthError> {
        let name = new.name.trim().to_string();
        if name.is_empty() || name.len() > 100 {
            return Err(AuthError::invalid("name", "expected 1 to 100 characters naming the key"));
        }
        check_visible("name", &name)?;
        check_grant(by, new.role)?;
        let fingerprint = new.client_cert_sha256.as_deref().map(check_fingerprint).transpose()?;
        if let (Some(fp), Some(_)) = (&fingerprint, by) {
            if new.presented_cert_sha256.as_deref() != Some(fp.as_str()) {
                return Err(AuthError::Forbidden(
                    "bind a key to a client certificate over a connection that presents that certificate (it proves \
                     you hold it), or ask an operator to bind it with `sluice admin key`"
                        .into(),
                ));
            }
        }
        let (id, key) = apikey::generate()?;
        let now = now_ms();
        let expires_at_ms =
            new.expires_in.map(|d| now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
        let k = KeyDoc {
            name,
            role: new.role,
            digest: apikey::digest(&key),
            created_at_ms: now,
            created_by: creator(by),
            expires_at_ms,
            revoked_at_ms: None,
            last_used_ms: None,
            client_cert_sha256: fingerprint.clone(),
        };
        if let Some(fp) = &fingerprint {
            // One key per certificate, across tenants: the certificate names its key.
            // (Bindings live in their tenant's scope, so the store cannot refuse a second one in
            // another: look first. Two tenants racing would both have to hold the certificate.)
            if !self.free_stale_binding(fp).await?
                || !self
                    .store
                    .put_doc(doc(tenant, CLIENT_CERT, fp, encode(&CertDoc { key_id: id.clone() })?, 0))
                    .await?
            {
                return Err(AuthError::Conflict("that client certificate is bound to another key already".into()));
            }
        }
        if !self.store.put_doc(doc(tenant, API_KEY, &id, encode(&k)?, 0)).await? {
            return Err(AuthError::Internal("a fresh key id collided; try again".into()));
        }
        lock(&self.keys).remove(&id);
        Ok((key_view(&id, &k), key))
    }

    /// Removes the binding of certificate `fp` when the key it names no longer holds it (revoked,
    /// expired, gone, or bound to another certificate): such bindings, left by versions that did
    /// not free them, would keep the certificate from ever being bound again.
    /// Whether the certificate is free now.
    async fn free_stale_binding(&self, fp: &str) -> Result<bool, AuthError> {
        let Some(found) = self.store.find_doc(CLIENT_CERT, fp).await? else { return Ok(true) };
        let bound: CertDoc = decode(&found)?;
        let holds = match self.store.get_doc(&found.tenant, API_KEY, &bound.key_id).await? {
            Some(d) => {
                let k: KeyDoc = decode(&d)?;
                k.revoked_at_ms.is_none()
                    && k.expires_at_ms.is_none_or(|e| e > now_ms())
                    && k.client_cert_sha256.as_deref() == Some(fp)
            }
            None => false,
        };
        if !holds {
            self.store.delete_doc(&found.tenant, CLIENT_CERT, fp).await?;
            tracing::info!(key_id = %bound.key_id, "freed a client certificate binding of a key that no longer holds it");
        }
        Ok(!holds)
    }

    pub async fn list_api_keys(&self, tenant: &str) -> Result<Vec<ApiKeyView>, AuthError> {
        self.store
            .list_docs(tenant, API_KEY)
            .await?
            .iter()
            .map(|d| decode::<KeyDoc>(d).map(|k| key_view(&d.id, &k)))
            .collect()
    }

    /// Revokes a key of this tenant: it stops working on this node at once, on others within the
    /// cache time. Revoking twice keeps the first time.
    pub async fn revoke_api_key(&self, tenant: &str, by: &Principal, id: &str) -> Result<ApiKeyView, AuthError> {
        loop {
            let Some(found) = self.store.get_doc(tenant, API_KEY, id).await? else {
                return Err(AuthError::NotFound(format!("no API key {id} in this tenant")));
            };
            let mut k: KeyDoc = decode(&found)?;
            check_grant(Some(by), k.role)?;
            if k.revoked_at_ms.is_none() {
                k.revoked_at_ms = Some(now_ms());
                if !self.store.put_doc(doc(tenant, API_KEY, id, encode(&k)?, found.version)).await? {
                    continue;
                }
            }
            // The certificate is free to be bound again (by whoever proves they hold it).
            if let Some(fp) = &k.client_cert_sha256 {
                let bound = self.store.get_doc(tenant, CLIENT_CERT, fp).await?;
                if bound.map(|d| decode::<CertDoc>(&d)).transpose()?.is_some_and(|c| c.key_id == id) {
                    self.store.delete_doc(tenant, CLIENT_CERT, fp).await?;
                }
            }
            lock(&self.keys).remove(id);
            return Ok(key_view(id, &k));
        }
    }

    async fn key(&self, id: &str) -> Result<Option<(String, KeyDoc)>, AuthError> {
        if let Some(c) = lock(&self.keys).get(id) {
            if c.at.elapsed() < self.config.cache_ttl {
                return Ok(c.value.clone());
            }
        }
        let found = match self.store.find_doc(API_KEY, id).await {
            Ok(Some(d)) if d.tenant != SYSTEM_SCOPE => Some((d.tenant.clone(), decode::<KeyDoc>(&d)?)),
            Ok(_) => None,
            // The database is down: what this node knew still holds (reads keep working, writes
            // answer 503 on their own), rather than failing every request.
            Err(e) => match lock(&self.keys).get(id) {
                Some(stale) => return Ok(stale.value.clone()),
                None => return Err(e.into()),
            },
        };
        let mut keys = lock(&self.keys);
        if keys.len() > 100_000 {
            // Unknown ids are cached too (a flood of made-up keys must not reach the store each
            // time), so bound the map.
            keys.clear();
        }
        keys.insert(id.to_string(), Cached { value: found.clone(), at: Instant::now() });
        Ok(found)
    }

    /// Records that a key was used, at most once a minute per key, off the request's path.
    fn touch(&self, tenant: &str, id: &str) {
        let now = now_ms();
        {
            let mut touched = lock(&self.touched);
            if touched.get(id).is_some_and(|t| now - t < TOUCH_EVERY_MS) {
                return;
            }
            if touched.len() > 100_000 {
                touched.clear();
            }
            touched.insert(id.to_string(), now);
        }
        let (store, tenant, id) = (Arc::clone(&self.store), tenant.to_string(), id.to_string());
        tokio::spawn(async move {
            let Ok(Some(found)) = store.get_doc(&tenant, API_KEY, &id).await else { return };
            let Ok(mut k) = decode::<KeyDoc>(&found) else { return };
            k.last_used_ms = Some(now);
            let Ok(body) = encode(&k) else { return };
            // A lost race means someone else just wrote the key; the next use tries again.
            if let Err(e) = store.put_doc(doc(&tenant, API_KEY, &id, body, found.version)).await {
                tracing::debug!(error = %e, "cannot record an API key's last use");
            }
        });
    }

    // ---- authentication ----

    /// The principal of a bearer credential: an API key or a session token. `client_cert` is the
    /// fingerprint of the connection's verified client certificate, if any.
    pub async fn authenticate(&self, credential: &str, client_cert: Option<&str>) -> Result<Principal, AuthError> {
        let unknown = || AuthError::Unauthenticated("unknown or revoked API key".into());
        if let Some(id) = apikey::parse(credential) {
            let Some((tenant, k)) = self.key(id).await? else { return Err(unknown()) };
            if !apikey::matches(credential, &k.digest) {
                return Err(unknown());
            }
            if k.client_cert_sha256.as_deref().is_some_and(|bound| client_cert != Some(bound)) {
                return Err(AuthError::Unauthenticated(
                    "this API key is bound to a client certificate: connect with that certificate".into(),
                ));
            }
            return self.key_principal(tenant, id, k);
        }
        if credential.split('.').count() != 3 {
            return Err(AuthError::Unauthenticated(
                "expected an API key (slk_...) or a session token from /v1/auth/login".into(),
            ));
        }
        let claims = self.verify_token(credential).await?;
        let Some(email) = &claims.email else {
            return Err(AuthError::Unauthenticated(
                "this session token is of an older format that named the user by email; log in again".into(),
            ));
        };
        let gone = || AuthError::Unauthenticated("the user of this session no longer exists".into());
        let user = self.user(&claims.tid, email).await?.ok_or_else(gone)?;
        // The user the token was issued to, not someone given the same email since.
        if user.id.as_deref() != Some(claims.sub.as_str()) {
            return Err(gone());
        }
        // The current role counts, not the one at login.
        Ok(Principal { tenant: claims.tid, actor: Actor::User { email: user.email }, role: user.role })
    }

    /// The principal of a verified client certificate bound to a key (mutual TLS without a
    /// bearer credential).
    pub async fn authenticate_certificate(&self, fingerprint: &str) -> Result<Principal, AuthError> {
        let unbound = || {
            AuthError::Unauthenticated(
                "no credentials: send `Authorization: Bearer <API key or session token>` (this client \
                 certificate is bound to no key)"
                    .into(),
            )
        };
        let Some(found) = self.store.find_doc(CLIENT_CERT, fingerprint).await? else { return Err(unbound()) };
        let bound: CertDoc = decode(&found)?;
        let Some((tenant, k)) = self.key(&bound.key_id).await? else { return Err(unbound()) };
        if tenant != found.tenant || k.client_cert_sha256.as_deref() != Some(fingerprint) {
            return Err(unbound());
        }
        self.key_principal(tenant, &bound.key_id, k)
    }

    fn key_principal(&self, tenant: String, id: &str, k: KeyDoc) -> Result<Principal, AuthError> {
        if k.revoked_at_ms.is_some() {
            return Err(AuthError::Unauthenticated("unknown or revoked API key".into()));
        }
        if k.expires_at_ms.is_some_and(|e| e <= now_ms()) {
            return Err(AuthError::Unauthenticated("this API key has expired".into()));
        }
        self.touch(&tenant, id);
        Ok(Principal { tenant, actor: Actor::ApiKey { id: id.to_string(), name: k.name }, role: k.role })
    }

    async fn verify_token(&self, token: &str) -> Result<Claims, AuthError> {
        let kid = crate::jwt::kid_of(token)?;
        let unknown = || AuthError::Unauthenticated("invalid session token: unknown key".into());
        let verifier = self.verifier(&kid).await?.ok_or_else(unknown)?;
        let max_lifetime_s = i64::try_from(self.config.token_ttl.as_millis().div_ceil(1000)).unwrap_or(i64::MAX);
        verifier.verify(token, now_ms() / 1000, max_lifetime_s)
    }

    /// The public key named `kid` and its tenant, found with the one lookup across tenants.
    async fn verifier(&self, kid: &str) -> Result<Option<Arc<Verifier>>, AuthError> {
        if kid.len() != 16 || !kid.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        if let Some(c) = lock(&self.verifiers).get(kid) {
            // Keys do not change; only the absence of one may end.
            if c.value.is_some() || c.at.elapsed() < UNKNOWN_KID_TTL {
                return Ok(c.value.clone());
            }
        }
        let found = match self.store.find_doc(SIGNING_KEY, kid).await? {
            Some(d) if d.tenant != SYSTEM_SCOPE => {
                let key: StoredKey = decode(&d)?;
                Some(Arc::new(key.verifier(&d.tenant)?))
            }
            _ => None,
        };
        let mut verifiers = lock(&self.verifiers);
        if verifiers.len() > 100_000 {
            verifiers.clear();
        }
        verifiers.insert(kid.to_string(), Cached { value: found.clone(), at: Instant::now() });
        Ok(found)
    }

    /// Checks a password and opens a session. A failure says why, for the server's records; the
    /// caller must be told only "wrong email or password".
    pub async fn login(&self, tenant: &str, email: &str, password: &str) -> Result<Session, AuthError> {
        check_visible("email", email.trim())?;
        let real_tenant = check_tenant_id(tenant).is_ok() && tenant != SYSTEM_SCOPE;
        let found = if real_tenant { self.find_user_doc(tenant, email).await? } else { None };
        let user = match found {
            Some((id, _)) => self.load_user(tenant, &id).await?,
            None => None,
        };
        let stored = user.as_ref().and_then(|u| u.password_hash.clone());
        let pw = password.to_string();
        let ok = tokio::task::spawn_blocking(move || {
            // The same work whether or not the user exists.
            let ok = password::verify(&pw, stored.as_deref().unwrap_or(password::decoy()));
            ok && stored.is_some()
        })
        .await
        .map_err(|e| AuthError::Internal(format!("password check stopped: {e}")))?;
        match user {
            Some(u) if ok => {
                let user = user_view(&u);
                let (token, expires_at_ms) = self.issue_token(tenant, &user).await?;
                Ok(Session { token, expires_at_ms, user })
            }
            Some(_) => Err(AuthError::InvalidCredentials(LoginFailure::WrongPassword)),
            None if real_tenant && self.tenant_exists(tenant).await? => {
                Err(AuthError::InvalidCredentials(LoginFailure::UnknownUser))
            }
            None => Err(AuthError::InvalidCredentials(LoginFailure::UnknownTenant)),
        }
    }

    /// A session token for a user who proved who they are (a password, an identity provider).
    /// It names the user by id (and email, to find them), so it dies with the user.
    pub async fn issue_token(&self, tenant: &str, user: &UserView) -> Result<(String, i64), AuthError> {
        if user.id.is_empty() {
            return Err(AuthError::Internal(format!("user {} has no id", user.email)));
        }
        let now = now_ms();
        let exp_ms = now.saturating_add(i64::try_from(self.config.token_ttl.as_millis()).unwrap_or(i64::MAX));
        let claims = Claims {
            sub: user.id.clone(),
            email: Some(user.email.clone()),
            tid: tenant.into(),
            role: user.role.as_str().into(),
            iat: now / 1000,
            nbf: None,
            exp: exp_ms / 1000,
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            jti: crate::hex(&crate::random_bytes::<12>()?),
        };
        Ok((self.signer(tenant).await?.sign(&claims)?, exp_ms))
    }

    /// Whether any tenant has a user or an API key that can sign in.
    pub async fn has_credentials(&self) -> Result<bool, AuthError> {
        for t in self.tenants().await? {
            if !self.store.list_docs(&t, API_KEY).await?.is_empty() || !self.store.list_docs(&t, USER).await?.is_empty()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    // ---- signing keys ----

    /// The key that signs `tenant`'s tokens: its newest, or a new one when that is older than
    /// `rotate_after` (or there is none). Keys whose tokens have all expired are removed then.
    async fn signer(&self, tenant: &str) -> Result<Arc<Signer>, AuthError> {
        let now = now_ms();
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let rotate_after = ms(self.config.rotate_after);
        if let Some(s) = lock(&self.signers).get(tenant) {
            if now - s.created_at_ms < rotate_after {
                return Ok(Arc::clone(s));
            }
        }
        let keys = self.stored_keys(tenant).await?;
        let newest = match keys.first() {
            Some(k) if now - k.created_at_ms < rotate_after => k.clone(),
            _ => {
                let key = StoredKey::generate(tenant, now, &self.server_key)?;
                // Two nodes rotating at once make two keys; both verify, and each signs with its own.
                self.store.put_doc(doc(tenant, SIGNING_KEY, &key.kid, encode(&key)?, 0)).await?;
                tracing::info!(tenant, kid = %key.kid, "new session signing key");
                key
            }
        };
        // A key signs until a newer one exists; its tokens live `token_ttl` after that.
        let keep = rotate_after.saturating_add(ms(self.config.token_ttl)).saturating_add(60_000);
        for old in keys.iter().filter(|k| k.kid != newest.kid && now - k.created_at_ms > keep) {
            self.store.delete_doc(tenant, SIGNING_KEY, &old.kid).await?;
            lock(&self.verifiers).remove(&old.kid);
            tracing::info!(tenant, kid = %old.kid, "retired session signing key");
        }
        let signer = Arc::new(newest.signer(tenant, &self.server_key)?);
        lock(&self.signers).insert(tenant.to_string(), Arc::clone(&signer));
        Ok(signer)
    }

    /// A tenant's signing keys, newest first. Keys stored in clear (by versions before sealing)
    /// are sealed and written back.
    async fn stored_keys(&self, tenant: &str) -> Result<Vec<StoredKey>, AuthError> {
        let mut keys = Vec::new();
        for d in self.store.list_docs(tenant, SIGNING_KEY).await? {
            let mut key: StoredKey = decode(&d)?;
            if key.seal_clear(tenant, &self.server_key)? {
                // A lost race means another node sealed it first.
                if self.store.put_doc(doc(tenant, SIGNING_KEY, &d.id, encode(&key)?, d.version)).await? {
                    tracing::info!(tenant, kid = %key.kid, "sealed a session signing key stored in clear");
                }
            }
            keys.push(key);
        }
        keys.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then_with(|| a.kid.cmp(&b.kid)));
        Ok(keys)
    }

    /// The ids of a tenant's signing keys, newest first.
    pub async fn signing_kids(&self, tenant: &str) -> Result<Vec<String>, AuthError> {
        Ok(self.stored_keys(tenant).await?.into_iter().map(|k| k.kid).collect())
    }
}
