//! Secrets (Consul ACL tokens) that can never reach a log line, metric or error message.

use crate::telemetry::Chain;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read token file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {} is empty", path.display())]
    Empty { path: PathBuf },
}

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// Reads a token file, trimming the trailing newline editors and Secrets mounts add.
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(SecretError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Self(token.to_string()))
    }

    /// The only way to the value; call sites are easy to audit.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a token comes from. A file is re-read when it changes (a rotated Kubernetes Secret
/// swaps the mounted file), so rotation needs no restart.
#[derive(Clone)]
pub enum TokenSource {
    None,
    Fixed(Secret),
    File(FileSecret),
}

impl TokenSource {
    pub fn current(&self) -> Option<Secret> {
        match self {
            TokenSource::None => None,
            TokenSource::Fixed(secret) => Some(secret.clone()),
            TokenSource::File(file) => Some(file.current()),
        }
    }

    pub fn is_some(&self) -> bool {
        !matches!(self, TokenSource::None)
    }
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::None => f.write_str("TokenSource::None"),
            TokenSource::Fixed(_) => f.write_str("TokenSource::Fixed(<redacted>)"),
            TokenSource::File(file) => write!(f, "TokenSource::File({})", file.path.display()),
        }
    }
}

/// A secret file and the value last read from it.
pub struct FileSecret {
    path: PathBuf,
    state: Mutex<FileState>,
}

struct FileState {
    stamp: Option<(SystemTime, u64)>,
    secret: Secret,
}

/// A copy follows the same file on its own from the value read so far.
impl Clone for FileSecret {
    fn clone(&self) -> Self {
        let state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Self {
            path: self.path.clone(),
            state: Mutex::new(FileState {
                stamp: state.stamp,
                secret: state.secret.clone(),
            }),
        }
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl FileSecret {
    /// The first read must succeed: a missing or empty token file is a start-up error.
    pub fn open(path: &Path) -> Result<Self, SecretError> {
        let stamp = stamp(path);
        let secret = Secret::from_file(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            state: Mutex::new(FileState { stamp, secret }),
        })
    }

    /// The current value: re-read when the file's modification time or size changed. A
    /// failed re-read (mid-rotation, say) keeps the last good value.
    pub fn current(&self) -> Secret {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = stamp(&self.path);
        if now.is_some() && now != state.stamp {
            match Secret::from_file(&self.path) {
                Ok(secret) => {
                    if secret != state.secret {
                        tracing::info!(file = %self.path.display(), "token file changed; using the new token");
                    }
                    state.secret = secret;
                    state.stamp = now;
                }
                Err(e) => {
                    tracing::warn!(error = %Chain(&e), "cannot re-read token file; keeping the previous token")
                }
            }
        }
        state.secret.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_formats_the_value() {
        let s = Secret::new("s3cr3t-token");
        assert!(!format!("{s:?} {s} {:?}", Some(&s)).contains("s3cr3t"));
        assert_eq!(s.expose(), "s3cr3t-token");
    }

    #[test]
    fn reads_and_trims_files() {
        let dir = std::env::temp_dir().join(format!("workersd-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "abc\n").unwrap();
        assert_eq!(Secret::from_file(&file).unwrap().expose(), "abc");
        std::fs::write(&file, "\n").unwrap();
        assert!(matches!(
            Secret::from_file(&file),
            Err(SecretError::Empty { .. })
        ));
        let missing = Secret::from_file(&dir.join("missing")).unwrap_err();
        assert!(matches!(missing, SecretError::Read { .. }), "{missing}");
        assert!(missing.to_string().contains("missing"), "{missing}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn file_tokens_follow_rotation_and_survive_a_bad_rewrite() {
        let dir = std::env::temp_dir().join(format!("workersd-rotate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "first\n").unwrap();
        let source = TokenSource::File(FileSecret::open(&file).unwrap());
        assert_eq!(source.current().unwrap().expose(), "first");
        std::fs::write(&file, "second-token\n").unwrap();
        assert_eq!(source.current().unwrap().expose(), "second-token");
        std::fs::write(&file, "").unwrap();
        assert_eq!(
            source.current().unwrap().expose(),
            "second-token",
            "an empty rewrite is ignored"
        );
        assert!(!format!("{source:?}").contains("second"));
        std::fs::remove_dir_all(dir).unwrap();
        assert!(FileSecret::open(&file).is_err());
    }
}
