//! A small reader of X.509 certificates (DER) for the few fields the server reports: the subject's
//! common name, the DNS names, `notAfter` and the SHA-256 fingerprint. It reads certificates that
//! rustls accepted first; anything it does not understand is an error, never a guess.

use std::fmt::Write;

/// The fields read from one certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub subject_cn: Option<String>,
    pub dns_sans: Vec<String>,
    /// SHA-256 of the DER bytes, lowercase hex.
    pub fingerprint_sha256: String,
    /// `notAfter`, as Unix seconds.
    pub not_after_unix: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed certificate: {0}")]
pub struct Error(&'static str);

const BOOLEAN: u8 = 0x01;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const TELETEX_STRING: u8 = 0x14;
const IA5_STRING: u8 = 0x16;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const BMP_STRING: u8 = 0x1e;
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
/// `[0] EXPLICIT Version` of the TBS certificate.
const VERSION: u8 = 0xa0;
/// `[3] EXPLICIT Extensions` of the TBS certificate.
const EXTENSIONS: u8 = 0xa3;
/// `dNSName [2] IA5String` of a `GeneralName`.
const DNS_NAME: u8 = 0x82;
/// 2.5.4.3
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// 2.5.29.17
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

impl Summary {
    pub fn parse(der: &[u8]) -> Result<Self, Error> {
        let mut outer = Der(der);
        let mut cert = Der(outer.expect(SEQUENCE)?);
        let mut tbs = Der(cert.expect(SEQUENCE)?);
        if tbs.peek() == Some(VERSION) {
            tbs.next()?;
        }
        tbs.expect(INTEGER)?; // serial number
        tbs.expect(SEQUENCE)?; // signature algorithm
        tbs.expect(SEQUENCE)?; // issuer
        let mut validity = Der(tbs.expect(SEQUENCE)?);
        validity.next()?; // notBefore
        let (tag, not_after) = validity.next()?;
        let not_after_unix = time(tag, not_after)?;
        let subject_cn = common_name(tbs.expect(SEQUENCE)?)?;
        tbs.expect(SEQUENCE)?; // subject public key info
        let mut dns_sans = Vec::new();
        while !tbs.is_empty() {
            let (tag, content) = tbs.next()?;
            if tag == EXTENSIONS {
                dns_sans = dns_names(Der(content).expect(SEQUENCE)?)?;
            }
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut fingerprint_sha256 = String::with_capacity(64);
        for b in digest.as_ref() {
            let _ = write!(fingerprint_sha256, "{b:02x}");
        }
        Ok(Self { subject_cn, dns_sans, fingerprint_sha256, not_after_unix })
    }
}

/// The last common name of a `Name` (the most specific one, as names go from general to specific).
fn common_name(name: &[u8]) -> Result<Option<String>, Error> {
    let mut found = None;
    let mut rdns = Der(name);
    while !rdns.is_empty() {
        let mut attributes = Der(rdns.expect(SET)?);
        while !attributes.is_empty() {
            let mut attribute = Der(attributes.expect(SEQUENCE)?);
            let oid = attribute.expect(OID)?;
            let (tag, value) = attribute.next()?;
            if oid == OID_COMMON_NAME {
                found = Some(string(tag, value)?);
            }
        }
    }
    Ok(found)
}

/// The DNS names of the subject alternative name extension, if there is one.
fn dns_names(extensions: &[u8]) -> Result<Vec<String>, Error> {
    let mut names = Vec::new();
    let mut extensions = Der(extensions);
    while !extensions.is_empty() {
        let mut extension = Der(extensions.expect(SEQUENCE)?);
        let oid = extension.expect(OID)?;
        if extension.peek() == Some(BOOLEAN) {
            extension.next()?; // critical
        }
        let value = extension.expect(OCTET_STRING)?;
        if oid != OID_SUBJECT_ALT_NAME {
            continue;
        }
        let mut general_names = Der(Der(value).expect(SEQUENCE)?);
        while !general_names.is_empty() {
            let (tag, name) = general_names.next()?;
            if tag == DNS_NAME {
                names.push(string(IA5_STRING, name)?);
            }
        }
    }
    Ok(names)
}

fn string(tag: u8, value: &[u8]) -> Result<String, Error> {
    match tag {
        UTF8_STRING | PRINTABLE_STRING | IA5_STRING => {
            String::from_utf8(value.to_vec()).map_err(|_| Error("a name is not valid text"))
        }
        // Teletex strings are in practice Latin-1.
        TELETEX_STRING => Ok(value.iter().map(|b| char::from(*b)).collect()),
        BMP_STRING => {
            if value.len() % 2 != 0 {
                return Err(Error("a name is not valid UTF-16"));
            }
            let units = value.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            char::decode_utf16(units).collect::<Result<String, _>>().map_err(|_| Error("a name is not valid UTF-16"))
        }
        _ => Err(Error("a name has an unsupported string type")),
    }
}

/// A validity time (`UTCTime` `YYMMDDHHMMSSZ` or `GeneralizedTime` `YYYYMMDDHHMMSSZ`, as DER
/// requires them) as Unix seconds.
fn time(tag: u8, value: &[u8]) -> Result<i64, Error> {
    const BAD: Error = Error("a validity time is malformed");
    let digits = match (tag, value.split_last()) {
        (UTC_TIME | GENERALIZED_TIME, Some((b'Z', digits))) => digits,
        _ => return Err(BAD),
    };
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err(BAD);
    }
    let num = |range: std::ops::Range<usize>| -> i64 {
        digits[range].iter().fold(0, |acc, d| acc * 10 + i64::from(d - b'0'))
    };
    let (year, rest) = match (tag, digits.len()) {
        // RFC 5280: two-digit years from 50 are 19xx, below are 20xx.
        (UTC_TIME, 12) => {
            let yy = num(0..2);
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        (GENERALIZED_TIME, 14) => (num(0..4), 4),
        _ => return Err(BAD),
    };
    let (month, day) = (num(rest..rest + 2), num(rest + 2..rest + 4));
    let (hour, minute, second) = (num(rest + 4..rest + 6), num(rest + 6..rest + 8), num(rest + 8..rest + 10));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return Err(BAD);
    }
    Ok(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a date in the proleptic Gregorian calendar.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// DER elements one after another: a tag of one byte, a definite length, the content.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn peek(&self) -> Option<u8> {
        self.0.first().copied()
    }

    fn next(&mut self) -> Result<(u8, &'a [u8]), Error> {
        const TRUNCATED: Error = Error("truncated");
        let (&tag, rest) = self.0.split_first().ok_or(TRUNCATED)?;
        if tag & 0x1f == 0x1f {
            return Err(Error("a tag of more than one byte"));
        }
        let (&first, mut rest) = rest.split_first().ok_or(TRUNCATED)?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return Err(Error("a length that is not definite DER"));
            }
            let (bytes, after) = rest.split_at(n);
            rest = after;
            bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
        };
        if rest.len() < len {
            return Err(TRUNCATED);
        }
        let (content, after) = rest.split_at(len);
        self.0 = after;
        Ok((tag, content))
    }

    fn expect(&mut self, tag: u8) -> Result<&'a [u8], Error> {
        match self.next()? {
            (t, content) if t == tag => Ok(content),
            _ => Err(Error("a field is not where X.509 puts it")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    use super::*;

    fn cert(cn: Option<&str>, sans: &[&str], not_after: (i32, u8, u8)) -> Vec<u8> {
        let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "Sluice tests");
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        params.self_signed(&KeyPair::generate().unwrap()).unwrap().der().to_vec()
    }

    #[test]
    fn reads_the_subject_names_and_expiry() {
        let der = cert(Some("worker-7"), &["worker-7.internal", "localhost"], (2031, 5, 6));
        let s = Summary::parse(&der).unwrap();
        assert_eq!(s.subject_cn.as_deref(), Some("worker-7"));
        assert_eq!(s.dns_sans, ["worker-7.internal", "localhost"]);
        // date -u -d 2031-05-06 +%s
        assert_eq!(s.not_after_unix, 1_935_792_000);
        let digest = ring::digest::digest(&ring::digest::SHA256, &der);
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(s.fingerprint_sha256, hex);
        assert_eq!(s.fingerprint_sha256.len(), 64);
    }

    #[test]
    fn reads_generalized_times_and_names_without_a_common_name() {
        // From 2050 on, validity times are GeneralizedTime.
        let s = Summary::parse(&cert(None, &[], (2051, 2, 28))).unwrap();
        assert_eq!((s.subject_cn, s.dns_sans), (None, Vec::new()));
        // date -u -d 2051-02-28 +%s
        assert_eq!(s.not_after_unix, 2_561_155_200);
    }

    #[test]
    fn times_follow_the_calendar() {
        let cases: &[(u8, &str, i64)] = &[
            (UTC_TIME, "700101000000Z", 0),
            (UTC_TIME, "491231235959Z", 2_524_607_999),
            (UTC_TIME, "500101000000Z", -631_152_000),
            (GENERALIZED_TIME, "20000229120000Z", 951_825_600),
            (GENERALIZED_TIME, "21000301000000Z", 4_107_542_400),
        ];
        for (tag, text, expect) in cases {
            assert_eq!(time(*tag, text.as_bytes()), Ok(*expect), "{text}");
        }
        for bad in ["7001010000Z", "700101000000", "701301000000Z", "70010100000aZ", "700101250000Z"] {
            assert!(time(UTC_TIME, bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let der = cert(Some("x"), &["a.example"], (2030, 1, 1));
        for len in 0..der.len() {
            assert!(Summary::parse(&der[..len]).is_err(), "a certificate cut at {len} bytes parsed");
        }
        let mut flipped = der.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            let _ = Summary::parse(&flipped);
            flipped[i] ^= 0xff;
        }
        assert!(Summary::parse(b"not a certificate").is_err());
    }
}
