//! Client certificates (`sslcert`, `sslkey`, `sslpassword`) against a private PostgreSQL
//! cluster (testkit `PrivateServer`) with `ssl = on` and only
//! `hostssl all all 127.0.0.1/32 cert clientcert=verify-full` in `pg_hba.conf`: the
//! certificate's CN must be the user. Every certificate is made in the test (rcgen): a CA
//! the server trusts, another CA it does not, a server certificate for 127.0.0.1 and
//! localhost, and client certificates for `postgres` and for another user. Key-file errors
//! are checked when the URL is parsed, without a server.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use shardlease::{ClientCert, Error, Member, MemberConfig};
use shardlease_testkit::PrivateServer;

/// A CA: its certificate (PEM) and what signs with it.
fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA")
}

/// A certificate signed by `issuer`: (certificate PEM, key PEM, key as PKCS#8 DER).
fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    cn: &str,
    names: &[&str],
    purpose: ExtendedKeyUsagePurpose,
) -> (String, String, Vec<u8>) {
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![purpose];
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("sign");
    (cert.pem(), key.serialize_pem(), key.serialize_der())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A directory of client files, removed on drop.
struct Files(PathBuf);

impl Files {
    fn new() -> Files {
        let dir = std::env::temp_dir().join(format!(
            "shardlease-client-cert-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Files(dir)
    }

    /// Write `name` with `mode`; returns its path.
    fn write(&self, name: &str, contents: impl AsRef<[u8]>, mode: u32) -> String {
        use std::os::unix::fs::PermissionsExt;
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write a test file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path.display().to_string()
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Encrypt a PKCS#8 key with `password` (PBES2: PBKDF2-SHA256 and AES-256-CBC, as
/// `openssl pkcs8 -topk8 -v2 aes-256-cbc` does).
fn encrypted_pem(pkcs8_der: &[u8], password: &str) -> String {
    use pkcs8::der::pem::LineEnding;
    let info = pkcs8::PrivateKeyInfo::try_from(pkcs8_der).expect("PKCS#8");
    let params = pkcs8::pkcs5::pbes2::Parameters::pbkdf2_sha256_aes256cbc(
        10_000,
        b"saltsaltsaltsalt",
        &[7u8; 16],
    )
    .expect("PBES2 parameters");
    info.encrypt_with_params(params, password)
        .expect("encrypt")
        .to_pem("ENCRYPTED PRIVATE KEY", LineEnding::LF)
        .expect("PEM")
        .to_string()
}

/// The certificates of a test: the trusted CA, an untrusted one, and client files.
struct Pki {
    trusted: CertifiedIssuer<'static, KeyPair>,
    other: CertifiedIssuer<'static, KeyPair>,
    files: Files,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            trusted: ca("shardlease test CA"),
            other: ca("another CA"),
            files: Files::new(),
        };
        pki.files.write("ca.crt", pki.trusted.pem(), 0o644);
        pki
    }

    /// A client certificate for user `cn` signed by the trusted CA (or the other one), its key
    /// written with `mode`: (cert path, key path, key DER).
    fn client(&self, name: &str, cn: &str, trusted: bool, mode: u32) -> (String, String, Vec<u8>) {
        let issuer = if trusted { &self.trusted } else { &self.other };
        let (cert, key, der) = leaf(issuer, cn, &[], ExtendedKeyUsagePurpose::ClientAuth);
        (
            self.files.write(&format!("{name}.crt"), cert, 0o644),
            self.files.write(&format!("{name}.key"), key, mode),
            der,
        )
    }

    /// A private server that accepts only TLS connections with a client certificate of the
    /// trusted CA whose CN is the user.
    fn server(&self) -> PrivateServer {
        let (cert, key, _) = leaf(
            &self.trusted,
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        PrivateServer::builder()
            .conf("ssl = on")
            .conf("ssl_cert_file = 'server.crt'")
            .conf("ssl_key_file = 'server.key'")
            .conf("ssl_ca_file = 'ca.crt'")
            .hba("hostssl all all 127.0.0.1/32 cert clientcert=verify-full")
            .file("server.crt", cert)
            .file("server.key", key)
            .file("ca.crt", self.trusted.pem())
            .start()
            .expect("a private PostgreSQL with ssl = on")
    }

    /// The server's URL (verify-full against the trusted CA) with `extra` parameters.
    fn url(&self, server: &PrivateServer, extra: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}{extra}",
            server.port(),
            self.files.path("ca.crt")
        )
    }
}

fn url_error(url: &str) -> String {
    match shardlease::parse_database_url(url) {
        Ok(_) => panic!("{url} must be refused"),
        Err(Error::Url(m)) => m,
        Err(e) => panic!("{url}: expected Error::Url, got {e:?}"),
    }
}

#[tokio::test]
async fn an_accepted_certificate_connects_with_a_plain_or_an_encrypted_key() {
    let pki = Pki::new();
    let server = pki.server();
    let (cert, key, der) = pki.client("pg", "postgres", true, 0o600);

    let pg =
        shardlease::parse_database_url(&pki.url(&server, &format!("&sslcert={cert}&sslkey={key}")))
            .expect("the URL with a client certificate parses");
    assert_eq!(
        pg.client_cert().map(|c| c.cert.display().to_string()),
        Some(cert.clone())
    );
    let mut c = shardlease::connect_client(&pg, "client-cert")
        .await
        .expect("an accepted client certificate connects");
    let row = c
        .query_one(
            "SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    assert!(row.get::<_, bool>(0), "the connection uses TLS");
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("/CN=postgres")
    );

    // The member's own connections present it too.
    shardlease::migrate(&mut c).await.expect("migrate over TLS");
    let member = Member::join(
        &pg,
        MemberConfig::new("g", "m").heartbeat(Duration::from_millis(200)),
    )
    .await
    .expect("a member joins over a client-certificate connection");
    member.leave().await.expect("leave");

    // The same key encrypted as PKCS#8, with its password; the password is never shown.
    let enc = pki
        .files
        .write("pg-enc.key", encrypted_pem(&der, "s3cret pass"), 0o600);
    let pg = shardlease::parse_database_url(&pki.url(
        &server,
        &format!("&sslcert={cert}&sslkey={enc}&sslpassword=s3cret%20pass"),
    ))
    .expect("an encrypted key with its password parses");
    assert!(
        !format!("{pg:?}").contains("s3cret"),
        "the password is never shown: {pg:?}"
    );
    shardlease::connect_client(&pg, "client-cert-encrypted")
        .await
        .expect("an encrypted key with sslpassword connects");

    // The library API says the same without a URL.
    let mut cfg = shardlease::tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(server.port())
        .user("postgres")
        .dbname("postgres");
    let pg = shardlease::DbConfig::from(cfg)
        .with_tls(
            shardlease::TlsMode::VerifyFull,
            Some(shardlease::RootCert::parse(&pki.files.path("ca.crt"))),
        )
        .and_then(|db| {
            db.with_client_cert(Some(ClientCert::new(&cert, &enc).password("s3cret pass")))
        })
        .expect("DbConfig with a client certificate");
    shardlease::connect_client(&pg, "client-cert-api")
        .await
        .expect("the API's client certificate connects");
}

#[tokio::test]
async fn the_server_rejects_another_cas_certificate_the_wrong_user_and_none() {
    let pki = Pki::new();
    let server = pki.server();
    let connect = |extra: String| {
        let url = pki.url(&server, &extra);
        async move {
            let pg = shardlease::parse_database_url(&url).expect("the URL parses");
            match shardlease::connect_client(&pg, "client-cert").await {
                Ok(_) => panic!("{url} must be rejected"),
                Err(e) => e,
            }
        }
    };

    let (cert, key, _) = pki.client("foreign", "postgres", false, 0o600);
    let err = connect(format!("&sslcert={cert}&sslkey={key}")).await;
    let msg = err.to_string();
    eprintln!("another CA's certificate: {msg}");
    assert!(matches!(err, Error::Tls { .. }), "{err:?}");
    assert!(
        msg.contains("rejected the client certificate")
            && msg.contains(&cert)
            && msg.contains("ssl_ca_file"),
        "says the server rejected our certificate, names it and the server setting: {msg}"
    );

    let (cert, key, _) = pki.client("mallory", "mallory", true, 0o600);
    let err = connect(format!("&sslcert={cert}&sslkey={key}")).await;
    let msg = err.to_string();
    eprintln!("a certificate for another user: {msg}");
    assert!(matches!(err, Error::Tls { .. }), "{err:?}");
    assert!(
        msg.contains("certificate authentication failed for user \"postgres\"")
            && msg.contains("CN")
            && msg.contains(&cert),
        "quotes the server, names the certificate and says the CN must be the user: {msg}"
    );

    let err = connect(String::new()).await;
    let msg = err.to_string();
    eprintln!("no client certificate: {msg}");
    assert!(
        msg.contains("sslcert") && msg.contains("sslkey"),
        "says to give sslcert and sslkey: {msg}"
    );
}

#[tokio::test]
async fn key_file_problems_are_clear_errors_naming_the_file() {
    let pki = Pki::new();
    let base = "postgres://postgres@127.0.0.1:1/postgres?sslmode=verify-full";
    let (cert, key, der) = pki.client("pg", "postgres", true, 0o600);

    let missing = pki.files.path("missing.key");
    let m = url_error(&format!("{base}&sslcert={cert}&sslkey={missing}"));
    assert!(m.contains(&missing) && m.contains("cannot be read"), "{m}");

    let m = url_error(&format!(
        "{base}&sslcert={}&sslkey={key}",
        pki.files.path("missing.crt")
    ));
    assert!(
        m.contains("missing.crt") && m.contains("cannot be read"),
        "{m}"
    );

    let open = pki
        .files
        .write("open.key", std::fs::read(&key).unwrap(), 0o644);
    let m = url_error(&format!("{base}&sslcert={cert}&sslkey={open}"));
    assert!(
        m.contains(&open) && m.contains("group or world access") && m.contains("0644"),
        "{m}"
    );

    let enc = pki
        .files
        .write("enc.key", encrypted_pem(&der, "right"), 0o600);
    let m = url_error(&format!("{base}&sslcert={cert}&sslkey={enc}"));
    assert!(
        m.contains(&enc) && m.contains("encrypted") && m.contains("sslpassword"),
        "{m}"
    );
    let m = url_error(&format!(
        "{base}&sslcert={cert}&sslkey={enc}&sslpassword=not-the-pw-42"
    ));
    assert!(m.contains(&enc) && m.contains("cannot be decrypted"), "{m}");
    assert!(
        !m.contains("not-the-pw-42"),
        "the password is never shown: {m}"
    );

    let traditional = pki.files.write(
        "traditional.key",
        "-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,00000000000000000000000000000000\n\nAAAA\n-----END EC PRIVATE KEY-----\n",
        0o600,
    );
    let m = url_error(&format!(
        "{base}&sslcert={cert}&sslkey={traditional}&sslpassword=x"
    ));
    assert!(
        m.contains("traditional format") && m.contains("openssl pkcs8 -topk8"),
        "{m}"
    );

    let garbage = pki.files.write("garbage.key", "not a key\n", 0o600);
    let m = url_error(&format!("{base}&sslcert={cert}&sslkey={garbage}"));
    assert!(
        m.contains(&garbage) && m.contains("no usable private key"),
        "{m}"
    );

    let (_, other_key, _) = pki.client("other", "postgres", true, 0o600);
    let pg = shardlease::parse_database_url(&format!("{base}&sslcert={cert}&sslkey={other_key}"))
        .expect("both files are valid on their own");
    let err = shardlease::connect_client(&pg, "mismatch")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("is not the key of sslcert"),
        "a key of another certificate is named as such: {err}"
    );

    // Half a pair, or a client certificate without TLS.
    let m = url_error(&format!("{base}&sslcert={cert}"));
    assert!(m.contains("without sslkey"), "{m}");
    let m = url_error(&format!("{base}&sslkey={key}"));
    assert!(m.contains("without sslcert"), "{m}");
    let m = url_error(&format!("{base}&sslpassword=x"));
    assert!(m.contains("sslpassword"), "{m}");
    let m = url_error(&format!(
        "postgres://postgres@127.0.0.1:1/postgres?sslcert={cert}&sslkey={key}"
    ));
    assert!(
        m.contains("sslmode=prefer") && m.contains("verify-full"),
        "{m}"
    );

    // A key that vanishes after start-up: the connection attempt names it.
    let moving = pki
        .files
        .write("moving.key", std::fs::read(&key).unwrap(), 0o600);
    let pg = shardlease::parse_database_url(&format!("{base}&sslcert={cert}&sslkey={moving}"))
        .expect("parses while the key exists");
    std::fs::remove_file(Path::new(&moving)).unwrap();
    let err = shardlease::connect_client(&pg, "vanished")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Tls { .. }), "{err:?}");
    assert!(err.to_string().contains(&moving), "{err}");
}

/// Run `openssl` with `args` in `dir`; `false` when there is no openssl binary.
fn openssl(dir: &Path, args: &[&str]) -> bool {
    match std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => panic!("openssl {args:?}: {e}"),
        Ok(out) => {
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            true
        }
    }
}

#[tokio::test]
async fn keys_encrypted_by_openssl_load_and_the_traditional_format_says_how_to_convert() {
    let files = Files::new();
    let dir = files.0.clone();
    if !openssl(&dir, &["version"]) {
        eprintln!("skipped: no openssl binary to write keys with (apt-get install openssl)");
        return;
    }
    // What users have: OpenSSL 3 writes encrypted PKCS#8 for genrsa and genpkey, and the
    // traditional format for `openssl ec -aes256`.
    for args in [
        &[
            "genrsa",
            "-aes256",
            "-passout",
            "pass:pw 1",
            "-out",
            "rsa.key",
            "2048",
        ][..],
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-aes256",
            "-pass",
            "pass:pw 1",
            "-out",
            "ec.key",
        ],
        &[
            "ec",
            "-in",
            "ec.key",
            "-passin",
            "pass:pw 1",
            "-aes256",
            "-passout",
            "pass:pw 1",
            "-out",
            "ec-traditional.key",
        ],
    ] {
        openssl(&dir, args);
    }
    for key in ["rsa", "ec"] {
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                &format!("{key}.key"),
                "-passin",
                "pass:pw 1",
                "-subj",
                "/CN=postgres",
                "-days",
                "1",
                "-out",
                &format!("{key}.crt"),
            ],
        );
    }
    use std::os::unix::fs::PermissionsExt;
    for key in ["rsa.key", "ec.key", "ec-traditional.key"] {
        std::fs::set_permissions(dir.join(key), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // Port 1: nothing listens, so the connection attempt gets as far as loading the key
    // into the TLS connector and then fails to connect (Error::Connect, not Error::Tls).
    let url = |cert: &str, key: &str| {
        format!(
            "postgres://postgres@127.0.0.1:1/postgres?sslmode=require&sslcert={}&sslkey={}&sslpassword=pw%201",
            files.path(cert),
            files.path(key)
        )
    };
    for key in ["rsa", "ec"] {
        let pg = shardlease::parse_database_url(&url(&format!("{key}.crt"), &format!("{key}.key")))
            .unwrap_or_else(|e| panic!("openssl's encrypted {key} key loads: {e}"));
        let err = shardlease::connect_client(&pg, "openssl-key")
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Connect { .. }),
            "the {key} key and certificate go together: {err:?}"
        );
    }
    let m = url_error(&url("ec.crt", "ec-traditional.key"));
    assert!(m.contains("traditional format"), "{m}");
    // The conversion the message suggests works.
    openssl(
        &dir,
        &[
            "pkcs8",
            "-topk8",
            "-v2",
            "aes-256-cbc",
            "-in",
            "ec-traditional.key",
            "-passin",
            "pass:pw 1",
            "-passout",
            "pass:pw 1",
            "-out",
            "key.p8",
        ],
    );
    std::fs::set_permissions(dir.join("key.p8"), std::fs::Permissions::from_mode(0o600)).unwrap();
    shardlease::parse_database_url(&url("ec.crt", "key.p8")).expect("the converted key loads");
}
