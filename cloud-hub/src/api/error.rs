//! The API's single error shape `{ "code", "message", "details" }`, and the
//! extractors (JSON body, query string, path) that map every bad input to it.

use std::collections::HashMap;
use std::str::FromStr;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// An API error: status, a stable machine-readable `code`, a human message,
/// and `details` (for input errors, `{"field": ...}` names the bad input).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: serde_json::Value,
    /// Seconds, for 429 answers.
    pub retry_after_s: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
    details: &'a serde_json::Value,
}

impl ApiError {
    /// An error with empty details.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: serde_json::json!({}),
            retry_after_s: None,
        }
    }

    /// 422: the input named `field` is wrong.
    pub fn invalid(field: &str, message: impl std::fmt::Display) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_input",
            format!("{field}: {message}"),
        );
        e.details = serde_json::json!({ "field": field });
        e
    }

    /// 404 for a resource of `kind` named `id`.
    pub fn not_found(kind: &str, id: &str) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {kind} {id:?}"),
        );
        e.details = serde_json::json!({ "kind": kind, "id": id });
        e
    }

    /// 403: the caller's scope does not cover `what`.
    pub fn forbidden(what: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("token scope does not cover {what}"),
        )
    }

    /// 409: the request conflicts with the current state.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 500 with a message that is safe to show.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// Replace the details.
    pub fn with_details(mut self, details: serde_json::Value) -> ApiError {
        self.details = details;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code,
            message: &self.message,
            details: &self.details,
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after_s
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"fieldsync\""),
            );
        }
        resp
    }
}

/// A JSON body. Unlike `axum::Json`, every failure answers in the API's
/// error shape: 415 without a JSON content type, 400 for malformed JSON,
/// 422 naming the field for a body of the wrong shape.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                let mime = ct.split(';').next().unwrap_or("").trim();
                mime == "application/json" || mime.ends_with("+json")
            });
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected a body with content-type application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("could not read the body: {e}"),
            )
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Deserialize JSON, naming the field at fault.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let inner = e.inner();
            if inner.is_syntax() || inner.is_eof() {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    format!("the body is not valid JSON: {inner}"),
                ));
            }
            let mut field = e.path().to_string();
            let msg = inner.to_string();
            // serde reports a missing field at its parent; name the field.
            if let Some(rest) = msg.strip_prefix("missing field `")
                && let Some(name) = rest.split('`').next()
            {
                field = if field == "." {
                    name.to_string()
                } else {
                    format!("{field}.{name}")
                };
            }
            if field == "." {
                field = "body".to_string();
            }
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            Err(ApiError::invalid(&field, msg))
        }
    }
}

/// The query string as name -> value, refusing repeated names. Routes
/// check names and types through [`Params::take`] and [`Params::finish`].
#[derive(Debug, Clone, Default)]
pub struct Params {
    map: HashMap<String, String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or("");
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("malformed query string: {e}"),
            )
        })?;
        let mut map = HashMap::new();
        for (k, v) in pairs {
            if map.contains_key(&k) {
                return Err(ApiError::invalid(&k, "given more than once"));
            }
            map.insert(k, v);
        }
        Ok(Params { map })
    }
}

impl Params {
    /// Parse a query string by hand (for tests and internal callers).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Params {
        Params {
            map: pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Remove and parse parameter `name`; 422 naming it when it does not parse.
    pub fn take<T: FromStr>(&mut self, name: &str) -> Result<Option<T>, ApiError>
    where
        T::Err: std::fmt::Display,
    {
        match self.map.remove(name) {
            None => Ok(None),
            Some(v) => v
                .parse::<T>()
                .map(Some)
                .map_err(|e| ApiError::invalid(name, format!("{v:?}: {e}"))),
        }
    }

    /// Like [`Params::take`], but the parameter must be present.
    pub fn require<T: FromStr>(&mut self, name: &str) -> Result<T, ApiError>
    where
        T::Err: std::fmt::Display,
    {
        self.take(name)?
            .ok_or_else(|| ApiError::invalid(name, "is required"))
    }

    /// Refuse any parameter no one took.
    pub fn finish(self) -> Result<(), ApiError> {
        let mut left: Vec<&String> = self.map.keys().collect();
        left.sort();
        match left.first() {
            None => Ok(()),
            Some(name) => Err(ApiError::invalid(name, "unknown query parameter")),
        }
    }
}

/// Fallback for paths no route matches.
pub(crate) async fn route_not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "route_not_found",
        format!("no route for {}", uri.path()),
    )
}

/// Fallback for a known path with a method it does not serve.
pub(crate) async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("method {method} is not allowed on this route"),
    )
}
