//! The identity directory: tenants, users, API keys and signing keys, as documents in the store,
//! and authentication of a request's bearer credential against them.
//!
//! Lookups are cached per node for `AuthConfig::cache_ttl`; a change made on this node (revoking a
//! key, removing a user) takes effect here at once and on other nodes within that time. While the
//! database cannot be reached, what the node read before still authenticates.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_store::{Doc, Store};

use crate::jwt::{Claims, Keyring, StoredKey, AUDIENCE, ISSUER};
use crate::role::{Actor, Principal, Role};
use crate::{apikey, check_tenant_id, now_ms, password, AuthError, LoginFailure, SYSTEM_SCOPE};

const TENANT: &str = "tenant";
const USER: &str = "user";
const API_KEY: &str = "api_key";
const SIGNING_KEY: &str = "signing_key";
/// A client certificate's SHA-256 fingerprint → the API key it stands for.
const CLIENT_CERT: &str = "client_cert";
/// A key's last-used time is written at most this often.
const TOUCH_EVERY_MS: i64 = 60_000;
/// Unknown `kid`s reload the keyring from the store at most this often (made-up tokens must not
/// reach the store on every request).
const RING_RELOAD_EVERY: Duration = Duration::from_secs(1);

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

/// See the module docs.
pub struct Directory {
    store: Arc<dyn Store>,
    config: AuthConfig,
    /// Key id → its tenant and document (or `None`: no such key).
    keys: Mutex<HashMap<String, Cached<Option<TenantKey>>>>,
    /// (tenant, email) → the user (or `None`).
    users: Mutex<HashMap<(String, String), CachedUser>>,
    ring: RwLock<Arc<Keyring>>,
    /// When an unknown `kid` last made this node reload the ring.
    ring_loaded: Mutex<Option<Instant>>,
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

/// A normalized email, or why it is not one.
pub fn check_email(email: &str) -> Result<String, AuthError> {
    let e = email.trim().to_lowercase();
    let ok = e.len() <= 254
        && e.split_once('@').is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
        && !e.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(e)
    } else {
        Err(AuthError::invalid("email", "expected an email address like ada@example.com (at most 254 characters)"))
    }
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
    /// Opens the directory and makes sure there is a current signing key.
    pub async fn open(store: Arc<dyn Store>, config: AuthConfig) -> Result<Arc<Self>, AuthError> {
        let dir = Arc::new(Self {
            store,
            config,
            keys: Mutex::default(),
            users: Mutex::default(),
            ring: RwLock::new(Arc::new(Keyring::default())),
            ring_loaded: Mutex::new(None),
            touched: Mutex::default(),
        });
        dir.rotate_signing_key().await?;
        Ok(dir)
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// Rotates the signing key every few minutes if it is due, and reloads keys other nodes made.
    pub fn spawn_maintenance(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let dir = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = dir.rotate_signing_key().await {
                    tracing::warn!(error = %e, "cannot rotate the session signing key; will retry");
                }
            }
        })
    }

    // ---- tenants ----

    /// Creates a tenant; false when it exists already.
    pub async fn create_tenant(&self, id: &str, name: &str) -> Result<bool, AuthError> {
        check_tenant_id(id).map_err(|m| AuthError::invalid("tenant", m))?;
        let body = encode(&TenantDoc { name: name.into(), created_at_ms: now_ms() })?;
        Ok(self.store.put_doc(doc(SYSTEM_SCOPE, TENANT, id, body, 0)).await?)
    }

    pub async fn tenant_exists(&self, id: &str) -> Result<bool, AuthError> {
        Ok(self.store.get_doc(SYSTEM_SCOPE, TENANT, id).await?.is_some())
    }

    /// Tenant ids, in order.
    pub async fn tenants(&self) -> Result<Vec<String>, AuthError> {
        Ok(self.store.list_docs(SYSTEM_SCOPE, TENANT).await?.into_iter().map(|d| d.id).collect())
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

    /// Removes a user; their session tokens stop working within the cache time.
    pub async fn delete_user(&self, tenant: &str, by: &Principal, email: &str) -> Result<(), AuthError> {
        let email = email.to_lowercase();
        let found = self.store.get_doc(tenant, USER, &email).await?;
        let Some(found) = found else {
            return Err(AuthError::NotFound(format!("no user {email} in this tenant")));
        };
        let user: UserDoc = decode(&found)?;
        check_grant(Some(by), user.role)?;
        self.store.delete_doc(tenant, USER, &email).await?;
        lock(&self.users).remove(&(tenant.to_string(), email));
        Ok(())
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
        check_grant(by, new.role)?;
        let fingerprint = new.client_cert_sha256.as_deref().map(check_fingerprint).transpose()?;
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
            if self.store.find_doc(CLIENT_CERT, fp).await?.is_some()
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
        let ring = self.ring();
        match ring.verify(token) {
            Ok(c) => return Ok(c),
            Err(Some(e)) => return Err(e),
            Err(None) => {}
        }
        // Another node may have rotated: reload once, at most every second.
        let due = {
            let mut last = lock(&self.ring_loaded);
            let due = last.is_none_or(|t| t.elapsed() >= RING_RELOAD_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            self.load_ring().await?;
        }
        let ring = self.ring();
        ring.verify(token)
            .map_err(|e| e.unwrap_or_else(|| AuthError::Unauthenticated("invalid session token: unknown key".into())))
    }

    /// Checks a password and opens a session. A failure says why, for the server's records; the
    /// caller must be told only "wrong email or password".
    pub async fn login(&self, tenant: &str, email: &str, password: &str) -> Result<Session, AuthError> {
        let email = email.trim().to_lowercase();
        let real_tenant = check_tenant_id(tenant).is_ok() && tenant != SYSTEM_SCOPE;
        let user = if real_tenant { self.load_user(tenant, &email).await? } else { None };
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
                let (token, expires_at_ms) = self.issue_token(tenant, &user)?;
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
    pub fn issue_token(&self, tenant: &str, user: &UserView) -> Result<(String, i64), AuthError> {
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
            exp: exp_ms / 1000,
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            jti: crate::hex(&crate::random_bytes::<12>()?),
        };
        let ring = self.ring();
        Ok((ring.sign(&claims)?, exp_ms))
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

    /// The keyring as last loaded.
    fn ring(&self) -> Arc<Keyring> {
        self.ring.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn stored_keys(&self) -> Result<Vec<StoredKey>, AuthError> {
        self.store.list_docs(SYSTEM_SCOPE, SIGNING_KEY).await?.iter().map(decode).collect()
    }

    async fn load_ring(&self) -> Result<(), AuthError> {
        let ring = Keyring::new(&self.stored_keys().await?)?;
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ring);
        Ok(())
    }

    /// Makes a new signing key when the newest is older than `rotate_after` (or there is none),
    /// drops keys whose tokens have all expired, and reloads the ring.
    pub async fn rotate_signing_key(&self) -> Result<(), AuthError> {
        let now = now_ms();
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let keys = self.stored_keys().await?;
        let newest = keys.iter().map(|k| k.created_at_ms).max();
        if newest.is_none_or(|t| now - t >= ms(self.config.rotate_after)) {
            let key = StoredKey::generate(now)?;
            // Two nodes rotating at once make two keys; both verify, the newer signs.
            self.store.put_doc(doc(SYSTEM_SCOPE, SIGNING_KEY, &key.kid, encode(&key)?, 0)).await?;
            tracing::info!(kid = %key.kid, "new session signing key");
        }
        // A key signs until a newer one exists; its tokens live `token_ttl` after that.
        let keep = ms(self.config.rotate_after).saturating_add(ms(self.config.token_ttl)).saturating_add(60_000);
        let mut keys = self.stored_keys().await?;
        keys.sort_by_key(|k| std::cmp::Reverse(k.created_at_ms));
        for old in keys.iter().skip(1).filter(|k| now - k.created_at_ms > keep) {
            self.store.delete_doc(SYSTEM_SCOPE, SIGNING_KEY, &old.kid).await?;
            tracing::info!(kid = %old.kid, "retired session signing key");
        }
        self.load_ring().await
    }

    /// The key ids in the ring, newest first.
    pub fn signing_kids(&self) -> Vec<String> {
        self.ring().kids().into_iter().map(str::to_string).collect()
    }
}
