//! Salesforce login: the three OAuth grants a daemon can use (JWT bearer, client credentials,
//! refresh token), all a form POST to `{login_url}/services/oauth2/token`.
//!
//! Owns the credentials (held as [`SecretString`], never printed) and turns token-endpoint
//! refusals into [`ConnectorError::Auth`] with a hint naming the setting to fix. A rotated refresh
//! token is kept in the state file (`salesforce.refresh_token`) and read back from there before
//! every later login, because the configured one stops working once Salesforce rotates it, and
//! so does the one this process last saw once another process sharing the state file (a
//! standby's "Check live", `check`, `why --live`) logs in and rotates it.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::config::{ConfigError, SalesforceAuth, SalesforceSettings};
use crate::connectors::ConnectorError;

use super::{API, SalesforceConnector, excerpt};

/// The kv key holding the newest refresh token Salesforce issued (a secret: never logged).
pub(super) const REFRESH_TOKEN_KEY: &str = "salesforce.refresh_token";

/// The JWT audience of production orgs (and Developer Edition, and any My Domain of them).
pub(super) const PRODUCTION_AUDIENCE: &str = "https://login.salesforce.com";
/// The JWT audience of sandboxes, whatever host the token is requested from.
pub(super) const SANDBOX_AUDIENCE: &str = "https://test.salesforce.com";

/// The JWT `aud` Salesforce expects for the org `login_url` points at. It is *not* the token
/// host: an assertion POSTed to a My Domain (`https://acme.my.salesforce.com`) still needs
/// `https://login.salesforce.com`, or `https://test.salesforce.com` for sandboxes (see
/// [`is_sandbox_host`]); a My Domain `aud` is refused with `invalid_grant: audience is invalid`
/// (reference §a1). Anything else, a simulator on loopback included, counts as production.
/// `salesforce.jwt_audience` overrides this (Experience Cloud sites, hosts a URL cannot tell).
pub(super) fn jwt_audience_for(login_url: &url::Url) -> &'static str {
    let host = login_url
        .host_str()
        .unwrap_or("")
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if is_sandbox_host(&host) {
        SANDBOX_AUDIENCE
    } else {
        PRODUCTION_AUDIENCE
    }
}

/// Whether a (lower-case) host is a sandbox's, by the rules Salesforce's own CLI used to decide
/// the JWT audience (sfdx-core `SfdcUrl.isSandboxUrl`), anchored at the end of the host:
/// - `test.salesforce.com`;
/// - enhanced domains: `*.sandbox.my.salesforce.com` (and `.mil`);
/// - sandbox My Domains without enhanced domains: a `--` before `.my.salesforce.com`
///   (`acme--uat.my.salesforce.com`, `acme--uat.cs42.my.salesforce.com`; a production My
///   Domain name cannot hold `--`);
/// - CS instances: `cs<digits>.salesforce.com`, `*.cs<digits>.my.salesforce.com`,
///   `cs<digits>.force.com`;
/// - Hyperforce (falcon) sandbox instances: `usa2s.sfdc-<x>.salesforce.com` (or `.force.com`).
fn is_sandbox_host(host: &str) -> bool {
    let labels: Vec<&str> = host.split('.').collect();
    let cs_instance = |l: &str| {
        l.strip_prefix("cs")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    // `[a-z]{3}[0-9]+s`, at the end of the label.
    let falcon_sandbox = |l: &str| {
        l.strip_suffix('s').is_some_and(|rest| {
            let letters = rest.trim_end_matches(|c: char| c.is_ascii_digit());
            letters.len() < rest.len()
                && letters
                    .bytes()
                    .rev()
                    .take(3)
                    .filter(u8::is_ascii_lowercase)
                    .count()
                    == 3
        })
    };
    let on_cs_instance = labels.iter().enumerate().any(|(i, l)| {
        let rest = labels[i + 1..].join(".");
        cs_instance(l)
            && matches!(
                rest.as_str(),
                "salesforce.com" | "my.salesforce.com" | "force.com"
            )
    });
    let on_falcon_sandbox = (host.ends_with(".salesforce.com") || host.ends_with(".force.com"))
        && labels
            .windows(2)
            .any(|w| falcon_sandbox(w[0]) && w[1].starts_with("sfdc-"));
    host == "test.salesforce.com"
        || host.ends_with(".sandbox.my.salesforce.com")
        || host.ends_with(".sandbox.my.salesforce.mil")
        || host
            .strip_suffix(".my.salesforce.com")
            .is_some_and(|name| name.contains("--"))
        || on_cs_instance
        || on_falcon_sandbox
}

/// What the configured grant needs, secrets resolved at start-up.
pub(super) enum Credentials {
    Jwt {
        username: String,
        key: Box<jsonwebtoken::EncodingKey>,
    },
    Client {
        secret: SecretString,
    },
    RefreshToken {
        secret: SecretString,
        configured: SecretString,
    },
}

impl Credentials {
    pub(super) fn from_settings(s: &SalesforceSettings) -> Result<Credentials, ConfigError> {
        Ok(match s.auth {
            SalesforceAuth::Jwt => {
                let pem = s.private_key_source.resolve("salesforce.private_key")?;
                let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.expose_secret().as_bytes())
                    .map_err(|_| {
                    ConfigError::new(
                        "salesforce.private_key",
                        "is not an RSA private key in PEM form",
                    )
                })?;
                Credentials::Jwt {
                    username: s.username.clone().unwrap_or_default(),
                    key: Box::new(key),
                }
            }
            SalesforceAuth::ClientCredentials => Credentials::Client {
                secret: s.client_secret_source.resolve("salesforce.client_secret")?,
            },
            SalesforceAuth::RefreshToken => Credentials::RefreshToken {
                secret: s.client_secret_source.resolve("salesforce.client_secret")?,
                configured: s.refresh_token_source.resolve("salesforce.refresh_token")?,
            },
        })
    }

    fn hint(&self) -> &'static str {
        match self {
            Credentials::Jwt { .. } => {
                "check salesforce.username, salesforce.client_id, salesforce.private_key_file (the key whose certificate is on the app), that the app is pre-authorised for the user, and (on \"audience is invalid\") salesforce.jwt_audience: https://login.salesforce.com for production, https://test.salesforce.com for sandboxes"
            }
            Credentials::Client { .. } => {
                "check salesforce.client_id, salesforce.client_secret, that the app has a Run As user, and that salesforce.login_url is the org's My Domain"
            }
            Credentials::RefreshToken { .. } => {
                "check salesforce.client_id, salesforce.client_secret and salesforce.refresh_token (it may have been revoked or rotated; obtain a new one)"
            }
        }
    }
}

/// A logged-in session. `generation` tells a caller whose token failed whether someone else
/// already logged in again.
#[derive(Clone)]
pub(super) struct Session {
    pub access_token: SecretString,
    pub instance_url: String,
    pub generation: u64,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: SecretString,
    instance_url: String,
    #[serde(default)]
    refresh_token: Option<SecretString>,
}

#[derive(Deserialize)]
struct TokenError {
    error: String,
    #[serde(default)]
    error_description: String,
}

/// Why a token request failed. `invalid_grant` says Salesforce refused the grant itself (for
/// a refresh token: revoked, or rotated out, possibly by another process sharing the state).
struct TokenFailure {
    error: ConnectorError,
    invalid_grant: bool,
}

impl TokenFailure {
    fn other(error: ConnectorError) -> TokenFailure {
        TokenFailure {
            error,
            invalid_grant: false,
        }
    }
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
}

impl SalesforceConnector {
    /// The current session, logging in if there is none.
    pub(super) async fn session(&self) -> Result<Session, ConnectorError> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let s = self.login(0).await?;
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Logs in again after `failed` was refused, unless another task already did.
    pub(super) async fn relogin(&self, failed: u64) -> Result<Session, ConnectorError> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| s.generation != failed) {
            return Ok(s.clone());
        }
        tracing::info!("salesforce session expired; logging in again");
        *slot = None;
        let s = self.login(failed).await?;
        *slot = Some(s.clone());
        Ok(s)
    }

    async fn login(&self, previous: u64) -> Result<Session, ConnectorError> {
        let s = &self.settings;
        let mut form: Vec<(&str, String)> = Vec::new();
        match &self.creds {
            Credentials::Jwt { username, key } => {
                let claims = Claims {
                    iss: &s.client_id,
                    sub: username,
                    aud: &self.jwt_audience,
                    exp: jsonwebtoken::get_current_timestamp() + 180,
                };
                let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
                let assertion = jsonwebtoken::encode(&header, &claims, key).map_err(|e| {
                    ConnectorError::Auth {
                        api: API,
                        message: format!("cannot sign the JWT assertion: {e}"),
                        hint: "check salesforce.private_key_file".into(),
                    }
                })?;
                form.push((
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:jwt-bearer".into(),
                ));
                form.push(("assertion", assertion));
            }
            Credentials::Client { secret } => {
                form.push(("grant_type", "client_credentials".into()));
                form.push(("client_id", s.client_id.clone()));
                form.push(("client_secret", secret.expose_secret().to_owned()));
            }
            Credentials::RefreshToken { secret, configured } => {
                let answer = self.refresh_token_login(secret, configured).await?;
                return Ok(self.session_from(answer, previous).await);
            }
        }
        let answer = self.request_token(&form).await.map_err(|f| f.error)?;
        Ok(self.session_from(answer, previous).await)
    }

    /// The refresh-token grant. The token is read afresh before every login (see
    /// [`Self::current_refresh_token`]): another process sharing the state file (a standby's
    /// "Check live", `check`, `why --live`) may have rotated it since this one last logged in,
    /// leaving the token this process last saw invalid. If Salesforce still answers
    /// `invalid_grant`, another process may have rotated the token between our read and our
    /// POST: the stored token is read once more and, if it changed, tried once.
    async fn refresh_token_login(
        &self,
        secret: &SecretString,
        configured: &SecretString,
    ) -> Result<TokenAnswer, ConnectorError> {
        let mut token = self.current_refresh_token(configured).await;
        let mut retried = false;
        loop {
            let form: Vec<(&str, String)> = vec![
                ("grant_type", "refresh_token".into()),
                ("client_id", self.settings.client_id.clone()),
                ("client_secret", secret.expose_secret().to_owned()),
                ("refresh_token", token.expose_secret().to_owned()),
            ];
            let failure = match self.request_token(&form).await {
                Ok(answer) => return Ok(answer),
                Err(f) => f,
            };
            if !failure.invalid_grant {
                return Err(failure.error);
            }
            self.forget_unsaved_refresh_token(&token).await;
            if !retried
                && let Some(newer) = self.stored_refresh_token().await
                && newer.expose_secret() != token.expose_secret()
            {
                tracing::info!(
                    "salesforce refused the refresh token; another process stored a newer one, retrying with it"
                );
                retried = true;
                token = newer;
                continue;
            }
            return Err(failure.error);
        }
    }

    /// POSTs one grant to the token endpoint.
    async fn request_token(&self, form: &[(&str, String)]) -> Result<TokenAnswer, TokenFailure> {
        let url = format!(
            "{}/services/oauth2/token",
            self.settings.login_url.trim_end_matches('/')
        );
        self.limiter.acquire().await;
        let resp = self.client.post(&url).form(form).send().await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                crate::metrics::record_request(API, None);
                return Err(TokenFailure::other(ConnectorError::Transient {
                    api: API,
                    message: format!("login request failed: {}", e.without_url()),
                }));
            }
        };
        let status = resp.status();
        crate::metrics::record_request(API, Some(status.as_u16()));
        let body = resp.text().await.unwrap_or_default();
        if status.is_server_error() {
            return Err(TokenFailure::other(ConnectorError::Transient {
                api: API,
                message: format!("login answered HTTP {status}"),
            }));
        }
        if !status.is_success() {
            let (message, invalid_grant) = match serde_json::from_str::<TokenError>(&body) {
                Ok(e) => (
                    format!("{}: {}", e.error, e.error_description),
                    e.error == "invalid_grant",
                ),
                Err(_) => (format!("HTTP {status}: {}", excerpt(&body)), false),
            };
            return Err(TokenFailure {
                error: ConnectorError::Auth {
                    api: API,
                    message,
                    hint: self.creds.hint().into(),
                },
                invalid_grant,
            });
        }
        serde_json::from_str(&body).map_err(|_| {
            TokenFailure::other(ConnectorError::Protocol {
                api: API,
                message: "the token endpoint answered without access_token/instance_url".into(),
            })
        })
    }

    /// Keeps a rotated refresh token and turns a token answer into a session.
    async fn session_from(&self, answer: TokenAnswer, previous: u64) -> Session {
        if let Some(new) = answer.refresh_token {
            self.keep_refresh_token(new).await;
        }
        Session {
            access_token: answer.access_token,
            instance_url: answer.instance_url.trim_end_matches('/').to_owned(),
            generation: previous + 1,
        }
    }

    /// The newest refresh token, read afresh for every login: a rotated one the state file
    /// could not take (no state file, or the write failed), else the one in the state file
    /// (whichever process stored it), else the configured one.
    async fn current_refresh_token(&self, configured: &SecretString) -> SecretString {
        if let Some(t) = self.rotated_refresh.lock().await.clone() {
            return t;
        }
        if let Some(t) = self.stored_refresh_token().await {
            return t;
        }
        configured.clone()
    }

    /// The refresh token in the state file, if there is one.
    async fn stored_refresh_token(&self) -> Option<SecretString> {
        let store = self.store.as_ref()?;
        match store.get(REFRESH_TOKEN_KEY).await {
            Ok(Some(serde_json::Value::String(t))) if !t.is_empty() => Some(SecretString::from(t)),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the kept salesforce refresh token");
                None
            }
        }
    }

    /// Stores a rotated refresh token for every process sharing the state file. Only a token
    /// the state file did not take stays in memory: one that did is read back from there, so a
    /// rotation by another process is seen.
    async fn keep_refresh_token(&self, token: SecretString) {
        let saved = match &self.store {
            Some(store) => {
                let value = serde_json::Value::String(token.expose_secret().to_owned());
                match store.set(REFRESH_TOKEN_KEY, &value).await {
                    Ok(()) => true,
                    Err(e) => {
                        // The login itself worked; the next restart would fall back to the
                        // configured token, which Salesforce may have invalidated. Say so loudly.
                        tracing::error!(error = %e, "cannot keep the rotated salesforce refresh token in the state file");
                        false
                    }
                }
            }
            None => false,
        };
        *self.rotated_refresh.lock().await = if saved { None } else { Some(token) };
    }

    /// Drops the in-memory refresh token once Salesforce has refused it, so later logins go
    /// back to the state file (or the configured token).
    async fn forget_unsaved_refresh_token(&self, refused: &SecretString) {
        let mut kept = self.rotated_refresh.lock().await;
        if kept
            .as_ref()
            .is_some_and(|t| t.expose_secret() == refused.expose_secret())
        {
            *kept = None;
        }
    }
}
