//! TLS to PostgreSQL with libpq's `sslmode` rules.
//!
//! intelmqcbmail connects through libpq, which takes `sslmode`,
//! `sslrootcert`, `sslcert` and `sslkey` from the connection parameters,
//! else from `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`, else
//! from its defaults (`prefer`; `~/.postgresql/root.crt`,
//! `~/.postgresql/postgresql.crt`, `~/.postgresql/postgresql.key` when they
//! exist). An operator's working TLS setup must keep working, so this
//! module resolves the same way and hands the result to tokio-postgres
//! (which knows disable/prefer/require) and a native-tls connector (which
//! does the certificate and host-name checks of `verify-ca`/`verify-full`).
//!
//! As in libpq, a root certificate file that exists makes every TLS mode
//! verify the server's certificate chain (`prefer` and `require` included);
//! only `verify-full` also checks the host name. Not supported: libpq's
//! CRLs (`sslcrl`), encrypted client keys (`sslpassword`), `gssencmode`,
//! `sslnegotiation=direct`, and its key-file permission check.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use postgres_native_tls::MakeTlsConnector;

use crate::config::{DatabaseConfig, RootCert, SslMode};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{var}={value:?} is not one of {}", SslMode::NAMES.join(", "))]
    BadEnv { var: &'static str, value: String },
    #[error(
        "sslmode {mode} needs the CA that signed the server's certificate, and the root \
         certificate file {} does not exist: set database.event.sslrootcert (or \
         PGSSLROOTCERT) to that CA's PEM file, or to \"system\" for the system's trusted roots",
        path.display()
    )]
    NoRootCert { mode: SslMode, path: PathBuf },
    #[error(
        "sslrootcert=system verifies the server against the system's trusted roots and \
         requires sslmode verify-full (libpq's rule), not {0}"
    )]
    SystemNeedsVerifyFull(SslMode),
    #[error("cannot read {what} {}: {reason}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "the client certificate {} has no private key: set database.event.sslkey (or PGSSLKEY)",
        .0.display()
    )]
    NoKey(PathBuf),
    #[error("cannot set up TLS: {0}")]
    Setup(#[from] native_tls::Error),
}

/// The TLS settings in force for one connection attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub mode: SslMode,
    /// Verify the chain against these roots (`None`: no verification).
    pub roots: Option<RootCert>,
    /// Client certificate and key.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl Settings {
    /// Resolves `db`'s settings as libpq does: connection parameter, then
    /// environment (`env`), then defaults under `home`.
    pub fn resolve(
        db: &DatabaseConfig,
        env: impl Fn(&str) -> Option<String>,
        home: Option<&Path>,
    ) -> Result<Settings, TlsError> {
        let env_path = |v: &str| env(v).filter(|s| !s.is_empty()).map(PathBuf::from);
        let default = |f: &str| home.map(|h| h.join(".postgresql").join(f));
        let root = db.sslrootcert.clone().or_else(|| {
            env(ENV_ROOT)
                .filter(|s| !s.is_empty())
                .map(|s| RootCert::parse(&s))
        });
        let mode = match (db.sslmode, env(ENV_MODE).filter(|s| !s.is_empty())) {
            (Some(m), _) => m,
            (None, Some(v)) => SslMode::parse(&v).ok_or(TlsError::BadEnv {
                var: ENV_MODE,
                value: v,
            })?,
            // libpq: sslrootcert=system makes verify-full the default.
            (None, None) if root == Some(RootCert::System) => SslMode::VerifyFull,
            (None, None) => SslMode::Prefer,
        };
        let verifying = matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull);
        let roots = match root {
            Some(RootCert::System) if mode == SslMode::VerifyFull => Some(RootCert::System),
            Some(RootCert::System) if mode == SslMode::Disable => None,
            Some(RootCert::System) => return Err(TlsError::SystemNeedsVerifyFull(mode)),
            Some(RootCert::File(p)) if p.is_file() => Some(RootCert::File(p)),
            Some(RootCert::File(p)) if verifying => {
                return Err(TlsError::NoRootCert { mode, path: p })
            }
            Some(RootCert::File(_)) => None,
            None => match default("root.crt") {
                Some(p) if p.is_file() => Some(RootCert::File(p)),
                p if verifying => {
                    return Err(TlsError::NoRootCert {
                        mode,
                        path: p.unwrap_or_else(|| PathBuf::from("~/.postgresql/root.crt")),
                    })
                }
                _ => None,
            },
        };
        let cert = db
            .sslcert
            .clone()
            .or_else(|| env_path(ENV_CERT))
            .or_else(|| default("postgresql.crt").filter(|p| p.is_file()));
        let key = db
            .sslkey
            .clone()
            .or_else(|| env_path(ENV_KEY))
            .or_else(|| default("postgresql.key"));
        let identity = match (cert, key) {
            (Some(c), Some(k)) if k.is_file() => Some((c, k)),
            (Some(c), _) => return Err(TlsError::NoKey(c)),
            (None, _) => None,
        };
        Ok(Settings {
            mode,
            roots,
            identity,
        })
    }

    /// The settings from the process environment and `$HOME`.
    pub fn from_env(db: &DatabaseConfig) -> Result<Settings, TlsError> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        Settings::resolve(db, |v| std::env::var(v).ok(), home.as_deref())
    }

    /// The connector that makes the TLS session (certificate checks
    /// included); tokio-postgres decides whether to use it.
    ///
    /// Built once per process and kept: building one loads the system's
    /// CA bundle, which OpenSSL 3 parses certificate by certificate (tens
    /// of milliseconds of CPU), and every worker opens two connections.
    /// Built per connection, that was a whole core for a second at every
    /// start, doubled the one-shot's CPU and put the service's first mails
    /// ~1 s late (docs/performance.md, session 6). The key holds the files'
    /// modification times, so a renewed certificate or key is read at the
    /// next connection.
    pub fn connector(&self) -> Result<MakeTlsConnector, TlsError> {
        static CACHE: Cache<MakeTlsConnector> = Cache::new();
        CACHE.get_or_build(self, || self.build_connector())
    }

    fn build_connector(&self) -> Result<MakeTlsConnector, TlsError> {
        let mut b = native_tls::TlsConnector::builder();
        match &self.roots {
            None => {
                b.danger_accept_invalid_certs(true);
            }
            Some(RootCert::System) => {}
            Some(RootCert::File(p)) => {
                // libpq trusts the file's CAs only.
                b.disable_built_in_roots(true);
                let pem = read("root certificate file", p)?;
                let certs =
                    openssl::x509::X509::stack_from_pem(&pem).map_err(|e| TlsError::Read {
                        what: "root certificate file",
                        path: p.clone(),
                        reason: e.to_string(),
                    })?;
                for c in certs {
                    let der = c.to_der().map_err(|e| TlsError::Read {
                        what: "root certificate file",
                        path: p.clone(),
                        reason: e.to_string(),
                    })?;
                    b.add_root_certificate(native_tls::Certificate::from_der(&der)?);
                }
            }
        }
        if self.mode != SslMode::VerifyFull {
            b.danger_accept_invalid_hostnames(true);
        }
        if let Some((cert, key)) = &self.identity {
            let cert_pem = read("client certificate", cert)?;
            // native-tls wants PKCS#8; libpq also takes the traditional
            // "BEGIN RSA PRIVATE KEY" form, so convert.
            let key_pem = read("client key", key)?;
            let pkcs8 = openssl::pkey::PKey::private_key_from_pem(&key_pem)
                .and_then(|k| k.private_key_to_pem_pkcs8())
                .map_err(|e| TlsError::Read {
                    what: "client key",
                    path: key.clone(),
                    reason: format!("not an unencrypted PEM private key ({e})"),
                })?;
            b.identity(native_tls::Identity::from_pkcs8(&cert_pem, &pkcs8)?);
        }
        Ok(MakeTlsConnector::new(b.build()?))
    }

    /// tokio-postgres's mode for the first attempt (`allow` tries without
    /// TLS first, see [`crate::notify::db`]).
    pub fn first_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as T;
        match self.mode {
            SslMode::Disable | SslMode::Allow => T::Disable,
            SslMode::Prefer => T::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => T::Require,
        }
    }
}

/// The last connector built, and what from.
struct Cache<T> {
    slot: Mutex<Option<(CacheKey, T)>>,
}

impl<T: Clone> Cache<T> {
    const fn new() -> Cache<T> {
        Cache {
            slot: Mutex::new(None),
        }
    }

    fn get_or_build<E>(&self, s: &Settings, build: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let key = CacheKey::of(s);
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, c)) = slot.as_ref() {
            if *k == key {
                return Ok(c.clone());
            }
        }
        let built = build()?;
        *slot = Some((key, built.clone()));
        Ok(built)
    }
}

/// What a cached connector was built from.
#[derive(PartialEq, Eq)]
struct CacheKey {
    settings: Settings,
    modified: Vec<Option<SystemTime>>,
}

impl CacheKey {
    fn of(s: &Settings) -> CacheKey {
        let mut files: Vec<&Path> = Vec::new();
        if let Some(RootCert::File(p)) = &s.roots {
            files.push(p);
        }
        if let Some((c, k)) = &s.identity {
            files.push(c);
            files.push(k);
        }
        CacheKey {
            settings: s.clone(),
            modified: files
                .into_iter()
                .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
                .collect(),
        }
    }
}

pub const ENV_MODE: &str = "PGSSLMODE";
pub const ENV_ROOT: &str = "PGSSLROOTCERT";
pub const ENV_CERT: &str = "PGSSLCERT";
pub const ENV_KEY: &str = "PGSSLKEY";

fn read(what: &'static str, p: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(p).map_err(|e| TlsError::Read {
        what,
        path: p.to_path_buf(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn db() -> DatabaseConfig {
        DatabaseConfig {
            name: "d".into(),
            username: "u".into(),
            password: None,
            hosts: vec!["localhost".into()],
            ports: vec![5432],
            sslmode: None,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            target_session_attrs: None,
            additional_directive_where: None,
        }
    }

    fn resolve(
        db: &DatabaseConfig,
        env: &[(&str, &str)],
        home: &Path,
    ) -> Result<Settings, TlsError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::resolve(db, |k| env.get(k).cloned(), Some(home))
    }

    #[test]
    fn libpq_precedence_and_defaults() {
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        // Nothing anywhere: prefer, no verification, no client cert.
        let s = resolve(&db(), &[], h).unwrap();
        assert_eq!(s.mode, SslMode::Prefer);
        assert_eq!(s.roots, None);
        assert_eq!(s.identity, None);
        // The environment, then the config.
        let s = resolve(&db(), &[("PGSSLMODE", "require")], h).unwrap();
        assert_eq!(s.mode, SslMode::Require);
        let mut d = db();
        d.sslmode = Some(SslMode::Disable);
        assert_eq!(
            resolve(&d, &[("PGSSLMODE", "require")], h).unwrap().mode,
            SslMode::Disable
        );
        assert!(matches!(
            resolve(&db(), &[("PGSSLMODE", "sure")], h),
            Err(TlsError::BadEnv { .. })
        ));
        // verify-* without a root certificate: refused, naming the file.
        let e = resolve(&db(), &[("PGSSLMODE", "verify-full")], h).unwrap_err();
        assert!(e.to_string().contains(".postgresql/root.crt"), "{e}");
        // ~/.postgresql/root.crt makes even `prefer` verify (libpq).
        std::fs::create_dir(h.join(".postgresql")).unwrap();
        std::fs::write(h.join(".postgresql/root.crt"), "x").unwrap();
        let s = resolve(&db(), &[], h).unwrap();
        assert_eq!(
            s.roots,
            Some(RootCert::File(h.join(".postgresql/root.crt")))
        );
        // A client certificate without its key is refused.
        std::fs::write(h.join(".postgresql/postgresql.crt"), "x").unwrap();
        assert!(matches!(resolve(&db(), &[], h), Err(TlsError::NoKey(_))));
        std::fs::write(h.join("k"), "x").unwrap();
        let s = resolve(&db(), &[("PGSSLKEY", h.join("k").to_str().unwrap())], h).unwrap();
        assert_eq!(
            s.identity,
            Some((h.join(".postgresql/postgresql.crt"), h.join("k")))
        );
        // sslrootcert=system: verify-full by default, weaker modes refused.
        let s = resolve(
            &db(),
            &[("PGSSLROOTCERT", "system"), ("PGSSLKEY", "/nonexistent")],
            h,
        );
        assert!(matches!(s, Err(TlsError::NoKey(_))));
        std::fs::remove_file(h.join(".postgresql/postgresql.crt")).unwrap();
        let s = resolve(&db(), &[("PGSSLROOTCERT", "system")], h).unwrap();
        assert_eq!(
            (s.mode, s.roots),
            (SslMode::VerifyFull, Some(RootCert::System))
        );
        assert!(matches!(
            resolve(
                &db(),
                &[("PGSSLROOTCERT", "system"), ("PGSSLMODE", "require")],
                h
            ),
            Err(TlsError::SystemNeedsVerifyFull(SslMode::Require))
        ));
    }

    #[test]
    fn a_connector_is_built_once_per_settings_and_again_when_a_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root.crt");
        std::fs::write(&root, "old").unwrap();
        let cache: Cache<u32> = Cache::new();
        let builds = std::cell::Cell::new(0u32);
        let build = || -> Result<u32, ()> {
            builds.set(builds.get() + 1);
            Ok(builds.get())
        };
        let prefer = Settings {
            mode: SslMode::Prefer,
            roots: Some(RootCert::File(root.clone())),
            identity: None,
        };
        assert_eq!(cache.get_or_build(&prefer, build), Ok(1));
        assert_eq!(cache.get_or_build(&prefer, build), Ok(1));
        assert_eq!(
            builds.get(),
            1,
            "same settings, same files: no second build"
        );

        let require = Settings {
            mode: SslMode::Require,
            ..prefer.clone()
        };
        assert_eq!(cache.get_or_build(&require, build), Ok(2));

        // A renewed root certificate: a newer modification time.
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&root)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(cache.get_or_build(&require, build), Ok(3));
        assert_eq!(cache.get_or_build(&require, build), Ok(3));

        // A failed build keeps nothing.
        assert_eq!(cache.get_or_build(&prefer, || Err(())), Err(()));
        assert_eq!(cache.get_or_build(&prefer, build), Ok(4));
    }
}
