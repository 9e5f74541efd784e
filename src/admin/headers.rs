//! What every review UI response is made of: the API's error codes ([`ErrorCode`], [`ApiError`]), response
//! helpers (`full`, `json`, `error`, `redirect`), and the strict CSP and other security headers
//! ([`secure_headers`]) `admin::web` puts on every response.
#![deny(unsafe_code)]

use std::convert::Infallible;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full};
use serde::Serialize;

pub const CSP: &str = "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; \
img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; base-uri 'none'; \
frame-ancestors 'none'; form-action 'self'";

pub type Body = UnsyncBoxBody<Bytes, Infallible>;
pub type Resp = Response<Body>;

/// A stable error code of the API, with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Unauthenticated,
    SessionExpired,
    BadCredentials,
    AccountLocked,
    RateLimited,
    CsrfRejected,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    BadRequest,
    QueryTooLong,
    BadCursor,
    BodyTooLarge,
    NotLive,
    LiveSealed,
    Unavailable,
    /// A recording fetched from the fleet's object store does not match its manifest or audit record.
    RecordingUnverified,
    Internal,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::Unauthenticated | ErrorCode::SessionExpired | ErrorCode::BadCredentials => {
                StatusCode::UNAUTHORIZED
            }
            ErrorCode::AccountLocked | ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::CsrfRejected | ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::BadRequest | ErrorCode::QueryTooLong | ErrorCode::BadCursor => {
                StatusCode::BAD_REQUEST
            }
            ErrorCode::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::NotLive | ErrorCode::LiveSealed | ErrorCode::RecordingUnverified => {
                StatusCode::CONFLICT
            }
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An API error: `{"error": code, "message": ...}`.
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    pub error: ErrorCode,
    pub message: String,
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(error: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            error,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn not_found() -> ApiError {
        ApiError::new(ErrorCode::NotFound, "no such session, channel or object")
    }

    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        tracing::warn!(error = %e, "review UI request failed");
        ApiError::new(ErrorCode::Internal, "internal error; see the gateway log")
    }
}

pub fn full(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Resp {
    full(
        status,
        "application/json",
        serde_json::to_vec(body).unwrap_or_default(),
    )
}

pub fn error(e: &ApiError) -> Resp {
    let mut r = json(e.error.status(), e);
    if let Some(s) = e.retry_after {
        r.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

pub(super) fn redirect(to: &str) -> Resp {
    let mut r = full(StatusCode::SEE_OTHER, "text/plain", "");
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(http::header::LOCATION, v);
    }
    r
}

pub(super) fn secure_headers(r: &mut Resp, cacheable: bool) {
    let h = r.headers_mut();
    let mut set = |k: &'static str, v: &'static str| {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    };
    set("content-security-policy", CSP);
    set("x-content-type-options", "nosniff");
    set("referrer-policy", "no-referrer");
    set("cross-origin-opener-policy", "same-origin");
    set("cross-origin-resource-policy", "same-origin");
    set("x-frame-options", "DENY");
    set(
        "permissions-policy",
        "camera=(), microphone=(), geolocation=(), usb=(), payment=()",
    );
    if !cacheable {
        set("cache-control", "no-store");
    } else {
        set("cache-control", "no-cache");
    }
}
