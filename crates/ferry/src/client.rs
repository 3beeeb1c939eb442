//! The HTTP client: where ferryd is, the token, and typed calls.

use std::path::PathBuf;

use anyhow::{Context, bail};
use ferry_api::ApiError;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// An API answer that was not a success: the CLI exits 1 with its message.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: StatusCode,
    pub body: ApiError,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.body.error)?;
        if let Some(field) = &self.body.field {
            write!(f, " (field {field})")?;
        }
        write!(f, " [HTTP {}]", self.status.as_u16())
    }
}

impl std::error::Error for ApiFailure {}

#[derive(Debug, Deserialize, Default)]
struct FileConfig {
    url: Option<String>,
    token: Option<String>,
}

pub struct Client {
    http: reqwest::Client,
    pub url: String,
    token: String,
}

fn config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("ferry").join("config.toml"))
}

impl Client {
    /// Flags first, then `FERRY_URL`/`FERRY_TOKEN`, then the configuration
    /// file written by `ferryd init` (`FERRY_CONFIG` or
    /// `~/.config/ferry/config.toml`).
    pub fn from_env(url: Option<String>, token: Option<String>) -> anyhow::Result<Client> {
        let file: FileConfig = match config_path() {
            Some(p) if p.exists() => {
                let text = std::fs::read_to_string(&p)
                    .with_context(|| format!("cannot read {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("invalid {}", p.display()))?
            }
            _ => FileConfig::default(),
        };
        let url = url
            .or_else(|| std::env::var("FERRY_URL").ok())
            .or(file.url)
            .context("no ferryd to talk to: set FERRY_URL (or --url), or run `ferryd init`")?;
        let token = token
            .or_else(|| std::env::var("FERRY_TOKEN").ok())
            .or(file.token)
            .context("no API token: set FERRY_TOKEN (or --token), or run `ferryd init`")?;
        Ok(Client {
            http: reqwest::Client::new(),
            url: url.trim_end_matches('/').to_string(),
            token,
        })
    }

    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token)
    }

    async fn send<T: DeserializeOwned>(&self, rb: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = rb
            .send()
            .await
            .with_context(|| format!("cannot reach ferryd at {}", self.url))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            let body = serde_json::from_str(&text).unwrap_or(ApiError {
                error: text.trim().to_string(),
                field: None,
            });
            return Err(ApiFailure { status, body }.into());
        }
        let text = if text.is_empty() { "null" } else { &text };
        serde_json::from_str(text).with_context(|| format!("unexpected answer from ferryd: {text}"))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.request(Method::GET, path)).await
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &Value) -> anyhow::Result<T> {
        self.send(self.request(Method::POST, path).json(body)).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send::<Value>(self.request(Method::DELETE, path))
            .await
            .map(drop)
    }
}

/// Parses a size: bytes, or with a K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1u64 << 40,
                _ => bail!("size {s:?}: unknown suffix {c} (use K, M, G or T)"),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("size {s:?} is not a number with an optional K/M/G/T"))?;
    n.checked_mul(mult)
        .with_context(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
