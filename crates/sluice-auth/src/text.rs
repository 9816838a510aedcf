//! What identifiers may contain. Emails are normalised (NFKC, then lower case) wherever they are
//! stored or looked up, so that `ＡＤＡ@example.com` and `ada@example.com` are one user; and
//! text that names someone or something (emails, key and tenant names) must show what it says:
//! bidi controls, which reorder what is displayed (`U+202E` makes `moc.elgoog@eve` read as
//! `eve@google.com`), and other invisible format characters are refused.

use unicode_normalization::UnicodeNormalization;

use crate::AuthError;

/// Whether `c` is invisible or changes how the text around it is displayed: the bidi controls
/// (U+061C, U+200E, U+200F, U+202A to U+202E, U+2066 to U+2069), the other format characters
/// of Unicode (category Cf: zero-width spaces and joiners, the byte order mark, the soft hyphen,
/// invisible operators, tags, ...) and the Hangul fillers, which show as blank space.
pub fn is_hidden(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061C}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08E2}'
            | '\u{115F}'..='\u{1160}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0001}'
            | '\u{E0020}'..='\u{E007F}'
    )
}

/// Refuses text with control characters or [hidden](is_hidden) ones, naming `field`.
pub fn check_visible(field: &str, text: &str) -> Result<(), AuthError> {
    match text.chars().find(|c| c.is_control() || is_hidden(*c)) {
        Some(c) => Err(AuthError::invalid(
            field,
            format!("contains the invisible or control character U+{:04X}; remove it", u32::from(c)),
        )),
        None => Ok(()),
    }
}

/// The normal form of an email, as it is stored and looked up: trimmed, NFKC, lower case.
pub fn normalize_email(email: &str) -> String {
    email.trim().nfkc().collect::<String>().to_lowercase()
}

/// A normalised email, or why it is not one (a 400 naming `email`).
pub fn check_email(email: &str) -> Result<String, AuthError> {
    check_visible("email", email.trim())?;
    let e = normalize_email(email);
    let ok = e.len() <= 254
        && e.split_once('@').is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
        && !e.chars().any(|c| c.is_whitespace() || c.is_control() || is_hidden(c));
    if ok {
        Ok(e)
    } else {
        Err(AuthError::invalid("email", "expected an email address like ada@example.com (at most 254 characters)"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn field_of(e: AuthError) -> String {
        match e {
            AuthError::Invalid { field, .. } => field,
            other => panic!("{other:?}"),
        }
    }

    /// Issue 13, item 20: look-alike emails were distinct users, and bidi controls were accepted.
    #[test]
    fn emails_are_normalised_and_hidden_characters_refused() {
        for (given, stored) in [
            ("Ada@Example.com", "ada@example.com"),
            ("  ada@example.com ", "ada@example.com"),
            ("ＡＤＡ@ｅｘａｍｐｌｅ.ｃｏｍ", "ada@example.com"),
            ("ada@ex\u{FB01}.com", "ada@exfi.com"),
            ("ÄDA@example.com", "äda@example.com"),
            ("A\u{0308}DA@example.com", "äda@example.com"),
        ] {
            assert_eq!(check_email(given).unwrap(), stored, "{given:?}");
        }
        for hidden in [
            '\u{202E}',
            '\u{202A}',
            '\u{2066}',
            '\u{2069}',
            '\u{200E}',
            '\u{200F}',
            '\u{061C}',
            '\u{200B}',
            '\u{FEFF}',
            '\u{00AD}',
            '\u{E0041}',
        ] {
            let email = format!("ada{hidden}@example.com");
            assert_eq!(field_of(check_email(&email).unwrap_err()), "email", "{hidden:?}");
            assert!(check_visible("name", &format!("ci key{hidden}")).is_err(), "{hidden:?}");
        }
        for bad in ["", "ada", "@example.com", "ada@", "a da@example.com", "ada\n@example.com"] {
            assert_eq!(field_of(check_email(bad).unwrap_err()), "email", "{bad:?}");
        }
        assert!(check_visible("name", "nightly build — café ✓ 日本").is_ok());
        assert!(check_visible("name", "tab\there").is_err());
    }
}
