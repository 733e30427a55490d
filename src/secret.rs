//! Secrets (Consul ACL tokens) that can never reach a log line, metric or error message.

use std::fmt;
use std::path::Path;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// Reads a token file, trimming the trailing newline editors and Secrets mounts add.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(format!("token file {} is empty", path.display()));
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
        assert!(Secret::from_file(&file).unwrap_err().contains("empty"));
        assert!(Secret::from_file(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
