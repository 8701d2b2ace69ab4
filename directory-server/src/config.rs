//! The directory server's configuration file.
//!
//! ```toml
//! [directory]
//! listen = "0.0.0.0:7700"
//! state_dir = "/var/lib/vmsync-directory"
//!
//! [security]
//! secret_file = "/etc/vmsync/cluster.secret"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// The shared secret, trimmed of surrounding ASCII whitespace.
    pub secret: Vec<u8>,
}

/// Why a configuration cannot be used; always names the file, and the key
/// when one is at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: key `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    directory: RawDirectory,
    security: RawSecurity,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirectory {
    listen: String,
    state_dir: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecurity {
    secret_file: PathBuf,
}

impl Config {
    /// Reads and checks the file at `path` (including the secret file).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Checks `text`, the contents of the file at `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let err = |key: &str, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        // toml's messages name the offending key (or the missing one) and
        // the line.
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let listen = raw.directory.listen.parse::<SocketAddr>().map_err(|e| {
            err(
                "directory.listen",
                format!("'{}' is not an IP:PORT address: {e}", raw.directory.listen),
            )
        })?;
        if raw.directory.state_dir.as_os_str().is_empty() {
            return Err(err("directory.state_dir", "must not be empty".into()));
        }
        let file = &raw.security.secret_file;
        let secret = std::fs::read(file).map_err(|e| {
            err(
                "security.secret_file",
                format!("cannot read {}: {e}", file.display()),
            )
        })?;
        let secret = secret.trim_ascii().to_vec();
        // The same rules as the nodes' (one shared check in `protocol`).
        if let Err(weak) = protocol::check_secret(&secret) {
            return Err(err(
                "security.secret_file",
                format!(
                    "the shared secret in {} is refused: {weak}; \
                     make one with `vmsyncctl gen-secret FILE`",
                    file.display()
                ),
            ));
        }
        Ok(Config {
            listen,
            state_dir: raw.directory.state_dir,
            secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/dir.toml"), text)
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "  short \n").unwrap();
        let text = |listen: &str| {
            format!(
                "[directory]\nlisten = \"{listen}\"\nstate_dir = \"/tmp/x\"\n[security]\nsecret_file = \"{}\"\n",
                secret.display()
            )
        };
        let e = parse(&text("nonsense")).unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/dir.toml: key `directory.listen`"),
            "{e}"
        );
        let e = parse(&text("127.0.0.1:7700")).unwrap_err().to_string();
        assert!(e.contains("key `security.secret_file`"), "{e}");
        assert!(e.contains("holds 5 bytes"), "{e}");
        assert!(e.contains(&secret.display().to_string()), "{e}");
        // Long enough but guessable: refused too, naming the file.
        std::fs::write(&secret, "pass1word!pass1word!\n").unwrap();
        let e = parse(&text("127.0.0.1:7700")).unwrap_err().to_string();
        assert!(e.contains("pattern repeated"), "{e}");
        assert!(e.contains(&secret.display().to_string()), "{e}");
        std::fs::write(&secret, "directory-test-secret-0123456789\n").unwrap();
        let config = parse(&text("127.0.0.1:7700")).unwrap();
        assert_eq!(config.secret, b"directory-test-secret-0123456789");
        let e = parse("[directory]\nlisten = \"127.0.0.1:1\"\n[security]\nsecret_file = \"/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("state_dir"), "{e}");
    }
}
