//! Who is on the other end of a connection: its address and, over mutual TLS, the certificate it
//! proved it holds. Handlers and middleware read it as `ConnectInfo<Peer>`, over plain TCP and TLS.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;

use crate::x509;

/// The peer of one connection, the same for every request on it.
///
/// In a handler: `ConnectInfo(peer): ConnectInfo<Peer>`; in middleware:
/// `req.extensions().get::<ConnectInfo<Peer>>()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The remote address of the TCP connection.
    pub addr: SocketAddr,
    /// The client certificate, when the connection is TLS and the client presented one that the
    /// configured client CA signed. Always `None` over plain TCP.
    pub client_cert: Option<Arc<ClientCert>>,
}

/// What a verified client certificate says about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    /// The subject's common name (`CN`), when it has one.
    pub subject_cn: Option<String>,
    /// The DNS names of the subject alternative name extension.
    pub dns_sans: Vec<String>,
    /// SHA-256 of the certificate's DER bytes, lowercase hex (64 characters).
    pub fingerprint_sha256: String,
    /// The end of the certificate's validity (`notAfter`), as Unix seconds.
    pub not_after_unix: i64,
}

impl ClientCert {
    /// Reads the identity fields of a DER certificate.
    pub fn from_der(der: &CertificateDer<'_>) -> Result<Self, x509::Error> {
        let cert = x509::Summary::parse(der)?;
        Ok(Self {
            subject_cn: cert.subject_cn,
            dns_sans: cert.dns_sans,
            fingerprint_sha256: cert.fingerprint_sha256,
            not_after_unix: cert.not_after_unix,
        })
    }
}
