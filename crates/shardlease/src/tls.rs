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
//!
//! Client certificates ([`ClientCert`]) are libpq's `sslcert`, `sslkey` and `sslpassword`,
//! also taken out of the string: the connector presents them when the server asks. The key
//! may be PKCS#8, PKCS#1 (RSA) or SEC1 (EC) PEM, or PKCS#8 encrypted with `sslpassword`
//! (PBES2: PBKDF2 or scrypt with AES-CBC, what `openssl pkcs8 -topk8 -v2 aes-256-cbc` and
//! OpenSSL 3's `genpkey -aes256` write); as in libpq, a key file that the group or others
//! may read is refused. Both files are read at every connection attempt, so renewed ones
//! are picked up without a restart.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
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

/// libpq's `sslcert`, `sslkey` and `sslpassword`: the certificate this client presents to
/// the server (for `cert` authentication or `clientcert=verify-full` in `pg_hba.conf`).
///
/// Unlike libpq, there is no default file (libpq reads `~/.postgresql/postgresql.crt` and
/// `.key` when present): give both paths. Both files are read at every connection attempt.
#[derive(Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct ClientCert {
    /// PEM file of the client's certificate, followed by any intermediate certificates.
    pub cert: PathBuf,
    /// PEM file of its private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC); or PKCS#8 encrypted
    /// with the [password](ClientCert::password). Refused when the group or others may read
    /// it, as in libpq (at most 0600, or 0640 when owned by root).
    pub key: PathBuf,
    password: Option<String>,
}

impl ClientCert {
    /// The certificate file and its key file.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> ClientCert {
        ClientCert {
            cert: cert.into(),
            key: key.into(),
            password: None,
        }
    }

    /// The password of an encrypted key (libpq's `sslpassword`); ignored for a plain key.
    #[must_use]
    pub fn password(mut self, password: impl Into<String>) -> ClientCert {
        self.password = Some(password.into());
        self
    }

    /// Whether a password is set (it is never shown).
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }
}

impl fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Read the client's certificate chain and key; errors name the file and say what to do.
pub(crate) fn load_client_cert(
    c: &ClientCert,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let shown = c.cert.display();
    let pem = std::fs::read(&c.cert).map_err(|e| format!("sslcert {shown} cannot be read: {e}"))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("sslcert {shown} is not a valid PEM file: {e}"))?;
    if chain.is_empty() {
        return Err(format!(
            "sslcert {shown} contains no PEM certificate (-----BEGIN CERTIFICATE-----)"
        ));
    }
    Ok((chain, load_client_key(&c.key, c.password.as_deref())?))
}

fn load_client_key(path: &Path, password: Option<&str>) -> Result<PrivateKeyDer<'static>, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| {
        format!("sslkey {shown} cannot be read: {e} (the private key of sslcert is needed too)")
    })?;
    if !meta.is_file() {
        return Err(format!("sslkey {shown} is not a regular file"));
    }
    check_key_permissions(path, &meta)?;
    let pem = std::fs::read(path).map_err(|e| format!("sslkey {shown} cannot be read: {e}"))?;
    let text = String::from_utf8_lossy(&pem);
    if let Some(block) = pem_block(&text, "ENCRYPTED PRIVATE KEY") {
        let Some(password) = password else {
            return Err(format!(
                "sslkey {shown} is encrypted: give its password as sslpassword"
            ));
        };
        let (_, der) = pkcs8::der::pem::decode_vec(block.as_bytes())
            .map_err(|e| format!("sslkey {shown}: the encrypted key is not valid PEM: {e}"))?;
        let info = pkcs8::EncryptedPrivateKeyInfo::try_from(der.as_slice())
            .map_err(|e| format!("sslkey {shown}: the encrypted key is not valid PKCS#8: {e}"))?;
        // pkcs8's message ("PKCS#5 encryption failed") would mislead: say what it means.
        let plain = info.decrypt(password).map_err(|_| {
            format!(
                "sslkey {shown} cannot be decrypted with sslpassword: a wrong password, \
                 or an encryption other than PBES2 (PBKDF2 or scrypt with AES-CBC)"
            )
        })?;
        return Ok(PrivatePkcs8KeyDer::from(plain.as_bytes().to_vec()).into());
    }
    if text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(format!(
            "sslkey {shown} is encrypted in OpenSSL's traditional format, which is not supported: \
             convert it to encrypted PKCS#8 with \
             `openssl pkcs8 -topk8 -v2 aes-256-cbc -in {shown} -out key.p8` and use that file"
        ));
    }
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        format!(
            "sslkey {shown} holds no usable private key ({e}): PEM PKCS#8 (BEGIN PRIVATE KEY), \
             PKCS#1 (BEGIN RSA PRIVATE KEY), SEC1 (BEGIN EC PRIVATE KEY) or encrypted PKCS#8 \
             (BEGIN ENCRYPTED PRIVATE KEY) are supported"
        )
    })
}

/// The first `-----BEGIN label-----` ... `-----END label-----` block of `text`.
fn pem_block<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)?;
    let stop = text[start..].find(&end)? + start + end.len();
    Some(&text[start..stop])
}

/// libpq's rule: a key file that the group or others may read is refused (0600 or less;
/// 0640 or less when owned by root, as mounted secrets often are).
#[cfg(unix)]
fn check_key_permissions(path: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode() & 0o777;
    let forbidden = if meta.uid() == 0 { 0o037 } else { 0o077 };
    if mode & forbidden != 0 {
        return Err(format!(
            "sslkey {} has group or world access (mode {mode:04o}): it must be u=rw (0600) or \
             less, or u=rw,g=r (0640) or less when owned by root (chmod 0600 {})",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_permissions(_: &Path, _: &std::fs::Metadata) -> Result<(), String> {
    Ok(())
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
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
    pub sslpassword: Option<String>,
    /// A parameter we recognise but do not support (revocation lists).
    pub unsupported: Option<String>,
}

const UNSUPPORTED: &[&str] = &["sslcrl", "sslcrldir"];

/// Take the TLS parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`, `sslpassword`)
/// out of a `postgres://` URL or a key=value string. The
/// last occurrence wins, as in libpq. A string this cannot tokenise is returned unchanged,
/// for tokio-postgres to report.
pub(crate) fn take_tls_params(s: &str) -> TlsParams {
    let mut out = TlsParams::default();
    let mut keep = |key: &str, value: String| -> bool {
        match key {
            "sslmode" => out.sslmode = Some(value),
            "sslrootcert" => out.sslrootcert = Some(value),
            "sslcert" => out.sslcert = Some(value),
            "sslkey" => out.sslkey = Some(value),
            "sslpassword" => out.sslpassword = Some(value),
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
    client: Option<&ClientCert>,
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
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot configure TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let (chain, key) = load_client_cert(c)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => format!(
                        "sslkey {} is not the key of sslcert {}: give the key the certificate was issued for",
                        c.key.display(),
                        c.cert.display()
                    ),
                    e => format!(
                        "sslkey {} cannot be used with sslcert {}: {e}",
                        c.key.display(),
                        c.cert.display()
                    ),
                })?
        }
    };
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

/// When a connection failed because a certificate was rejected (the server's by us, or
/// ours by the server), say why and what to do; `None` for every other failure.
pub(crate) fn explain_rejection(
    e: &tokio_postgres::Error,
    mode: TlsMode,
    root: Option<&RootCert>,
    client: Option<&ClientCert>,
) -> Option<String> {
    if let Some(detail) = explain_client_rejection(e, client) {
        return Some(detail);
    }
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

/// The server refused our client certificate (a TLS alert), or none was given where one is
/// required, or its CN is not the user (authentication fails with SQLSTATE 28000).
fn explain_client_rejection(
    e: &tokio_postgres::Error,
    client: Option<&ClientCert>,
) -> Option<String> {
    use rustls::AlertDescription as A;
    let sent = |c: &ClientCert| format!("sslcert {}", c.cert.display());
    if let Some(rustls::Error::AlertReceived(alert)) = rustls_error(e) {
        let Some(c) = client else {
            return Some(format!(
                "the server ended the TLS handshake (alert {alert:?}); if it requires a client \
                 certificate, set sslcert and sslkey"
            ));
        };
        let why = match alert {
            A::UnknownCA => "it is not signed by a CA that the server trusts (unknown CA): \
                             the server's ssl_ca_file must hold the CA that signed it"
                .to_owned(),
            A::CertificateExpired => "it has expired".to_owned(),
            A::CertificateRevoked => "it is revoked (the server's ssl_crl_file)".to_owned(),
            other => format!(
                "alert {other:?}: check that it is signed by a CA in the server's ssl_ca_file, \
                 valid now, and meant for client authentication"
            ),
        };
        return Some(format!(
            "the server rejected the client certificate {}: {why}",
            sent(c)
        ));
    }
    let db = e.as_db_error()?;
    if db.code().code() != "28000" || !db.message().contains("certificate") {
        return None;
    }
    Some(match client {
        None => format!(
            "the server requires a client certificate (SQLSTATE 28000: {}): set sslcert and sslkey",
            db.message()
        ),
        Some(c) => format!(
            "the server accepted the chain of the client certificate {} but not for this user \
             (SQLSTATE 28000: {}): with `cert` authentication or clientcert=verify-full, the \
             certificate's CN must be the user name, or map to it in pg_ident.conf",
            sent(c),
            db.message()
        ),
    })
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
            take_tls_params("postgres://h/db?sslcrl=c.pem").unsupported,
            Some("sslcrl".into())
        );
    }

    #[test]
    fn client_certificate_params_are_taken() {
        let p = take_tls_params(
            "postgres://u@h/db?sslcert=%2Fc%2Fa.crt&application_name=x&sslkey=k.pem&sslpassword=p%26w",
        );
        assert_eq!(p.rest, "postgres://u@h/db?application_name=x");
        assert_eq!(p.sslcert.as_deref(), Some("/c/a.crt"));
        assert_eq!(p.sslkey.as_deref(), Some("k.pem"));
        assert_eq!(p.sslpassword.as_deref(), Some("p&w"));
        assert_eq!(p.unsupported, None);
        let p = take_tls_params("host=h sslcert=c.pem sslkey='/a b.key' sslpassword=pw");
        assert_eq!(p.rest.trim(), "host=h");
        assert_eq!(p.sslkey.as_deref(), Some("/a b.key"));
    }

    #[test]
    fn client_cert_debug_hides_the_password() {
        let c = ClientCert::new("/c.crt", "/c.key").password("hunter2");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("redacted"),
            "{shown}"
        );
        assert!(c.has_password());
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
