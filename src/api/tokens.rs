//! Admin tokens: who may write the config and feed events. Several may be
//! valid at once, so a token can be rotated without a restart or a window
//! in which writers are refused: add the new one, move the writers over,
//! remove the old one.
//!
//! Sources, all merged:
//! - `QUOTAFLOW_ADMIN_TOKEN`: one token, or several separated by commas;
//! - `server.admin_tokens_file`: one token a line, `id:token` to give it a
//!   name for the logs (else `file-N`), `#` comments; read again whenever
//!   its modification time changes, so rotating is editing the file (or
//!   updating the Kubernetes Secret it is mounted from).
//!
//! Tokens are compared in constant time and trimmed of white space; logs
//! name a token by its id, never by its value.

use std::path::PathBuf;
use std::time::SystemTime;

use parking_lot::Mutex;
use subtle::ConstantTimeEq;

/// One valid token and the name logs give it.
#[derive(Clone)]
struct Token {
    id: String,
    secret: String,
}

/// Every token valid now.
pub struct AdminTokens {
    from_env: Vec<Token>,
    file: Option<PathBuf>,
    /// The file's tokens as last read, and the modification time they
    /// were read at.
    from_file: Mutex<(Option<SystemTime>, Vec<Token>)>,
}

impl AdminTokens {
    /// Tokens from the environment variable's value (if any) and `file`.
    pub fn new(env_value: Option<&str>, file: Option<PathBuf>) -> Self {
        let from_env = env_value
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .enumerate()
            .map(|(i, t)| Token {
                id: format!("env-{}", i + 1),
                secret: t.to_owned(),
            })
            .collect();
        let tokens = Self {
            from_env,
            file,
            from_file: Mutex::new((None, Vec::new())),
        };
        tokens.refresh();
        tokens
    }

    /// Whether any token is configured (else writes are local-only).
    pub fn any(&self) -> bool {
        self.refresh();
        !self.from_env.is_empty() || !self.from_file.lock().1.is_empty()
    }

    /// The id of the token `presented` matches, if any. Every token is
    /// compared, so timing tells nothing of which one came close.
    pub fn check(&self, presented: &str) -> Option<String> {
        self.refresh();
        let presented = presented.trim().as_bytes();
        let file = self.from_file.lock();
        let mut found = None;
        for t in self.from_env.iter().chain(file.1.iter()) {
            if bool::from(t.secret.as_bytes().ct_eq(presented)) && found.is_none() {
                found = Some(t.id.clone());
            }
        }
        found
    }

    /// Read the file again if it changed since it was last read. An
    /// unreadable file keeps the tokens last read (logged), so a
    /// half-written Secret update does not lock every writer out.
    fn refresh(&self) {
        let Some(path) = &self.file else { return };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut cached = self.from_file.lock();
        if modified.is_some() && cached.0 == modified {
            return;
        }
        match std::fs::read_to_string(path) {
            Ok(text) => {
                *cached = (modified, parse_file(&text));
                tracing::info!(
                    event = "admin_tokens_loaded",
                    file = %path.display(),
                    tokens = cached.1.len(),
                    "admin tokens read"
                );
            }
            Err(e) => {
                if cached.0.is_some() || modified.is_none() {
                    tracing::error!(event = "admin_tokens_unreadable", file = %path.display(), error = %e, "cannot read the admin tokens file; keeping the tokens last read");
                }
                cached.0 = modified;
            }
        }
    }
}

fn parse_file(text: &str) -> Vec<Token> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .enumerate()
        .map(|(i, line)| match line.split_once(':') {
            Some((id, secret)) if !id.trim().is_empty() && !secret.trim().is_empty() => Token {
                id: id.trim().to_owned(),
                secret: secret.trim().to_owned(),
            },
            _ => Token {
                id: format!("file-{}", i + 1),
                secret: line.to_owned(),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_tokens_from_the_environment() {
        let t = AdminTokens::new(Some(" alpha , beta\n"), None);
        assert!(t.any());
        assert_eq!(t.check("alpha").as_deref(), Some("env-1"));
        assert_eq!(t.check("beta\n").as_deref(), Some("env-2"));
        assert_eq!(t.check("gamma"), None);
        assert!(!AdminTokens::new(Some(" , "), None).any());
        assert!(!AdminTokens::new(None, None).any());
    }

    #[test]
    fn a_tokens_file_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# writers\nci:old-secret\nplain-secret\n").unwrap();
        let t = AdminTokens::new(None, Some(path.clone()));
        assert_eq!(t.check("old-secret").as_deref(), Some("ci"));
        assert_eq!(t.check("plain-secret").as_deref(), Some("file-2"));
        // Rotate: the new token in, the old one out, no restart.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "ci:new-secret\n").unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(later))
            .unwrap();
        assert_eq!(t.check("new-secret").as_deref(), Some("ci"));
        assert_eq!(t.check("old-secret"), None);
        // A vanished file keeps what was read last.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(t.check("new-secret").as_deref(), Some("ci"));
    }
}
