//! The directory against a real SQLite store: users and passwords, session tokens and key
//! rotation, API keys from creation to revocation, and the grant rules.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use sluice_auth::jwt::{Claims, StoredKey};
use sluice_auth::{
    Actor, AuthConfig, AuthError, Directory, LoginFailure, NewApiKey, NewUser, Principal, Role, ServerKey,
};
use sluice_store::Store;
use sluice_store_sqlite::SqliteStore;

fn store(label: &str) -> (std::path::PathBuf, Arc<dyn Store>) {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("sluice-auth-{label}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.join("db.sqlite")).unwrap());
    (dir, s)
}

/// The server key of every directory in these tests (two nodes of a database share theirs).
const SERVER_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

async fn open(s: &Arc<dyn Store>, config: AuthConfig) -> Arc<Directory> {
    Directory::open(Arc::clone(s), config, ServerKey::parse(SERVER_KEY).unwrap()).await.unwrap()
}

fn admin(tenant: &str) -> Principal {
    Principal { tenant: tenant.into(), actor: Actor::User { email: "root@acme.io".into() }, role: Role::Admin }
}

#[tokio::test(flavor = "multi_thread")]
async fn users_log_in_and_sessions_follow_the_directory() {
    let (dir, s) = store("users");
    let d = open(&s, AuthConfig::default()).await;
    assert!(!d.has_credentials().await.unwrap());
    assert!(d.create_tenant("acme", "Acme").await.unwrap());
    assert!(!d.create_tenant("acme", "Acme again").await.unwrap());
    assert!(matches!(d.create_tenant("Bad_Tenant", "x").await, Err(AuthError::Invalid { .. })));
    assert!(matches!(d.create_tenant("_system", "x").await, Err(AuthError::Invalid { .. })));

    let new = |email: &str, role| NewUser { email: email.into(), password: Some("correct horse battery".into()), role };
    let ada = d.create_user("acme", None, new("Ada@Example.com", Role::Editor)).await.unwrap();
    assert_eq!(ada.email, "ada@example.com", "emails are normalized");
    assert!(d.has_credentials().await.unwrap());
    assert!(matches!(
        d.create_user("acme", None, new("ada@example.com", Role::Viewer)).await,
        Err(AuthError::Conflict(_))
    ));
    assert!(
        matches!(d.create_user("acme", None, new("not-an-email", Role::Viewer)).await, Err(AuthError::Invalid { field, .. }) if field == "email")
    );
    let short = NewUser { email: "bob@example.com".into(), password: Some("short".into()), role: Role::Viewer };
    assert!(
        matches!(d.create_user("acme", None, short).await, Err(AuthError::Invalid { field, .. }) if field == "password")
    );
    // Admins cannot make owners.
    assert!(matches!(
        d.create_user("acme", Some(&admin("acme")), new("o@x.io", Role::Owner)).await,
        Err(AuthError::Forbidden(_))
    ));

    // Stored hashes are argon2id, never the password.
    let raw = s.get_doc("acme", "user", "ada@example.com").await.unwrap().unwrap();
    let text = raw.body.to_string();
    assert!(text.contains("$argon2id$") && !text.contains("correct horse"), "{text}");

    let session = d.login("acme", "ADA@example.com", "correct horse battery").await.unwrap();
    let token = session.token;
    assert!(session.expires_at_ms > sluice_auth::now_ms());
    assert_eq!((session.user.email.as_str(), session.user.role), ("ada@example.com", Role::Editor));
    let p = d.authenticate(&token, None).await.unwrap();
    assert_eq!((p.tenant.as_str(), p.role, p.user()), ("acme", Role::Editor, Some("ada@example.com")));
    // One answer for every failure; the reason is for the server's records only.
    for (tenant, email, pw, why) in [
        ("acme", "ada@example.com", "wrong password!!", LoginFailure::WrongPassword),
        ("acme", "nobody@example.com", "correct horse battery", LoginFailure::UnknownUser),
        ("other", "ada@example.com", "correct horse battery", LoginFailure::UnknownTenant),
        ("_system", "ada@example.com", "correct horse battery", LoginFailure::UnknownTenant),
        ("Not A Tenant", "ada@example.com", "correct horse battery", LoginFailure::UnknownTenant),
    ] {
        let e = d.login(tenant, email, pw).await.unwrap_err();
        assert_eq!(e, AuthError::InvalidCredentials(why), "{tenant} {email}");
        assert_eq!(e.to_string(), "wrong email or password");
    }

    // A rotated signing key keeps old sessions valid; a second node loads the new key on demand.
    let other_node = open(&s, AuthConfig::default()).await;
    let rotating = open(&s, AuthConfig { rotate_after: Duration::from_millis(1), ..AuthConfig::default() }).await;
    assert!(rotating.login("acme", "ada@example.com", "correct horse battery").await.is_ok());
    let kids = rotating.signing_kids("acme").await.unwrap();
    assert!(kids.len() >= 2, "rotation made a second key: {kids:?}");
    assert!(rotating.authenticate(&token, None).await.is_ok(), "a session of the old key survives rotation");
    let fresh = rotating.login("acme", "ada@example.com", "correct horse battery").await.unwrap().token;
    assert!(other_node.authenticate(&fresh, None).await.is_ok(), "another node learns the new kid from the store");

    // Removing the user ends their sessions.
    d.delete_user("acme", &admin("acme"), "ada@example.com").await.unwrap();
    assert!(matches!(d.authenticate(&token, None).await, Err(AuthError::Unauthenticated(_))));
    assert!(matches!(d.authenticate("a.b.c", None).await, Err(AuthError::Unauthenticated(_))));
    assert!(matches!(d.authenticate("hello", None).await, Err(AuthError::Unauthenticated(_))));
    drop((d, other_node, rotating, s));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_are_shown_once_stored_hashed_and_revocable() {
    let (dir, s) = store("keys");
    let d = open(&s, AuthConfig::default()).await;
    d.create_tenant("acme", "Acme").await.unwrap();
    d.create_tenant("globex", "Globex").await.unwrap();
    let (view, key) = d
        .create_api_key(
            "acme",
            None,
            NewApiKey {
                name: "ci".into(),
                role: Role::Worker,
                expires_in: None,
                client_cert_sha256: None,
                presented_cert_sha256: None,
            },
        )
        .await
        .unwrap();
    assert!(key.starts_with("slk_") && key.contains(&view.id));
    let stored = s.get_doc("acme", "api_key", &view.id).await.unwrap().unwrap().body.to_string();
    assert!(!stored.contains(&key[21..]), "the secret is not stored");

    let p = d.authenticate(&key, None).await.unwrap();
    assert_eq!((p.tenant.as_str(), p.role, p.api_key()), ("acme", Role::Worker, Some(view.id.as_str())));
    // A key with one changed character is refused.
    let mut forged = key.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'a' { 'b' } else { 'a' });
    assert!(matches!(d.authenticate(&forged, None).await, Err(AuthError::Unauthenticated(_))));

    // Last use is recorded in the background.
    for _ in 0..100 {
        if d.list_api_keys("acme").await.unwrap()[0].last_used_ms.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(d.list_api_keys("acme").await.unwrap()[0].last_used_ms.is_some(), "last use recorded");

    // Another tenant's admin cannot see or revoke it.
    assert!(d.list_api_keys("globex").await.unwrap().is_empty());
    assert!(matches!(d.revoke_api_key("globex", &admin("globex"), &view.id).await, Err(AuthError::NotFound(_))));
    let revoked = d.revoke_api_key("acme", &admin("acme"), &view.id).await.unwrap();
    assert!(revoked.revoked_at_ms.is_some());
    assert!(
        matches!(d.authenticate(&key, None).await, Err(AuthError::Unauthenticated(_))),
        "revoked at once on this node"
    );
    let again = d.revoke_api_key("acme", &admin("acme"), &view.id).await.unwrap();
    assert_eq!(again.revoked_at_ms, revoked.revoked_at_ms, "revoking twice keeps the first time");

    // Expiry.
    let (_, short) = d
        .create_api_key(
            "acme",
            None,
            NewApiKey {
                name: "short".into(),
                role: Role::Viewer,
                expires_in: Some(Duration::from_millis(1)),
                client_cert_sha256: None,
                presented_cert_sha256: None,
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(matches!(d.authenticate(&short, None).await, Err(AuthError::Unauthenticated(m)) if m.contains("expired")));
    // Grants.
    let editor = Principal { role: Role::Editor, ..admin("acme") };
    let want = || NewApiKey {
        name: "x".into(),
        role: Role::Viewer,
        expires_in: None,
        client_cert_sha256: None,
        presented_cert_sha256: None,
    };
    assert!(matches!(d.create_api_key("acme", Some(&editor), want()).await, Err(AuthError::Forbidden(_))));
    assert!(matches!(
        d.create_api_key("acme", None, NewApiKey { name: " ".into(), ..want() }).await,
        Err(AuthError::Invalid { field, .. }) if field == "name"
    ));
    drop((d, s));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn users_from_an_identity_provider_are_provisioned_and_follow_its_roles() {
    let (dir, s) = store("external");
    let d = open(&s, AuthConfig::default()).await;
    d.create_tenant("acme", "Acme").await.unwrap();
    let idp = "oidc:https://idp.example.com";

    // Provisioning off: an unknown user is refused.
    let refused = d.sign_in_external("acme", "new@acme.io", Some(Role::Editor), false, idp).await;
    assert!(matches!(refused, Err(AuthError::Forbidden(m)) if m.contains("not a user")));
    // On: created once with the mapped role, without a password.
    let (user, created) = d.sign_in_external("acme", "New@Acme.io", Some(Role::Editor), true, idp).await.unwrap();
    assert_eq!((user.email.as_str(), user.role, created), ("new@acme.io", Role::Editor, true));
    assert_eq!(user.created_by, idp);
    assert!(matches!(
        d.login("acme", "new@acme.io", "").await,
        Err(AuthError::InvalidCredentials(LoginFailure::WrongPassword))
    ));
    // The provider's role applies at the next sign-in, and to open sessions.
    let (token, _) = d.issue_token("acme", &user).await.unwrap();
    let (user, created) = d.sign_in_external("acme", "new@acme.io", Some(Role::Viewer), true, idp).await.unwrap();
    assert_eq!((user.role, created), (Role::Viewer, false));
    assert_eq!(d.authenticate(&token, None).await.unwrap().role, Role::Viewer);
    // No role maps any more: refused, and the stored role stays.
    assert!(matches!(d.sign_in_external("acme", "new@acme.io", None, true, idp).await, Err(AuthError::Forbidden(_))));

    // A user made in Sluice keeps the role given there, whatever the provider maps.
    let pw = NewUser { email: "ada@acme.io".into(), password: Some("correct horse battery".into()), role: Role::Owner };
    d.create_user("acme", None, pw).await.unwrap();
    let (user, created) = d.sign_in_external("acme", "ada@acme.io", Some(Role::Viewer), false, idp).await.unwrap();
    assert_eq!((user.role, created), (Role::Owner, false));
    let (user, _) = d.sign_in_external("acme", "ada@acme.io", None, true, idp).await.unwrap();
    assert_eq!(user.role, Role::Owner);
    assert!(matches!(
        d.sign_in_external("acme", "not an email", Some(Role::Viewer), true, idp).await,
        Err(AuthError::Invalid { .. })
    ));
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 13, item 10: a session named its user by email, so a removed user's token worked again,
/// with the new user's role, once someone was added under the same email.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_dies_with_its_user_even_when_the_email_comes_back() {
    let (dir, s) = store("user-ids");
    let d = open(&s, AuthConfig::default()).await;
    d.create_tenant("acme", "Acme").await.unwrap();
    let new = |role| NewUser { email: "ada@acme.io".into(), password: Some("correct horse battery".into()), role };
    let first = d.create_user("acme", None, new(Role::Viewer)).await.unwrap();
    assert_eq!(first.id.len(), 36, "a UUID: {first:?}");
    let token = d.login("acme", "ada@acme.io", "correct horse battery").await.unwrap().token;
    assert_eq!(d.authenticate(&token, None).await.unwrap().role, Role::Viewer);

    d.delete_user("acme", &admin("acme"), "ada@acme.io").await.unwrap();
    let second = d.create_user("acme", None, new(Role::Owner)).await.unwrap();
    assert_ne!(second.id, first.id);
    assert!(
        matches!(d.authenticate(&token, None).await, Err(AuthError::Unauthenticated(m)) if m.contains("no longer exists")),
        "the old session does not become the new owner"
    );
    // Another node, which never cached the first user, refuses it too.
    let other = open(&s, AuthConfig::default()).await;
    assert!(matches!(other.authenticate(&token, None).await, Err(AuthError::Unauthenticated(_))));
    let fresh = d.login("acme", "ada@acme.io", "correct horse battery").await.unwrap().token;
    assert_eq!(other.authenticate(&fresh, None).await.unwrap().role, Role::Owner);
    let _ = std::fs::remove_dir_all(dir);
}

/// Users stored before users had ids get one when first read, written back once.
#[tokio::test(flavor = "multi_thread")]
async fn users_stored_without_an_id_get_one_on_first_use() {
    let (dir, s) = store("user-id-migration");
    let d = open(&s, AuthConfig::default()).await;
    d.create_tenant("acme", "Acme").await.unwrap();
    d.create_user(
        "acme",
        None,
        NewUser { email: "ada@acme.io".into(), password: Some("correct horse battery".into()), role: Role::Editor },
    )
    .await
    .unwrap();
    // Rewrite the stored user as an older version wrote it: no id.
    let mut old = s.get_doc("acme", "user", "ada@acme.io").await.unwrap().unwrap();
    old.body.as_object_mut().unwrap().remove("id");
    assert!(s.put_doc(old.clone()).await.unwrap());
    assert!(s.get_doc("acme", "user", "ada@acme.io").await.unwrap().unwrap().body.get("id").is_none());

    let fresh = open(&s, AuthConfig::default()).await;
    let token = fresh.login("acme", "ada@acme.io", "correct horse battery").await.unwrap().token;
    let stored = s.get_doc("acme", "user", "ada@acme.io").await.unwrap().unwrap();
    let id = stored.body["id"].as_str().expect("an id written back").to_string();
    assert_eq!(fresh.authenticate(&token, None).await.unwrap().user(), Some("ada@acme.io"));
    assert_eq!(fresh.list_users("acme").await.unwrap()[0].id, id, "the id stays the one written");
    let _ = std::fs::remove_dir_all(dir);
}

/// A token signed with `key_tenant`'s newest signing key, as someone holding the key could make.
async fn forge(s: &Arc<dyn Store>, key_tenant: &str, claims: &Claims) -> String {
    let mut docs = s.list_docs(key_tenant, "signing_key").await.unwrap();
    docs.sort_by_key(|d| d.body["created_at_ms"].as_i64());
    let key: StoredKey = serde_json::from_value(docs.pop().expect("a signing key").body).unwrap();
    key.signer(key_tenant, &ServerKey::parse(SERVER_KEY).unwrap()).unwrap().sign(claims).unwrap()
}

/// Issue 13, item 19: signing keys were shared by all tenants and stored in clear, and a token
/// signed with one was accepted whatever its `nbf`, `iat` or lifetime.
#[tokio::test(flavor = "multi_thread")]
async fn session_keys_are_per_tenant_sealed_and_bound_tokens_by_time() {
    let (dir, s) = store("signing-keys");
    let d = open(&s, AuthConfig::default()).await;
    let pw = || Some("correct horse battery".to_string());
    for tenant in ["acme", "globex"] {
        d.create_tenant(tenant, tenant).await.unwrap();
        d.create_user(tenant, None, NewUser { email: format!("ada@{tenant}.io"), password: pw(), role: Role::Owner })
            .await
            .unwrap();
    }
    let acme = d.login("acme", "ada@acme.io", "correct horse battery").await.unwrap();
    let globex = d.login("globex", "ada@globex.io", "correct horse battery").await.unwrap();
    let kid = |t: &str| jsonwebtoken::decode_header(t).unwrap().kid.unwrap();
    assert_ne!(kid(&acme.token), kid(&globex.token), "each tenant signs with its own key");

    // Keys are stored sealed with the server key, and only that key opens the directory.
    for tenant in ["acme", "globex"] {
        for doc in s.list_docs(tenant, "signing_key").await.unwrap() {
            assert!(doc.body.get("pkcs8").is_none() && doc.body["sealed"].as_str().unwrap().starts_with("v1:"));
        }
    }
    let wrong = Directory::open(Arc::clone(&s), AuthConfig::default(), ServerKey::generate().unwrap().0).await;
    assert!(
        matches!(&wrong, Err(AuthError::Internal(m)) if m.contains("not the one this database was set up with")),
        "{:?}",
        wrong.err()
    );

    // acme's key cannot speak for globex.
    let now = sluice_auth::now_ms() / 1000;
    let claims = |tid: &str, user: &sluice_auth::UserView, iat: i64, exp: i64| Claims {
        sub: user.id.clone(),
        email: Some(user.email.clone()),
        tid: tid.into(),
        role: "owner".into(),
        iat,
        nbf: None,
        exp,
        iss: "sluice".into(),
        aud: "sluice-api".into(),
        jti: "forged".into(),
    };
    let forged = forge(&s, "acme", &claims("globex", &globex.user, now, now + 600)).await;
    assert!(
        matches!(d.authenticate(&forged, None).await, Err(AuthError::Unauthenticated(m)) if m.contains("another tenant"))
    );
    let fine = forge(&s, "acme", &claims("acme", &acme.user, now, now + 600)).await;
    assert_eq!(d.authenticate(&fine, None).await.unwrap().tenant, "acme");

    // Times: not issued ahead of the clock, not valid yet, or valid for years.
    let year = 365 * 86_400;
    let ahead = claims("acme", &acme.user, now + 3600, now + 7200);
    let not_yet = Claims { nbf: Some(now + 3600), ..claims("acme", &acme.user, now, now + 3600) };
    let decade = claims("acme", &acme.user, now, now + 10 * year);
    for (c, why) in [(ahead, "in the future"), (not_yet, "not valid yet"), (decade, "longer than")] {
        let token = forge(&s, "acme", &c).await;
        let refused = d.authenticate(&token, None).await;
        assert!(matches!(&refused, Err(AuthError::Unauthenticated(m)) if m.contains(why)), "{c:?}: {refused:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Keys stored in clear by older versions: a tenant's are sealed when first read; those shared
/// by every tenant are removed (the tokens they signed named users by email and are refused).
#[tokio::test(flavor = "multi_thread")]
async fn signing_keys_stored_in_clear_are_sealed_or_retired() {
    let (dir, s) = store("clear-keys");
    let d = open(&s, AuthConfig::default()).await;
    d.create_tenant("acme", "Acme").await.unwrap();
    d.create_user(
        "acme",
        None,
        NewUser { email: "ada@acme.io".into(), password: Some("correct horse battery".into()), role: Role::Owner },
    )
    .await
    .unwrap();
    let token = d.login("acme", "ada@acme.io", "correct horse battery").await.unwrap().token;
    // Write the key back in clear, as an older version stored it, and a shared one beside it.
    let server_key = ServerKey::parse(SERVER_KEY).unwrap();
    let mut stored = s.list_docs("acme", "signing_key").await.unwrap().pop().unwrap();
    let mut key: StoredKey = serde_json::from_value(stored.body.clone()).unwrap();
    let pkcs8 = server_key.open(key.sealed.as_deref().unwrap(), &StoredKey::sealed_name("acme", &key.kid)).unwrap();
    key.pkcs8 = Some(base64::engine::general_purpose::STANDARD.encode(pkcs8));
    key.sealed = None;
    stored.body = serde_json::to_value(&key).unwrap();
    assert!(s.put_doc(stored.clone()).await.unwrap());
    let shared = sluice_store::Doc { tenant: "_system".into(), id: "00000000000000aa".into(), version: 0, ..stored };
    assert!(s.put_doc(shared).await.unwrap());

    let fresh = open(&s, AuthConfig::default()).await;
    assert!(s.list_docs("_system", "signing_key").await.unwrap().is_empty(), "the shared key is gone");
    // The clear key still verifies and signs, and is stored sealed from then on.
    assert!(fresh.authenticate(&token, None).await.is_ok());
    assert!(fresh.login("acme", "ada@acme.io", "correct horse battery").await.is_ok());
    let body = s.get_doc("acme", "signing_key", &key.kid).await.unwrap().unwrap().body;
    assert!(body.get("pkcs8").is_none() && body["sealed"].as_str().unwrap().starts_with("v1:"), "{body}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 13, item 20: emails were only lower-cased, so a look-alike in compatibility characters
/// was another user, and bidi controls were accepted in emails and key names.
#[tokio::test(flavor = "multi_thread")]
async fn look_alike_emails_are_one_user_and_hidden_characters_are_refused() {
    let (dir, s) = store("look-alikes");
    let d = open(&s, AuthConfig::default()).await;
    d.create_tenant("acme", "Acme").await.unwrap();
    let new = |email: &str| NewUser {
        email: email.into(),
        password: Some("correct horse battery".into()),
        role: Role::Editor,
    };
    let ada = d.create_user("acme", None, new("ＡＤＡ@Example.com")).await.unwrap();
    assert_eq!(ada.email, "ada@example.com");
    assert!(matches!(d.create_user("acme", None, new("ada@example.com")).await, Err(AuthError::Conflict(_))));
    assert!(d.login("acme", "ａｄａ@example.com", "correct horse battery").await.is_ok());
    fn field<T>(r: Result<T, AuthError>) -> String {
        match r {
            Err(AuthError::Invalid { field, .. }) => field,
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("accepted"),
        }
    }
    assert_eq!(field(d.create_user("acme", None, new("moc.elpmaxe@\u{202E}eve")).await), "email");
    assert_eq!(field(d.create_user("acme", None, new("eve\u{200B}@example.com")).await), "email");
    assert_eq!(field(d.login("acme", "ada\u{2066}@example.com", "correct horse battery").await), "email");
    let key = |name: &str| NewApiKey {
        name: name.into(),
        role: Role::Viewer,
        expires_in: None,
        client_cert_sha256: None,
        presented_cert_sha256: None,
    };
    assert_eq!(field(d.create_api_key("acme", None, key("deploy\u{202E}gnp.exe")).await), "name");
    assert!(d.create_api_key("acme", None, key("nightly — café")).await.is_ok());
    assert_eq!(field(d.create_tenant("globex", "Globex\u{FEFF}").await), "name");
    assert!(matches!(
        d.sign_in_external("acme", "ＡＤＡ@example.com", Some(Role::Viewer), true, "oidc:x").await,
        Ok((u, false)) if u.email == "ada@example.com"
    ));

    // A user stored before normalisation under a look-alike form can still sign in and be removed.
    let mut legacy = s.get_doc("acme", "user", "ada@example.com").await.unwrap().unwrap();
    let mut body = legacy.body.clone();
    body["email"] = "ｂｏｂ@example.com".into();
    body["id"] = "0190d3c2-0000-7000-8000-0000000000b0".into();
    legacy = sluice_store::Doc { id: "ｂｏｂ@example.com".into(), body, version: 0, ..legacy };
    assert!(s.put_doc(legacy).await.unwrap());
    assert!(d.login("acme", "ｂｏｂ@example.com", "correct horse battery").await.is_ok());
    assert_eq!(d.delete_user("acme", &admin("acme"), "ＢＯＢ@example.com").await.unwrap(), "ｂｏｂ@example.com");
    assert!(s.get_doc("acme", "user", "ｂｏｂ@example.com").await.unwrap().is_none());
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 13, item 9: any tenant could bind any certificate's fingerprint (and so squat it, or
/// make it authenticate as its own key), and revoking a key never freed its certificate.
#[tokio::test(flavor = "multi_thread")]
async fn binding_a_client_certificate_takes_holding_it_and_revocation_frees_it() {
    let (dir, s) = store("cert-bindings");
    let d = open(&s, AuthConfig::default()).await;
    d.create_tenant("acme", "Acme").await.unwrap();
    d.create_tenant("globex", "Globex").await.unwrap();
    let (acme_cert, globex_cert) = ("a".repeat(64), "b".repeat(64));
    let bind = |fp: &str, presented: Option<&str>| NewApiKey {
        name: "worker".into(),
        role: Role::Worker,
        expires_in: None,
        client_cert_sha256: Some(fp.into()),
        presented_cert_sha256: presented.map(str::to_string),
    };
    // globex cannot bind acme's certificate: it presents none, or its own.
    for presented in [None, Some(globex_cert.as_str())] {
        let refused = d.create_api_key("globex", Some(&admin("globex")), bind(&acme_cert, presented)).await;
        assert!(matches!(refused, Err(AuthError::Forbidden(_))), "{presented:?}: {refused:?}");
    }
    // acme, presenting it, can; the certificate is acme's key.
    let (key, _) = d.create_api_key("acme", Some(&admin("acme")), bind(&acme_cert, Some(&acme_cert))).await.unwrap();
    assert_eq!(d.authenticate_certificate(&acme_cert).await.unwrap().tenant, "acme");
    let again = d.create_api_key("globex", Some(&admin("globex")), bind(&acme_cert, Some(&acme_cert))).await;
    assert!(matches!(again, Err(AuthError::Conflict(_))), "bound already: {again:?}");
    // Revoking frees it.
    d.revoke_api_key("acme", &admin("acme"), &key.id).await.unwrap();
    assert!(d.authenticate_certificate(&acme_cert).await.is_err());
    let (rebound, _) =
        d.create_api_key("globex", Some(&admin("globex")), bind(&acme_cert, Some(&acme_cert))).await.unwrap();
    assert_eq!(d.authenticate_certificate(&acme_cert).await.unwrap().api_key(), Some(rebound.id.as_str()));

    // A binding left behind by a revoked key (as older versions left them) is freed too.
    let (old, _) = d.create_api_key("acme", None, bind(&globex_cert, None)).await.unwrap();
    let mut stored = s.get_doc("acme", "api_key", &old.id).await.unwrap().unwrap();
    stored.body["revoked_at_ms"] = 1.into();
    assert!(s.put_doc(stored).await.unwrap());
    assert!(s.find_doc("client_cert", &globex_cert).await.unwrap().is_some());
    let fresh = open(&s, AuthConfig::default()).await;
    let (mine, _) =
        fresh.create_api_key("globex", Some(&admin("globex")), bind(&globex_cert, Some(&globex_cert))).await.unwrap();
    assert_eq!(fresh.authenticate_certificate(&globex_cert).await.unwrap().api_key(), Some(mine.id.as_str()));
    let _ = std::fs::remove_dir_all(dir);
}
