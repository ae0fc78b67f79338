//! Who may talk to the daemon, checked on every request before it is routed:
//!
//! - **Host**: the request's `Host` must name this daemon — a loopback name (`localhost`,
//!   `127.0.0.1`, `[::1]`), the address it listens on, or one given with `--allow-host`.
//!   A page whose name was rebound to 127.0.0.1 (DNS rebinding) sends its own name, and is
//!   refused (403).
//! - **Origin**: browsers send `Origin` on cross-site requests; one is accepted only when it
//!   was given with `--allow-origin`, so that no web page the user opens can drive the daemon
//!   (CSRF). Clients that are not browsers send none.
//! - **CORS**: for an origin given with `--allow-origin` (and only for those), a preflight
//!   (`OPTIONS` with that `Origin`) is answered 204 with the methods and headers the API
//!   takes, and every answer carries `Access-Control-Allow-Origin: ORIGIN` and
//!   `Vary: Origin`. Nothing CORS-related is sent for any other request.
//! - **API key**: with `--api-key` (or `SHOAL_API_KEY`), every request but `GET /health`
//!   carries `Authorization: Bearer KEY`, compared in constant time; without it, 401.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// What the guard lets in.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    /// The API key, if the daemon has one.
    pub api_key: Option<String>,
    /// Host names (without port) accepted besides the loopback ones, lower case.
    pub hosts: Vec<String>,
    /// Origins accepted (`scheme://host[:port]`), lower case.
    pub origins: Vec<String>,
}

/// Names every loopback daemon answers to.
const LOOPBACK: &[&str] = &["localhost", "127.0.0.1", "[::1]", "::1"];

/// `host` without its port (`[::1]:7433` → `[::1]`, `a:1` → `a`).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h)
}

/// Compares without stopping at the first difference (the time does not tell how much of a
/// guessed key was right).
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

/// A header's value as text, cut for messages.
fn shown(h: &HeaderMap, name: header::HeaderName) -> Option<String> {
    h.get(name).map(|v| {
        let s = String::from_utf8_lossy(v.as_bytes());
        crate::error::shown(&s, 80)
    })
}

/// What a preflight allows.
const CORS_METHODS: &str = "GET, POST, DELETE, OPTIONS";
const CORS_HEADERS: &str = "authorization, content-type, x-request-id";
/// How long a browser may keep a preflight's answer, in seconds.
const CORS_MAX_AGE: &str = "600";

impl Guard {
    /// The request's `Origin` when it is one of the allowed ones (as sent).
    pub fn allowed_origin(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        let o = String::from_utf8_lossy(origin.as_bytes()).to_ascii_lowercase();
        self.origins.contains(&o).then(|| origin.clone())
    }

    /// Why `headers` may not reach the API, if they may not.
    pub fn check(&self, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
        self.check_site(headers)?;
        self.check_key(path, headers)
    }

    /// Host and Origin.
    fn check_site(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).map(str::to_ascii_lowercase);
        let Some(host) = host else {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "a request needs a Host header"));
        };
        let name = host_name(&host);
        if !LOOPBACK.contains(&name) && !self.hosts.iter().any(|h| h == name) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "Host `{}` is not this daemon's name; it answers to localhost, 127.0.0.1 and [::1] \
                     (add names with --allow-host)",
                    shown(headers, header::HOST).unwrap_or_default()
                ),
            ));
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let o = String::from_utf8_lossy(origin.as_bytes()).to_ascii_lowercase();
            if !self.origins.contains(&o) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "requests from web pages are refused (Origin `{}`); allow an origin with --allow-origin",
                        shown(headers, header::ORIGIN).unwrap_or_default()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The API key.
    fn check_key(&self, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
        if let Some(key) = &self.api_key
            && path != "/health"
        {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
                .map(<[u8]>::trim_ascii);
            if !given.is_some_and(|g| same(g, key.as_bytes())) {
                let mut e = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "this daemon needs its API key: send `Authorization: Bearer KEY` (shoal's clients \
                     read SHOAL_API_KEY)",
                );
                e.code = Some("invalid_api_key");
                return Err(e);
            }
        }
        Ok(())
    }
}

/// The middleware: refuses what [`Guard::check`] refuses, answers CORS preflights of
/// allowed origins (without the API key, which browsers do not send on them), and marks
/// the answers to allowed origins.
pub async fn layer(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let origin = guard.allowed_origin(req.headers());
    let mut r = match (&origin, req.method()) {
        (Some(_), &Method::OPTIONS) => match guard.check_site(req.headers()) {
            Ok(()) => preflight(),
            Err(e) => e.into_response(),
        },
        _ => match guard.check(req.uri().path(), req.headers()) {
            Ok(()) => next.run(req).await,
            Err(e) => {
                let unauthorized = e.status == StatusCode::UNAUTHORIZED;
                let mut r = e.into_response();
                if unauthorized {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                }
                r
            }
        },
    };
    if let Some(o) = origin {
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    r
}

/// A preflight's answer (the origin is added by [`layer`]).
fn preflight() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(CORS_METHODS));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(CORS_HEADERS));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(CORS_MAX_AGE));
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("x-request-id"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn hosts_origins_and_keys() {
        let g = Guard { api_key: Some("sekrit".into()), hosts: vec!["box.lan".into()], origins: vec![] };
        let ok = |p: &[(&'static str, &str)]| g.check("/v1/actors", &headers(p)).map_err(|e| e.status.as_u16());
        assert_eq!(ok(&[("host", "127.0.0.1:7433"), ("authorization", "Bearer sekrit")]), Ok(()));
        assert_eq!(ok(&[("host", "[::1]:1"), ("authorization", "Bearer sekrit")]), Ok(()));
        assert_eq!(ok(&[("host", "box.lan:80"), ("authorization", "Bearer sekrit")]), Ok(()));
        assert_eq!(ok(&[("host", "evil.example:7433"), ("authorization", "Bearer sekrit")]), Err(403));
        assert_eq!(ok(&[("host", "localhost"), ("authorization", "Bearer sekri")]), Err(401));
        assert_eq!(ok(&[("host", "localhost"), ("authorization", "Bearer sekritt")]), Err(401));
        assert_eq!(ok(&[("host", "localhost")]), Err(401));
        assert_eq!(ok(&[("authorization", "Bearer sekrit")]), Err(400));
        assert_eq!(
            ok(&[("host", "localhost"), ("authorization", "Bearer sekrit"), ("origin", "http://evil.example")]),
            Err(403)
        );
        assert_eq!(g.check("/health", &headers(&[("host", "localhost")])).map_err(|e| e.status.as_u16()), Ok(()));
        let g = Guard { origins: vec!["http://localhost:3000".into()], ..Guard::default() };
        let h = headers(&[("host", "localhost"), ("origin", "http://localhost:3000")]);
        assert!(g.check("/v1/actors", &h).is_ok());
    }

    #[test]
    fn host_names_lose_their_port() {
        assert_eq!(host_name("a.b:80"), "a.b");
        assert_eq!(host_name("[::1]:7433"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
        assert_eq!(host_name("localhost"), "localhost");
    }
}
