//! The directory against a real SQLite store: users and passwords, session tokens and key
//! rotation, API keys from creation to revocation, and the grant rules.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use sluice_auth::{Actor, AuthConfig, AuthError, Directory, LoginFailure, NewApiKey, NewUser, Principal, Role};
use sluice_store::Store;
use sluice_store_sqlite::SqliteStore;

fn store(label: &str) -> (std::path::PathBuf, Arc<dyn Store>) {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("sluice-auth-{label}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.join("db.sqlite")).unwrap());
    (dir, s)
}

fn admin(tenant: &str) -> Principal {
    Principal { tenant: tenant.into(), actor: Actor::User { email: "root@acme.io".into() }, role: Role::Admin }
}

#[tokio::test(flavor = "multi_thread")]
async fn users_log_in_and_sessions_follow_the_directory() {
    let (dir, s) = store("users");
    let d = Directory::open(Arc::clone(&s), AuthConfig::default()).await.unwrap();
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
    let other_node = Directory::open(Arc::clone(&s), AuthConfig::default()).await.unwrap();
    let rotating =
        Directory::open(Arc::clone(&s), AuthConfig { rotate_after: Duration::from_millis(1), ..AuthConfig::default() })
            .await
            .unwrap();
    let kids = rotating.signing_kids();
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
    let d = Directory::open(Arc::clone(&s), AuthConfig::default()).await.unwrap();
    d.create_tenant("acme", "Acme").await.unwrap();
    d.create_tenant("globex", "Globex").await.unwrap();
    let (view, key) = d
        .create_api_key(
            "acme",
            None,
            NewApiKey { name: "ci".into(), role: Role::Worker, expires_in: None, client_cert_sha256: None },
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
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(matches!(d.authenticate(&short, None).await, Err(AuthError::Unauthenticated(m)) if m.contains("expired")));
    // Grants.
    let editor = Principal { role: Role::Editor, ..admin("acme") };
    let want = || NewApiKey { name: "x".into(), role: Role::Viewer, expires_in: None, client_cert_sha256: None };
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
    let d = Directory::open(Arc::clone(&s), AuthConfig::default()).await.unwrap();
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
    let (token, _) = d.issue_token("acme", &user).unwrap();
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
    let d = Directory::open(Arc::clone(&s), AuthConfig::default()).await.unwrap();
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
    let other = Directory::open(Arc::clone(&s), AuthConfig::default()).await.unwrap();
    assert!(matches!(other.authenticate(&token, None).await, Err(AuthError::Unauthenticated(_))));
    let fresh = d.login("acme", "ada@acme.io", "correct horse battery").await.unwrap().token;
    assert_eq!(other.authenticate(&fresh, None).await.unwrap().role, Role::Owner);
    let _ = std::fs::remove_dir_all(dir);
}

/// Users stored before users had ids get one when first read, written back once.
#[tokio::test(flavor = "multi_thread")]
async fn users_stored_without_an_id_get_one_on_first_use() {
    let (dir, s) = store("user-id-migration");
    let d = Directory::open(Arc::clone(&s), AuthConfig::default()).await.unwrap();
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

    let fresh = Directory::open(Arc::clone(&s), AuthConfig::default()).await.unwrap();
    let token = fresh.login("acme", "ada@acme.io", "correct horse battery").await.unwrap().token;
    let stored = s.get_doc("acme", "user", "ada@acme.io").await.unwrap().unwrap();
    let id = stored.body["id"].as_str().expect("an id written back").to_string();
    assert_eq!(fresh.authenticate(&token, None).await.unwrap().user(), Some("ada@acme.io"));
    assert_eq!(fresh.list_users("acme").await.unwrap()[0].id, id, "the id stays the one written");
    let _ = std::fs::remove_dir_all(dir);
}
