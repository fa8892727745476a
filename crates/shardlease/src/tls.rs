//! TLS for the PostgreSQL connections, with libpq's `sslmode` semantics, on rustls with the
//! ring provider (no OpenSSL, no aws-lc-rs).
//!
//! tokio-postgres itself knows only `disable`, `prefer` and `require`, and its URL parser
//! rejects `verify-ca`, `verify-full` and `sslrootcert`. So [`take_tls_params`] removes
//! `sslmode` and `sslrootcert` from the URL (or key=value string) before tokio-postgres sees
//! it; the connection then asks tokio-postgres for `SslMode::Require` and hands it a rustls
//! connector whose certificate verifier does what the mode says:
//!
//! | sslmode                 | TLS | verifies                                                   |
//! |-------------------------|-----|------------------------------------------------------------|
//! | `disable`, `allow`, `prefer` (default) | no | -                                         |
//! | `require`               | yes | nothing (encrypt only); with `sslrootcert`, as `verify-ca`  |
//! | `verify-ca`             | yes | the chain, against `sslrootcert` (or the webpki roots)     |
//! | `verify-full`           | yes | the chain and the host name                                |
//!
//! `sslrootcert=system` means the bundled webpki (Mozilla) roots and, as in libpq, implies
//! `verify-full` and refuses weaker modes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`: whether to use TLS, and what to verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TlsMode {
    /// No TLS.
    Disable,
    /// No TLS (libpq would try TLS only if the server refused a plain connection).
    Allow,
    /// No TLS: the default, as before TLS was built in.
    Prefer,
    /// TLS, encrypt only: the server's certificate is not verified, unless a root
    /// certificate is given (then as [`TlsMode::VerifyCa`], as libpq does).
    Require,
    /// TLS; the server's certificate chain must lead to a trusted root. The host name is not checked.
    VerifyCa,
    /// TLS; the chain must lead to a trusted root and the certificate must name the host.
    VerifyFull,
}

impl TlsMode {
    /// The libpq spelling (`verify-full`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Allow => "allow",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }

    /// True when connections in this mode use TLS.
    pub fn uses_tls(self) -> bool {
        matches!(
            self,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull
        )
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TlsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => TlsMode::Disable,
            "allow" => TlsMode::Allow,
            "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ))
            }
        })
    }
}

/// libpq's `sslrootcert`: the roots the server's certificate must chain to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RootCert {
    /// `sslrootcert=system`: the bundled webpki (Mozilla) roots.
    System,
    /// A PEM file of one or more CA certificates, read at every connection attempt.
    File(PathBuf),
}

impl RootCert {
    /// `system`, or a file path.
    pub fn parse(s: &str) -> RootCert {
        if s == "system" {
            RootCert::System
        } else {
            RootCert::File(PathBuf::from(s))
        }
    }
}

impl fmt::Display for RootCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RootCert::System => f.write_str("system"),
            RootCert::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// What the certificate verifier checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verification {
    /// Nothing but the handshake signatures: encrypt only (libpq's `require`).
    EncryptOnly,
    /// The chain to a trusted root, not the name (`verify-ca`).
    Chain,
    /// Chain and host name (`verify-full`).
    Full,
}

/// The verification `mode` asks for, given `root`; `None` means no TLS.
pub(crate) fn verification(mode: TlsMode, root: Option<&RootCert>) -> Option<Verification> {
    match mode {
        TlsMode::Disable | TlsMode::Allow | TlsMode::Prefer => None,
        TlsMode::Require if root.is_none() => Some(Verification::EncryptOnly),
        TlsMode::Require | TlsMode::VerifyCa => Some(Verification::Chain),
        TlsMode::VerifyFull => Some(Verification::Full),
    }
}

/// The TLS parameters found in a connection string, which is returned without them.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct TlsParams {
    /// The string to hand to tokio-postgres.
    pub rest: String,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    /// A parameter we recognise but do not support (client certificates).
    pub unsupported: Option<String>,
}

const UNSUPPORTED: &[&str] = &["sslcert", "sslkey", "sslpassword", "sslcrl", "sslcrldir"];

/// Take `sslmode` and `sslrootcert` out of a `postgres://` URL or a key=value string. The
/// last occurrence wins, as in libpq. A string this cannot tokenise is returned unchanged,
/// for tokio-postgres to report.
pub(crate) fn take_tls_params(s: &str) -> TlsParams {
    let mut out = TlsParams::default();
    let mut keep = |key: &str, value: String| -> bool {
        match key {
            "sslmode" => out.sslmode = Some(value),
            "sslrootcert" => out.sslrootcert = Some(value),
            k if UNSUPPORTED.contains(&k) => out.unsupported = Some(k.to_owned()),
            _ => return true,
        }
        false
    };
    let rest = if let Some(after_scheme) = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|p| s.strip_prefix(p))
    {
        // As tokio-postgres does: the credentials end at the first '@', the query starts at
        // the first '?' after them.
        let creds_end = after_scheme.find('@').map(|i| i + 1).unwrap_or(0);
        match after_scheme[creds_end..].find('?') {
            None => s.to_owned(),
            Some(q) => {
                let query_start = s.len() - after_scheme.len() + creds_end + q;
                let (head, query) = (&s[..query_start], &s[query_start + 1..]);
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|pair| {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        keep(&decode(k), decode(v))
                    })
                    .collect();
                if kept.is_empty() {
                    head.to_owned()
                } else {
                    format!("{head}?{}", kept.join("&"))
                }
            }
        }
    } else {
        match key_value_pairs(s) {
            Some(pairs) => {
                let mut rest = String::with_capacity(s.len());
                let mut last = 0;
                for (start, end, key, value) in pairs {
                    if !keep(key, value) {
                        rest.push_str(&s[last..start]);
                        last = end;
                    }
                }
                rest.push_str(&s[last..]);
                rest
            }
            None => s.to_owned(),
        }
    };
    out.rest = rest;
    out
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The `key = value` pairs of a libpq key=value string, with their byte spans, tokenised
/// as tokio-postgres does (values may be single-quoted; a backslash escapes the next
/// character). `None` when the string does not tokenise.
fn key_value_pairs(s: &str) -> Option<Vec<(usize, usize, &str, String)>> {
    let mut pairs = Vec::new();
    let mut it = s.char_indices().peekable();
    let skip_ws = |it: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut it);
        let Some(&(start, _)) = it.peek() else {
            return Some(pairs);
        };
        while it
            .next_if(|&(_, c)| !c.is_whitespace() && c != '=')
            .is_some()
        {}
        let key_end = it.peek().map(|&(i, _)| i).unwrap_or(s.len());
        let key = &s[start..key_end];
        if key.is_empty() {
            return None;
        }
        skip_ws(&mut it);
        it.next_if(|&(_, c)| c == '=')?;
        skip_ws(&mut it);
        let mut value = String::new();
        if it.next_if(|&(_, c)| c == '\'').is_some() {
            loop {
                let (_, c) = it.next()?;
                match c {
                    '\'' => break,
                    '\\' => value.push(it.next()?.1),
                    c => value.push(c),
                }
            }
        } else {
            while let Some((_, c)) = it.next_if(|(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some((_, c2)) = it.next() {
                        value.push(c2);
                    }
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                return None;
            }
        }
        let end = it.peek().map(|&(i, _)| i).unwrap_or(s.len());
        pairs.push((start, end, key, value));
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The trusted roots: the PEM file, or the bundled webpki roots. Errors name the file.
pub(crate) fn load_roots(root: Option<&RootCert>) -> Result<RootCertStore, String> {
    let path: &Path = match root {
        None | Some(RootCert::System) => {
            return Ok(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })
        }
        Some(RootCert::File(path)) => path,
    };
    let shown = path.display();
    let pem =
        std::fs::read(path).map_err(|e| format!("sslrootcert {shown} cannot be read: {e}"))?;
    let mut store = RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.map_err(|e| format!("sslrootcert {shown} is not a valid PEM file: {e}"))?;
        store.add(cert).map_err(|e| {
            format!(
                "sslrootcert {shown}: certificate {} is not usable as a root: {e}",
                i + 1
            )
        })?;
    }
    if store.is_empty() {
        return Err(format!(
            "sslrootcert {shown} contains no PEM certificate (-----BEGIN CERTIFICATE-----)"
        ));
    }
    Ok(store)
}

/// A rustls connector that verifies as `verification` says, against `root`.
pub(crate) fn connector(
    verification: Verification,
    root: Option<&RootCert>,
) -> Result<MakeRustlsConnect, String> {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match verification {
        Verification::EncryptOnly => Arc::new(EncryptOnly {
            provider: provider.clone(),
        }),
        Verification::Chain | Verification::Full => {
            let webpki = WebPkiServerVerifier::builder_with_provider(
                Arc::new(load_roots(root)?),
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("cannot build the certificate verifier: {e}"))?;
            if verification == Verification::Full {
                webpki
            } else {
                Arc::new(ChainOnly { webpki })
            }
        }
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot configure TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // PostgreSQL 17 checks ALPN on direct TLS connections; older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(MakeRustlsConnect::new(config))
}

/// `sslmode=require` without a root certificate: accept any server certificate (encrypt
/// only, as libpq does: this does not protect against an active man in the middle), but
/// still check that the server holds the certificate's key.
#[derive(Debug)]
struct EncryptOnly {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `sslmode=verify-ca`: webpki's verification without the name check. webpki checks the
/// chain (validity, trust anchor) before the name, so a name error means the chain passed.
#[derive(Debug)]
struct ChainOnly {
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// When a connection failed because the server's certificate was rejected, say why and
/// what to do; `None` for every other failure.
pub(crate) fn explain_rejection(
    e: &tokio_postgres::Error,
    mode: TlsMode,
    root: Option<&RootCert>,
) -> Option<String> {
    let cert_error = rustls_error(e).and_then(|r| match r {
        rustls::Error::InvalidCertificate(c) => Some(c),
        _ => None,
    })?;
    let roots = match root {
        Some(RootCert::File(p)) => format!(
            "the certificates in sslrootcert {}; point sslrootcert at the CA that signed the \
             server's certificate",
            p.display()
        ),
        None | Some(RootCert::System) => "the bundled webpki (Mozilla) roots; set sslrootcert to \
             the PEM file of the CA that signed the server's certificate"
            .into(),
    };
    let why = match cert_error {
        CertificateError::UnknownIssuer => format!(
            "it is not signed by a trusted root (unknown issuer). Trusted roots: {roots}, \
             or use sslmode=require without sslrootcert to encrypt without verifying"
        ),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!(
                "{} (a hostname mismatch: sslmode=verify-full checks that the certificate names \
                 the host). Connect by a name the certificate lists, or use sslmode=verify-ca \
                 to check the chain only",
                rustls::Error::InvalidCertificate(cert_error.clone())
            )
        }
        other => rustls::Error::InvalidCertificate(other.clone()).to_string(),
    };
    let mode = match (mode, root) {
        (TlsMode::Require, Some(_)) => {
            "sslmode=require with sslrootcert, which verifies as verify-ca".into()
        }
        (mode, _) => format!("sslmode={mode}"),
    };
    Some(format!(
        "the server's certificate was rejected ({mode}): {why}"
    ))
}

/// The rustls error in `e`'s chain of causes (tokio-rustls wraps it in an `io::Error`,
/// whose `source()` skips it).
fn rustls_error(e: &tokio_postgres::Error) -> Option<&rustls::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(r) = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(r);
        }
        source = s.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(s: &str) -> (String, Option<String>, Option<String>) {
        let p = take_tls_params(s);
        (p.rest, p.sslmode, p.sslrootcert)
    }

    #[test]
    fn urls_lose_only_the_tls_params() {
        assert_eq!(
            take("postgres://u:p@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fa%20b.pem"),
            (
                "postgres://u:p@h:5/db?application_name=x".into(),
                Some("verify-full".into()),
                Some("/a b.pem".into())
            )
        );
        assert_eq!(
            take("postgresql://h/db?sslmode=require"),
            ("postgresql://h/db".into(), Some("require".into()), None)
        );
        assert_eq!(
            take("postgres://h/db?connect_timeout=3"),
            ("postgres://h/db?connect_timeout=3".into(), None, None)
        );
        // The last occurrence wins.
        assert_eq!(
            take("postgres://h/db?sslmode=disable&sslmode=require").1,
            Some("require".into())
        );
        // A '?' in the password is not the query.
        assert_eq!(
            take("postgres://u:p?sslmode=require@h/db"),
            ("postgres://u:p?sslmode=require@h/db".into(), None, None)
        );
    }

    #[test]
    fn key_value_strings_lose_only_the_tls_params() {
        assert_eq!(
            take("host=h sslmode = verify-ca  user=u sslrootcert='/x y/ca.pem' password='a b\\' sslmode=disable'"),
            (
                "host=h   user=u  password='a b\\' sslmode=disable'".into(),
                Some("verify-ca".into()),
                Some("/x y/ca.pem".into())
            )
        );
        // Untokenisable: unchanged, for tokio-postgres to report.
        assert_eq!(take("host='h").0, "host='h");
        assert_eq!(take("host=h").0, "host=h");
    }

    #[test]
    fn unsupported_params_are_noticed() {
        assert_eq!(
            take_tls_params("postgres://h/db?sslcert=c.pem").unsupported,
            Some("sslcert".into())
        );
    }

    #[test]
    fn modes() {
        assert_eq!("verify-full".parse::<TlsMode>(), Ok(TlsMode::VerifyFull));
        assert!("VERIFY-FULL".parse::<TlsMode>().is_err());
        assert_eq!(verification(TlsMode::Prefer, None), None);
        assert_eq!(
            verification(TlsMode::Require, None),
            Some(Verification::EncryptOnly)
        );
        let file = RootCert::parse("/ca.pem");
        assert_eq!(
            verification(TlsMode::Require, Some(&file)),
            Some(Verification::Chain)
        );
        assert_eq!(
            verification(TlsMode::VerifyFull, None),
            Some(Verification::Full)
        );
    }

    #[test]
    fn root_file_errors_name_the_file() {
        let err = load_roots(Some(&RootCert::parse("/nonexistent/ca.pem"))).unwrap_err();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        let dir = std::env::temp_dir().join(format!("shardlease-tls-{}", std::process::id()));
        std::fs::write(&dir, "not a certificate\n").unwrap();
        let err = load_roots(Some(&RootCert::File(dir.clone()))).unwrap_err();
        let _ = std::fs::remove_file(&dir);
        assert!(err.contains("no PEM certificate"), "{err}");
        assert!(load_roots(None).unwrap().len() > 50);
    }
}
