//! Passwords: argon2id in PHC string form, with OWASP's minimum parameters (19 MiB, 2 passes,
//! 1 lane). Hashing takes tens of milliseconds of CPU by design, so callers run it on a blocking
//! thread.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::AuthError;

/// Shortest and longest password accepted.
pub const MIN_LEN: usize = 12;
pub const MAX_LEN: usize = 1024;

fn argon2() -> Result<Argon2<'static>, AuthError> {
    let params = Params::new(19 * 1024, 2, 1, None)
        .map_err(|e| AuthError::Internal(format!("invalid argon2 parameters: {e}")))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Checks the length rules; the reason when they fail.
pub fn check(password: &str) -> Result<(), AuthError> {
    let n = password.chars().count();
    if n < MIN_LEN {
        return Err(AuthError::invalid("password", format!("must be at least {MIN_LEN} characters")));
    }
    if password.len() > MAX_LEN {
        return Err(AuthError::invalid("password", format!("must be at most {MAX_LEN} bytes")));
    }
    Ok(())
}

/// The PHC string (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`) of `password` with a fresh salt.
pub fn hash(password: &str) -> Result<String, AuthError> {
    let salt_bytes = crate::random_bytes::<16>()?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| AuthError::Internal(format!("salt: {e}")))?;
    argon2()?
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Internal(format!("cannot hash a password: {e}")))
}

/// Whether `password` matches the PHC string `stored` (constant time in the password).
pub fn verify(password: &str, stored: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(stored) else {
        tracing::error!("a stored password hash does not parse; the user cannot log in");
        return false;
    };
    argon2().is_ok_and(|a| a.verify_password(password.as_bytes(), &parsed).is_ok())
}

/// A hash of nothing anyone knows, verified when a login names no user, so that an unknown email
/// takes as long to refuse as a wrong password.
pub fn decoy() -> &'static str {
    "$argon2id$v=19$m=19456,t=2,p=1$c2x1aWNlLWRlY295LXNhbHQ$1tqnJ5HV8Yb2Gv7bWhbSC2dtIJq+nzFxkMsLRsGy+3k"
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hashes_verify_and_are_salted() {
        let a = hash("correct horse battery").unwrap();
        let b = hash("correct horse battery").unwrap();
        assert!(a.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{a}");
        assert_ne!(a, b, "each hash has its own salt");
        assert!(verify("correct horse battery", &a));
        assert!(!verify("correct horse batterY", &a));
        assert!(!verify("correct horse battery", "not a hash"));
        assert!(!verify("anything at all", decoy()));
    }

    #[test]
    fn length_rules() {
        assert!(check("short").is_err());
        assert!(check("twelve chars").is_ok());
        assert!(check(&"x".repeat(2000)).is_err());
    }
}
