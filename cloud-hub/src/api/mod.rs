//! The hub's fleet HTTP API, `/api/v1`: routes over a [`FleetData`] store,
//! scoped bearer tokens, per-token rate limits, one JSON error shape, cursor
//! pagination, an OpenAPI document, server-sent events, and the driver that
//! runs the rollout engine against the store.
//!
//! ```
//! use std::sync::Arc;
//! use cloud_hub::api::{self, ApiState, ManualClock, Scope};
//! use cloud_hub::api::auth::RateLimit;
//! use cloud_hub::api::data::MemoryFleet;
//!
//! let state = ApiState::new(
//!     Arc::new(MemoryFleet::default()),
//!     Arc::new(ManualClock::new(1_700_000_000_000)),
//!     RateLimit::default(),
//! );
//! let token = state.tokens.create_user_token("alice", Scope::Admin).unwrap();
//! assert!(token.starts_with("fsu_"));
//! let _router: axum::Router = api::router(state);
//! ```

pub mod auth;
pub mod data;
pub mod error;
mod handlers;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{MethodRouter, get, post};
use schemas::time::Timestamp;
use schemas::{SiteId, TenantId};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use auth::{Caller, RateLimit, RateLimiter, Scope, TokenStore};
pub use data::{FleetData, MemoryFleet};
pub use error::ApiError;
pub use handlers::{drive_rollouts, run_rollout_driver};

/// The OpenAPI 3 document of this API (written by hand; a test checks it
/// against the router).
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// Where time comes from: wall time for records, monotonic time for rate
/// limits.
pub trait Clock: Send + Sync + 'static {
    /// Wall-clock time.
    fn now(&self) -> Timestamp;
    /// Monotonic time since an arbitrary origin.
    fn monotonic(&self) -> Duration;
}

/// The real clock.
#[derive(Debug, Clone)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    // The one place the API reads the system clock.
    #[allow(clippy::disallowed_methods)]
    fn now(&self) -> Timestamp {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Timestamp(ms)
    }
    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock tests move by hand; wall and monotonic time advance together.
#[derive(Debug)]
pub struct ManualClock {
    start_ms: i64,
    offset_ms: AtomicI64,
}

impl ManualClock {
    /// A clock showing wall time `start_ms`.
    pub fn new(start_ms: i64) -> ManualClock {
        ManualClock {
            start_ms,
            offset_ms: AtomicI64::new(0),
        }
    }
    /// Move time forward by `ms`.
    pub fn advance(&self, ms: i64) {
        self.offset_ms.fetch_add(ms.max(0), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.start_ms + self.offset_ms.load(Ordering::SeqCst))
    }
    fn monotonic(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.offset_ms.load(Ordering::SeqCst)).unwrap_or(0))
    }
}

/// A live change, sent to `GET /api/v1/events` subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubEvent {
    /// `alarm`, `command`, `rollout`, `device`, ...
    pub kind: String,
    pub tenant: Option<TenantId>,
    pub site: Option<SiteId>,
    pub at: Timestamp,
    pub data: serde_json::Value,
}

/// Tunables of the API.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiConfig {
    /// Page size when `limit` is absent.
    pub default_limit: usize,
    /// Largest `limit` accepted.
    pub max_limit: usize,
    /// An edge not seen for this long is offline.
    pub offline_after_ms: i64,
    /// Command lifetime when the request gives none.
    pub command_ttl_ms: i64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            default_limit: 50,
            max_limit: 500,
            offline_after_ms: 60_000,
            command_ttl_ms: 300_000,
        }
    }
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub data: Arc<dyn FleetData>,
    pub tokens: Arc<TokenStore>,
    pub limiter: Arc<RateLimiter>,
    pub clock: Arc<dyn Clock>,
    pub events: broadcast::Sender<HubEvent>,
    pub config: ApiConfig,
    /// Serialises read-modify-write of rollouts.
    rollout_lock: Arc<tokio::sync::Mutex<()>>,
}

impl ApiState {
    /// State over `data` with a fresh token store and default tunables.
    pub fn new(data: Arc<dyn FleetData>, clock: Arc<dyn Clock>, rate: RateLimit) -> ApiState {
        let (events, _) = broadcast::channel(1024);
        ApiState {
            data,
            tokens: Arc::new(TokenStore::default()),
            limiter: Arc::new(RateLimiter::new(rate)),
            clock,
            events,
            config: ApiConfig::default(),
            rollout_lock: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Send an event to subscribers (none listening is fine).
    pub fn publish(&self, e: HubEvent) {
        let _ = self.events.send(e);
    }
}

/// One registered route.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteInfo {
    /// Upper-case HTTP method.
    pub method: &'static str,
    /// Path with `{param}` placeholders.
    pub path: &'static str,
}

struct Routes {
    router: Router<ApiState>,
    list: Vec<RouteInfo>,
}

impl Routes {
    fn add(
        mut self,
        path: &'static str,
        methods: &[&'static str],
        mr: MethodRouter<ApiState>,
    ) -> Self {
        self.router = self.router.route(path, mr);
        self.list
            .extend(methods.iter().map(|&method| RouteInfo { method, path }));
        self
    }
}

/// The `/api/v1` router and the list of routes it serves.
pub fn router_with_routes(state: ApiState) -> (Router, Vec<RouteInfo>) {
    use handlers as h;
    let r = Routes {
        router: Router::new(),
        list: Vec::new(),
    }
    .add("/api/v1/openapi.json", &["GET"], get(h::openapi))
    .add("/api/v1/sites", &["GET"], get(h::list_sites))
    .add("/api/v1/edges", &["GET"], get(h::list_edges))
    .add("/api/v1/health", &["GET"], get(h::fleet_health))
    .add("/api/v1/devices", &["GET"], get(h::list_devices))
    .add("/api/v1/devices/{id}", &["GET"], get(h::get_device))
    .add("/api/v1/telemetry", &["GET"], get(h::telemetry))
    .add("/api/v1/telemetry/top", &["GET"], get(h::telemetry_top))
    .add("/api/v1/alarms", &["GET"], get(h::list_alarms))
    .add("/api/v1/alarms/{id}/ack", &["POST"], post(h::ack_alarm))
    .add(
        "/api/v1/commands",
        &["GET", "POST"],
        get(h::list_commands).post(h::create_command),
    )
    .add("/api/v1/commands/{id}", &["GET"], get(h::get_command))
    .add(
        "/api/v1/rollouts",
        &["GET", "POST"],
        get(h::list_rollouts).post(h::create_rollout),
    )
    .add("/api/v1/rollouts/{id}", &["GET"], get(h::get_rollout))
    .add(
        "/api/v1/rollouts/{id}/pause",
        &["POST"],
        post(h::pause_rollout),
    )
    .add(
        "/api/v1/rollouts/{id}/resume",
        &["POST"],
        post(h::resume_rollout),
    )
    .add(
        "/api/v1/rollouts/{id}/abort",
        &["POST"],
        post(h::abort_rollout),
    )
    .add("/api/v1/audit", &["GET"], get(h::list_audit))
    .add("/api/v1/sync/heads", &["GET"], get(h::sync_heads))
    .add("/api/v1/events", &["GET"], get(h::events));
    let router = r
        .router
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state);
    (router, r.list)
}

/// The `/api/v1` router.
pub fn router(state: ApiState) -> Router {
    router_with_routes(state).0
}
