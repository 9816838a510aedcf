//! Certificates for TLS tests, made on the spot: a CA, and server and client certificates it
//! signs, as PEM text and DER, with a helper that replaces PEM files the way deploy tools do.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority with its key.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate signed by a [`Ca`], with its private key.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("cannot make a key: {e}"));
        let issuer = CertifiedIssuer::self_signed(params, key).unwrap_or_else(|e| panic!("cannot make a CA: {e}"));
        Self { issuer }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `127.0.0.1` and `localhost`, valid until midnight UTC of
    /// `not_after` (year, month, day).
    pub fn server(&self, not_after: (i32, u8, u8)) -> Leaf {
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let mut params = CertificateParams::new(names).unwrap_or_else(|e| panic!("{e}"));
        params.distinguished_name.push(DnType::CommonName, "sluice test server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        self.sign(params)
    }

    /// A client certificate with the common name `cn` and the DNS name `<cn>.clients.test`.
    pub fn client(&self, cn: &str) -> Leaf {
        let mut params = CertificateParams::new(vec![format!("{cn}.clients.test")]).unwrap_or_else(|e| panic!("{e}"));
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Leaf {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("cannot make a key: {e}"));
        let cert = params.signed_by(&key, &self.issuer).unwrap_or_else(|e| panic!("cannot sign: {e}"));
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().to_vec() }
    }
}

impl Leaf {
    /// SHA-256 of the certificate, lowercase hex.
    pub fn fingerprint(&self) -> String {
        ring::digest::digest(&ring::digest::SHA256, &self.der).as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The certificate followed by its key: what `reqwest::Identity::from_pem` reads.
    pub fn identity_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem)
    }

    /// Writes the certificate and the key to `cert` and `key`: the key first, each file replaced
    /// at once (written beside it, then renamed over it).
    pub fn install(&self, cert: &Path, key: &Path) {
        replace(key, &self.key_pem);
        replace(cert, &self.cert_pem);
    }
}

/// Replaces the file at `path` with `contents` in one step, so that a reader sees the old or the
/// new file, never half of one.
pub fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("cannot rename to {}: {e}", path.display()));
}
