//! Who is asking, on the admin port (DESIGN "Who may see what").
//!
//! It owns the port's gatekeeping and nothing else: which Host names are answered (DNS
//! rebinding), who the caller is (a Bearer token, a console session, or a person a trusted
//! sign-in proxy names), whether reading CRM data needs that, and the console's sessions and
//! their cross-site-request protection. One middleware ([`gate`]) decides before any handler
//! runs and leaves the caller in the request's extensions ([`Caller`]); the handlers that act
//! ask it for the operator role ([`Caller::operator`]).
//!
//! Sessions are signed, not stored: a cookie holds a random id, its role and expiry, and an
//! HMAC keyed by that role's token. Every replica that shares the tokens accepts it (a load
//! balancer in front of several replicas needs no sticky sessions), the token itself never
//! leaves the server, and rotating a token ends every session made with it. The cookie is
//! HttpOnly and SameSite=Strict, and its name carries the port (cookies are not scoped to
//! ports). An action made with a session or through the proxy also carries `X-CSRF-Token`, a
//! value derived from the session (or the person's name) that a page of another site cannot
//! read and a form cannot send; a Bearer request needs none (a browser never adds that header
//! across sites by itself).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::hmac;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use crate::config::{AdminRole, AdminSettings};
use crate::service::AdminTokens;

/// The header an action made from the console carries (see the module's docs).
pub const CSRF_HEADER: &str = "x-csrf-token";

/// Routes that answer without a credential and whatever the Host: probes and scrapers (a
/// kubelet's probe names the pod's address, not a host name), and nothing in them is CRM data.
const PROBES: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// The admin port's gatekeeper, built once from the settings and the tokens.
pub struct Auth {
    reads_need_credentials: bool,
    bound_to_loopback: bool,
    allowed_hosts: Vec<String>,
    trusted_user_header: Option<header::HeaderName>,
    trusted_proxies: Vec<ipnet::IpNet>,
    trusted_role: AdminRole,
    session_ttl: Duration,
    cookie_name: String,
    operator: Option<Credential>,
    viewer: Option<Credential>,
    csrf_key: hmac::Key,
}

struct Credential {
    token: SecretString,
    /// Signs this role's sessions: derived from the token, so a new token ends old sessions.
    session_key: hmac::Key,
}

impl Credential {
    fn new(token: &SecretString) -> Credential {
        let derived = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, token.expose_secret().as_bytes()),
            b"pendo-sync console session v1",
        );
        Credential {
            token: token.clone(),
            session_key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
        }
    }
}

/// How the caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// `Authorization: Bearer` (the CLI, scripts).
    Bearer,
    /// A console session (cookie); its id.
    Session(String),
    /// A person a trusted sign-in proxy named.
    Proxy,
}

/// A caller with a credential.
#[derive(Debug, Clone)]
pub struct Principal {
    pub role: AdminRole,
    /// Recorded as "who" by hold decisions and queue actions.
    pub who: String,
    pub via: Via,
    /// The person a trusted proxy named, also when a token gave the role.
    pub proxy_user: Option<String>,
}

/// The caller of one request (none: no credential), left in the request's extensions.
#[derive(Debug, Clone, Default)]
pub struct Caller(pub Option<Principal>);

impl Caller {
    /// The operator's name for the record, or the answer refusing the action.
    pub fn operator(&self, auth: &Auth) -> Result<String, Box<Response>> {
        Err(Box::new(match &self.0 {
            Some(p) if p.role == AdminRole::Operator => return Ok(p.who.clone()),
            Some(p) => refusal(
                StatusCode::FORBIDDEN,
                &format!(
                    "{} may read but not act: actions need the operator token (admin.token)",
                    p.who
                ),
            ),
            None if !auth.actions_possible() => refusal(
                StatusCode::FORBIDDEN,
                "set admin.token to enable POST endpoints",
            ),
            None => (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                axum::Json(json!({
                    "error": "a valid admin token is required (Authorization: Bearer ..., or sign in to the console)"
                })),
            )
                .into_response(),
        }))
    }
}

fn refusal(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

impl Auth {
    pub fn new(admin: &AdminSettings, tokens: &AdminTokens) -> Auth {
        let operator = tokens.operator.as_ref().map(Credential::new);
        let viewer = tokens.viewer.as_ref().map(Credential::new);
        // Derived from the tokens, so every replica derives the same; random (this process
        // only) where there is no token at all.
        let mut material = Vec::new();
        for t in [&tokens.operator, &tokens.viewer].into_iter().flatten() {
            material.extend_from_slice(t.expose_secret().as_bytes());
            material.push(0);
        }
        if material.is_empty() {
            material = vec![0; 32];
            aws_lc_rs::rand::fill(&mut material).expect("the system's random source works");
        }
        let csrf = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &material),
            b"pendo-sync console csrf v1",
        );
        let port = admin.listen.parse::<SocketAddr>().map_or(0, |a| a.port());
        Auth {
            reads_need_credentials: admin.reads_need_credentials,
            bound_to_loopback: admin.is_loopback(),
            allowed_hosts: admin.allowed_hosts.clone(),
            trusted_user_header: admin
                .trusted_user_header
                .as_deref()
                .and_then(|h| header::HeaderName::try_from(h).ok()),
            trusted_proxies: admin.trusted_proxy_nets.clone(),
            trusted_role: admin.trusted_role,
            session_ttl: admin.session_ttl,
            cookie_name: format!("pendo_sync_session_{port}"),
            operator,
            viewer,
            csrf_key: hmac::Key::new(hmac::HMAC_SHA256, csrf.as_ref()),
        }
    }

    /// Whether anyone can act at all (an operator token, or a proxy that grants the role).
    fn actions_possible(&self) -> bool {
        self.operator.is_some()
            || (self.trusted_user_header.is_some() && self.trusted_role == AdminRole::Operator)
    }

    /// Whether the console can be signed in to (a token is configured).
    pub fn sign_in_possible(&self) -> bool {
        self.operator.is_some() || self.viewer.is_some()
    }

    pub fn reads_need_credentials(&self) -> bool {
        self.reads_need_credentials
    }

    /// Whether a request addressed to `host` (the Host header) is answered.
    pub fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host);
        if is_loopback_name(&name) {
            return true;
        }
        if self.allowed_hosts.is_empty() {
            // A loopback port is reached by loopback names only; another port by names this
            // process cannot know, unless they are listed.
            return !self.bound_to_loopback;
        }
        self.allowed_hosts.contains(&name)
    }

    /// The role a token gives, if it is one of ours.
    fn role_of_token(&self, given: &str) -> Option<AdminRole> {
        let matches = |c: &Option<Credential>| {
            c.as_ref()
                .is_some_and(|c| same_secret(given.as_bytes(), c.token.expose_secret().as_bytes()))
        };
        // Both compared, always: the time taken does not tell which matched.
        let (op, view) = (matches(&self.operator), matches(&self.viewer));
        if op {
            Some(AdminRole::Operator)
        } else if view {
            Some(AdminRole::Viewer)
        } else {
            None
        }
    }

    /// A new session for `role`: the cookie's value.
    fn new_session(&self, role: AdminRole, now_secs: u64) -> Option<String> {
        let credential = self.credential(role)?;
        let mut id = [0u8; 16];
        aws_lc_rs::rand::fill(&mut id).ok()?;
        let payload = format!(
            "{}.{}.{}",
            role.as_str(),
            now_secs + self.session_ttl.as_secs(),
            hex(&id)
        );
        let mac = hmac::sign(&credential.session_key, payload.as_bytes());
        Some(format!("{payload}.{}", hex(mac.as_ref())))
    }

    fn credential(&self, role: AdminRole) -> Option<&Credential> {
        match role {
            AdminRole::Operator => self.operator.as_ref(),
            AdminRole::Viewer => self.viewer.as_ref(),
        }
    }

    /// The session a cookie's value names: its role and id, if it is ours and not expired.
    fn session(&self, value: &str, now_secs: u64) -> Option<(AdminRole, String)> {
        let (payload, mac) = value.rsplit_once('.')?;
        let mut parts = payload.split('.');
        let role = match parts.next()? {
            "operator" => AdminRole::Operator,
            "viewer" => AdminRole::Viewer,
            _ => return None,
        };
        let expires: u64 = parts.next()?.parse().ok()?;
        let id = parts.next()?;
        if parts.next().is_some() || expires <= now_secs {
            return None;
        }
        let credential = self.credential(role)?;
        hmac::verify(&credential.session_key, payload.as_bytes(), &unhex(mac)?).ok()?;
        Some((role, id.to_owned()))
    }

    /// The `X-CSRF-Token` value a principal's actions carry; none for Bearer callers.
    pub fn csrf_token(&self, principal: &Principal) -> Option<String> {
        let seed = match &principal.via {
            Via::Bearer => return None,
            Via::Session(id) => format!("session:{id}"),
            Via::Proxy => format!("proxy:{}", principal.who),
        };
        let tag = hmac::sign(&self.csrf_key, seed.as_bytes());
        Some(hex(&tag.as_ref()[..16]))
    }

    /// The person a trusted proxy names, if the request came from one.
    fn proxy_user(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Option<String> {
        let name = self.trusted_user_header.as_ref()?;
        let peer = peer?;
        if !self.trusted_proxies.iter().any(|n| n.contains(&peer)) {
            return None;
        }
        let value = headers.get(name)?.to_str().ok()?;
        let clean: String = value
            .trim()
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        (!clean.is_empty()).then_some(clean)
    }

    /// Who is asking: a Bearer token, else a session cookie; a trusted proxy's person names
    /// the caller (and gives its role, if higher).
    pub fn identify(&self, headers: &HeaderMap, peer: Option<IpAddr>, now_secs: u64) -> Caller {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|t| self.role_of_token(t))
            .map(|role| Principal {
                role,
                who: match role {
                    AdminRole::Operator => "admin-api".to_owned(),
                    AdminRole::Viewer => "admin-api (viewer)".to_owned(),
                },
                via: Via::Bearer,
                proxy_user: None,
            });
        let principal = bearer.or_else(|| {
            let value = cookie(headers, &self.cookie_name)?;
            let (role, id) = self.session(value, now_secs)?;
            Some(Principal {
                role,
                who: match role {
                    AdminRole::Operator => "console".to_owned(),
                    AdminRole::Viewer => "console (viewer)".to_owned(),
                },
                via: Via::Session(id),
                proxy_user: None,
            })
        });
        let proxied = self.proxy_user(headers, peer);
        Caller(match (principal, proxied) {
            (Some(mut p), Some(person)) => {
                p.role = p.role.max(self.trusted_role);
                p.who = person.clone();
                p.proxy_user = Some(person);
                Some(p)
            }
            (Some(p), None) => Some(p),
            (None, Some(person)) => Some(Principal {
                role: self.trusted_role,
                who: person.clone(),
                via: Via::Proxy,
                proxy_user: Some(person),
            }),
            (None, None) => None,
        })
    }

    /// The `Set-Cookie` value that starts a session for `role`.
    pub fn session_cookie(&self, role: AdminRole, secure: bool, now_secs: u64) -> Option<String> {
        let value = self.new_session(role, now_secs)?;
        Some(format!(
            "{}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            self.cookie_name,
            self.session_ttl.as_secs(),
            if secure { "; Secure" } else { "" }
        ))
    }

    /// The `Set-Cookie` value that ends the session in this browser.
    pub fn expired_cookie(&self) -> String {
        format!(
            "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
            self.cookie_name
        )
    }

    /// Signs in with `token`: the role it gives, or none.
    pub fn sign_in(&self, token: &str) -> Option<AdminRole> {
        self.role_of_token(token.trim())
    }

    /// Whether the request came through a trusted proxy that says the browser used HTTPS (the
    /// cookie is then marked Secure).
    pub fn behind_https_proxy(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> bool {
        peer.is_some_and(|p| self.trusted_proxies.iter().any(|n| n.contains(&p)))
            && headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("https"))
    }
}

/// Compares without an early exit, so the answer time does not tell how much of a guess matched.
pub(super) fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for i in 0..given.len().max(expected.len()) {
        let a = given.get(i).copied().unwrap_or(0);
        let b = expected.get(i).copied().unwrap_or(0);
        diff |= usize::from(a ^ b);
    }
    std::hint::black_box(diff) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One cookie's value from the `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The name in a Host header, lower case, without its port.
fn host_name(host: &str) -> String {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.to_ascii_lowercase()
}

/// `localhost`, a 127.x.y.z address or `::1`.
fn is_loopback_name(name: &str) -> bool {
    name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn is_probe(path: &str) -> bool {
    PROBES.contains(&path)
}

/// Routes that need no credential even where reads do: the probes, the console's assets, and
/// signing in and out.
fn is_open(path: &str) -> bool {
    is_probe(path)
        || path.starts_with("/assets/")
        || matches!(path, "/signin" | "/signout" | "/session")
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The request's peer address (absent when the router is driven without a socket).
pub fn peer(request: &Request) -> Option<IpAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// The gate before every route: the Host check, who is asking, whether reads need that, and
/// the cross-site check of actions made with a session or through the proxy.
pub async fn gate(State(auth): State<Arc<Auth>>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    if !is_probe(&path) {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !auth.host_allowed(host) {
            let message = if auth.allowed_hosts.is_empty() {
                "this admin port answers requests for localhost, 127.0.0.1 or [::1] only (list other names in admin.allowed_hosts)".to_owned()
            } else {
                format!(
                    "this admin port answers requests for {} and loopback names only (admin.allowed_hosts)",
                    auth.allowed_hosts.join(", ")
                )
            };
            return refusal(StatusCode::MISDIRECTED_REQUEST, &message);
        }
    }
    let caller = auth.identify(request.headers(), peer(&request), now_secs());
    let unsafe_method = !matches!(*request.method(), Method::GET | Method::HEAD);
    if unsafe_method
        && path != "/signin"
        && let Some(p) = &caller.0
        && let Some(expected) = auth.csrf_token(p)
    {
        let given = request
            .headers()
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !same_secret(given.as_bytes(), expected.as_bytes()) {
            return refusal(
                StatusCode::FORBIDDEN,
                "cross-site request refused: an action from the console carries its X-CSRF-Token (reload the page)",
            );
        }
    }
    if auth.reads_need_credentials && caller.0.is_none() && !is_open(&path) {
        if path.starts_with("/v1/") {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                axum::Json(json!({
                    "error": "this admin port shows CRM data to callers with a token only (Authorization: Bearer <admin.token or admin.viewer_token>)"
                })),
            )
                .into_response();
        }
        let next_path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        return super::console::sign_in_page(
            &auth,
            StatusCode::UNAUTHORIZED,
            &next_path,
            "Sign in to see this page: it shows CRM data.",
        );
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml_admin: impl FnOnce(&mut AdminSettings)) -> AdminSettings {
        let mut a = AdminSettings::default();
        toml_admin(&mut a);
        a
    }

    fn tokens() -> AdminTokens {
        AdminTokens {
            operator: Some(SecretString::from("op-token")),
            viewer: Some(SecretString::from("view-token")),
        }
    }

    #[test]
    fn loopback_hosts() {
        let auth = Auth::new(&AdminSettings::default(), &tokens());
        for ok in [
            "localhost",
            "LOCALHOST:9464",
            "127.0.0.1:9464",
            "127.1.2.3",
            "[::1]:9464",
            "[::1]",
        ] {
            assert!(auth.host_allowed(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:9464",
            "localhost.evil.example",
            "10.0.0.1:9464",
            "[::2]:1",
        ] {
            assert!(!auth.host_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn allowed_hosts_are_answered_and_others_are_not_on_any_bind() {
        let wide = settings(|a| a.listen = "0.0.0.0:9464".into());
        assert!(Auth::new(&wide, &tokens()).host_allowed("anything.example"));
        let listed = settings(|a| {
            a.listen = "0.0.0.0:9464".into();
            a.allowed_hosts = vec!["pendo-sync.internal".into()];
        });
        let auth = Auth::new(&listed, &tokens());
        assert!(auth.host_allowed("pendo-sync.internal:9464"));
        assert!(auth.host_allowed("PENDO-SYNC.internal"));
        assert!(
            auth.host_allowed("127.0.0.1:9464"),
            "the CLI reaches it over loopback"
        );
        assert!(!auth.host_allowed("evil.example"));
        assert!(!auth.host_allowed("10.1.2.3:9464"));
    }

    #[test]
    fn a_session_carries_its_role_and_nothing_forged_or_expired_passes() {
        let auth = Auth::new(&AdminSettings::default(), &tokens());
        let now = 1_000_000;
        let value = auth.new_session(AdminRole::Viewer, now).unwrap();
        assert!(!value.contains("view-token") && !value.contains("op-token"));
        let (role, id) = auth.session(&value, now).unwrap();
        assert_eq!(role, AdminRole::Viewer);
        assert_eq!(id.len(), 32);
        // Promoted to operator by hand: the MAC does not match the operator's key.
        let forged = value.replacen("viewer", "operator", 1);
        assert!(auth.session(&forged, now).is_none());
        // Expired.
        let ttl = AdminSettings::default().session_ttl.as_secs();
        assert!(auth.session(&value, now + ttl).is_none());
        // Another token: every session made with the old one ends.
        let rotated = Auth::new(
            &AdminSettings::default(),
            &AdminTokens {
                operator: Some(SecretString::from("op-token")),
                viewer: Some(SecretString::from("new-view-token")),
            },
        );
        assert!(rotated.session(&value, now).is_none());
        // Two sessions differ.
        assert_ne!(value, auth.new_session(AdminRole::Viewer, now).unwrap());
    }

    #[test]
    fn a_trusted_proxy_names_the_person_only_from_its_addresses() {
        let admin = settings(|a| {
            a.trusted_user_header = Some("X-Forwarded-Email".into());
            a.trusted_proxy_nets = vec!["10.0.0.0/8".parse().unwrap()];
        });
        let auth = Auth::new(&admin, &tokens());
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-email", "ana@acme.com".parse().unwrap());
        let from_proxy = auth.identify(&h, Some("10.2.3.4".parse().unwrap()), 0);
        let p = from_proxy.0.unwrap();
        assert_eq!(
            (p.role, p.who.as_str()),
            (AdminRole::Viewer, "ana@acme.com")
        );
        assert!(
            auth.identify(&h, Some("192.168.0.9".parse().unwrap()), 0)
                .0
                .is_none()
        );
        assert!(auth.identify(&h, None, 0).0.is_none());
        // With the operator token as well: the token's role, the person's name.
        h.insert(header::AUTHORIZATION, "Bearer op-token".parse().unwrap());
        let p = auth
            .identify(&h, Some("10.2.3.4".parse().unwrap()), 0)
            .0
            .unwrap();
        assert_eq!(
            (p.role, p.who.as_str()),
            (AdminRole::Operator, "ana@acme.com")
        );
    }

    #[test]
    fn secrets_compare_equal_only_when_identical() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cret", b"s3cres"));
        assert!(!same_secret(b"s3cre", b"s3cret"));
        assert!(!same_secret(b"", b"s3cret"));
        assert!(!same_secret(b"s3cret\0", b"s3cret"));
    }
}
